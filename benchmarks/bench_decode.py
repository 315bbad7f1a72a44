"""Decoding large latents: the plain decode against the decode in slabs (ldm/modules/diffusionmodules/slab_decode.py).

    python benchmarks/bench_decode.py [--latents 64x64x64,64x64x128] [--slabs 64,32] [--repeat 3]
                                      [--storage cuda|cpu] [--quick] [--out DIR]

The decoder is the BraTS autoencoder's (configs/autoencoder/brats_kl_f4_3d.yaml: channels 64/128/256, f = 4, 3 res
blocks per level, attention in the mid block) with random weights, in eval mode, bf16 autocast, Triton GroupNorm on
CUDA. For each latent (B = 1, 4 channels) it decodes plainly (an out-of-memory is reported, not fatal) and in slabs of
each `--slabs` output rows, and prints seconds (median of `--repeat` after one warm-up), peak GPU memory, and the
largest absolute difference to the plain decode (bf16; then, on CUDA, once in fp32 with TF32 off on the smaller
`--exact-latent`, where only rounding separates them).
Writes DIR/bench_decode.json (DIR: --out, else $OUT, else .) and prints a markdown table last.
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

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from benchmarks.bench_models import fmt  # noqa: E402
from ldm.modules.diffusionmodules.model import build_encoder_decoder  # noqa: E402
from ldm.modules.diffusionmodules.slab_decode import decode_in_slabs  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
GIB = 2 ** 30


def brats_decoder(quick: bool) -> torch.nn.Module:
    """The BraTS autoencoder's Decoder (tiny channels with --quick), random weights, eval mode."""
    ddconfig = OmegaConf.to_container(OmegaConf.load(REPO / "configs/autoencoder/brats_kl_f4_3d.yaml")
                                      .model.params.ddconfig)
    if quick:
        ddconfig.update(ch=8, norm_num_groups=4)
    torch.manual_seed(0)
    return build_encoder_decoder(ddconfig)[1].eval()


def timed(fn, device: torch.device, repeat: int) -> tuple[torch.Tensor, float, float | None]:
    """(output, median seconds of `repeat` runs after one warm-up, peak GiB over the timed runs)."""
    out = fn()
    del out
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)
    seconds = []
    for _ in range(repeat):
        start = time.perf_counter()
        out = fn()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        seconds.append(time.perf_counter() - start)
    peak = torch.cuda.max_memory_allocated(device) / GIB if device.type == "cuda" else None
    return out, statistics.median(seconds), peak


def measure(name: str, fn, device: torch.device, repeat: int, reference: torch.Tensor | None, row: dict) -> \
        torch.Tensor | None:
    """Fills `row` (method, seconds, peak, difference to `reference`); returns the output on the CPU, or None."""
    row["method"] = name
    try:
        out, seconds, peak = timed(fn, device, repeat)
    except RuntimeError as err:  # out of memory, or a kernel refusing the size: a row, not the run's end
        row["status"] = f"{type(err).__name__}: {str(err).splitlines()[0][:120]}"
        return None
    finally:
        if device.type == "cuda":
            torch.cuda.empty_cache()
    out = out.float().cpu()
    row.update(status="ok", seconds=seconds, peak_gib=peak, output_abs_max=out.abs().max().item())
    if reference is not None:
        row["max_abs_diff"] = (out - reference).abs().max().item()
    print(json.dumps(row), flush=True)
    return out


def run(args: argparse.Namespace) -> list[dict]:
    device = torch.device(args.device)
    torch.backends.cudnn.benchmark = True
    decoder = brats_decoder(args.quick).to(device)
    storage = None if args.storage == device.type else args.storage
    rows = []
    for index, latent in enumerate(args.latents):
        z = torch.randn(1, decoder.z_channels, *latent, device=device)
        output_shape = [s * decoder.factor for s in latent]
        base = dict(latent=list(latent), output=output_shape)
        with torch.no_grad(), torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda"):
            row = dict(base, precision="bf16" if device.type == "cuda" else "fp32")
            reference = measure("plain", lambda: decoder(z), device, args.repeat, None, row)
            rows.append(row)
            for slab in args.slabs:
                row = dict(base, precision=rows[-1]["precision"])
                measure(f"slabs of {slab}", lambda: decode_in_slabs(decoder, z, slab, storage), device, args.repeat,
                        reference, row)
                rows.append(row)
            del reference
    if device.type == "cuda":
        rows += exactness_rows(decoder, args, device, storage)
    return rows


