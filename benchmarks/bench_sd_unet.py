"""Stable Diffusion 1.5-size UNet training step: ours against diffusers' UNet2DConditionModel of the same weights.

    python benchmarks/bench_sd_unet.py [--quick] [--batch 8] [--steps 10] [--checkpointing] [--out DIR]

Both networks hold the same random weights (diffusers' model built from SD 1.5's published UNet config, ours
converted from it by `ldm.convert.unet`), and their outputs are compared first (fp32, one sample; relative error
||ours - theirs|| / ||theirs|| in the table). A step is SD's epsilon training step: latents (B, 4, 64, 64), text
context (B, 77, 768), random timesteps, bf16 autocast, MSE against the noise, backward, fused AdamW over all weights.
diffusers runs with its default attention processor (PyTorch SDPA, its best without xformers); ours with its
defaults (attention dispatcher, GroupNorm kernels `auto`). `--checkpointing` adds a row each with activation
checkpointing (diffusers' `enable_gradient_checkpointing`, ours `use_checkpoint`).
Reports the median step time over `--steps` timed steps after 2 warm-up steps, and the peak allocated memory.
Writes DIR/bench_sd_unet.json (DIR: --out, else $OUT, else .) and prints a markdown table last.
Without CUDA only `--quick` runs: a tiny SD-1.x-shaped UNet, fp32, host timers (a correctness check, not numbers).
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
from torch import nn
from torch.nn import functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from ldm.convert import unet as convert_unet  # noqa: E402

GIB = 2 ** 30
SD15 = dict(cross_attention_dim=768, attention_head_dim=8, sample_size=64)  # the rest are diffusers' defaults
QUICK = dict(block_out_channels=(32, 64), layers_per_block=1, cross_attention_dim=32, attention_head_dim=4,
             norm_num_groups=32, sample_size=8, down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
             up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"))
CONTEXT_TOKENS = 77


def build_pair(config: dict, checkpointing: bool) -> tuple[nn.Module, nn.Module]:
    """(diffusers' UNet2DConditionModel from `config`, ours with its weights)."""
    import diffusers

    torch.manual_seed(0)
    theirs = diffusers.UNet2DConditionModel(**config)
    state = theirs.state_dict()
    heads = convert_unet.heads_from_diffusers(theirs.config, list(theirs.config.block_out_channels))
    params = convert_unet.infer_config(state, "diffusers", "", *heads)
    ours = convert_unet.build({**params, "use_checkpoint": checkpointing})
    ours.load_state_dict(convert_unet.state_to_ours(ours, state, "diffusers", "", "diffusers UNet"))
    if checkpointing:
        theirs.enable_gradient_checkpointing()
    return theirs, ours


def forward_fn(model: nn.Module, kind: str) -> Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]:
    if kind == "diffusers":
        return lambda x, t, context: model(x, t, encoder_hidden_states=context).sample
    return lambda x, t, context: model(x, t, context=context)


def output_error(theirs: nn.Module, ours: nn.Module, config: dict, device: torch.device) -> float:
    """||ours - theirs|| / ||theirs|| of the eval-mode fp32 outputs for one random input."""
    size = config["sample_size"]
    generator = torch.Generator().manual_seed(1)
    x = torch.randn(1, 4, size, size, generator=generator).to(device)
    context = torch.randn(1, CONTEXT_TOKENS, config["cross_attention_dim"], generator=generator).to(device)
    t = torch.tensor([531], device=device)
    with torch.no_grad():
        a = forward_fn(theirs.eval(), "diffusers")(x, t, context)
        b = forward_fn(ours.eval(), "ours")(x, t, context)
    return float((b - a).norm() / a.norm())


