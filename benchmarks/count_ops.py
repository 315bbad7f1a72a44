"""The kernels one training forward + backward of bench_models' UNet or autoencoder launches, counted on the CPU.

    python benchmarks/count_ops.py [--case unet|ae128] [--size 8] [--top 12] [--quick] [--json FILE]

Builds our network as bench_models does (kernels=triton, channels-last) at a small spatial `--size` (the counts do
not depend on it), runs one forward and backward with every Triton launch recorded instead of run
(benchmarks/kernel_codegen.py's machinery: grids planned for an H100/H200) and every ATen op that does work counted by
a dispatch mode (views, reshapes and allocations left out). Prints the Triton launches and ATen ops, forward and
backward, and the backward's ATen ops by name with their most frequent input shapes: each is a kernel on a GPU, ~2 us
and a ~1 us gap in a CUDA graph for the small ones, so this says which small ops a change removes before any GPU time
is spent.
fp32 and no autocast (CPU autocast casts other ops than CUDA's); the numbers of casts are not counted here.
`--quick`: bench_models' tiny networks of the same design (tests/test_count_ops.py). Run it as its own process: it turns
Triton's interpreter off (TRITON_INTERPRET) for the recording.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import sys
from collections import Counter, defaultdict
from pathlib import Path

import torch
from torch.utils._python_dispatch import TorchDispatchMode

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from benchmarks import kernel_codegen  # noqa: E402  (first: it turns Triton's interpreter off for the recording)
from benchmarks.bench_models import CASES, QUICK_CASES, Case, build_ours  # noqa: E402
from ldm.engine.memory_format import channels_last, model_to_channels_last  # noqa: E402

# ATen ops that only view, reshape or allocate: no kernel of their own
NO_KERNEL = {"view", "_unsafe_view", "as_strided", "t", "transpose", "permute", "expand", "detach", "alias", "slice",
             "select", "unsqueeze", "squeeze", "split", "split_with_sizes", "empty", "empty_like", "empty_strided",
             "new_empty", "new_empty_strided", "_reshape_alias", "reshape", "unbind", "lift_fresh", "is_same_size",
             "movedim", "chunk", "flatten", "unflatten", "view_as"}


class OpCounter(TorchDispatchMode):
    """Counts the ATen ops that do work, by name and by the shapes of their first two tensor arguments."""

    def __init__(self):
        super().__init__()
        self.shapes: dict[str, Counter] = defaultdict(Counter)

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        name = func.overloadpacket.__name__
        if name not in NO_KERNEL:
            self.shapes[name][tuple(tuple(a.shape) for a in args if isinstance(a, torch.Tensor))[:2]] += 1
        return func(*args, **(kwargs or {}))

    def total(self) -> int:
        return sum(sum(c.values()) for c in self.shapes.values())


def count(case: Case) -> tuple[Counter, Counter, OpCounter, OpCounter]:
    """(forward Triton launches, backward Triton launches, forward ATen ops, backward ATen ops) of one forward +
    backward."""
    launches: list = []
    with kernel_codegen.recorded_launches(case.name, launches, sms=132):
        model = model_to_channels_last(build_ours(case, "triton", compvis_decoder=False).train())
        x = channels_last(torch.randn(case.input_shape))
        t = torch.randint(0, 1000, (case.batch,))
        forward_ops = OpCounter()
        with forward_ops:
            out = model.decode(model.encode(x).sample()) if case.kind == "ae" else model(x, t)
        forward_launches = len(launches)
        ops = OpCounter()
        with ops:
            out.backward(torch.ones_like(out))
    names = [launch.fn.fn.__name__ for launch in launches]
    return Counter(names[:forward_launches]), Counter(names[forward_launches:]), forward_ops, ops


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--case", choices=("unet", "ae128"), default="unet")
    parser.add_argument("--size", type=int, default=8, help="spatial size per axis (8: the UNet's lowest level 2^3)")
    parser.add_argument("--top", type=int, default=12)
    parser.add_argument("--quick", action="store_true", help="bench_models' tiny networks")
    parser.add_argument("--json", default=None, help="also write the counts there")
    args = parser.parse_args(argv)
    case = QUICK_CASES[args.case.rstrip("0123456789")] if args.quick else CASES[args.case]
    case = dataclasses.replace(case, size=args.size)
    forward, backward, forward_ops, ops = count(case)
    if args.json:
        def listed(counter: OpCounter) -> dict:
            return {name: [[list(map(list, s)), n] for s, n in shapes.items()]
                    for name, shapes in counter.shapes.items()}
        with open(args.json, "w") as f:
            json.dump({"forward_launches": forward, "backward_launches": backward,
                       "forward_ops": listed(forward_ops), "backward_ops": listed(ops)}, f)
    print(f"{case.name} at {args.size}^3: Triton launches forward "
          f"{sum(forward.values())}, backward {sum(backward.values())}; ATen ops forward {forward_ops.total()}, "
          f"backward {ops.total()}")
    print(f"backward Triton launches: {dict(backward.most_common())}")
    print("| backward ATen op | count | most frequent input shapes |\n|---|---|---|")
    for name, shapes in sorted(ops.shapes.items(), key=lambda kv: -sum(kv[1].values()))[:args.top]:
        common = ", ".join(f"{list(map(list, s))} x{n}" for s, n in shapes.most_common(2))
        print(f"| {name} | {sum(shapes.values())} | {common} |")


if __name__ == "__main__":
    main()
