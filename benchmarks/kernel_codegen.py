"""What our Triton kernels compile to for a GPU, on a machine without one: registers, spills, shared memory and the
width of every global load and store, per launch of a few UNet-shaped calls.

    python benchmarks/kernel_codegen.py [--arch 90] [--sms 132] [--cases group_norm,concat,...] [--json FILE]

Each case calls one of our ops (kernels/) on CPU tensors of the bench_models UNet's shapes (bf16, channels-last), with
every kernel launch recorded instead of run and the ops choosing their launches as on a GPU with `--sms`
multiprocessors. Each recorded launch is then specialised as Triton's JIT does it on a GPU (pointers and integers
divisible by 16, integers equal to 1 made constants: Triton's own binder), compiled for sm_`--arch` with the ptxas that
Triton bundles, and read back: registers, local memory (spills), shared memory, `bar.sync` count, and the global loads
and stores by width in bytes. These are not timings; they say whether a kernel reads bf16 tensors 16 bytes at a time
or element by element (2 bytes), and whether it spills, which tests/kernels/test_kernel_codegen.py checks on the CPU.
Compiles with the Triton installed here, which may not be the GPU machine's (check `triton` in the output). The
specialisation calls Triton's private `create_function_from_signature` and `JITFunction._pack_args` (as in Triton 3.6
to 3.8): a Triton upgrade that changes them breaks this script, loudly, not silently.
"""
from __future__ import annotations

import os

os.environ.pop("TRITON_INTERPRET", None)  # compile for the GPU target; the interpreter would run the kernels instead

import argparse  # noqa: E402
import contextlib  # noqa: E402
import json  # noqa: E402
import re  # noqa: E402
import subprocess  # noqa: E402
import sys  # noqa: E402
import tempfile  # noqa: E402
from collections import Counter  # noqa: E402
from dataclasses import dataclass, field  # noqa: E402
from pathlib import Path  # noqa: E402

import torch  # noqa: E402
import triton  # noqa: E402
from triton.backends.compiler import GPUTarget  # noqa: E402
from triton.backends.nvidia.compiler import CUDABackend  # noqa: E402
from triton.compiler import ASTSource  # noqa: E402
from triton.runtime import jit  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from kernels import channel_sum, concat, group_norm, master_adamw, residual_add, thin_conv, upsample  # noqa: E402
from ldm.engine.memory_format import channels_last  # noqa: E402

# The modules whose ops check `_INTERPRET` to accept CPU tensors, and those that size grids by `multiprocessors`.
KERNEL_MODULES = (channel_sum, concat, group_norm, master_adamw, residual_add, upsample)
SIZED_BY_MULTIPROCESSORS = (channel_sum, group_norm, thin_conv)


@dataclass
class Launch:
    case: str
    fn: jit.JITFunction
    args: tuple
    kwargs: dict
    grid: tuple


@contextlib.contextmanager
def recorded_launches(case: str, launches: list[Launch], sms: int):
    """Within: every `kernel[grid](...)` is appended to `launches` and not run (outputs stay unwritten), the ops take
    CPU tensors, and grids are planned for a GPU of `sms` multiprocessors."""
    saved_run = jit.JITFunction.run
    saved_flags = {module: module._INTERPRET for module in KERNEL_MODULES}
    saved_sms = {module: module.multiprocessors for module in SIZED_BY_MULTIPROCESSORS}

    def record(self, *args, grid, warmup, **kwargs):
        launches.append(Launch(case, self, args, kwargs, tuple(grid) if not callable(grid) else grid))

    jit.JITFunction.run = record
    for module in KERNEL_MODULES:
        module._INTERPRET = True
    for module in SIZED_BY_MULTIPROCESSORS:
        module.multiprocessors = lambda device: sms
    group_norm._plan.cache_clear()
    try:
        yield
    finally:
        jit.JITFunction.run = saved_run
        for module, flag in saved_flags.items():
            module._INTERPRET = flag
        for module, function in saved_sms.items():
            module.multiprocessors = function
        group_norm._plan.cache_clear()


