"""Attention, bf16, non-causal: our Triton flash attention against every PyTorch SDPA backend, and the dispatcher.

    python benchmarks/bench_attention.py [--quick] [--sweep] [--shapes "4,8,4096,64;1,1,32768,512"] [--out DIR]

For each (B, H, L, d) shape (L_q = L_k = L):
- checks: the forward of ours, of the dispatcher's `attention` and of each SDPA backend against fp32 float math on a
  subsample of the queries (all keys), and our gradients (dq, dk, dv) against fp32 float math on a reduced problem
  of the same head dim (B = 1, H <= 2, L <= 1024); errors are ||out - ref|| / ||ref|| (max-abs ratio in the JSON);
- times `triton.testing.do_bench` medians (L2 flushed between runs) of the forward (no autograd) and of
  forward+backward; TFLOP/s with forward FLOPs = 4 B H L_q L_k d and forward+backward = 3.5x that;
- columns: ours (kernels/attention.py), auto (the dispatcher `ldm.modules.attention.attention`, with the backend it
  picked), and the SDPA backends flash, cudnn, efficient, math (math skipped, '-', where its L x L matrix would pass
  ~8 GB); a backend that refuses the shape shows '-' and its reason goes to the JSON.
--sweep also times every candidate launch config of our three kernels per shape (forward; dK/dV and dQ each with the
other at its default), prints the best, and the AUTO_TABLE order the fastest forward+backward suggests; reorder the
tables in kernels/attention.py and ldm/modules/attention.py from it.
Writes everything to DIR/bench_attention.json (DIR: --out, else $OUT, else .) and prints a markdown table last.
Without CUDA only `--quick` runs: tiny shapes through Triton's interpreter, host timers (a syntax check, not numbers).
"""
from __future__ import annotations

import argparse
import json
import logging
import math
import os
import statistics
import sys
import time
from pathlib import Path

import torch

if not torch.cuda.is_available():  # Triton reads this when the kernels are decorated, i.e. at import
    os.environ.setdefault("TRITON_INTERPRET", "1")

import triton  # noqa: E402
from torch.nn import functional as F  # noqa: E402
from torch.nn.attention import SDPBackend, sdpa_kernel  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import kernels.attention as fa  # noqa: E402
from ldm.modules import attention as dispatch  # noqa: E402

SHAPES = [(4, 8, 4096, 64), (1, 4, 32768, 64), (4, 8, 4096, 32), (4, 8, 4096, 128), (1, 1, 32768, 256),
          (1, 1, 32768, 512)]
QUICK_SHAPES_CUDA = [(1, 2, 1024, 64), (1, 1, 2048, 512)]
QUICK_SHAPES_CPU = [(1, 1, 37, 32)]
SDPA = {"flash": SDPBackend.FLASH_ATTENTION, "cudnn": SDPBackend.CUDNN_ATTENTION,
        "efficient": SDPBackend.EFFICIENT_ATTENTION, "math": SDPBackend.MATH}
MATH_SCORE_BYTES = 8e9  # skip math when its bf16 L x L scores alone would exceed this
CHECK_QUERIES = 256  # queries in the forward check's subsample
# Extra launch configs the sweep tries besides the tables' candidates, per padded head dim.
EXTRA_SWEEP = {
    "forward": {32: [(128, 128, 32, 4, 3)], 64: [(128, 128, 64, 4, 2), (64, 128, 64, 4, 3)],
                128: [(128, 32, 128, 8, 3), (64, 128, 128, 8, 2)], 256: [(128, 32, 256, 8, 2)],
                512: [(128, 32, 256, 8, 2), (64, 16, 512, 8, 2)]},
    "backward dK/dV": {64: [(64, 64, 64, 8, 3), (64, 128, 64, 8, 3, True)], 128: [(64, 128, 128, 8, 2)],
                       256: [(64, 64, 256, 8, 2, True)]},
    "backward dQ": {64: [(64, 128, 64, 8, 3)], 128: [(128, 128, 128, 8, 2)], 256: [(128, 32, 256, 8, 2)]},
}


def fwd_flops(shape) -> float:
    batch, heads, length, head_dim = shape
    return 4.0 * batch * heads * length * length * head_dim


def sdpa_call(name: str):
    def run(q, k, v):
        with sdpa_kernel(SDPA[name]):
            return F.scaled_dot_product_attention(q, k, v)
    return run


def implementations() -> dict:
    return {"ours": fa.flash_attention, "auto": dispatch.attention, **{name: sdpa_call(name) for name in SDPA}}


