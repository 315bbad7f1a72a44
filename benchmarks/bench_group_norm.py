"""GroupNorm(32 groups) + SiLU in bf16: our Triton kernels against PyTorch eager and torch.compile, on the GPU.

    python benchmarks/bench_group_norm.py [--no-compile] [--layouts contiguous,channels_last] [--input-bias] [--out DIR]

For each shape and layout: checks ours against the fp32 PyTorch reference on the same bf16 inputs (output and the
gradients of x, weight, bias), then times forward and forward+backward as GPU time: the calls are captured in a CUDA
graph over enough distinct input sets to exceed 4x the L2 cache (so no input is read from cache), the graph is replayed,
and the median replay time is divided by the number of sets. In a model the host-side launch cost overlaps other
layers' GPU work; the last column is the same forward+backward timed by `triton.testing.do_bench` without a graph
(host launch cost included, L2 cleared), which is what small tensors cost when nothing hides the launches.
% = the fewest bytes the op must move / time / measured copy bandwidth, where the forward moves 2 tensors (read x,
write y) and forward+backward 5 (also read x and dy, write dx). `--input-bias` adds a per-channel fp32 bias to x
first (a convolution's bias, as the ResNet blocks do), with its gradient: ours fused (`input_bias`) against the same
bias added in a separate pass before our kernels, and eager PyTorch. Writes the numbers to DIR/bench_group_norm.json
($OUT when set) and prints a markdown table last.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

import torch
import triton
from torch.nn import functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from kernels import group_norm as gn_module  # noqa: E402
from kernels.group_norm import GroupNormTuning, group_norm_act, group_norm_reference  # noqa: E402

SHAPES = [(1, 64, 128, 128, 128), (2, 128, 64, 64, 64), (8, 256, 16, 16, 16), (8, 320, 64, 64)]
GROUPS = 32
EPS = 1e-6


def copy_bandwidth(device: torch.device) -> float:
    """Bytes read + written per second of a large device-to-device copy."""
    src = torch.randn(256 * 2 ** 20, device=device)  # 1 GiB
    dst = torch.empty_like(src)
    ms = triton.testing.do_bench(lambda: dst.copy_(src), warmup=50, rep=300, return_mode="median")
    return 2 * src.numel() * src.element_size() / (ms * 1e-3)


def make_inputs(shape, layout: str, device, sets: int = 1):
    """`sets` pairs (x, dy) in bf16 and the layout, plus fp32 weight and bias."""
    fmt = torch.contiguous_format
    if layout == "channels_last":
        fmt = torch.channels_last_3d if len(shape) == 5 else torch.channels_last
    xs = [(torch.randn(shape, device=device, dtype=torch.bfloat16) * 1.5 + 0.5).to(memory_format=fmt).requires_grad_()
          for _ in range(sets)]
    dys = [torch.randn_like(x) for x in xs]
    C = shape[1]
    w = (1 + 0.1 * torch.randn(C, device=device)).requires_grad_()
    b = (0.1 * torch.randn(C, device=device)).requires_grad_()
    return xs, w, b, dys


def graph_time(call, sets: int, replays: int = 15) -> float:
    """Median GPU ms of call(i) over i < sets, captured once in a CUDA graph and replayed."""
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for i in range(sets):
            call(i)
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for i in range(sets):
            call(i)
    times = []
    for _ in range(replays):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        graph.replay()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) / sets)
    del graph
    return sorted(times)[len(times) // 2]


def biased(x, ib):
    """x + ib per channel in x's dtype (a separate pass), or x without a bias."""
    return x if ib is None else x + ib.view(1, -1, *(1,) * (x.ndim - 2)).to(x.dtype)


def eager(x, w, b, ib=None):
    return F.silu(F.group_norm(biased(x, ib), GROUPS, w.to(x.dtype), b.to(x.dtype), EPS))


def ours(tuning):
    def run(x, w, b, ib=None):
        return group_norm_act(x, w, b, GROUPS, EPS, act=True, tuning=tuning, input_bias=ib)[0]
    return run


