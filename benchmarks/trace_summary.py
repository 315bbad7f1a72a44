"""Where a profiled step's GPU time goes between kernels: a summary of a Chrome trace from `bench_models.py --profile N
--trace` (or any torch.profiler trace with CUDA activity), on any machine.

    python benchmarks/trace_summary.py TRACE.json[.gz] [--top 15] [--kernels gn_,_copy_rows]

Prints, for the GPU timeline of the trace:
- span (first kernel start to last kernel end), busy time (union of kernel, memcpy and memset intervals), and the
  idle time split into the wait before the first kernel (host work the GPU waited for: measured from the first CPU
  event) and the gaps between GPU activities, by what follows the gap (a kernel after a memset, any kernel, a memset)
  and by length;
- the longest gaps with the activities on either side;
- with `--kernels`: each launch of kernels whose name starts with one of the given prefixes, grouped by kernel, grid,
  the input shape of the PyTorch op that launched it (eager traces record shapes; a graph replay has none) and the
  launch's place among that op's launches (e.g. the two launches of a channels-last GroupNorm), with the median time.
"""
from __future__ import annotations

import argparse
import gzip
import json
import statistics
from collections import defaultdict
from pathlib import Path

GPU_CATEGORIES = ("kernel", "gpu_memcpy", "gpu_memset")
CPU_CATEGORIES = ("cpu_op", "user_annotation", "cuda_runtime", "cuda_driver", "python_function")
GAP_BUCKETS_US = (1, 2, 5, 10, 50)


def load(path: str) -> list[dict]:
    opener = gzip.open if path.endswith(".gz") else open
    with opener(path, "rt") as f:
        return json.load(f)["traceEvents"]


def kind(event: dict) -> str:
    return {"gpu_memset": "memset", "gpu_memcpy": "memcpy"}.get(event.get("cat"), "kernel")


def gpu_events(events: list[dict]) -> list[dict]:
    return sorted((e for e in events if e.get("cat") in GPU_CATEGORIES and e.get("ph") == "X"), key=lambda e: e["ts"])


def bucket(gap_us: float) -> str:
    upper = next((b for b in GAP_BUCKETS_US if gap_us < b), None)
    return f"< {upper} us" if upper is not None else f">= {GAP_BUCKETS_US[-1]} us"


def timeline(events: list[dict]) -> dict:
    """Span, busy and idle times (us) of the GPU activity in `events`, idle split by cause; and every gap."""
    gpu = gpu_events(events)
    if not gpu:
        raise SystemExit("trace_summary: the trace has no GPU kernels (was it profiled with CUDA activity?)")
    cpu_starts = [e["ts"] for e in events if e.get("cat") in CPU_CATEGORIES and e.get("ph") == "X"]
    start, end = gpu[0]["ts"], max(e["ts"] + e["dur"] for e in gpu)
    busy, gaps = 0.0, []
    covered = start  # end of the union of intervals so far
    previous = None
    for event in gpu:
        gap = event["ts"] - covered
        if gap > 0 and previous is not None:
            gaps.append((gap, f"{kind(previous)} -> {kind(event)}", previous["name"], event["name"]))
        busy += max(0.0, event["ts"] + event["dur"] - max(covered, event["ts"]))
        covered = max(covered, event["ts"] + event["dur"])
        previous = event
    return dict(span=end - start, busy=busy, wait_before_first=start - min(cpu_starts) if cpu_starts else None,
                gaps=sorted(gaps, reverse=True), activities=len(gpu))


def totals(gaps: list[tuple], key) -> dict[str, tuple[float, int]]:
    """key(gap) -> (summed length in us, count) over `gaps` (as `timeline` lists them)."""
    sums: dict[str, list] = defaultdict(lambda: [0.0, 0])
    for gap in gaps:
        entry = sums[key(gap)]
        entry[0] += gap[0]
        entry[1] += 1
    return {k: (v[0], v[1]) for k, v in sums.items()}