def median_ms(fn, quick: bool) -> float:
    """GPU: do_bench median (L2 flushed). CPU (interpreter smoke run): median host time of 3 calls."""
    if torch.cuda.is_available():
        return triton.testing.do_bench(fn, warmup=10 if quick else 25, rep=30 if quick else 100,
                                       return_mode="median")
    times = []
    for _ in range(3):
        start = time.perf_counter()
        fn()
        times.append((time.perf_counter() - start) * 1e3)
    return statistics.median(times)


def errors(actual: torch.Tensor, expected: torch.Tensor) -> dict:
    actual, expected = actual.float(), expected.float()
    if not torch.isfinite(actual).all():
        return {"rel_norm": float("nan"), "rel_max": float("nan")}
    return {"rel_norm": ((actual - expected).norm() / expected.norm()).item(),
            "rel_max": ((actual - expected).abs().max() / expected.abs().max()).item()}


def float_reference(q, k, v):
    return fa.attention_reference(q.float(), k.float(), v.float())


def is_refusal(err: Exception) -> bool:
    return isinstance(err, fa.UnsupportedAttentionInputs) or (
        isinstance(err, RuntimeError) and not isinstance(err, torch.OutOfMemoryError)
        and ("No available kernel" in str(err) or "No viable backend" in str(err)))


def check_gradients(shape, dtype, device) -> dict:
    """Our dq, dk, dv against fp32 float math on (1, min(H, 2), min(L, 1024), d)."""
    _, heads, length, head_dim = shape
    small = (1, min(heads, 2), min(length, 1024), head_dim)
    q, k, v = (torch.randn(small, device=device, dtype=dtype, requires_grad=True) for _ in range(3))
    out = fa.flash_attention(q, k, v)
    grad_out = torch.randn_like(out)
    grads = torch.autograd.grad(out, (q, k, v), grad_out)
    q32, k32, v32 = (t.detach().float().requires_grad_() for t in (q, k, v))
    ref = float_reference(q32, k32, v32)
    ref_grads = torch.autograd.grad(ref, (q32, k32, v32), grad_out.float())
    return {name: errors(a, b) for name, a, b in zip(("out", "dq", "dk", "dv"), (out, *grads), (ref, *ref_grads))}


def kernel_resources() -> dict:
    """Registers / spills / config of our last launches (GPU only)."""
    found = {}
    for name, (cfg, compiled) in fa.LAST_LAUNCHES.items():
        regs, spills = getattr(compiled, "n_regs", None), getattr(compiled, "n_spills", None)
        found[name] = {"config": str(cfg), "regs": regs, "spills": spills,
                       "shared": getattr(getattr(compiled, "metadata", None), "shared", None)}
    return found


def bench_shape(shape, dtype, device, quick: bool) -> dict:
    batch, heads, length, head_dim = shape
    flops = fwd_flops(shape)
    result = {"shape": list(shape), "fwd_flops": flops, "columns": {}}
    q, k, v = (torch.randn(shape, device=device, dtype=dtype) for _ in range(3))
    grad_out = torch.randn_like(q)
    q_sub = q[:, :, :CHECK_QUERIES]
    reference = float_reference(q_sub, k, v)
    for name, fn in implementations().items():
        column = {}
        result["columns"][name] = column
        if name == "math" and batch * heads * length * length * 2 > MATH_SCORE_BYTES:
            column["skipped"] = "L x L scores over 8 GB"
            continue
        try:
            with torch.no_grad():
                column["check_fwd"] = errors(fn(q_sub, k, v), reference)
                column["fwd_ms"] = median_ms(lambda: fn(q, k, v), quick)
            if name == "auto":
                column["picked_fwd"] = dispatch.chosen_backend(q, k, v)
            qg, kg, vg = (t.detach().requires_grad_() for t in (q, k, v))

            def forward_backward():
                fn(qg, kg, vg).backward(grad_out)
            column["fwd_bwd_ms"] = (median_ms(forward_backward, quick) if not torch.cuda.is_available() else
                                    triton.testing.do_bench(forward_backward, warmup=10 if quick else 25,
                                                            rep=30 if quick else 100, grad_to_none=[qg, kg, vg],
                                                            return_mode="median"))
            if name == "auto":
                column["picked_fwd_bwd"] = dispatch.chosen_backend(qg, kg, vg)
            if name == "ours":
                column["kernels"] = kernel_resources()
        except Exception as err:  # a refusal, or out of memory: record it and go on with the next column
            if not (is_refusal(err) or isinstance(err, torch.OutOfMemoryError)):
                raise
            column["refused" if is_refusal(err) else "out_of_memory"] = str(err).strip().splitlines()[0][:300]
        finally:
            if torch.cuda.is_available():
                torch.cuda.empty_cache()
        if "fwd_ms" in column:
            column["fwd_tflops"] = flops / (column["fwd_ms"] * 1e-3) / 1e12
        if "fwd_bwd_ms" in column:
            column["fwd_bwd_tflops"] = 3.5 * flops / (column["fwd_bwd_ms"] * 1e-3) / 1e12
        print(json.dumps({"shape": shape, "column": name, **column}), flush=True)
    result["check_grads_ours"] = check_gradients(shape, dtype, device)
    print(json.dumps({"shape": shape, "check_grads_ours": result["check_grads_ours"]}), flush=True)
    return result


