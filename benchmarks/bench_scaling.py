"""Training throughput of the BraTS networks on 1..N GPUs, DDP and FSDP, and the scaling efficiency, in one command.

    python benchmarks/bench_scaling.py [--cases ae96,unet] [--gpus 1,2,4,8] [--strategies ddp,fsdp]
                                       [--steps 10] [--warmup 3] [--activation-checkpointing] [--quick] [--out DIR]

Cases are bench_models.py's (`ae96`, `ae128`, `unet`: the BraTS autoencoder and latent UNet shapes; `--quick` takes
its tiny ones), built and trained as there: our AutoencoderKL (L1 + KL) or UNetModel (eps MSE), AdamW, bf16-mixed on
CUDA (fp32 on CPU). Weak scaling: every process trains the case's batch, so N processes see N times the samples per
step. For each strategy and each N (default: 1, 2, 4, ... up to the GPUs present) N processes are started
(torch.multiprocessing; NCCL on CUDA, gloo on CPU) and set up through Fabric with the strategy `trainer.strategy`
builds (ldm/engine/strategy.py: FSDP wraps the networks' blocks; `--activation-checkpointing` as in its options).
Each runs `--warmup` untimed then `--steps` timed steps; rank 0 times the timed ones between two barriers.

Reported per row: samples/s = N * batch * steps / time, and efficiency = samples/s at N / (N * samples/s at 1 of the
same case and strategy). FSDP needs CUDA (Fabric refuses it elsewhere): without GPUs its rows say so. `--quick` runs
the tiny case of each kind chosen on CPU, one thread per process, with 1 and 2 gloo processes: a check that the machinery works, not a measurement.
Writes DIR/bench_scaling.json (DIR: --out, else $OUT, else .) and prints a markdown table last.
"""
from __future__ import annotations

import argparse
import json
import os
import socket
import sys
import tempfile
import time
from pathlib import Path

import torch
import torch.multiprocessing as mp
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from benchmarks.bench_models import CASES, QUICK_CASES, Case, Variant, build_ours, make_loss  # noqa: E402
from ldm.engine.strategy import fabric_strategy  # noqa: E402

LEARNING_RATE = 1e-4


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def strategy_option(name: str, activation_checkpointing: bool) -> str | dict:
    """The `trainer.strategy` value this row trains with."""
    return {"name": "fsdp", "activation_checkpointing": True} if name == "fsdp" and activation_checkpointing else name