def bf16_channels_last(*shape: int, grad: bool = False) -> torch.Tensor:
    return channels_last(torch.randn(shape, dtype=torch.bfloat16)).requires_grad_(grad)


def forward_backward(y: torch.Tensor, *inputs: torch.Tensor) -> None:
    torch.autograd.grad(y, inputs, torch.ones_like(y))


def case_group_norm(shape: tuple[int, ...], input_bias: bool | str, scale_shift: bool = False):
    """input_bias: True (N, C), "shared" (C,) as the autoencoder's, "sample" (C,) plus a bf16 (N, C) sample bias as
    the UNet's ResBlocks; scale_shift: bf16 (N, C) scale and shift, as a Linear makes them under autocast."""

    def run():
        x = bf16_channels_last(*shape, grad=True)
        N, C = shape[:2]
        w, b = torch.ones(C, requires_grad=True), torch.zeros(C, requires_grad=True)
        ib = torch.zeros((N, C) if input_bias is True else (C,), requires_grad=True) if input_bias else None
        sb = torch.zeros(N, C, dtype=torch.bfloat16, requires_grad=True) if input_bias == "sample" else None
        scale_shift_args = [torch.zeros(N, C, dtype=torch.bfloat16, requires_grad=True) for _ in range(2 * scale_shift)]
        y = group_norm.group_norm_act(x, w, b, 32, act=True, input_bias=ib, sample_bias=sb, 
                                      **dict(zip(("scale", "shift"), scale_shift_args)))[0]
        forward_backward(y, x, w, b, *([ib] if input_bias else []), *([sb] if sb is not None else []),
                         *scale_shift_args)
    return run


def case_concat():
    h, skip = bf16_channels_last(4, 256, 32, 32, 32, grad=True), bf16_channels_last(4, 128, 32, 32, 32, grad=True)
    forward_backward(concat.concat_channels(h, skip), h, skip)


def case_upsample():
    x = bf16_channels_last(4, 256, 16, 16, 16, grad=True)
    forward_backward(upsample.upsample_nearest(x, (2, 2, 2)), x)


def case_residual_add():
    x, y = bf16_channels_last(4, 128, 32, 32, 32, grad=True), bf16_channels_last(4, 128, 32, 32, 32, grad=True)
    bias = torch.zeros(128, requires_grad=True)
    forward_backward(residual_add.residual_bias_add(x, y, bias), x, y, bias)


def case_thin_conv():
    """The UNet's first convolution (4 -> 128 channels) and its last (128 -> 4)."""
    x, h = bf16_channels_last(4, 4, 32, 32, 32, grad=True), bf16_channels_last(4, 128, 32, 32, 32, grad=True)
    w_in = torch.randn(128, 4, 3, 3, 3, dtype=torch.bfloat16, requires_grad=True)
    w_out = torch.randn(4, 128, 3, 3, 3, dtype=torch.bfloat16, requires_grad=True)
    forward_backward(thin_conv.thin_conv3d(x, w_in), x, w_in)
    forward_backward(thin_conv.thin_conv3d(h, w_out), h, w_out)


def case_master_adamw(launch: master_adamw.MasterAdamWLaunch = master_adamw.DEFAULT_LAUNCH):
    """AdamW with fp32 masters over a few of the UNet's weights (a channels-last 3x3x3 convolution, a linear one)."""
    def run():
        weights = [channels_last(torch.zeros(256, 256, 3, 3, 3, dtype=torch.bfloat16)),
                   torch.zeros(1024, 512, dtype=torch.bfloat16)]
        fp32 = [[torch.zeros_like(w, dtype=torch.float32) for w in weights] for _ in range(3)]
        master_adamw.master_adamw_step(weights, [torch.zeros_like(w) for w in weights], *fp32, lr=1e-4, beta1=0.9,
                                       beta2=0.999, eps=1e-8, weight_decay=0.01, step=1, launch=launch)
    return run


