"""Per-channel fp32 sums of channels-last bf16 gradients (a bias's gradient): kernels.channel_sum against PyTorch; and
the in-place bias add (kernels.channel_sum.add_channel_bias_) against PyTorch's broadcast add_.

    python benchmarks/bench_channel_sum.py [--out DIR]

Shapes: the UNet's (4 x C x 32^3 / 16^3 / 8^3) and the 128^3 autoencoder's largest, each dense channels-last and as
the first C channels of a 2C-channel channels-last tensor (what torch.cat hands its inputs in backward). For each:
checks both against a float64 sum, then times them as GPU time: the calls are captured in a CUDA graph over enough
distinct inputs to exceed 4x the L2 cache, the graph is replayed 20 times, and the median replay time is divided by
the number of inputs. % = bytes read (the tensor once; the bias add: read and written) / time / measured copy
bandwidth. Writes
DIR/bench_channel_sum.json ($OUT when set) and prints a markdown table last.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from kernels.channel_sum import add_channel_bias_, channel_sum  # noqa: E402

SHAPES = [(4, 128, 32, 32, 32), (4, 256, 16, 16, 16), (4, 512, 8, 8, 8), (1, 64, 128, 128, 128),
          (1, 128, 64, 64, 64)]


def torch_sum(x: torch.Tensor) -> torch.Tensor:
    return x.sum(dim=[d for d in range(x.ndim) if d != 1], dtype=torch.float32)


def copy_bandwidth(device: torch.device) -> float:
    """Bytes read + written per second of a 1 GiB device-to-device copy (median of 10)."""
    src = torch.randn(256 * 2 ** 20, device=device)
    dst = torch.empty_like(src)
    times = []
    for _ in range(12):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        dst.copy_(src)
        end.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(end) / 1e3)
    return 2 * src.numel() * 4 / statistics.median(times[2:])


def graph_time_ms(fn, inputs: list[torch.Tensor]) -> float:
    """Median GPU ms of one call: a CUDA graph of one call per input, replayed 20 times."""
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for x in inputs[:2]:
            fn(x)
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for x in inputs:
            fn(x)
    times = []
    for _ in range(20):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        graph.replay()
        end.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(end) / len(inputs))
    return statistics.median(times)


def input_sets(nbytes: int, device: torch.device) -> int:
    """How many distinct inputs of `nbytes` exceed 4x the L2 cache (so a replayed graph reads from memory)."""
    return max(1, -(-4 * torch.cuda.get_device_properties(device).L2_cache_size // nbytes))


def timed_row(fn, inputs: list[torch.Tensor], nbytes: int, bandwidth: float, err: float, **labels) -> dict:
    """Times fn over inputs (`graph_time_ms`) and returns (and prints) the row: labels, ms, % of copy bandwidth for
    `nbytes` moved per call, the error found beforehand and the number of inputs."""
    ms = graph_time_ms(fn, inputs)
    row = dict(labels, ms=ms, pct=100 * nbytes / (ms * 1e-3) / bandwidth, max_rel_err=err, input_sets=len(inputs))
    print(json.dumps(row), flush=True)
    return row


def write_report(out: str, name: str, bandwidth: float, rows: list[dict]) -> None:
    folder = Path(out)
    folder.mkdir(parents=True, exist_ok=True)
    (folder / name).write_text(json.dumps(dict(copy_bandwidth=bandwidth, rows=rows), indent=1))


def gpu_benchmark(description: str, script: str) -> tuple[argparse.Namespace, torch.device, float]:
    """The command line (`--out DIR`, default $OUT or .), the CUDA device (exits when there is none) and its measured
    copy bandwidth, for a GPU micro-benchmark `script` described by `description`."""
    parser = argparse.ArgumentParser(description=description, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default=os.environ.get("OUT", "."))
    args = parser.parse_args()
    if not torch.cuda.is_available():
        raise SystemExit(f"{script} needs a CUDA GPU")
    device = torch.device("cuda")
    return args, device, copy_bandwidth(device)


def main() -> None:
    args, device, bandwidth = gpu_benchmark(__doc__, "bench_channel_sum.py")
    rows = []
    for shape in SHAPES:
        nbytes = 2 * torch.Size(shape).numel()
        sets = input_sets(nbytes, device)
        for layout in ("channels-last", "slice"):  # slice: the first C channels of a 2C-channel tensor (cat's grad)
            wide = 2 if layout == "slice" else 1
            inputs = [torch.randn(shape[0], wide * shape[1], *shape[2:], device=device, dtype=torch.bfloat16)
                      .contiguous(memory_format=torch.channels_last_3d)[:, :shape[1]] for _ in range(sets)]
            expected = inputs[0].double().sum(dim=(0, 2, 3, 4))
            for name, fn in (("ours", channel_sum), ("torch", torch_sum)):
                err = ((fn(inputs[0]).double() - expected).abs().max() / expected.abs().max()).item()
                rows.append(timed_row(fn, inputs, nbytes, bandwidth, err, shape=list(shape), layout=layout,
                                      variant=name))
            if layout == "channels-last":
                bias = torch.randn(shape[1], device=device)
                expected = inputs[0] + bias.to(torch.bfloat16).view(1, -1, 1, 1, 1)
                add = (("ours", lambda y: add_channel_bias_(y, bias)),
                       ("torch", lambda y: y.add_(bias.to(y.dtype).view(1, -1, 1, 1, 1))))
                errors = {name: (fn(inputs[0].clone()).float() - expected.float()).abs().max().item()
                          for name, fn in add}  # before timing: the timed adds accumulate into the inputs
                for name, fn in add:
                    rows.append(timed_row(fn, inputs, 2 * nbytes, bandwidth, errors[name], shape=list(shape),
                                          layout="bias add", variant=name))
            del inputs
            torch.cuda.empty_cache()
    write_report(args.out, "bench_channel_sum.json", bandwidth, rows)
    print(f"\nPer-channel fp32 sum of a channels-last bf16 tensor, {torch.cuda.get_device_name()}, copy "
          f"{bandwidth / 1e12:.2f} TB/s; GPU ms (% of copy bandwidth), median of CUDA-graph replays; err = max error "
          f"/ max |sum| vs float64 (bias add: max abs difference to PyTorch's add)")
    print("| shape | layout | variant | ms | err |")
    print("|---|---|---|---|---|")
    for r in rows:
        print(f"| {'x'.join(map(str, r['shape']))} | {r['layout']} | {r['variant']} | "
              f"{r['ms']:.4f} ({r['pct']:.0f}%) | "
              f"{r['max_rel_err']:.1e} |")


if __name__ == "__main__":
    main()
