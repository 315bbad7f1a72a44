"""The optimizer step of `trainer.bf16_weight_copies` against what it replaces, on the bench_models UNet's weights.

    python benchmarks/bench_master_adamw.py [--repeats 20] [--launches 1024x1w4,1024x4w4,2048x1w8] [--quick]
                                            [--device cuda] [--out DIR]

The weights that get bf16 copies are those autocast casts (read off one forward of bench_models' 166M UNet at a tiny
input: 166.4M parameters in 156 tensors; `--quick`: its small test UNet, 2.8M, minutes in Triton's interpreter). Timed, per step, over those weights only:
- "fused AdamW": torch's fused AdamW on fp32 weights and fp32 gradients (28 bytes per parameter);
- "casts + fused AdamW": what a graphed step does for them today: the weights cast to bf16 and the bf16 gradients
  cast to fp32 (one multi-tensor copy each, ldm/engine/weight_cast.py; 12 bytes per parameter), then fused AdamW;
- "master_adamw BxKwW": kernels/master_adamw.py with B elements per pass, K passes per program and W warps
  (`MasterAdamWLaunch`), bf16 gradient and copy, fp32 weight and moments (28 bytes per parameter).
Before timing, one step of each from the same state is checked: the master_adamw weights against fused AdamW's
(max abs difference in the table) and each copy against its weight rounded to bf16. Times are medians of `--repeats`
steps after three warm-ups, CUDA events around each step (on a CPU: wall time; there the kernel runs in Triton's
interpreter, set TRITON_INTERPRET=1, and the figures only show that the script runs). GB/s is the bytes named above
over the time. Writes DIR/bench_master_adamw.json (DIR: --out, else $OUT, else .) and prints a markdown table last.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path
from typing import Callable

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from benchmarks.bench_models import CASES, QUICK_CASES, build_ours  # noqa: E402
from kernels.master_adamw import MasterAdamWLaunch, master_adamw_step  # noqa: E402
from ldm.engine.memory_format import channels_last, model_to_channels_last  # noqa: E402
from ldm.engine.weight_cast import parameters_cast_by_autocast  # noqa: E402

HYPER = dict(lr=1e-4, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.01)


def parse_launch(spec: str) -> MasterAdamWLaunch:
    """'1024x4w4' -> MasterAdamWLaunch(block=1024, blocks_per_program=4, num_warps=4)."""
    try:
        block, rest = spec.split("x")
        per_program, warps = rest.split("w")
        return MasterAdamWLaunch(int(block), int(per_program), int(warps))
    except ValueError as err:
        raise SystemExit(f"--launches: {spec!r} is not BLOCKxPROGRAMSwWARPS, e.g. 1024x4w4 ({err})") from err


def copied_weights(quick: bool, device: torch.device) -> list[torch.Tensor]:
    """The UNet's weights that autocast casts (they get copies), channels-last, on `device`."""
    case = QUICK_CASES["unet"] if quick else CASES["unet"]
    model = model_to_channels_last(build_ours(case, "torch", compvis_decoder=False).to(device).train())
    x = channels_last(torch.randn(1, case.in_channels, 8, 8, 8, device=device))
    with torch.autocast(device.type, dtype=torch.bfloat16):
        names = set(parameters_cast_by_autocast(model, model(x, torch.tensor([3], device=device)), torch.bfloat16))
    return [p.detach() for name, p in model.named_parameters() if name in names]


def timed(step: Callable[[], None], device: torch.device, repeats: int) -> float:
    """Median ms of `step()` over `repeats` calls after three warm-ups."""
    times = []
    for i in range(repeats + 3):
        if device.type == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            step()
            end.record()
            end.synchronize()
            elapsed = start.elapsed_time(end)
        else:
            began = time.perf_counter()
            step()
            elapsed = 1e3 * (time.perf_counter() - began)
        if i >= 3:
            times.append(elapsed)
    return statistics.median(times)


class Fused:
    """torch's fused AdamW over fp32 copies of the weights; with `casts`, the two casts of a graphed step first."""

    def __init__(self, weights: list[torch.Tensor], grads_bf16: list[torch.Tensor], casts: bool):
        self.params = [torch.nn.Parameter(w.clone()) for w in weights]
        for p, g in zip(self.params, grads_bf16):
            p.grad = torch.empty_like(p).copy_(g)
        self.optimizer = torch.optim.AdamW(self.params, **HYPER, fused=True)
        self.casts = casts
        self.cast_weights = [torch.empty_like(w, dtype=torch.bfloat16) for w in weights]
        self.grads_bf16 = grads_bf16

    def step(self) -> None:
        if self.casts:
            torch._foreach_copy_(self.cast_weights, self.params)
            torch._foreach_copy_([p.grad for p in self.params], self.grads_bf16)
        self.optimizer.step()