def launches(events: list[dict], prefixes: tuple[str, ...]) -> dict[tuple, list[float]]:
    """(kernel, grid, input shape of the innermost enclosing op with shapes, the launch's place among that op's
    launches of these kernels: 1, 2, ...) -> durations (us) of kernels whose name starts with one of `prefixes`; the
    op is found through the launch's correlation id and its CPU thread."""
    runtime = {e["args"].get("correlation"): e for e in events
               if e.get("cat") in ("cuda_runtime", "cuda_driver") and "args" in e}
    ops_by_thread = defaultdict(list)
    for e in events:
        if e.get("cat") == "cpu_op" and e.get("ph") == "X" and e.get("args", {}).get("Input Dims"):
            ops_by_thread[e["tid"]].append(e)
    found: dict[tuple, list[float]] = defaultdict(list)
    seen_in_op: dict[tuple, int] = defaultdict(int)
    for e in sorted(gpu_events(events), key=lambda e: e.get("args", {}).get("correlation", 0)):
        if e.get("cat") != "kernel" or not e["name"].startswith(prefixes):
            continue
        launch = runtime.get(e.get("args", {}).get("correlation"))
        shape, place = None, 1
        if launch is not None:
            enclosing = [o for o in ops_by_thread[launch["tid"]] if o["ts"] <= launch["ts"] <= o["ts"] + o["dur"]]
            if enclosing:
                innermost = min(enclosing, key=lambda o: o["dur"])
                shape = next((tuple(d) for d in innermost["args"]["Input Dims"] if d), None)
                op = (innermost["tid"], innermost["ts"])
                seen_in_op[op] += 1
                place = seen_in_op[op]
        found[(e["name"], tuple(e.get("args", {}).get("grid", ())), shape, place)].append(e["dur"])
    return found


def idle_line(t: dict) -> str:
    """One line of `timeline`'s result: busy against span, the wait for the host, the gaps by what they lie between."""
    between = ", ".join(f"{name} {total / 1e3:.3f} ms ({count})" for name, (total, count)
                        in sorted(totals(t["gaps"], lambda g: g[1]).items(), key=lambda kv: -kv[1][0]))
    wait = ("" if t["wait_before_first"] is None else
            f"; waited {t['wait_before_first'] / 1e3:.3f} ms for the host before the first kernel")
    return (f"GPU busy {t['busy'] / 1e3:.3f} of {t['span'] / 1e3:.3f} ms from the first kernel to the last{wait}; "
            f"gaps: {between or 'none'}")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("trace", help="Chrome trace (.json or .json.gz)")
    parser.add_argument("--top", type=int, default=15, help="longest gaps to list")
    parser.add_argument("--kernels", default="", help="comma-separated kernel name prefixes to list per launch")
    args = parser.parse_args(argv)
    if not Path(args.trace).exists():
        raise SystemExit(f"trace_summary: {args.trace} does not exist")
    events = load(args.trace)
    t = timeline(events)
    print(f"{args.trace}: {t['activities']} GPU activities. {idle_line(t)}")
    print("\n| between | ms | gaps |\n|---|---|---|")
    for name, (total, count) in sorted(totals(t["gaps"], lambda g: g[1]).items(), key=lambda kv: -kv[1][0]):
        print(f"| {name} | {total / 1e3:.3f} | {count} |")
    print("\n| gap length | ms | gaps |\n|---|---|---|")
    by_length = totals(t["gaps"], lambda g: bucket(g[0]))
    for name in [f"< {b} us" for b in GAP_BUCKETS_US] + [f">= {GAP_BUCKETS_US[-1]} us"]:
        if name in by_length:
            print(f"| {name} | {by_length[name][0] / 1e3:.3f} | {by_length[name][1]} |")
    print(f"\nlongest {args.top} gaps (us: before -> after)")
    for gap, _, before, after in t["gaps"][:args.top]:
        print(f"  {gap:8.1f}  {before[:60]} -> {after[:60]}")
    prefixes = tuple(p for p in args.kernels.split(",") if p)
    if prefixes:
        print("\n| kernel | grid | input shape | launch in op | launches | median us | total ms |\n"
              "|---|---|---|---|---|---|---|")
        rows = launches(events, prefixes)
        for (name, grid, shape, place), durations in sorted(rows.items(), key=lambda kv: -sum(kv[1])):
            print(f"| {name[:40]} | {grid} | {shape} | {place} | {len(durations)} | "
                  f"{statistics.median(durations):.1f} | {sum(durations) / 1e3:.3f} |")


if __name__ == "__main__":
    main()
