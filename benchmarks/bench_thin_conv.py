"""The autoencoder's one-channel convolutions (conv_in 1 -> 64, conv_out 64 -> 1, 3x3x3) at 128^3, bf16,
channels-last, forward + backward, as cuDNN runs them and with the thin side zero-padded to more channels.

    python benchmarks/bench_thin_conv.py [--size 128] [--wide 64] [--thin 1] [--batch 1] [--pads 1,8] [--out DIR]

`--thin 4 --wide 128 --batch 4 --size 32 --pads 4,8,16`: the UNet's on a 4-channel latent. The Triton kernels
(kernels/thin_conv.py, "triton" rows) take up to 8 thin channels.
cuDNN's Hopper kernels want channel counts in multiples of 8; with one channel it falls back to older kernels that ran
these two layers, about 7 GFLOP each, in ~5 ms of a 90 ms step (bench_models --profile). Padding the thin side with zero
channels (zero weights) gives the same result: conv_in reads an input padded to P channels, conv_out computes P output
channels of which the first is kept. Times are CUDA-event medians of forward + backward (gradients of the weight, and
of the input where the layer needs one: conv_out's). Checks the padded results against the unpadded ones. Prints a table
last and writes DIR/bench_thin_conv.json.
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
from kernels.thin_conv import thin_conv3d  # noqa: E402

CL = torch.channels_last_3d


def padded_weight(weight: torch.Tensor, out_to: int, in_to: int) -> torch.Tensor:
    """(Cout, Cin, k, k, k) zero-padded to (out_to, in_to, k, k, k)."""
    return F.pad(weight, (0, 0, 0, 0, 0, 0, 0, in_to - weight.shape[1], 0, out_to - weight.shape[0]))


def conv_in(x, weight, bias, pad_to):
    """x: (B, T, S, S, S) -> (B, C, S, S, S); x and weight padded to pad_to input channels (0: the Triton kernels)."""
    if pad_to == 0:
        return thin_conv3d(x, weight, bias)
    if pad_to > x.shape[1]:
        x = F.pad(x, (0, 0, 0, 0, 0, 0, 0, pad_to - x.shape[1])).contiguous(memory_format=CL)
        weight = padded_weight(weight, weight.shape[0], pad_to)
    return F.conv3d(x, weight.contiguous(memory_format=CL), bias, padding=1)


def conv_out(h, weight, bias, pad_to):
    """h: (B, C, S, S, S) -> (B, T, S, S, S); pad_to output channels computed, the first T kept (0: the Triton
    kernels)."""
    if pad_to == 0:
        return thin_conv3d(h, weight, bias)
    thin = weight.shape[0]
    if pad_to > thin:
        weight = padded_weight(weight, pad_to, weight.shape[1])
        bias = F.pad(bias, (0, pad_to - thin))
    return F.conv3d(h, weight.contiguous(memory_format=CL), bias, padding=1)[:, :thin]


def time_ms(fn) -> float:
    return triton.testing.do_bench(fn, warmup=10, rep=100, return_mode="median")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--size", type=int, default=128)
    parser.add_argument("--wide", type=int, default=64)
    parser.add_argument("--thin", type=int, default=1, help="channels of the thin side")
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--pads", default="1,8", help="cuDNN with the thin side padded to these channel counts")
    parser.add_argument("--out", default=os.environ.get("OUT", "."))
    args = parser.parse_args()
    torch.backends.cudnn.benchmark = True
    dev, s, c, t, b = "cuda", args.size, args.wide, args.thin, args.batch
    x = torch.randn(b, t, s, s, s, device=dev).contiguous(memory_format=CL)
    h = torch.randn(b, c, s, s, s, device=dev).contiguous(memory_format=CL).requires_grad_()
    w_in = (0.1 * torch.randn(c, t, 3, 3, 3, device=dev)).requires_grad_()
    b_in = torch.zeros(c, device=dev, requires_grad=True)
    w_out = (0.02 * torch.randn(t, c, 3, 3, 3, device=dev)).requires_grad_()
    b_out = torch.zeros(t, device=dev, requires_grad=True)
    dy_in = torch.randn(b, c, s, s, s, device=dev, dtype=torch.bfloat16).contiguous(memory_format=CL)
    dy_out = torch.randn(b, t, s, s, s, device=dev, dtype=torch.bfloat16).contiguous(memory_format=CL)
    rows, reference = [], {}
    pads = [int(p) for p in args.pads.split(",")]
    if t not in pads:
        parser.error(f"--pads must include --thin ({t}): the unpadded reference")
    for pad in pads + [0]:
        for name, fn, inputs, params, dy in (("conv_in", conv_in, (x, w_in, b_in), (w_in, b_in), dy_in),
                                             ("conv_out", conv_out, (h, w_out, b_out), (h, w_out, b_out), dy_out)):
            def forward():
                with torch.autocast("cuda", torch.bfloat16):
                    return fn(*inputs, pad)

            def forward_backward():
                torch.autograd.grad(forward(), params, dy)
            y = forward()
            grads = torch.autograd.grad(y, params, dy)
            if pad == t:
                reference[name] = (y.float(), [g.float() for g in grads])
            ref_y, ref_grads = reference[name]
            err = max(((a.float() - b).norm() / b.norm()).item() for a, b in zip((y, *grads), (ref_y, *ref_grads)))
            with torch.no_grad():
                fwd = time_ms(forward)
            row = dict(layer=name, pad_to=pad, fwd_ms=fwd, fwd_bwd_ms=time_ms(forward_backward), rel_err_vs_unpadded=err,
                       out_layout_channels_last=bool(y.is_contiguous(memory_format=CL)) if name == "conv_in" else None)
            rows.append(row)
            print(json.dumps(row), flush=True)
    Path(args.out).mkdir(parents=True, exist_ok=True)
    (Path(args.out) / "bench_thin_conv.json").write_text(json.dumps(rows, indent=1))
    print(f"\nthin convolutions, {torch.cuda.get_device_name()}, bf16 autocast, {b} x {s}^3, {t} thin / {c} wide "
          f"channels, channels-last")
    print("| layer | cuDNN padded to / triton | fwd ms | fwd+bwd ms | rel. err vs unpadded |\n|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['layer']} | {r['pad_to'] or 'triton'} | {r['fwd_ms']:.3f} | {r['fwd_bwd_ms']:.3f} | {r['rel_err_vs_unpadded']:.1e} |")


if __name__ == "__main__":
    main()