class Master:
    """kernels/master_adamw.py over fp32 weights with bf16 gradients and copies, launched as `launch`."""

    def __init__(self, weights: list[torch.Tensor], grads_bf16: list[torch.Tensor], launch: MasterAdamWLaunch):
        self.masters = [w.clone() for w in weights]
        self.copies = [m.to(torch.bfloat16) for m in self.masters]
        self.moments = [[torch.zeros_like(m) for m in self.masters] for _ in range(2)]
        self.grads = grads_bf16
        self.launch = launch
        self.tables = None
        self.count = 0

    def step(self) -> None:
        self.count += 1
        beta1, beta2 = HYPER["betas"]
        self.tables = master_adamw_step(self.copies, self.grads, self.masters, *self.moments, lr=HYPER["lr"],
                                        beta1=beta1, beta2=beta2, eps=HYPER["eps"],
                                        weight_decay=HYPER["weight_decay"], step=self.count, tables=self.tables,
                                        launch=self.launch)


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--repeats", type=int, default=20)
    parser.add_argument("--launches", default="1024x1w4,1024x2w4,1024x4w4,2048x1w8,2048x2w8",
                        help="master_adamw launches, comma-separated BLOCKxPROGRAMSwWARPS")
    parser.add_argument("--quick", action="store_true", help="the small test UNet (2.8M parameters)")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--out", default=os.environ.get("OUT", "."))
    args = parser.parse_args(argv)
    launches = [parse_launch(s) for s in args.launches.split(",")]
    device = torch.device(args.device)
    torch.manual_seed(0)
    weights = copied_weights(args.quick, device)
    count = sum(w.numel() for w in weights)
    generator = torch.Generator(device=device).manual_seed(1)
    grads = [torch.empty_like(w, dtype=torch.bfloat16).copy_(torch.randn(w.shape, device=device, generator=generator))
             for w in weights]
    print(f"{count / 1e6:.1f}M parameters in {len(weights)} tensors on {device}", flush=True)

    reference = Fused(weights, grads, casts=False)
    reference.step()
    rows = []
    contenders = [("fused AdamW", 28, lambda: Fused(weights, grads, casts=False)),
                  ("casts + fused AdamW", 40, lambda: Fused(weights, grads, casts=True))]
    contenders += [(f"master_adamw {la.block}x{la.blocks_per_program}w{la.num_warps}", 28,
                    lambda la=la: Master(weights, grads, la)) for la in launches]
    for label, bytes_per_parameter, make in contenders:
        contender = make()
        contender.step()  # from the same state as the reference's step
        row = dict(step=label, bytes_per_parameter=bytes_per_parameter)
        if isinstance(contender, Master):
            row["max_abs_difference"] = max(float((m - p.detach()).abs().max()) for m, p in
                                            zip(contender.masters, reference.params))
            row["copies_exact"] = all(torch.equal(c, m.to(torch.bfloat16))
                                      for c, m in zip(contender.copies, contender.masters))
        row["ms"] = timed(contender.step, device, args.repeats)
        row["gb_per_s"] = bytes_per_parameter * count / (row["ms"] / 1e3) / 1e9
        print(f"  {label}: {row['ms']:.3f} ms", flush=True)
        rows.append(row)
        del contender
    result = dict(device=torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
                  torch=torch.__version__, parameters=count, tensors=len(weights), repeats=args.repeats, rows=rows)
    Path(args.out).mkdir(parents=True, exist_ok=True)
    (Path(args.out) / "bench_master_adamw.json").write_text(json.dumps(result, indent=2))
    print(f"\n{result['device']}, {count / 1e6:.1f}M parameters, medians of {args.repeats}\n")
    print("| step | bytes / param | ms | GB/s | max abs diff to fused AdamW | copies = weights rounded |")
    print("|---|---|---|---|---|---|")
    for row in rows:
        diff = f"{row['max_abs_difference']:.2e}" if "max_abs_difference" in row else "-"
        exact = ("yes" if row["copies_exact"] else "NO") if "copies_exact" in row else "-"
        print(f"| {row['step']} | {row['bytes_per_parameter']} | {row['ms']:.3f} | {row['gb_per_s']:.0f} | {diff} | "
              f"{exact} |")
    return result


if __name__ == "__main__":
    main()