def sweep_shape(shape, dtype, device, quick: bool) -> dict:
    """Every candidate config of our kernels on this shape: {kernel: [(config, ms or error), ...]}."""
    _, _, _, head_dim = shape
    block_d = fa.padded_head_dim(head_dim)
    scale = 1 / math.sqrt(head_dim)
    q, k, v = (torch.randn(shape, device=device, dtype=dtype) for _ in range(3))
    grad_out = torch.randn_like(q)
    out, lse = fa.attention_forward(q, k, v, scale)
    default_dkdv = fa.candidate_configs(fa.BACKWARD_DKDV_CONFIGS, head_dim, dtype)[0]
    default_dq = fa.candidate_configs(fa.BACKWARD_DQ_CONFIGS, head_dim, dtype)[0]
    grads_default = fa.attention_backward(q, k, v, out, lse, grad_out, scale)
    tables = {"forward": fa.FORWARD_CONFIGS, "backward dK/dV": fa.BACKWARD_DKDV_CONFIGS,
              "backward dQ": fa.BACKWARD_DQ_CONFIGS}
    found = {}
    for kernel, table in tables.items():
        configs = list(dict.fromkeys([*table[block_d], *(fa.KernelConfig(*row)
                                                          for row in EXTRA_SWEEP[kernel].get(block_d, []))]))
        rows = []
        for cfg in configs:
            try:
                if kernel == "forward":
                    run = lambda: fa.attention_forward(q, k, v, scale, cfg)  # noqa: E731
                    diff = (run()[0].float() - out.float()).abs().max().item()
                else:
                    dkdv, dq = (cfg, default_dq) if kernel == "backward dK/dV" else (default_dkdv, cfg)
                    run = lambda: fa.attention_backward(q, k, v, out, lse, grad_out, scale, dkdv, dq)  # noqa: E731
                    diff = max((a.float() - b.float()).abs().max().item() for a, b in zip(run(), grads_default))
                ms = median_ms(run, quick)
                regs = kernel_resources().get(kernel, {})
                rows.append({"config": str(cfg), "ms": ms, "max_diff_vs_default": diff, "regs": regs.get("regs"),
                             "spills": regs.get("spills")})
            except fa.OutOfResources as err:
                rows.append({"config": str(cfg), "error": f"out of resources: {err}"})
        found[kernel] = rows
        best = min((r for r in rows if "ms" in r), key=lambda r: r["ms"], default=None)
        print(json.dumps({"shape": shape, "sweep": kernel, "rows": rows, "best": best and best["config"]}), flush=True)
    return found


def cell(column: dict) -> str:
    if "skipped" in column or ("fwd_tflops" not in column and "fwd_bwd_tflops" not in column):
        return "-"
    fwd = f"{column['fwd_tflops']:.0f}" if "fwd_tflops" in column else "-"
    both = f"{column['fwd_bwd_tflops']:.0f}" if "fwd_bwd_tflops" in column else "-"
    return f"{fwd} / {both}"


def ratio(results: dict, name: str, key: str) -> str:
    """name's rate over the best SDPA backend's for key ('fwd_tflops' or 'fwd_bwd_tflops')."""
    best = max((results[b].get(key, 0.0) for b in SDPA), default=0.0)
    mine = results[name].get(key)
    return f"{mine / best:.2f}" if best and mine else "-"