def exactness_rows(decoder: torch.nn.Module, args: argparse.Namespace, device: torch.device,
                   storage: str | None) -> list[dict]:
    """Plain against slabs in fp32 with TF32 off, on the smaller `--exact-latent` (fp32 3D convolutions without
    TF32 take seconds per decode at 256^3): only rounding separates them."""
    z = torch.randn(1, decoder.z_channels, *args.exact_latent, device=device)
    slab = max(1, args.slabs[-1] // 2)
    base = dict(latent=list(args.exact_latent), output=[s * decoder.factor for s in args.exact_latent],
                precision="fp32, no TF32")
    allow = torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32
    torch.backends.cudnn.allow_tf32 = torch.backends.cuda.matmul.allow_tf32 = False
    try:
        with torch.no_grad():
            plain, slabs = dict(base), dict(base)
            reference = measure("plain", lambda: decoder(z), device, 1, None, plain)
            measure(f"slabs of {slab}", lambda: decode_in_slabs(decoder, z, slab, storage), device, 1, reference,
                    slabs)
    finally:
        torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32 = allow
    return [plain, slabs]


def markdown_table(rows: list[dict]) -> str:
    lines = ["| latent -> output | precision | method | seconds | peak GiB | max abs diff to plain | output abs max "
             "| status |", "|---|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {'x'.join(map(str, r['latent']))} -> {'x'.join(map(str, r['output']))} | {r['precision']} "
                     f"| {r['method']} | {fmt(r.get('seconds'), '.3f')} | {fmt(r.get('peak_gib'), '.2f')} "
                     f"| {fmt(r.get('max_abs_diff'), '.2e')} | {fmt(r.get('output_abs_max'), '.2f')} "
                     f"| {r['status']} |")
    return "\n".join(lines)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--latents", default=None, help="latent sizes DxHxW, comma-separated (default "
                                                        "64x64x64,64x64x128; --quick 8x8x8)")
    parser.add_argument("--exact-latent", default="32x32x32",
                        help="latent of the fp32 exactness check (CUDA only; default 32x32x32)")
    parser.add_argument("--slabs", default=None, help="slab sizes in output rows (default 64,32; --quick 8)")
    parser.add_argument("--repeat", type=int, default=None, help="timed runs per method (default 3; --quick 1)")
    parser.add_argument("--storage", default=None, help="where whole intermediate tensors live (default: the device)")
    parser.add_argument("--quick", action="store_true", help="a tiny decoder on small latents: a smoke test")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--out", default=os.environ.get("OUT", "."), help="folder for bench_decode.json")
    args = parser.parse_args(argv)
    latents = args.latents or ("8x8x8" if args.quick else "64x64x64,64x64x128")
    args.latents = [tuple(int(s) for s in shape.split("x")) for shape in latents.split(",")]
    args.exact_latent = tuple(int(s) for s in args.exact_latent.split("x"))
    args.slabs = [int(s) for s in (args.slabs or ("8" if args.quick else "64,32")).split(",")]
    args.repeat = args.repeat or (1 if args.quick else 3)
    args.storage = args.storage or torch.device(args.device).type
    return args


def main(argv: list[str] | None = None) -> list[dict]:
    args = parse_args(argv)
    name = torch.cuda.get_device_name(args.device) if args.device.startswith("cuda") else "CPU"
    print(f"device: {name}, torch {torch.__version__}", flush=True)
    rows = run(args)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "bench_decode.json").write_text(json.dumps(dict(device=name, torch=torch.__version__,
                                                           args={k: str(v) for k, v in vars(args).items()},
                                                           rows=rows), indent=1))
    print(f"\nDecode of the BraTS autoencoder (random weights), batch 1, {name}; intermediate tensors on "
          f"{args.storage}")
    print(markdown_table(rows))
    return rows


if __name__ == "__main__":
    main()
