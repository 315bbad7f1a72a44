"""Nearest-neighbour 2x upsampling of channels-last bf16 volumes, forward and backward: kernels.upsample against the
broadcast copy the models used before (ldm.modules.nn_dims, the channels-last path) and F.interpolate.

    python benchmarks/bench_upsample.py [--out DIR]

Shapes: the UNet's two upsamplers (4 x 512 x 8^3, 4 x 256 x 16^3) and the 128^3 autoencoder's (1 x 128 x 32^3 and
64^3). Each is checked against F.interpolate (forward, exact) and against the summed reshape (backward), then timed as
GPU time: calls captured in a CUDA graph over enough distinct inputs to exceed 4x the L2 cache, replayed 20 times,
median replay over the number of inputs. % = bytes moved (input read once, output written once; backward the
reverse) / time / measured copy bandwidth. Writes DIR/bench_upsample.json ($OUT when set), prints a table last.
"""
from __future__ import annotations

import sys
from pathlib import Path

import torch
from torch.nn import functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from benchmarks.bench_channel_sum import gpu_benchmark, input_sets, timed_row, write_report  # noqa: E402
from kernels.upsample import upsample_nearest, upsample_nearest_backward  # noqa: E402
from ldm.modules.nn_dims import _upsample_nearest_broadcast  # noqa: E402

SHAPES = [(4, 512, 8, 8, 8), (4, 256, 16, 16, 16), (1, 128, 32, 32, 32), (1, 128, 64, 64, 64)]
FACTORS = (2, 2, 2)


def broadcast_backward(dy: torch.Tensor) -> torch.Tensor:
    """What autograd does for the broadcast copy: sum the (D, 2, H, 2, W, 2) view over the factor axes."""
    n, c, d, h, w = dy.shape
    return dy.movedim(1, -1).reshape(n, d // 2, 2, h // 2, 2, w // 2, 2, c).sum(dim=(2, 4, 6)).movedim(-1, 1)


def interpolate_backward(dy: torch.Tensor) -> torch.Tensor:
    """F.interpolate's backward (aten's nearest-3D backward kernel)."""
    input_size = [*dy.shape[:2], *(s // 2 for s in dy.shape[2:])]
    return torch.ops.aten.upsample_nearest3d_backward(dy, list(dy.shape[2:]), input_size, None, None, None)


def main() -> None:
    args, device, bandwidth = gpu_benchmark(__doc__, "bench_upsample.py")
    rows = []
    for shape in SHAPES:
        nbytes = 2 * torch.Size(shape).numel() * 9  # bf16: input once + 8x larger output once
        sets = input_sets(nbytes, device)
        xs = [torch.randn(shape, device=device, dtype=torch.bfloat16).contiguous(memory_format=torch.channels_last_3d)
              for _ in range(sets)]
        dys = [torch.randn(*shape[:2], *(2 * s for s in shape[2:]), device=device, dtype=torch.bfloat16)
               .contiguous(memory_format=torch.channels_last_3d) for _ in range(sets)]
        expected = F.interpolate(xs[0], scale_factor=2, mode="nearest")
        expected_dx = broadcast_backward(dys[0].float())
        cases = (("forward", "ours", lambda x: upsample_nearest(x, FACTORS), xs, expected),
                 ("forward", "broadcast copy", lambda x: _upsample_nearest_broadcast(x, FACTORS, True), xs, expected),
                 ("forward", "F.interpolate", lambda x: F.interpolate(x, scale_factor=2, mode="nearest"), xs,
                  expected),
                 ("backward", "ours", lambda dy: upsample_nearest_backward(dy, torch.Size(shape), FACTORS), dys,
                  expected_dx),
                 ("backward", "broadcast copy", broadcast_backward, dys, expected_dx),
                 ("backward", "F.interpolate", interpolate_backward, dys, expected_dx))
        for direction, name, fn, inputs, reference in cases:
            err = ((fn(inputs[0]).float() - reference.float()).abs().max() / reference.float().abs().max()).item()
            rows.append(timed_row(fn, inputs, nbytes, bandwidth, err, shape=list(shape), direction=direction,
                                  variant=name))
        del xs, dys
        torch.cuda.empty_cache()
    write_report(args.out, "bench_upsample.json", bandwidth, rows)
    print(f"\n2x nearest upsampling of channels-last bf16, {torch.cuda.get_device_name()}, copy "
          f"{bandwidth / 1e12:.2f} TB/s; GPU ms (% of copy bandwidth), median of CUDA-graph replays; err = max error "
          f"/ max |value|")
    print("| input | direction | variant | ms | err |")
    print("|---|---|---|---|---|")
    for r in rows:
        print(f"| {'x'.join(map(str, r['shape']))} | {r['direction']} | {r['variant']} | {r['ms']:.4f} "
              f"({r['pct']:.0f}%) | {r['max_rel_err']:.1e} |")


if __name__ == "__main__":
    main()
