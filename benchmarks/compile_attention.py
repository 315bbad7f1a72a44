"""Compile the attention kernels for an H100 (sm_90) on a machine without a GPU and report their resources.

    python benchmarks/compile_attention.py [--kernels forward,dkdv,dq] [--head-dims 32,64,128,256,512] [--first]
    python benchmarks/compile_attention.py --config dkdv:512:16,64,512,8,2,1   # kernel:head_dim:M,N,C,warps,stages[,split]

For every candidate launch config of kernels/attention.py's tables (or the --config ones): shared memory (Triton's
metadata; an H100 program may use 227 KB), registers, spill bytes and stack frame (ptxas -v), and how many
HGMMA (wgmma, Hopper's tensor-core path) and HMMA (the older mma path) instructions the SASS holds. Arguments are
specialised as on a real launch with 16-byte aligned pointers and strides and lengths divisible by 16 (without
that, Triton does not pipeline the tile loads and the numbers mean nothing). Uses the ptxas and cuobjdump that come
with Triton; takes ~10 s per kernel.
"""
from __future__ import annotations

import argparse
import os
import re
import subprocess
import sys
import tempfile
from pathlib import Path

os.environ.pop("TRITON_INTERPRET", None)  # compile for real, not through the interpreter

import triton  # noqa: E402
from triton.backends.compiler import GPUTarget  # noqa: E402
from triton.compiler import ASTSource  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import kernels.attention as fa  # noqa: E402

TOOLS = Path(triton.__file__).parent / "backends" / "nvidia" / "bin"
H100 = GPUTarget("cuda", 90, 32)
KERNELS = {
    "forward": (fa._attn_fwd_kernel, "BLOCK_DV", fa.FORWARD_CONFIGS),
    "dkdv": (fa._attn_bwd_dkdv_kernel, "BLOCK_DC", fa.BACKWARD_DKDV_CONFIGS),
    "dq": (fa._attn_bwd_dq_kernel, "BLOCK_DC", fa.BACKWARD_DQ_CONFIGS),
}
FP32_POINTERS = ("LSE", "DELTA")
FLOAT_SCALARS = ("qk_scale", "scale")


def compile_kernel(fn, constexprs: dict, num_warps: int, num_stages: int) -> dict:
    """Compile fn for sm_90 in bf16 with the given constexprs; resources of the result."""
    names = fn.arg_names
    signature, attrs = {}, {}
    for index, name in enumerate(names):
        if name in constexprs:
            signature[name] = "constexpr"
        elif name.isupper():  # tensors
            signature[name] = "*fp32" if name in FP32_POINTERS else "*bf16"
            attrs[(index,)] = [["tt.divisibility", 16]]
        elif name in FLOAT_SCALARS:
            signature[name] = "fp32"
        else:
            signature[name] = "i32"
            if name.startswith("stride") or name in ("len_q", "len_k"):
                attrs[(index,)] = [["tt.divisibility", 16]]
    source = ASTSource(fn=fn, signature=signature, constexprs={(names.index(k),): v for k, v in constexprs.items()},
                       attrs=attrs)
    kernel = triton.compile(source, target=H100, options={"num_warps": num_warps, "num_stages": num_stages})
    with tempfile.TemporaryDirectory() as tmp:
        ptx, cubin = Path(tmp, "k.ptx"), Path(tmp, "k.cubin")
        ptx.write_text(kernel.asm["ptx"])
        cubin.write_bytes(kernel.asm["cubin"])
        report = subprocess.run([TOOLS / "ptxas", "-v", "--gpu-name", "sm_90a", ptx, "-o", Path(tmp, "o.cubin")],
                                capture_output=True, text=True, check=True).stderr
        sass = subprocess.run([TOOLS / "cuobjdump", "-sass", cubin], capture_output=True, text=True,
                              check=True).stdout

    def number(pattern: str) -> int | None:
        found = re.search(pattern, report)
        return int(found.group(1)) if found else None
    return {"shared_kb": round(kernel.metadata.shared / 1024, 1), "regs": number(r"Used (\d+) registers"),
            "spill_bytes": number(r"(\d+) bytes spill stores"), "stack": number(r"(\d+) bytes stack frame"),
            "hgmma": sass.count("HGMMA"), "hmma": sass.count("HMMA")}


def compile_config(kernel: str, head_dim: int, cfg: fa.KernelConfig) -> dict:
    fn, chunk_name, _ = KERNELS[kernel]
    block_d = fa.padded_head_dim(head_dim)
    constexprs = dict(HEAD_DIM=head_dim, BLOCK_D=block_d, BLOCK_M=cfg.block_m, BLOCK_N=cfg.block_n,
                      EVEN_M=True, EVEN_N=True, MASK_D=head_dim != block_d, DOT_PRECISION="tf32")
    constexprs[chunk_name] = min(cfg.block_c, block_d)
    if kernel != "dkdv":
        return compile_kernel(fn, constexprs, cfg.num_warps, cfg.num_stages)
    if not cfg.split:
        return compile_kernel(fn, dict(constexprs, WITH_DK=True, WITH_DV=True), cfg.num_warps, cfg.num_stages)
    return {part: compile_kernel(fn, dict(constexprs, WITH_DK=part == "dK", WITH_DV=part == "dV"), cfg.num_warps,
                                 cfg.num_stages) for part in ("dK", "dV")}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--kernels", default="forward,dkdv,dq")
    parser.add_argument("--head-dims", default="32,64,128,256,512")
    parser.add_argument("--first", action="store_true", help="only the first (default) config of each table row")
    parser.add_argument("--config", action="append", default=[], help="kernel:head_dim:M,N,C,warps,stages[,split]")
    args = parser.parse_args()
    jobs = []
    for spec in args.config:
        kernel, head_dim, values = spec.split(":")
        numbers = [int(x) for x in values.split(",")]
        jobs.append((kernel, int(head_dim), fa.KernelConfig(*numbers[:5], split=bool(numbers[5:6] and numbers[5]))))
    if not args.config:
        for kernel in args.kernels.split(","):
            for head_dim in (int(d) for d in args.head_dims.split(",")):
                configs = KERNELS[kernel][2][fa.padded_head_dim(head_dim)]
                jobs += [(kernel, head_dim, cfg) for cfg in configs[:1 if args.first else None]]
    for kernel, head_dim, cfg in jobs:
        try:
            result = compile_config(kernel, head_dim, cfg)
        except Exception as err:  # report and go on: a config that does not compile is a finding
            result = f"FAILED {type(err).__name__}: {str(err)[:300]}"
        print(f"{kernel:8s} d={head_dim:<4d} {str(cfg):26s} {result}", flush=True)


if __name__ == "__main__":
    main()