CASES = {
    "group_norm_4x128x32^3": case_group_norm((4, 128, 32, 32, 32), input_bias=False),
    "group_norm_4x256x16^3": case_group_norm((4, 256, 16, 16, 16), input_bias=False),
    "group_norm_4x256x16^3_input_bias": case_group_norm((4, 256, 16, 16, 16), input_bias=True),
    "group_norm_4x512x8^3": case_group_norm((4, 512, 8, 8, 8), input_bias=False),
    # the UNet decoder's concatenations: 12 and 24 channels per group, padded to 16 and 32 lanes (2-byte accesses)
    "group_norm_4x384x32^3": case_group_norm((4, 384, 32, 32, 32), input_bias=False),
    "group_norm_4x768x16^3": case_group_norm((4, 768, 16, 16, 16), input_bias=False),
    # the BraTS UNet's scale-shift norm, the autoencoder's conv bias (one for all samples)
    "group_norm_4x256x16^3_scale_shift": case_group_norm((4, 256, 16, 16, 16), input_bias=True, scale_shift=True),
    "group_norm_1x64x64^3_shared_input_bias": case_group_norm((1, 64, 64, 64, 64), input_bias="shared"),
    "group_norm_4x256x16^3_sample_bias": case_group_norm((4, 256, 16, 16, 16), input_bias="sample"),
    "master_adamw": case_master_adamw(),
    "master_adamw_4x2048": case_master_adamw(master_adamw.MasterAdamWLaunch(blocks_per_program=4)),
    "master_adamw_1024w4": case_master_adamw(master_adamw.MasterAdamWLaunch(block=1024, num_warps=4)),
    "concat": case_concat,
    "upsample": case_upsample,
    "residual_add": case_residual_add,
    "thin_conv": case_thin_conv,
}


@dataclass
class Codegen:
    case: str
    kernel: str
    grid: tuple
    constants: dict
    num_warps: int
    registers: int
    local_bytes: int
    shared_bytes: int
    barriers: int
    loads: dict = field(default_factory=dict)   # width in bytes -> count of global load instructions
    stores: dict = field(default_factory=dict)


def compile_launch(launch: Launch, arch: int):
    """The CompiledKernel Triton's JIT would build for this launch on an sm_`arch` GPU."""
    target = GPUTarget("cuda", arch, 32)
    backend = CUDABackend(target)
    kwargs = dict(launch.kwargs)
    kwargs.setdefault("debug", launch.fn.debug or triton.knobs.runtime.debug)
    kwargs["instrumentation_mode"] = triton.knobs.compilation.instrumentation_mode
    binder = jit.create_function_from_signature(launch.fn.signature, launch.fn.params, backend)
    bound_args, specialization, options = binder(*launch.args, **kwargs)
    options, signature, constexprs, attrs = launch.fn._pack_args(backend, kwargs, bound_args, specialization, options)
    return triton.compile(ASTSource(launch.fn, signature, constexprs, attrs), target=target, options=options.__dict__)


ACCESS = re.compile(r"\b(ld|st)(?:\.[\w:]+)*?\.global(?:\.[\w:]+)*?(?:\.v(\d))?\.[bfsu](\d+)\s")
# global -> shared copies (Triton's software pipelining): cp.async.{ca,cg}.shared.global [dst], [src], bytes
ASYNC_COPY = re.compile(r"\bcp\.async\.c[ag]\.shared\.global\S*\s+\[[^\]]*\],\s*\[[^\]]*\],\s*(0x[0-9a-fA-F]+|\d+)")


