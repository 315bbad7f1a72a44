"""Bytes autograd keeps for backward in one training forward, with and without `recompute_cheap` (no GPU needed).

    python benchmarks/count_kept_activations.py [--configs ae128,brats,unet]

Builds the models on the meta device (no memory, no compute), runs the forward (autoencoders: encode -> posterior
sample -> decode; the UNet: eps prediction at random timesteps) under saved-tensor hooks and adds up what is kept:
all tensors, and the volumes (rank-5 tensors) alone. fp32, no autocast.
On the meta device attention takes PyTorch's math path and keeps its token-by-token matrix, which flash attention on
a GPU does not: read the volume column for what `recompute_cheap` changes. Cases: `ae128` is bench_models' 1x1x128^3
autoencoder (MONAI's architecture), `brats` is configs/autoencoder/brats_kl_f4_3d.yaml at its batch 2 x 4 x 128^3,
`unet` bench_models' 166M UNet on 4 x 4 x 32^3.
"""
from __future__ import annotations

import argparse
import sys
from typing import Callable
from pathlib import Path

import torch
from omegaconf import OmegaConf
from torch import nn

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from benchmarks.bench_models import CASES, build_ours  # noqa: E402
from ldm.models.autoencoder import AutoencoderKL  # noqa: E402
from ldm.modules.recomputed_conv import set_recompute_cheap  # noqa: E402

GIB = 2 ** 30


def build(name: str) -> tuple[nn.Module, Callable[[nn.Module], torch.Tensor]]:
    """The model (on CPU) and its training forward on meta inputs."""
    if name in ("ae128", "unet"):
        case = CASES[name]
        model = build_ours(case, "torch", compvis_decoder=False)
        if name == "unet":
            return model, lambda m: m(torch.empty(case.input_shape, device="meta"),
                                      torch.zeros(case.batch, device="meta"))
        return model, lambda m: m.decode(m.encode(torch.empty(case.input_shape, device="meta")).sample())
    if name == "brats":
        params = OmegaConf.load(ROOT / "configs" / "autoencoder" / "brats_kl_f4_3d.yaml").model.params
        ddconfig = {**OmegaConf.to_container(params.ddconfig), "kernels": "torch"}
        model = AutoencoderKL(ddconfig, {"target": "torch.nn.Identity"}, embed_dim=params.embed_dim)
        return model, lambda m: m.decode(m.encode(torch.empty(2, 4, 128, 128, 128, device="meta")).sample())
    raise SystemExit(f"unknown config {name!r}: ae128, brats or unet")


def kept_bytes(model: nn.Module, forward: Callable[[nn.Module], torch.Tensor]) -> tuple[int, int]:
    """(all kept bytes, kept bytes of rank-5 tensors), parameters excluded."""
    totals = [0, 0]

    def pack(t: torch.Tensor) -> torch.Tensor:
        if not isinstance(t, nn.Parameter):
            size = t.numel() * t.element_size()
            totals[0] += size
            totals[1] += size if t.dim() == 5 else 0
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        forward(model)
    return totals[0], totals[1]


def main(argv: list[str] | None = None) -> list[dict]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--configs", default="ae128,brats,unet")
    args = parser.parse_args(argv)
    rows = []
    for name in args.configs.split(","):
        model, forward = build(name)
        model = model.to("meta")
        for recompute in (False, True):
            set_recompute_cheap(model, recompute)
            everything, volumes = kept_bytes(model, forward)
            rows.append(dict(config=name, recompute_cheap=recompute, all_gib=everything / GIB,
                             volumes_gib=volumes / GIB))
    print("| config | recompute_cheap | kept, all (GiB fp32) | kept, volumes (GiB fp32) |")
    print("|---|---|---|---|")
    for r in rows:
        print(f"| {r['config']} | {r['recompute_cheap']} | {r['all_gib']:.2f} | {r['volumes_gib']:.2f} |")
    return rows


if __name__ == "__main__":
    main()