def add_then_ours(x, w, b, ib):
    return group_norm_act(biased(x, ib), w, b, GROUPS, EPS, act=True)[0]


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.double(), b.double()
    if not torch.isfinite(a).all():
        return float("nan")
    return ((a - b).norm() / b.norm()).item()


def check(fn, x, w, b, ib, dy) -> float:
    """Largest relative error of fn's output and gradients against the fp32 reference on the same inputs."""
    params = (w, b) if ib is None else (w, b, ib)
    y = fn(x, w, b, ib)
    got = [y, *torch.autograd.grad(y, (x, *params), dy)]
    xr, *params_r = (t.detach().float().requires_grad_() for t in (x, *params))
    yr = group_norm_reference(xr, *params_r[:2], GROUPS, EPS, act=True,
                              input_bias=params_r[2] if ib is not None else None)[0]
    ref = [yr, *torch.autograd.grad(yr, (xr, *params_r), dy.float())]
    return max(rel_err(g, r) for g, r in zip(got, ref))


def time_fn(fn, xs, w, b, ib, dys) -> tuple[float, float, float]:
    """GPU ms of forward and of forward+backward (gradients of x, weight, bias and the input bias, if any), and
    host-inclusive forward+backward."""
    params = (w, b) if ib is None else (w, b, ib)

    def forward(i):
        with torch.no_grad():
            fn(xs[i], w, b, ib)

    def forward_backward(i):
        y = fn(xs[i], w, b, ib)
        torch.autograd.grad(y, (xs[i], *params), dys[i])
    fwd = graph_time(forward, len(xs))
    both = graph_time(forward_backward, len(xs))
    host = triton.testing.do_bench(lambda: forward_backward(0), warmup=25, rep=200, return_mode="median")
    return fwd, both, host


def profile_host(fn, device) -> None:
    import cProfile
    import pstats
    xs, w, b, dys = make_inputs((8, 256, 16, 16, 16), "contiguous", device)
    for _ in range(20):
        torch.autograd.grad(fn(xs[0], w, b), (xs[0], w, b), dys[0])
    torch.cuda.synchronize()
    profiler = cProfile.Profile()
    profiler.enable()
    for _ in range(200):
        torch.autograd.grad(fn(xs[0], w, b), (xs[0], w, b), dys[0])
    torch.cuda.synchronize()
    profiler.disable()
    pstats.Stats(profiler).sort_stats("tottime").print_stats(18)


