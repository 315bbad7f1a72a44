"""The UNet decoder's skip concatenation of channels-last bf16 volumes, forward and backward: kernels.concat against
torch.cat (with the dense copy of h's gradient that ldm.modules.nn_dims.concat_skip adds to it).

    python benchmarks/bench_concat.py [--out DIR]

Shapes: the concatenations of the 166M UNet's decoder at 4 x 4 x 32^3 (h and skip channels at 32^3, 16^3 and 8^3).
Each is checked against torch.cat (forward and h's gradient, exact), then timed as GPU time: calls captured in a CUDA
graph over enough distinct inputs to exceed 4x the L2 cache, replayed 20 times, median replay over the number of
inputs. Forward: both inputs read, the output written; backward: h's channels of the gradient read and written
dense. % = those bytes / time / measured copy bandwidth. Writes DIR/bench_concat.json ($OUT when set), prints a table
last.
"""
from __future__ import annotations

import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from benchmarks.bench_channel_sum import gpu_benchmark, input_sets, timed_row, write_report  # noqa: E402
from kernels.concat import concat_channels, leading_channels_dense  # noqa: E402
from kernels.layout import dense  # noqa: E402

# (N, C_h, C_skip, size): the UNet's decoder inputs, 32^3 (128 + 128, 256 + 128), 16^3 (256 + 256), 8^3 (512 + 512)
SHAPES = [(4, 128, 128, 32), (4, 256, 128, 32), (4, 256, 256, 16), (4, 512, 512, 8)]


def channels_last(shape: tuple[int, ...], device: torch.device) -> torch.Tensor:
    return torch.randn(shape, device=device, dtype=torch.bfloat16).contiguous(memory_format=torch.channels_last_3d)


def main() -> None:
    args, device, bandwidth = gpu_benchmark(__doc__, "bench_concat.py")
    rows = []
    for n, c_h, c_skip, size in SHAPES:
        spatial = (size, size, size)
        forward_bytes = 2 * 2 * n * (c_h + c_skip) * size ** 3      # bf16: inputs read, output written
        backward_bytes = 2 * 2 * n * c_h * size ** 3                # h's channels read, written dense
        sets = input_sets(forward_bytes, device)
        pairs = [(channels_last((n, c_h, *spatial), device), channels_last((n, c_skip, *spatial), device))
                 for _ in range(sets)]
        grads = [channels_last((n, c_h + c_skip, *spatial), device) for _ in range(sets)]
        expected, expected_dh = torch.cat(pairs[0], dim=1), grads[0][:, :c_h]
        cases = (("forward", "ours", lambda p: concat_channels(*p), pairs, expected, forward_bytes),
                 ("forward", "torch.cat", lambda p: torch.cat(p, dim=1), pairs, expected, forward_bytes),
                 ("backward", "ours", lambda g: leading_channels_dense(g, c_h), grads, expected_dh,
                  backward_bytes),
                 ("backward", "torch (dense slice)", lambda g: dense(g[:, :c_h], channels_last=True), grads,
                  expected_dh, backward_bytes))
        for direction, name, fn, inputs, reference, nbytes in cases:
            err = (fn(inputs[0]).float() - reference.float()).abs().max().item()
            rows.append(timed_row(fn, inputs, nbytes, bandwidth, err, shape=[n, c_h, c_skip, size],
                                  direction=direction, variant=name))
        del pairs, grads
        torch.cuda.empty_cache()
    write_report(args.out, "bench_concat.json", bandwidth, rows)
    print(f"\nSkip concatenation of channels-last bf16, {torch.cuda.get_device_name()}, copy "
          f"{bandwidth / 1e12:.2f} TB/s; GPU ms (% of copy bandwidth), median of CUDA-graph replays; err = max abs "
          f"difference")
    print("| N, C_h + C_skip, size^3 | direction | variant | ms | err |")
    print("|---|---|---|---|---|")
    for r in rows:
        n, c_h, c_skip, size = r["shape"]
        print(f"| {n}, {c_h} + {c_skip}, {size}^3 | {r['direction']} | {r['variant']} | {r['ms']:.4f} "
              f"({r['pct']:.0f}%) | {r['max_rel_err']:.1e} |")


if __name__ == "__main__":
    main()