def access_widths(ptx: str) -> tuple[Counter, Counter]:
    """Global loads and stores in the PTX, counted by bytes per thread and instruction (e.g. 16 for v4.b32); loads
    include asynchronous copies into shared memory."""
    loads, stores = Counter(), Counter()
    for kind, vector, bits in ACCESS.findall(ptx):
        (loads if kind == "ld" else stores)[int(vector or 1) * int(bits) // 8] += 1
    for size in ASYNC_COPY.findall(ptx):
        loads[int(size, 0)] += 1
    return loads, stores


def resource_usage(cubin: bytes) -> dict[str, int]:
    """REG, STACK, SHARED, LOCAL of the kernel in `cubin`, from the cuobjdump that Triton bundles."""
    tool = Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "cuobjdump"
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(cubin)
        f.flush()
        text = subprocess.run([str(tool), "--dump-resource-usage", f.name], capture_output=True, text=True,
                              check=True).stdout
    found = re.search(r"REG:(\d+) STACK:(\d+) SHARED:(\d+) LOCAL:(\d+)", text)
    if not found:
        raise RuntimeError(f"kernel_codegen: no resource usage in cuobjdump's output: {text[-300:]}")
    return dict(zip(("REG", "STACK", "SHARED", "LOCAL"), map(int, found.groups())))


def analyse(launch: Launch, arch: int) -> Codegen:
    kernel = compile_launch(launch, arch)
    ptx = kernel.asm["ptx"]
    usage = resource_usage(kernel.asm["cubin"])
    loads, stores = access_widths(ptx)
    constants = {k: v for k, v in launch.kwargs.items() if isinstance(v, (int, bool)) and k != "num_warps"}
    return Codegen(case=launch.case, kernel=launch.fn.__name__, grid=launch.grid, constants=constants,
                   num_warps=kernel.metadata.num_warps, registers=usage["REG"],
                   local_bytes=usage["LOCAL"] + usage["STACK"], shared_bytes=kernel.metadata.shared,
                   barriers=ptx.count("bar.sync"), loads=dict(sorted(loads.items())),
                   stores=dict(sorted(stores.items())))


def record(cases: list[str], sms: int) -> list[Launch]:
    """Every launch of the named cases, in order (a kernel launched twice alike is listed twice)."""
    launches: list[Launch] = []
    for name in cases:
        with recorded_launches(name, launches, sms):
            CASES[name]()
    return launches


def widths(counts: dict) -> str:
    return " ".join(f"{n}x{w}B" for w, n in sorted(counts.items(), key=lambda kv: -kv[0])) or "-"


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--arch", type=int, default=90, help="compute capability x10: 90 (H100/H200), 80 (A100)")
    parser.add_argument("--sms", type=int, default=132, help="multiprocessors the launches are planned for (H100/H200)")
    parser.add_argument("--cases", default=",".join(CASES), help=f"comma-separated, of: {', '.join(CASES)}")
    parser.add_argument("--json", default=None, help="also write the rows here")
    args = parser.parse_args(argv)
    names = [c for c in args.cases.split(",") if c]
    unknown = sorted(set(names) - set(CASES))
    if unknown:
        raise SystemExit(f"kernel_codegen: unknown cases {unknown}; known: {', '.join(CASES)}")
    rows = [analyse(launch, args.arch) for launch in record(names, args.sms)]
    if args.json:
        Path(args.json).write_text(json.dumps([row.__dict__ for row in rows], indent=1, default=str))
    print(f"Triton {triton.__version__}, sm_{args.arch}, launches planned for {args.sms} multiprocessors; global "
          f"loads / stores as count x bytes per thread and instruction")
    print("| case | kernel | grid | warps | regs | spilled B | shared B | bar.sync | loads | stores | constants |")
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        constants = ", ".join(f"{k}={v}" for k, v in r.constants.items() if k.isupper() and k != "BARRIER")
        print(f"| {r.case} | {r.kernel} | {r.grid} | {r.num_warps} | {r.registers} | {r.local_bytes} "
              f"| {r.shared_bytes} | {r.barriers} | {widths(r.loads)} | {widths(r.stores)} | {constants} |")


if __name__ == "__main__":
    main()
