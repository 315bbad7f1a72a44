"""Bytes autograd keeps for backward in one autoencoder forward, with and without `recompute_cheap` (no GPU needed).

    python benchmarks/count_kept_activations.py [--configs ae128,brats]

Builds the models on the meta device (no memory, no compute), runs encode -> posterior sample -> decode under
saved-tensor hooks and adds up what is kept: all tensors, and the volumes (rank-5 tensors) alone. fp32, no autocast.
On the meta device attention takes PyTorch's math path and keeps its token-by-token matrix, which flash attention on
a GPU does not: read the volume column for what `recompute_cheap` changes. Cases: `ae128` is bench_models' 1x1x128^3
autoencoder (MONAI's architecture), `brats` is configs/autoencoder/brats_kl_f4_3d.yaml at its batch 2 x 4 x 128^3.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch
from omegaconf import OmegaConf
from torch import nn

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from benchmarks.bench_models import CASES, build_ours  # noqa: E402
from ldm.models.autoencoder import AutoencoderKL  # noqa: E402
from ldm.modules.diffusionmodules.model import set_recompute_cheap  # noqa: E402

GIB = 2 ** 30


def build(name: str) -> tuple[nn.Module, tuple[int, ...]]:
    if name == "ae128":
        case = CASES["ae128"]
        return build_ours(case, "torch", compvis_decoder=False), case.input_shape
    if name == "brats":
        params = OmegaConf.load(ROOT / "configs" / "autoencoder" / "brats_kl_f4_3d.yaml").model.params
        ddconfig = {**OmegaConf.to_container(params.ddconfig), "kernels": "torch"}
        return AutoencoderKL(ddconfig, {"target": "torch.nn.Identity"}, embed_dim=params.embed_dim), (2, 4, 128, 128, 128)
    raise SystemExit(f"unknown config {name!r}: ae128 or brats")


def kept_bytes(model: nn.Module, shape: tuple[int, ...]) -> tuple[int, int]:
    """(all kept bytes, kept bytes of rank-5 tensors), parameters excluded."""
    totals = [0, 0]

    def pack(t: torch.Tensor) -> torch.Tensor:
        if not isinstance(t, nn.Parameter):
            size = t.numel() * t.element_size()
            totals[0] += size
            totals[1] += size if t.dim() == 5 else 0
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        model.decode(model.encode(torch.empty(shape, device="meta")).sample())
    return totals[0], totals[1]


def main(argv: list[str] | None = None) -> list[dict]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--configs", default="ae128,brats")
    args = parser.parse_args(argv)
    rows = []
    for name in args.configs.split(","):
        model, shape = build(name)
        model = model.to("meta")
        for recompute in (False, True):
            set_recompute_cheap(model, recompute)
            everything, volumes = kept_bytes(model, shape)
            rows.append(dict(config=name, input=shape, recompute_cheap=recompute, all_gib=everything / GIB,
                             volumes_gib=volumes / GIB))
    print("| config | input | recompute_cheap | kept, all (GiB fp32) | kept, volumes (GiB fp32) |")
    print("|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['config']} | {'x'.join(map(str, r['input']))} | {r['recompute_cheap']} | {r['all_gib']:.2f} | "
              f"{r['volumes_gib']:.2f} |")
    return rows


if __name__ == "__main__":
    main()
