"""Where the host's time goes in one eager training step of bench_models' networks (Python cProfile).

    python benchmarks/profile_host.py [--case unet|ae128] [--kernels triton] [--channels-last] [--graph-network]
                                      [--steps 3] [--top 30]

`--channels-last` and `--graph-network` build the variant as bench_models does (channels_last_3d; the networks'
forward and backward as CUDA graphs, what trainer.cuda_graph does). Runs two warm-up steps, then profiles `--steps` steps (forward, backward, AdamW, bf16 autocast; a synchronize after
each) and prints the functions with the most own time and the most cumulative time. A step whose host time exceeds
its GPU time (bench_models --profile) is launch-bound: this says which Python code to cut or to capture in a graph.
"""
from __future__ import annotations

import argparse
import cProfile
import io
import pstats
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from benchmarks.bench_models import CASES, Variant, build_ours, graphed_networks, make_loss, make_step  # noqa: E402
from ldm.engine.cuda_graph import graph_training_forward  # noqa: E402
from ldm.engine.memory_format import channels_last, model_to_channels_last  # noqa: E402


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--case", choices=list(CASES), default="unet")
    parser.add_argument("--kernels", choices=("torch", "triton"), default="triton")
    parser.add_argument("--channels-last", action="store_true")
    parser.add_argument("--graph-network", action="store_true")
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--top", type=int, default=30)
    args = parser.parse_args(argv)
    device = torch.device("cuda")
    torch.backends.cudnn.benchmark = True
    case = CASES[args.case]
    model = build_ours(case, args.kernels, compvis_decoder=False).to(device).train()
    x = torch.randn(case.input_shape, device=device).clamp(-1, 1)
    variant = Variant("ours", args.kernels, layout="channels_last" if args.channels_last else "contiguous",
                      graph_network=args.graph_network)
    if args.channels_last:
        model, x = model_to_channels_last(model), channels_last(x)
    if args.graph_network:
        for name, network in graphed_networks(case, variant, model).items():
            graph_training_forward(network, name)
    step = make_step(model, make_loss(case, variant, model, x), device, "bf16")
    for _ in range(2):  # with --graph-network the first captures the graphs
        step()
    torch.cuda.synchronize(device)
    profiler = cProfile.Profile()
    profiler.enable()
    for _ in range(args.steps):
        step()
        torch.cuda.synchronize(device)
    profiler.disable()
    for order in ("tottime", "cumulative"):
        text = io.StringIO()
        pstats.Stats(profiler, stream=text).sort_stats(order).print_stats(args.top)
        print(f"\n== {case.name} {variant.label}: {args.steps} steps, by {order} ==")
        print("\n".join(line for line in text.getvalue().splitlines() if line.strip())[:6000])


if __name__ == "__main__":
    main()