class TrainingLoss(nn.Module):
    """The network and bench_models.py's loss of `case` as one module whose forward is the loss: the strategy
    wrapper (DDP's gradient hooks, FSDP's gathers) sees the whole step, the AE's encode and decode included."""

    def __init__(self, case: Case, network: nn.Module):
        super().__init__()
        self.case, self.network = case, network

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x: (B, C, D, H, W) -> the scalar loss."""
        return make_loss(self.case, Variant("ours", kernels="torch"), self.network, x)()


def train_on_rank(rank: int, world_size: int, port: int, case: Case, strategy: str | dict, accelerator: str,
                  steps: int, warmup: int, result_file: str) -> None:
    """One process of a run: Fabric with `strategy` over `world_size` processes started outside it (it reads the
    ranks from the environment), `warmup` + `steps` training steps; rank 0 writes the timed seconds."""
    from lightning.fabric import Fabric

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), WORLD_SIZE=str(world_size), RANK=str(rank),
                      LOCAL_RANK=str(rank), NODE_RANK="0")
    if accelerator == "cpu":  # one thread per process: a check of the machinery, not a measurement of the CPU
        os.environ["OMP_NUM_THREADS"] = "1"
        torch.set_num_threads(1)
    precision = "bf16-mixed" if accelerator == "cuda" else "32-true"
    fabric = Fabric(accelerator=accelerator, devices=world_size, strategy=fabric_strategy(strategy),
                    precision=precision)
    fabric.launch()
    torch.manual_seed(0)  # the same initial weights on every rank
    model = TrainingLoss(case, build_ours(case, kernels="torch", compvis_decoder=False))
    if fabric.strategy.__class__.__name__ == "FSDPStrategy":  # optimizers must see the sharded parameters
        model = fabric.setup_module(model)
        optimizer = fabric.setup_optimizers(torch.optim.AdamW(model.parameters(), lr=LEARNING_RATE))
    else:
        model, optimizer = fabric.setup(model, torch.optim.AdamW(model.parameters(), lr=LEARNING_RATE))
    torch.manual_seed(1 + rank)  # each rank its own data and noise
    x = torch.rand(case.input_shape, device=fabric.device) * 2 - 1

    def step() -> None:
        optimizer.zero_grad(set_to_none=True)
        fabric.backward(model(x))
        optimizer.step()

    for _ in range(warmup):
        step()
    synchronize_all(fabric)
    start = time.perf_counter()
    for _ in range(steps):
        step()
    synchronize_all(fabric)
    if fabric.global_rank == 0:
        Path(result_file).write_text(json.dumps({"seconds": time.perf_counter() - start}))


def synchronize_all(fabric) -> None:
    if fabric.device.type == "cuda":
        torch.cuda.synchronize(fabric.device)
    fabric.barrier()


def run(case: Case, strategy_name: str, processes: int, args: argparse.Namespace, accelerator: str) -> dict:
    """One row: `processes` processes training `case` with the strategy; its samples/s or why there is none."""
    strategy = strategy_option(strategy_name, args.activation_checkpointing)
    row = {"case": case.name, "input": "x".join(map(str, case.input_shape)), "strategy": strategy_name,
           "processes": processes, "status": "ok"}
    if strategy_name == "fsdp" and accelerator != "cuda":
        return row | {"status": "skipped: FSDP needs CUDA"}
    with tempfile.TemporaryDirectory() as folder:
        result_file = Path(folder) / "rank0.json"
        try:
            mp.start_processes(train_on_rank, nprocs=processes,
                               args=(processes, free_port(), case, strategy, accelerator, args.steps, args.warmup,
                                     str(result_file)),
                               start_method="spawn" if accelerator == "cuda" else "fork")
        except Exception as err:  # a rank failed (e.g. out of memory): its error, the next row goes on
            return row | {"status": f"failed: {str(err).strip().splitlines()[-1] if str(err).strip() else err!r}"}
        seconds = json.loads(result_file.read_text())["seconds"]
    return row | {"seconds": seconds, "samples_per_s": processes * case.batch * args.steps / seconds}


def add_efficiency(rows: list[dict]) -> None:
    """efficiency = samples/s / (processes * samples/s of one process), per case and strategy."""
    for row in rows:
        single = next((r.get("samples_per_s") for r in rows if r["case"] == row["case"]
                       and r["strategy"] == row["strategy"] and r["processes"] == 1), None)
        if row.get("samples_per_s") and single:
            row["efficiency"] = row["samples_per_s"] / (row["processes"] * single)


def markdown_table(rows: list[dict]) -> str:
    lines = ["| case | input per process | strategy | processes | samples/s | efficiency | status |",
             "|---|---|---|---|---|---|---|"]
    for row in rows:
        rate = f"{row['samples_per_s']:.2f}" if "samples_per_s" in row else "-"
        efficiency = f"{row['efficiency']:.2f}" if "efficiency" in row else "-"
        lines.append(f"| {row['case']} | {row['input']} | {row['strategy']} | {row['processes']} | {rate} | "
                     f"{efficiency} | {row['status']} |")
    return "\n".join(lines)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--cases", default="ae96,unet", help=f"comma-separated, of {', '.join(CASES)}")
    parser.add_argument("--gpus", default=None, help="comma-separated process counts (default 1, 2, 4, ... up to the "
                                                     "GPUs present; --quick: 1,2)")
    parser.add_argument("--strategies", default="ddp,fsdp", help="comma-separated, of ddp, fsdp")
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--activation-checkpointing", action="store_true", help="FSDP rows recompute the blocks")
    parser.add_argument("--quick", action="store_true", help="tiny cases on CPU with 1 and 2 gloo processes")
    parser.add_argument("--out", default=os.environ.get("OUT", "."))
    args = parser.parse_args(argv)
    unknown = [name for name in args.cases.split(",") if name not in CASES]
    if unknown:
        parser.error(f"--cases: unknown {', '.join(unknown)} (known: {', '.join(CASES)})")
    unknown = [name for name in args.strategies.split(",") if name not in ("ddp", "fsdp")]
    if unknown:
        parser.error(f"--strategies: unknown {', '.join(unknown)} (known: ddp, fsdp)")
    return args


def process_counts(args: argparse.Namespace, accelerator: str) -> list[int]:
    if args.gpus is not None:
        return [int(n) for n in args.gpus.split(",")]
    if accelerator != "cuda":
        return [1, 2]
    available = torch.cuda.device_count()
    return [2 ** i for i in range(available.bit_length()) if 2 ** i <= available]


def main(argv: list[str] | None = None) -> list[dict]:
    args = parse_args(argv)
    accelerator = "cpu" if args.quick or not torch.cuda.is_available() else "cuda"
    cases = [CASES[name] for name in args.cases.split(",")]
    if args.quick:  # the tiny case of each kind chosen
        cases = [QUICK_CASES[kind] for kind in dict.fromkeys(case.kind for case in cases)]
    device = torch.cuda.get_device_name(0) if accelerator == "cuda" else "CPU"
    print(f"device: {device} x {torch.cuda.device_count() if accelerator == 'cuda' else os.cpu_count()}, "
          f"torch {torch.__version__}", flush=True)
    rows = []
    for case in cases:
        for strategy in args.strategies.split(","):
            for processes in process_counts(args, accelerator):
                rows.append(run(case, strategy, processes, args, accelerator))
                print(json.dumps(rows[-1]), flush=True)
    add_efficiency(rows)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "bench_scaling.json").write_text(json.dumps(dict(device=device, torch=torch.__version__, args=vars(args),
                                                            rows=rows), indent=1))
    print(f"\nWeak scaling, {args.warmup} warm-up + {args.steps} timed steps, {device}")
    print(markdown_table(rows))
    return rows


if __name__ == "__main__":
    main()