def parse_shape(token: str) -> tuple[int, ...]:
    """'2' -> SHAPES[2]; '4x128x32x32x32' -> (4, 128, 32, 32, 32)."""
    if "x" not in token:
        return SHAPES[int(token)]
    shape = tuple(int(size) for size in token.split("x"))
    if len(shape) not in (4, 5) or shape[1] % GROUPS:
        raise SystemExit(f"--shapes: {token!r} must be N x C x (D x) H x W with C a multiple of {GROUPS}")
    return shape


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--no-compile", action="store_true", help="skip torch.compile (saves minutes of compiling)")
    parser.add_argument("--layouts", default="contiguous,channels_last")
    parser.add_argument("--tunings", default="", help="extra launch choices to time, ';'-separated, each a ','-separated "
                        "list of GroupNormTuning fields, e.g. 'forward_tile=4096,backward_tile=2048;splits=64'")
    parser.add_argument("--host-profile", action="store_true",
                        help="also profile the host side of 200 forward+backward calls (cProfile, top functions)")
    parser.add_argument("--input-bias", action="store_true",
                        help="add a per-channel bias to x first: ours fused, ours after a separate add, eager")
    parser.add_argument("--shapes", default="", help="only these shapes: indices into SHAPES (0-3) or "
                        "explicit N x C x spatial shapes, e.g. 0,1,4x128x32x32x32")
    parser.add_argument("--out", default=os.environ.get("OUT", "."))
    args = parser.parse_args()
    if not torch.cuda.is_available():
        raise SystemExit("bench_group_norm.py needs a CUDA GPU")
    device = torch.device("cuda")
    torch.manual_seed(0)
    bandwidth = copy_bandwidth(device)
    l2_bytes = torch.cuda.get_device_properties(device).L2_cache_size
    print(f"device: {torch.cuda.get_device_name()}, torch {torch.__version__}, triton {triton.__version__}, "
          f"copy bandwidth {bandwidth / 1e12:.3f} TB/s", flush=True)

    variants = {"ours": ours(GroupNormTuning()), "eager": eager}
    if args.input_bias:
        variants["ours, separate bias add"] = add_then_ours
    for spec in filter(None, args.tunings.split(";")):
        variants[f"ours {spec}"] = ours(GroupNormTuning.parse(spec))
    if not args.no_compile:  # one specialisation per shape and layout: lift dynamo's recompile limit above 8
        torch._dynamo.config.cache_size_limit = torch._dynamo.config.recompile_limit = 64
        variants["compile"] = torch.compile(eager, dynamic=False)

    if args.host_profile:
        profile_host(variants["ours"], device)
    shapes = [parse_shape(token) for token in args.shapes.split(",")] if args.shapes else SHAPES
    rows = []
    for layout in args.layouts.split(","):
        for shape in shapes:
            elem_bytes = 2 * torch.Size(shape).numel()
            sets = max(1, -(-4 * l2_bytes // (2 * elem_bytes)))
            xs, w, b, dys = make_inputs(shape, layout, device, sets)
            ib = (0.5 * torch.randn(shape[1], device=device)).requires_grad_() if args.input_bias else None
            for name, fn in variants.items():
                gn_module.LAST_KERNELS.clear()
                err = check(fn, xs[0], w, b, ib, dys[0])
                regs = {k: f"{v.n_regs}/{v.n_spills}" for k, v in gn_module.LAST_KERNELS.items()}
                fwd, both, host = time_fn(fn, xs, w, b, ib, dys)
                row = dict(shape=list(shape), layout=layout, variant=name, input_bias=args.input_bias,
                           fwd_ms=fwd, fwd_bwd_ms=both,
                           fwd_pct=100 * 2 * elem_bytes / (fwd * 1e-3) / bandwidth,
                           fwd_bwd_pct=100 * 5 * elem_bytes / (both * 1e-3) / bandwidth, host_fwd_bwd_ms=host,
                           max_rel_err=err, regs_spills=regs, input_sets=sets)
                rows.append(row)
                print(json.dumps(row), flush=True)
            del xs, w, b, ib, dys
            torch.cuda.empty_cache()

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "bench_group_norm.json").write_text(json.dumps(dict(copy_bandwidth=bandwidth, rows=rows), indent=1))
    prefix = "input bias + " if args.input_bias else ""
    print(f"\n{prefix}GroupNorm({GROUPS}) + SiLU, bf16, {torch.cuda.get_device_name()}, "
          f"copy {bandwidth / 1e12:.2f} TB/s; "
          f"GPU ms (% of copy bandwidth), median of CUDA-graph replays; host = fwd+bwd without a graph; "
          f"err = max rel. error of y, dx, dw, db vs fp32 reference; regs = registers/spills (fwd, bwd)")
    print("| shape | layout | variant | fwd | fwd+bwd | host fwd+bwd | err | regs |")
    print("|---|---|---|---|---|---|---|---|")
    for r in rows:
        regs = " ".join(r["regs_spills"].values())
        print(f"| {'x'.join(map(str, r['shape']))} | {r['layout']} | {r['variant']} | {r['fwd_ms']:.3f} "
              f"({r['fwd_pct']:.0f}%) | {r['fwd_bwd_ms']:.3f} ({r['fwd_bwd_pct']:.0f}%) | {r['host_fwd_bwd_ms']:.3f} | "
              f"{r['max_rel_err']:.1e} | {regs} |")


if __name__ == "__main__":
    main()