def suggested_table(rows: list[dict]) -> dict:
    """Per head dim: backends ordered by forward+backward rate on the largest shape of that head dim."""
    order = {}
    for row in sorted(rows, key=lambda r: r["fwd_flops"]):
        rates = {("triton" if name == "ours" else name): col.get("fwd_bwd_tflops", col.get("fwd_tflops", 0.0))
                 for name, col in row["columns"].items() if name != "auto"}
        order[row["shape"][3]] = [name for name, rate in sorted(rates.items(), key=lambda kv: -kv[1]) if rate > 0]
    return order


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="small shapes, short timing: a smoke run")
    parser.add_argument("--sweep", action="store_true", help="also time every launch config of our kernels")
    parser.add_argument("--shapes", default="", help="';'-separated B,H,L,d shapes instead of the defaults")
    parser.add_argument("--out", default=os.environ.get("OUT", "."))
    args = parser.parse_args()
    cuda = torch.cuda.is_available()
    if not cuda and not args.quick:
        raise SystemExit("bench_attention.py needs a CUDA GPU (without one, only --quick runs, as a syntax check)")
    logging.basicConfig(level=logging.INFO, format="%(name)s: %(message)s")
    device = torch.device("cuda" if cuda else "cpu")
    dtype = torch.bfloat16 if cuda else torch.float32  # the interpreter's bf16 dot products are wrong
    if args.shapes:
        shapes = [tuple(int(x) for x in s.split(",")) for s in args.shapes.split(";")]
    else:
        shapes = SHAPES if not args.quick else (QUICK_SHAPES_CUDA if cuda else QUICK_SHAPES_CPU)
    name = torch.cuda.get_device_name() if cuda else "cpu (Triton interpreter)"
    print(f"device: {name}, torch {torch.__version__}, triton {triton.__version__}, dtype {dtype}", flush=True)
    torch.manual_seed(0)
    rows, sweeps = [], {}
    for shape in shapes:
        rows.append(bench_shape(shape, dtype, device, args.quick))
        if args.sweep:
            sweeps["x".join(map(str, shape))] = sweep_shape(shape, dtype, device, args.quick)
    suggestion = suggested_table(rows)

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "bench_attention.json").write_text(json.dumps(
        dict(device=name, torch=torch.__version__, triton=triton.__version__, dtype=str(dtype), rows=rows,
             sweeps=sweeps, suggested_table=suggestion), indent=1, default=str))

    if args.sweep:
        print("\nSweep (ms; best first) per shape and kernel:")
        for shape_name, found in sweeps.items():
            for kernel, sweep_rows in found.items():
                timed = sorted((r for r in sweep_rows if "ms" in r), key=lambda r: r["ms"])
                print(f"  {shape_name} {kernel}: " + ", ".join(f"{r['config']} {r['ms']:.3f}"
                                                              f" (r{r['regs']}/s{r['spills']})" for r in timed))
    print("\nSuggested AUTO_TABLE order per head dim (fastest forward+backward first): "
          + "; ".join(f"d={d}: {', '.join(order)}" for d, order in suggestion.items()))
    print(f"\nAttention, {str(dtype).removeprefix('torch.')}, non-causal, {name}: TFLOP/s forward / forward+backward "
          f"(do_bench medians; fwd FLOPs = 4·B·H·L²·d, fwd+bwd = 3.5x). err = our max rel. error (norm) of out, dq, "
          f"dk, dv vs fp32. ours/best = ours over the best SDPA backend; auto/best the same for the dispatcher.")
    print("| B,H,L,d | ours | auto (picks) | flash | cuDNN | efficient | math | ours/best fwd, fwd+bwd | "
          "auto/best fwd, fwd+bwd | err |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for row in rows:
        cols = row["columns"]
        picked = (cols["auto"].get("picked_fwd", "?"), cols["auto"].get("picked_fwd_bwd", "?"))
        picks = picked[0] if picked[0] == picked[1] else f"{picked[0]}, with grad {picked[1]}"
        err = max(e["rel_norm"] for e in row["check_grads_ours"].values())
        print(f"| {','.join(map(str, row['shape']))} | {cell(cols['ours'])} | {cell(cols['auto'])} ({picks}) | "
              f"{cell(cols['flash'])} | {cell(cols['cudnn'])} | {cell(cols['efficient'])} | {cell(cols['math'])} | "
              f"{ratio(cols, 'ours', 'fwd_tflops')}, {ratio(cols, 'ours', 'fwd_bwd_tflops')} | "
              f"{ratio(cols, 'auto', 'fwd_tflops')}, {ratio(cols, 'auto', 'fwd_bwd_tflops')} | {err:.1e} |")


if __name__ == "__main__":
    main()
