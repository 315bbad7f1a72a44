"""One EMA update of the BraTS LDM's UNet (configs/latent-diffusion/brats_mask_concat_3d.yaml): `LitEma` (one
multi-tensor lerp, decay from host counters) against the per-parameter loop it replaced (CompVis' formula, kept
here as the reference).

    python benchmarks/bench_ema.py [--width 128] [--repeats 20] [--device cuda] [--out DIR]

Builds the UNet from the config with model_channels = --width (128: the config's 169M parameters; a small width
keeps the ~860 parameter tensors but makes them tiny, so that on a CPU the timing is the host's dispatch cost rather
than arithmetic). Checks that both updates give the same averages over three updates, then times each: "host" is the
time until the call returns, "total" until the device has finished (torch.cuda.synchronize), medians of --repeats
updates after two warm-ups; on a CPU the two are the same. Writes DIR/bench_ema.json ($OUT when set) and prints a
markdown table last.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path

import torch
from omegaconf import OmegaConf

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from ldm.modules.ema import LitEma  # noqa: E402
from ldm.util import instantiate_from_config  # noqa: E402

CONFIG = ROOT / "configs" / "latent-diffusion" / "brats_mask_concat_3d.yaml"


def build_unet(width: int) -> torch.nn.Module:
    unet_config = OmegaConf.load(CONFIG).model.params.unet_config
    unet_config.params.model_channels = width
    unet_config.params.kernels = "torch"
    return instantiate_from_config(unet_config)


@torch.no_grad()
def per_parameter_update(ema: LitEma, model: torch.nn.Module) -> None:
    """The replaced update: decay read from the device, three kernels per parameter."""
    decay = float(ema.decay)
    if ema.num_updates >= 0:
        n = int(ema.num_updates) + 1
        decay = min(decay, (1 + n) / (10 + n))
        ema.num_updates += 1
    params = dict(model.named_parameters())
    for name, shadow_name in ema.shadow_names.items():
        shadow = ema.get_buffer(shadow_name)
        shadow.sub_((1.0 - decay) * (shadow - params[name].detach().to(shadow.dtype)))


def timed(update, device: torch.device, repeats: int) -> tuple[float, float]:
    """(median host ms, median total ms) of `update()`."""
    host, total = [], []
    for i in range(repeats + 2):
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        start = time.perf_counter()
        update()
        returned = time.perf_counter()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        finished = time.perf_counter()
        if i >= 2:
            host.append(1e3 * (returned - start))
            total.append(1e3 * (finished - start))
    return statistics.median(host), statistics.median(total)


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--width", type=int, default=128, help="the UNet's model_channels (config: 128)")
    parser.add_argument("--repeats", type=int, default=20)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--out", default=os.environ.get("OUT", "."))
    args = parser.parse_args(argv)
    device = torch.device(args.device)
    torch.manual_seed(0)
    model = build_unet(args.width).to(device)
    tensors = sum(1 for p in model.parameters() if p.requires_grad)
    count = sum(p.numel() for p in model.parameters() if p.requires_grad)
    ours, reference = LitEma(model).to(device), LitEma(model).to(device)

    for _ in range(3):  # the same averages from both, while the warm-up decay changes every step
        with torch.no_grad():
            for p in model.parameters():
                p.add_(torch.randn_like(p), alpha=1e-2)
        ours(model)
        per_parameter_update(reference, model)
    worst = max(float((ours.get_buffer(k) - reference.get_buffer(k)).abs().max()) for k in ours.shadow_names.values())
    scale = max(float(ours.get_buffer(k).abs().max()) for k in ours.shadow_names.values())
    if worst > 1e-6 * scale:
        raise SystemExit(f"the two updates disagree: max abs difference {worst:.3g} (largest average {scale:.3g})")

    rows = []
    for name, update in [("per-parameter loop (replaced)", lambda: per_parameter_update(reference, model)),
                         ("LitEma (foreach lerp)", lambda: ours(model))]:
        host_ms, total_ms = timed(update, device, args.repeats)
        rows.append(dict(update=name, host_ms=host_ms, total_ms=total_ms))
    device_name = torch.cuda.get_device_name(device) if device.type == "cuda" else "CPU"
    result = dict(device=device_name, torch=torch.__version__, width=args.width, tensors=tensors, parameters=count,
                  max_abs_difference=worst, rows=rows)
    Path(args.out).mkdir(parents=True, exist_ok=True)
    (Path(args.out) / "bench_ema.json").write_text(json.dumps(result, indent=2))
    print(f"{device_name}, torch {torch.__version__}: UNet width {args.width}, {tensors} parameter tensors, "
          f"{count / 1e6:.1f}M parameters; max abs difference of the averages {worst:.2g}")
    print("| update | host ms | total ms |\n|---|---|---|")
    for row in rows:
        print(f"| {row['update']} | {row['host_ms']:.2f} | {row['total_ms']:.2f} |")
    return result


if __name__ == "__main__":
    main()