def time_steps(model: nn.Module, kind: str, config: dict, batch: int, steps: int, device: torch.device,
               bf16: bool) -> tuple[list[float], float | None, float]:
    """(step times in ms, peak allocated GiB or None on CPU, last loss) of `steps` timed training steps."""
    model.train()
    forward = forward_fn(model, kind)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-5, fused=device.type == "cuda")
    size = config["sample_size"]
    generator = torch.Generator(device).manual_seed(2)
    x = torch.randn(batch, 4, size, size, device=device, generator=generator)
    noise = torch.randn(x.shape, device=device, generator=generator)
    context = torch.randn(batch, CONTEXT_TOKENS, config["cross_attention_dim"], device=device, generator=generator)
    t = torch.randint(0, 1000, (batch,), device=device, generator=generator)

    def step() -> torch.Tensor:
        optimizer.zero_grad(set_to_none=True)
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16):
            loss = F.mse_loss(forward(x, t, context).float(), noise)
        loss.backward()
        optimizer.step()
        return loss.detach()

    for _ in range(2):
        step()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
    times = []
    for _ in range(steps):
        start = time.perf_counter()
        loss = step()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        times.append((time.perf_counter() - start) * 1e3)
    peak = torch.cuda.max_memory_allocated(device) / GIB if device.type == "cuda" else None
    return times, peak, float(loss)


def measure(config: dict, args: argparse.Namespace, device: torch.device, checkpointing: bool) -> list[dict]:
    theirs, ours = build_pair(config, checkpointing)
    error = output_error(theirs.to(device), ours.to(device), config, device)
    rows = []
    for kind, model in (("diffusers", theirs), ("ours", ours)):
        other = ours if kind == "diffusers" else theirs
        other.cpu()  # one model's weights and optimizer state on the device at a time
        model.to(device)
        times, peak, loss = time_steps(model, kind, config, args.batch, args.steps, device, bf16=not args.quick)
        rows.append({"variant": kind + (" ckpt" if checkpointing else ""), "params": sum(p.numel() for p in
                                                                                         model.parameters()),
                     "step_ms": statistics.median(times), "peak_gib": peak, "loss": loss, "output_rel_error": error})
        model.cpu()
        if device.type == "cuda":
            torch.cuda.empty_cache()
    return rows


def markdown_table(rows: list[dict], title: str) -> str:
    lines = [title, "", "| variant | params | step ms (median) | peak GiB | vs diffusers | output rel. error |",
             "|---|---|---|---|---|---|"]
    for row in rows:
        base = next(r for r in rows if r["variant"] == row["variant"].replace("ours", "diffusers"))
        peak = "-" if row["peak_gib"] is None else f"{row['peak_gib']:.2f}"
        lines.append(f"| {row['variant']} | {row['params']:,} | {row['step_ms']:.1f} | {peak} | "
                     f"{row['step_ms'] / base['step_ms']:.2f}x | {row['output_rel_error']:.1e} |")
    return "\n".join(lines)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="tiny UNet, fp32, runs on CPU (a check, not numbers)")
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--steps", type=int, default=10, help="timed steps (after 2 warm-up steps)")
    parser.add_argument("--checkpointing", action="store_true", help="also time both with activation checkpointing")
    parser.add_argument("--out", default=None, help="folder for bench_sd_unet.json (default $OUT, else .)")
    args = parser.parse_args(argv)
    if args.batch < 1 or args.steps < 1:
        parser.error("--batch and --steps must be positive")
    return args


def main(argv: list[str] | None = None) -> list[dict]:
    args = parse_args(argv)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device.type == "cpu" and not args.quick:
        raise SystemExit("bench_sd_unet.py: without CUDA only --quick runs")
    config = QUICK if args.quick else SD15
    rows = measure(config, args, device, checkpointing=False)
    if args.checkpointing:
        rows += measure(config, args, device, checkpointing=True)
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "CPU"
    title = (f"{'tiny SD-1.x-shaped' if args.quick else 'SD 1.5'} UNet training step, batch {args.batch}, "
             f"{config['sample_size']}^2 latents, context {CONTEXT_TOKENS}x{config['cross_attention_dim']}, "
             f"{'fp32' if args.quick else 'bf16 autocast'}, fused AdamW, {device.type} ({name})")
    out = Path(args.out or os.environ.get("OUT") or ".")
    out.mkdir(parents=True, exist_ok=True)
    (out / "bench_sd_unet.json").write_text(json.dumps({"title": title, "rows": rows}, indent=1))
    print(markdown_table(rows, title))
    return rows


if __name__ == "__main__":
    main()
