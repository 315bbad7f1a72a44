"""CPU micro benchmarks, timed by pytest-benchmark (not collected by the test suite, whose testpaths is tests/).

    python -m pytest benchmarks --benchmark-only            # a table of every benchmark, GPU ones skipped on a CPU
    python -m pytest benchmarks/test_bench_cpu.py --benchmark-only --benchmark-columns=median,iqr,rounds

Each case checks its two variants agree before it is timed, so a table row is never the time of a wrong result:
- EMA update of the BraTS UNet at width 32 (its ~290 parameter tensors, small): `LitEma`'s one multi-tensor lerp
  against the per-parameter loop it replaced (benchmarks/bench_ema.py, which also times the 169M-parameter UNet);
- the BraTS decoder at tiny width, plain against in slabs of 4 output rows (benchmarks/bench_decode.py times the full
  decoder on a GPU);
- attention through the dispatcher (`ldm.modules.attention.attention`) against the explicit softmax(q k^T) v.
"""
from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from benchmarks.bench_decode import brats_decoder  # noqa: E402
from benchmarks.bench_ema import build_unet, per_parameter_update  # noqa: E402
from ldm.modules.attention import attention  # noqa: E402
from ldm.modules.diffusionmodules.slab_decode import decode_in_slabs  # noqa: E402
from ldm.modules.ema import LitEma  # noqa: E402


@pytest.fixture(scope="module")
def unet():
    torch.manual_seed(0)
    return build_unet(32)


@pytest.mark.parametrize("variant", ["LitEma", "per_parameter"])
def test_ema_update(benchmark, unet, variant):
    ema, reference = LitEma(unet), LitEma(unet)
    with torch.no_grad():
        for p in unet.parameters():
            p.add_(torch.randn_like(p), alpha=1e-2)
    ema(unet)
    per_parameter_update(reference, unet)
    for name in ema.shadow_names.values():
        torch.testing.assert_close(ema.get_buffer(name), reference.get_buffer(name))
    update = (lambda: ema(unet)) if variant == "LitEma" else (lambda: per_parameter_update(reference, unet))
    benchmark(update)


@pytest.fixture(scope="module")
def decoder():
    return brats_decoder(quick=True)


@pytest.mark.parametrize("variant", ["plain", "slabs_of_4"])
@torch.no_grad()
def test_decode(benchmark, decoder, variant):
    z = torch.randn(1, 4, 4, 4, 4, generator=torch.Generator().manual_seed(0))  # z_channels 4: output 1 x 4 x 16^3
    plain = decoder(z)
    run = (lambda: decoder(z)) if variant == "plain" else (lambda: decode_in_slabs(decoder, z, 4))
    torch.testing.assert_close(run(), plain, rtol=1e-4, atol=1e-4)
    benchmark(run)


@pytest.mark.parametrize("variant", ["dispatcher", "explicit"])
def test_attention(benchmark, variant):
    gen = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(2, 4, 512, 32, generator=gen) for _ in range(3))

    def explicit():
        return torch.softmax(q @ k.transpose(-1, -2) / q.shape[-1] ** 0.5, dim=-1) @ v

    run = (lambda: attention(q, k, v)) if variant == "dispatcher" else explicit
    torch.testing.assert_close(run(), explicit(), rtol=1e-4, atol=1e-5)
    benchmark(run)
