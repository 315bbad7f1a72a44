"""Training-step time and memory of our 3D autoencoder and UNet against MONAI 1.6.1's, in one run.

    python benchmarks/bench_models.py [--only ae|unet] [--cases ae96,ae128,unet] [--steps 9] [--warmup 3]
                                      [--channels-last] [--recompute-cheap] [--cuda-graph] [--graph-network]
                                      [--kernels torch,triton] [--compile default,max-autotune]
                                      [--profile [TOP] [--trace]] [--quick] [--no-monai] [--out DIR]

Cases (the reference problems the project compares against MONAI on; `ae256`, the largest volume the autoencoder must
train on an 80 GB GPU, runs only when named):
  ae96   AutoencoderKL, channels (32, 64, 64), 2 res blocks, latent 4, attention in the mid blocks only, 2 x 1 x 96^3
  ae128  the same with channels (64, 128, 128), 1 x 1 x 128^3
  ae256  as ae128 at 1 x 1 x 256^3
  unet   UNet, channels (128, 256, 512), 2 res blocks, attention at levels 2-3 and the middle (64-channel heads),
         4 x 4 x 32^3
Both sides build the same architecture. Ours: `AutoencoderKL` whose decoder has as many res blocks per level as MONAI's
(2; the CompVis decoder has one more, `--compvis-decoder` keeps it), and `UNetModel` without scale-shift norm (MONAI has
none). Parameter counts are printed side by side; they differ only where the designs do: our AE encoder's last conv
gives mean and log-variance together (2 x latent channels) for one quant conv (the UNets' counts are equal).

Every variant trains for `--warmup` + `--steps` steps: forward + backward + fused AdamW step (the same for both)
under bf16 autocast with cudnn.benchmark (`--no-cudnn-benchmark`: without), `torch.cuda.synchronize()` around each
step; the step time is the median of the timed steps. Memory is reported twice. "alloc":
`torch.cuda.max_memory_allocated` over the timed steps (reset after warm-up, so cuDNN's autotuning does not count;
for a CUDA graph, over its capture, since replays allocate nothing; not measurable for "netgraph": its activations
live in the graphs' private pools, which count as reserved, not allocated). "reserved":
`torch.cuda.max_memory_reserved` over the same steps, with the cache emptied before them: what the allocator holds
from the GPU, fragmentation and graph pools included, the like-for-like figure for every variant. Variants run one
after another in one process, and what an earlier one leaves held (caches, workspaces) counts in a later one's
reserved: the JSON row's held_before_gib says how much; `--match REGEX` runs only the variants whose label matches
(one variant alone, for its memory). Each ratio is against MONAI's smallest of the same kind. `--memory-cap-gib G`
caps this process's GPU memory at G GiB (`set_per_process_memory_fraction`), e.g. 79 to stand for an 80 GB H100 on a
larger GPU. Losses: L1 reconstruction + 1e-6 KL (summed over the latent, mean over the batch) for the autoencoder;
MSE on eps for the UNet with t uniform in [0, 1000) on a linear beta schedule.
Variants: ours with kernels=torch and kernels=triton, contiguous (and channels_last_3d with
`--channels-last`; each also with `recompute_cheap`, "RC", with `--recompute-cheap`: GroupNorm+SiLU and nearest
upsampling recomputed in backward); MONAI with and without use_flash_attention. `--cuda-graph` adds each variant
(MONAI's too) with its whole step captured once as a CUDA graph and replayed: what is left when the host's per-kernel
launch work is gone. `--graph-network` adds each variant with what `trainer.cuda_graph` does in training
(ldm/engine/cuda_graph.py): the networks' forward and backward replayed as CUDA graphs ("netgraph"; the AE's encoder
and decoder separately for ours, the whole model for MONAI's), loss and AdamW eager, the weights autocast casts cast
in one pass each way (ldm/engine/weight_cast.py; `--weight-casts autocast` or `both`: per layer, as autocast does).
`--weight-copies` adds ours' netgraph variants with `trainer.bf16_weight_copies` ("WC"): the graphed weights read from
bf16 copies that AdamW writes in its step (ldm/engine/weight_copies.py), no casts either way.
`--compile MODES` (',' list of default, max-autotune, reduce-overhead) adds MONAI's and our eager variants (no graph,
no GroupNorm tuning) with their networks `torch.compile`d in each mode ("MONAI compile", "ours torch compile
max-autotune"; the networks --graph-network would capture, compiled in place), what a user who wants speed from MONAI
would try first. Each compiled variant starts from a reset Dynamo cache; its first warm-up step compiles (the row's
first_step_s, kept for every variant), so `--compile` needs `--warmup` >= 1. A compilation that fails is the row's
status. In the CUDA-graph modes (reduce-overhead, max-autotune) "alloc" is not measured, as for netgraph.
Ratios are ours / the best MONAI variant (fastest for time, smallest for memory), compiled ones included.

Conv FLOPs: counted by PyTorch's FlopCounterMode over one eager forward + backward (convolutions and their backward,
input gradients only where needed; above 128^3 voxels per sample at the input halved per axis, times the voxel ratio);
"conv TFLOP/s" is that over the step time and "% matmul" that over a measured bf16 matmul rate (8192^3 on CUDA): how far
the step is from the hardware's compute limit.
`--profile [TOP]` prints the TOP (15) GPU kernels (CPU ops without a GPU) with the most time in one step of each variant,
GPU time per kernel category (convolution, GroupNorm, attention, layout / copy, ...) and the PyTorch ops that launched
the most GPU time, with their input shapes.
`--quick` runs tiny models for a smoke test on any device (kernels=triton on CPU needs TRITON_INTERPRET=1, and Triton's
interpreter takes ~15 s per step even then). Off CUDA
the default precision is fp32 (`--precision`): CPU bf16 3D convolutions are slow, and their weight gradients overflowed
to 1e30 within two steps on this repo's CPU machine, for MONAI's UNet as for ours.
Writes DIR/bench_models.json (DIR: --out, else $OUT, else .) and prints a markdown table last.
"""
from __future__ import annotations

import argparse
import gc
import gzip
import json
import math
import os
import re
import shutil
import statistics
import sys
import tempfile
import time
import traceback
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable

import torch
from torch import nn
from torch.nn import functional as F
from torch.utils.flop_counter import FlopCounterMode

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from benchmarks.trace_summary import idle_line, load, timeline  # noqa: E402
from ldm.engine.cuda_graph import graph_training_forward  # noqa: E402
from ldm.engine.weight_copies import WeightCopies, copies_from  # noqa: E402
from ldm.engine.weight_cast import parameters_cast_by_autocast  # noqa: E402
from ldm.engine.memory_format import channels_last, model_to_channels_last  # noqa: E402
from ldm.models.autoencoder import AutoencoderKL  # noqa: E402
from ldm.modules.attention import set_attention_backend  # noqa: E402
from ldm.modules.diffusionmodules.model import build_encoder_decoder  # noqa: E402
from ldm.modules.normalization import set_group_norm_tuning  # noqa: E402
from ldm.modules.recomputed_conv import set_recompute_cheap  # noqa: E402
from ldm.modules.diffusionmodules.openaimodel import UNetModel  # noqa: E402

KL_WEIGHT = 1e-6
TIMESTEPS = 1000
LEARNING_RATE = 1e-4
GIB = 2 ** 30
FLOP_COUNT_VOXELS = 128 ** 3   # larger inputs have their conv FLOPs counted at a smaller size and scaled
# torch.compile modes `--compile` takes -> whether inductor replays the compiled networks as CUDA graphs (whose
# memory lives in private pools: reserved, not allocated, as for netgraph)
COMPILE_MODES = {"default": False, "reduce-overhead": True, "max-autotune": True}


@dataclass(frozen=True)
class Case:
    """One benchmark problem: a network shape and its input (batch, channels, size^3)."""

    name: str
    kind: str                       # "ae" or "unet"
    channels: tuple[int, ...]       # per level
    batch: int
    in_channels: int
    size: int                       # spatial size of each of the 3 axes
    num_res_blocks: int = 2
    latent_channels: int = 4        # ae
    norm_groups: int = 32           # ae (our UNet always uses 32 groups)
    head_channels: int = 64         # unet

    @property
    def input_shape(self) -> tuple[int, ...]:
        return (self.batch, self.in_channels, self.size, self.size, self.size)


CASES = {
    "ae96": Case("ae96", "ae", (32, 64, 64), batch=2, in_channels=1, size=96),
    "ae128": Case("ae128", "ae", (64, 128, 128), batch=1, in_channels=1, size=128),
    "ae256": Case("ae256", "ae", (64, 128, 128), batch=1, in_channels=1, size=256),
    "unet": Case("unet", "unet", (128, 256, 512), batch=4, in_channels=4, size=32),
}
DEFAULT_CASES = ("ae96", "ae128", "unet")
QUICK_CASES = {
    "ae": Case("ae-quick", "ae", (8, 16, 16), batch=1, in_channels=1, size=16, norm_groups=8),
    "unet": Case("unet-quick", "unet", (32, 32, 64), batch=1, in_channels=4, size=8, head_channels=32),
}


@dataclass(frozen=True)
class Variant:
    """Whose network and how it runs."""

    model: str                      # "ours" or "monai"
    kernels: str = "-"              # ours: GroupNorm implementation (torch / triton)
    layout: str = "contiguous"      # ours: contiguous or channels_last (channels_last_3d)
    flash: bool = False             # monai: use_flash_attention
    recompute: bool = False         # ours: recompute_cheap (GroupNorm+SiLU, upsampling recomputed in backward)
    graph: bool = False             # the whole step (forward, backward, AdamW) captured once as a CUDA graph
    graph_network: bool = False     # the networks' forward + backward as CUDA graphs (trainer.cuda_graph)
    weight_casts: str = "once"      # netgraph: autocast's weight casts in one pass ("once") or per layer ("autocast")
    gn_tuning: str = ""             # ours: GroupNormTuning fields, e.g. "forward_tile=4096" ("": the defaults)
    weight_copies: bool = False     # ours, netgraph: graphed weights read from bf16 copies AdamW writes (WeightCopies)
    compile: str = ""               # the networks torch.compile'd in this mode (COMPILE_MODES; "": eager)

    @property
    def label(self) -> str:
        how = " graph" if self.graph else " netgraph" if self.graph_network else ""
        how += " per-layer casts" if self.graph_network and self.weight_casts == "autocast" else ""
        how += (" compile" + ("" if self.compile == "default" else f" {self.compile}")) if self.compile else ""
        if self.model == "monai":
            return "MONAI" + (" flash" if self.flash else "") + how
        return (f"ours {self.kernels}" + (" CL" if self.layout == "channels_last" else "")
                + (" RC" if self.recompute else "") + (f" [{self.gn_tuning}]" if self.gn_tuning else "")
                + (" WC" if self.weight_copies else "") + how)


# ------------------------------------------------------------------------------------------------- networks
def attention_levels(case: Case) -> tuple[bool, ...]:
    """UNet: attention at every level but the first (the anchor's (F, T, T)); AE: none outside the mid blocks."""
    if case.kind == "unet":
        return (False,) + (True,) * (len(case.channels) - 1)
    return (False,) * len(case.channels)


def ae_ddconfig(case: Case, kernels: str) -> dict:
    base = case.channels[0]
    if any(c % base for c in case.channels):
        raise ValueError(f"case {case.name}: channels {case.channels} are not multiples of the first")
    return dict(dims=3, double_z=True, z_channels=case.latent_channels, resolution=case.size,
                in_channels=case.in_channels, out_ch=case.in_channels, ch=base,
                ch_mult=[c // base for c in case.channels], num_res_blocks=case.num_res_blocks, attn_resolutions=[],
                dropout=0.0, norm_num_groups=case.norm_groups, kernels=kernels)


def build_ours(case: Case, kernels: str, compvis_decoder: bool) -> nn.Module:
    if case.kind == "ae":
        ddconfig = ae_ddconfig(case, kernels)
        model = AutoencoderKL(ddconfig, {"target": "torch.nn.Identity"}, embed_dim=case.latent_channels)
        if not compvis_decoder:  # MONAI's decoder has num_res_blocks per level, the CompVis one num_res_blocks + 1
            model.decoder = build_encoder_decoder({**ddconfig, "num_res_blocks": case.num_res_blocks - 1})[1]
        return model
    base = case.channels[0]
    return UNetModel(image_size=case.size, in_channels=case.in_channels, model_channels=base,
                     out_channels=case.in_channels, num_res_blocks=case.num_res_blocks,
                     attention_resolutions=[2 ** i for i, on in enumerate(attention_levels(case)) if on],
                     channel_mult=[c // base for c in case.channels], dims=3, num_head_channels=case.head_channels,
                     use_scale_shift_norm=False, kernels=kernels)


def build_monai(case: Case, flash: bool) -> nn.Module:
    from monai.networks.nets import AutoencoderKL as MonaiAutoencoderKL
    from monai.networks.nets import DiffusionModelUNet

    if case.kind == "ae":
        return MonaiAutoencoderKL(spatial_dims=3, in_channels=case.in_channels, out_channels=case.in_channels,
                                  channels=case.channels, num_res_blocks=case.num_res_blocks,
                                  latent_channels=case.latent_channels, norm_num_groups=case.norm_groups,
                                  attention_levels=attention_levels(case), with_encoder_nonlocal_attn=True,
                                  with_decoder_nonlocal_attn=True, use_flash_attention=flash)
    levels = attention_levels(case)
    return DiffusionModelUNet(spatial_dims=3, in_channels=case.in_channels, out_channels=case.in_channels,
                              channels=case.channels, num_res_blocks=case.num_res_blocks, attention_levels=levels,
                              num_head_channels=tuple(case.head_channels if on else 0 for on in levels),
                              use_flash_attention=flash)


def parameter_count(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


# --------------------------------------------------------------------------------------------------- losses
def linear_alphas_cumprod(device: torch.device) -> torch.Tensor:
    """The DDPM linear schedule (1e-4 .. 2e-2 over 1000 steps): alpha-bar_t, (TIMESTEPS,) fp32."""
    betas = torch.linspace(1e-4, 2e-2, TIMESTEPS, dtype=torch.float64)
    return torch.cumprod(1.0 - betas, dim=0).float().to(device)


def make_loss(case: Case, variant: Variant, model: nn.Module, x: torch.Tensor) -> Callable[[], torch.Tensor]:
    """The scalar training loss of one step on input x: (B, C, D, H, W)."""
    if case.kind == "ae":
        if variant.model == "ours":
            def ae_loss() -> torch.Tensor:
                posterior = model.encode(x)
                reconstruction = model.decode(posterior.sample())
                return F.l1_loss(reconstruction.float(), x) + KL_WEIGHT * posterior.kl().mean()
            return ae_loss

        def monai_ae_loss() -> torch.Tensor:
            reconstruction, mu, sigma = model(x)
            mu, var = mu.float(), sigma.float().pow(2)
            kl = 0.5 * (mu.pow(2) + var - var.log() - 1.0).flatten(1).sum(dim=1).mean()
            return F.l1_loss(reconstruction.float(), x) + KL_WEIGHT * kl
        return monai_ae_loss

    alphas_cumprod = linear_alphas_cumprod(x.device)

    def eps_loss() -> torch.Tensor:
        t = torch.randint(0, TIMESTEPS, (x.shape[0],), device=x.device)
        noise = torch.randn_like(x)
        a = alphas_cumprod[t].view(-1, 1, 1, 1, 1)
        x_t = a.sqrt() * x + (1.0 - a).sqrt() * noise
        prediction = model(x_t, t) if variant.model == "ours" else model(x_t, timesteps=t)
        return F.mse_loss(prediction.float(), noise)
    return eps_loss


def graphed_networks(case: Case, variant: Variant, model: nn.Module) -> dict[str, nn.Module]:
    """What --graph-network captures and --compile compiles: each network the loss calls once per step."""
    if variant.model == "ours" and case.kind == "ae":
        return {"encoder": model.encoder, "decoder": model.decoder}
    return {variant.model: model}


# ----------------------------------------------------------------------------------------------- measuring
def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def autocast(device: torch.device, precision: str, cache_enabled: bool = True):
    """bf16 autocast, or nothing for fp32 (CUDA-graph capture needs cache_enabled=False)."""
    return torch.autocast(device.type, dtype=torch.bfloat16, enabled=precision == "bf16", cache_enabled=cache_enabled)


def make_step(model: nn.Module, loss_fn: Callable[[], torch.Tensor], device: torch.device,
              precision: str, optimizers: list | None = None) -> Callable[[], torch.Tensor]:
    """One training step (zero grads, forward under autocast, backward, AdamW); returns the detached loss.
    optimizers: default one fused AdamW over all parameters."""
    optimizers = optimizers or [torch.optim.AdamW(model.parameters(), lr=LEARNING_RATE, fused=True)]

    def step() -> torch.Tensor:
        for optimizer in optimizers:
            optimizer.zero_grad(set_to_none=True)
        with autocast(device, precision):
            loss = loss_fn()
        loss.backward()
        for optimizer in optimizers:
            optimizer.step()
        return loss.detach()

    return step


def make_graphed_step(model: nn.Module, loss_fn: Callable[[], torch.Tensor], device: torch.device,
                      precision: str, warmup: int = 3) -> Callable[[], torch.Tensor]:
    """The same step captured once as a CUDA graph (PyTorch's whole-network recipe): `warmup` eager steps on a side
    stream (cuDNN autotuning, Triton compilation, attention dispatch), then one capture of forward, backward and a
    capturable AdamW; each call replays it, so the host launches one graph instead of every kernel. Inputs stay the
    same tensors (the benchmark's x); gradients live in the graph's pool and are overwritten, not accumulated."""
    if device.type != "cuda":
        raise RuntimeError("CUDA graphs need a CUDA device")
    optimizer = torch.optim.AdamW(model.parameters(), lr=LEARNING_RATE, capturable=True, fused=True)

    def forward_backward_update() -> torch.Tensor:
        with autocast(device, precision, cache_enabled=False):
            loss = loss_fn()
        loss.backward()
        optimizer.step()
        return loss.detach()

    side = torch.cuda.Stream(device)
    side.wait_stream(torch.cuda.current_stream(device))
    with torch.cuda.stream(side):
        for _ in range(warmup):
            optimizer.zero_grad(set_to_none=True)
            forward_backward_update()
    torch.cuda.current_stream(device).wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    optimizer.zero_grad(set_to_none=True)
    # Replays allocate nothing: the step's memory is what the capture takes from the allocator (its private pool).
    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats(device)
    with torch.cuda.graph(graph):
        static_loss = forward_backward_update()

    def step() -> torch.Tensor:
        graph.replay()
        return static_loss.clone()

    return step


def flop_count_input(x: torch.Tensor, max_voxels: int = FLOP_COUNT_VOXELS) -> tuple[torch.Tensor, int]:
    """(x, 1), or for an input of more than `max_voxels` per sample a copy halved along every spatial axis until it has
    no more, and the voxel ratio: the conv FLOPs of these fully convolutional networks scale exactly with the voxel
    count (every convolution's output shrinks by the same factor), and counting at 256^3 means an extra eager
    forward + backward with a fresh round of cuDNN autotuning at the largest size. x: (B, C, *spatial)."""
    spatial = x.shape[2:]
    factor = 1
    while math.prod(s // factor for s in spatial) > max_voxels and all(s % (2 * factor) == 0 for s in spatial):
        factor *= 2
    if factor == 1:
        return x, 1
    small = x[(slice(None), slice(None), *(slice(None, s // factor) for s in spatial))].clone(
        memory_format=torch.preserve_format)
    return small, factor ** len(spatial)


def conv_flops(loss_fn: Callable[[], torch.Tensor], device: torch.device, precision: str) -> int:
    """FLOPs of every convolution in one eager forward + backward (PyTorch's FlopCounterMode: aten.convolution and
    aten.convolution_backward, whichever module or function calls them; an input gradient that is not needed is not
    computed, so not counted)."""
    with FlopCounterMode(display=False) as counter:  # (entering it again would reset its counts)
        with autocast(device, precision):
            loss = loss_fn()
        loss.backward()
    counts = counter.get_flop_counts()["Global"]
    return sum(flops for op, flops in counts.items() if "convolution" in str(op))


def matmul_tflops(device: torch.device, precision: str) -> float:
    """Measured matmul rate in TFLOP/s (bf16 or fp32): median of 20 products of 8192^3 (CUDA) or 512^3 (elsewhere)."""
    n = 8192 if device.type == "cuda" else 512
    dtype = torch.bfloat16 if precision == "bf16" else torch.float32
    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)
    for _ in range(3):
        a @ b
    times = []
    for _ in range(20):
        synchronize(device)
        start = time.perf_counter()
        a @ b
        synchronize(device)
        times.append(time.perf_counter() - start)
    return 2 * n ** 3 / statistics.median(times) / 1e12


# Kernel name fragments -> what the kernel does, for the per-category sums of `--profile` (first match wins).
KERNEL_CATEGORIES = (
    ("GroupNorm", ("gn_forward", "gn_backward", "group_norm")),
    ("attention", ("flash", "fmha", "attn", "attention", "sdpa")),
    ("convolution", ("conv", "xmma", "implicit_gemm", "dgrad", "wgrad", "cutlass", "gemm", "cudnn")),
    ("layout / copy", ("copy", "nchwtonhwc", "nhwctonchw", "transpose", "cat")),
    ("matmul (linear layers)", ("nvjet", "splitkreduce")),
    ("optimizer", ("fusedoptimizer",)),
    ("reduction", ("reduce", "channel_sum")),
    ("elementwise", ("elementwise", "triton")),
)


GPU_ANNOTATIONS = ("Optimizer.", "ProfilerStep")


def kernel_category(name: str) -> str:
    lowered = name.lower()
    return next((category for category, parts in KERNEL_CATEGORIES if any(p in lowered for p in parts)), "other")


def print_top_kernels(step: Callable[[], float], device: torch.device, title: str, top: int = 15,
                      trace: str | None = None) -> None:
    """Profiles one step; prints the `top` GPU kernels by total time (CPU ops by self time without a GPU), GPU time
    per kernel category, and the `top` PyTorch ops by the GPU time of the kernels they launch, with input shapes
    (which layer a copy or an elementwise pass comes from). `trace`: also writes the step's timeline there as a
    gzipped Chrome trace (chrome://tracing, Perfetto), for the gaps between kernels that the sums do not show."""
    from torch.autograd import DeviceType
    from torch.profiler import ProfilerActivity, profile

    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    with profile(activities=activities, record_shapes=True) as prof:
        step()
        synchronize(device)
    if trace:
        with tempfile.TemporaryDirectory() as tmp:
            raw = os.path.join(tmp, "trace.json")
            prof.export_chrome_trace(raw)
            with open(raw, "rb") as src, gzip.open(trace, "wb") as dst:
                shutil.copyfileobj(src, dst)
        print(f"timeline written to {trace}")
        if device.type == "cuda":
            print(idle_line(timeline(load(trace))))
    events = prof.key_averages()
    # GPU-side ranges of annotations (the optimizer's step) are listed like kernels: not counted twice
    kernels = [(e.key, e.self_device_time_total, e.count) for e in events
               if e.device_type == DeviceType.CUDA and not e.key.startswith(GPU_ANNOTATIONS)]
    unit = "GPU kernels"
    if not kernels:
        kernels = [(e.key, e.self_cpu_time_total, e.count) for e in events]
        unit = "CPU ops (self time)"
    total = sum(t for _, t, _ in kernels) or 1.0
    print(f"\n{title}: top {top} {unit} of one step, {total / 1e3:.1f} ms in all")
    print("| kernel | ms | % | calls |\n|---|---|---|---|")
    for name, t, calls in sorted(kernels, key=lambda k: -k[1])[:top]:
        print(f"| {name[:110].replace('|', '/')} | {t / 1e3:.2f} | {100 * t / total:.1f} | {calls} |")
    if unit != "GPU kernels":
        return
    by_category: dict[str, list[float]] = {}
    for name, t, calls in kernels:
        entry = by_category.setdefault(kernel_category(name), [0.0, 0])
        entry[0] += t
        entry[1] += calls
    print(f"\n{title}: GPU time by kernel category")
    print("| category | ms | % | kernels |\n|---|---|---|---|")
    for category, (t, calls) in sorted(by_category.items(), key=lambda kv: -kv[1][0]):
        print(f"| {category} | {t / 1e3:.2f} | {100 * t / total:.1f} | {calls} |")
    ops = [e for e in prof.key_averages(group_by_input_shape=True)
           if e.device_type == DeviceType.CPU and e.self_device_time_total > 0]
    print(f"\n{title}: top {top} PyTorch ops by the GPU time of their own kernels, by input shapes")
    print("| op | input shapes | ms | calls |\n|---|---|---|---|")
    for e in sorted(ops, key=lambda e: -e.self_device_time_total)[:top]:
        shapes = str([list(s) for s in e.input_shapes if s])[:90]
        print(f"| {e.key} | {shapes} | {e.self_device_time_total / 1e3:.2f} | {e.count} |")


def peak_memory_gib(device: torch.device, variant: Variant) -> tuple[float | None, float | None]:
    """(peak allocated, peak reserved) GiB since the last reset; allocated is None for netgraph variants and those
    compiled in a CUDA-graph mode, whose activations live in the graphs' private pools (reserved, not allocated)."""
    if device.type != "cuda":
        return None, None
    in_pools = variant.graph_network or COMPILE_MODES.get(variant.compile, False)
    allocated = None if in_pools else torch.cuda.max_memory_allocated(device) / GIB
    return allocated, torch.cuda.max_memory_reserved(device) / GIB


def free_memory(device: torch.device) -> None:
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


def measure(case: Case, variant: Variant, args: argparse.Namespace, device: torch.device, row: dict) -> None:
    """Builds one variant, trains it for warm-up + timed steps and fills `row` with what was measured."""
    torch.manual_seed(0)
    if variant.compile:  # each compiled variant compiles afresh: none reuses (or uses up the recompile limit of)
        torch._dynamo.reset()  # an earlier variant's compiled code
    started = time.perf_counter()
    if device.type == "cuda":  # what earlier variants left held (caches, workspaces): part of this one's reserved
        row["held_before_gib"] = torch.cuda.memory_reserved(device) / GIB

    def progress(what: str) -> None:  # a 256^3 case spends minutes before its first step: say where it is
        print(f"  {case.name} {variant.label}: {what} ({time.perf_counter() - started:.1f} s)", flush=True)

    model = (build_ours(case, variant.kernels, args.compvis_decoder) if variant.model == "ours"
             else build_monai(case, variant.flash))
    set_recompute_cheap(model, variant.recompute)
    if variant.gn_tuning:
        from kernels.group_norm import GroupNormTuning  # Triton: only where the triton kernels run
        set_group_norm_tuning(model, GroupNormTuning.parse(variant.gn_tuning))
    row["params"] = parameter_count(model)
    model = model.to(device=device).train()
    x = torch.randn(case.input_shape, device=device).clamp(-1, 1)
    if variant.layout == "channels_last":  # as the trainer does (trainer.channels_last)
        model, x = model_to_channels_last(model), channels_last(x)
    loss_fn = make_loss(case, variant, model, x)
    progress("built")
    counted_x, scale = flop_count_input(x)
    counted_loss = loss_fn if counted_x is x else make_loss(case, variant, model, counted_x)
    row["conv_tflop_per_step"] = scale * conv_flops(counted_loss, device, args.precision) / 1e12  # before any graph
    model.zero_grad(set_to_none=True)
    progress(f"conv FLOPs counted ({row['conv_tflop_per_step']:.2f} TFLOP per step)")
    optimizers, copies = None, None
    if variant.weight_copies:  # what trainer.bf16_weight_copies does: the copies are made at the capture
        optimizers = [torch.optim.AdamW(model.parameters(), lr=LEARNING_RATE, fused=True)]
        copies = copies_from([WeightCopies(optimizers[0])])
    if variant.graph_network:
        for name, network in graphed_networks(case, variant, model).items():
            graph_training_forward(network, name, cast_weights_once=variant.weight_casts == "once",
                                   weight_copies=copies)
    if variant.compile:  # in place (nn.Module.compile): the loss calls the same modules, now compiled on first call
        mode = variant.compile if args.compile_backend == "inductor" else None  # modes are inductor's
        for network in graphed_networks(case, variant, model).values():
            network.compile(mode=mode, backend=args.compile_backend)
    step = (make_graphed_step(model, loss_fn, device, args.precision) if variant.graph
            else make_step(model, loss_fn, device, args.precision, optimizers))
    warmup = []
    for _ in range(args.warmup):
        start = time.perf_counter()
        step()
        synchronize(device)
        warmup.append(1e3 * (time.perf_counter() - start))
        progress(f"warm-up step {len(warmup)}: {warmup[-1]:.0f} ms")
        if len(warmup) == 1:  # a compiled variant's compilation; the first cuDNN autotuning for every variant
            row["first_step_s"] = warmup[0] / 1e3
    if device.type == "cuda" and not variant.graph:  # a graph's peak is that of its capture (make_graphed_step)
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)
    times, losses = [], []
    for _ in range(args.steps):
        start = time.perf_counter()
        losses.append(step())
        synchronize(device)
        times.append(1e3 * (time.perf_counter() - start))
    losses = [float(loss) for loss in losses]
    allocated, reserved = peak_memory_gib(device, variant)
    row.update(step_ms=statistics.median(times), steps_ms=times, warmup_ms=warmup, loss=losses[-1],
               peak_gib=allocated, reserved_gib=reserved)
    if not all(math.isfinite(v) for v in losses):
        row["status"] = f"non-finite loss {losses}"
    if args.profile:
        trace = (os.path.join(args.out, f"trace_{case.name}_{variant.label.replace(' ', '_')}.json.gz")
                 if args.trace else None)
        print_top_kernels(step, device, f"{case.name} {variant.label}", top=args.profile, trace=trace)


def run_variant(case: Case, variant: Variant, args: argparse.Namespace, device: torch.device) -> dict:
    """`measure` one variant; a failure (out of memory, a kernel error) becomes the row's status, not the run's end."""
    row = dict(case=case.name, kind=case.kind, input=list(case.input_shape), variant=variant.label,
               **asdict(variant), status="ok")
    try:
        measure(case, variant, args, device, row)
    except Exception as err:
        row["status"] = f"{type(err).__name__}: {str(err).splitlines()[0][:200] if str(err) else ''}"
        if not isinstance(err, torch.OutOfMemoryError):
            traceback.print_exc()
    # Here the variant's model, optimizer and activations are unreachable (the traceback went with `err`).
    free_memory(device)
    return row


# ------------------------------------------------------------------------------------------------ reporting
def add_ratios(rows: list[dict], matmul: float) -> None:
    """Conv throughput of each row, and ours / the best MONAI variant of the same case (time, memory)."""
    for row in rows:
        if row["status"] == "ok":
            row["conv_tflops"] = row["conv_tflop_per_step"] / (row["step_ms"] / 1e3)
            row["conv_fraction_of_matmul"] = row["conv_tflops"] / matmul
    for case in {r["case"] for r in rows}:
        monai = [r for r in rows if r["case"] == case and r["model"] == "monai" and r["status"] == "ok"]
        if not monai:
            continue
        best_ms = min(r["step_ms"] for r in monai)
        for row in rows:
            if row["case"] == case and row["status"] == "ok":
                row["time_vs_monai_best"] = row["step_ms"] / best_ms
                for key, ratio in (("peak_gib", "memory_vs_monai_best"), ("reserved_gib", "reserved_vs_monai_best")):
                    memories = [r[key] for r in monai if r.get(key) is not None]
                    if memories and row.get(key) is not None:
                        row[ratio] = row[key] / min(memories)


def fmt(value, spec: str) -> str:
    """A table cell: `value` formatted with `spec`, or "-" when it was not measured."""
    return "-" if value is None else format(value, spec)


def markdown_table(rows: list[dict]) -> str:
    lines = ["| case | input | variant | params | step ms | alloc GiB | reserved GiB | time / MONAI best "
             "| alloc / MONAI best | reserved / MONAI best | conv TFLOP/s | % matmul | first step s | status |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        percent = None if r.get("conv_fraction_of_matmul") is None else 100 * r["conv_fraction_of_matmul"]
        lines.append(
            f"| {r['case']} | {'x'.join(map(str, r['input']))} | {r['variant']} | {fmt(r.get('params'), ',')} "
            f"| {fmt(r.get('step_ms'), '.1f')} | {fmt(r.get('peak_gib'), '.2f')} | {fmt(r.get('reserved_gib'), '.2f')} "
            f"| {fmt(r.get('time_vs_monai_best'), '.2f')} | {fmt(r.get('memory_vs_monai_best'), '.2f')} "
            f"| {fmt(r.get('reserved_vs_monai_best'), '.2f')} "
            f"| {fmt(r.get('conv_tflops'), '.1f')} | {fmt(percent, '.1f')} | {fmt(r.get('first_step_s'), '.1f')} "
            f"| {r['status']} |")
    return "\n".join(lines)


# ---------------------------------------------------------------------------------------------------- main
def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--only", choices=("ae", "unet"), help="run only the autoencoder or only the UNet cases")
    parser.add_argument("--cases", default=",".join(DEFAULT_CASES),
                        help=f"comma-separated, of {', '.join(CASES)} (default {','.join(DEFAULT_CASES)})")
    parser.add_argument("--steps", type=int, default=None, help="timed steps per variant (default 9; --quick 2)")
    parser.add_argument("--warmup", type=int, default=None, help="warm-up steps per variant (default 3; --quick 1)")
    parser.add_argument("--kernels", default="torch,triton", help="our GroupNorm kernels to run: torch, triton")
    parser.add_argument("--channels-last", action="store_true", help="also run ours in channels_last_3d")
    parser.add_argument("--channels-last-only", action="store_true", help="run ours in channels_last_3d only")
    parser.add_argument("--no-flash", action="store_true", help="skip MONAI's use_flash_attention variant")
    parser.add_argument("--only-flash", action="store_true", help="run MONAI with use_flash_attention only")
    parser.add_argument("--no-monai", action="store_true",
                        help="run ours only (no ratios: iterating on ours against a MONAI run already made)")
    parser.add_argument("--recompute-cheap", action="store_true",
                        help="also run ours with recompute_cheap (norms and upsampling recomputed in backward)")
    parser.add_argument("--cuda-graph", action="store_true",
                        help="also run every variant with its whole step captured as a CUDA graph (CUDA only)")
    parser.add_argument("--graph-network", action="store_true",
                        help="also run every variant with its networks' forward and backward as CUDA graphs, the rest "
                             "eager (what trainer.cuda_graph does; CUDA only)")
    parser.add_argument("--netgraph-only", action="store_true",
                        help="with --graph-network: only the netgraph variants (no eager ones; saves device time)")
    parser.add_argument("--weight-casts", choices=("once", "autocast", "both"), default="once",
                        help="netgraph variants: autocast's weight casts in one pass each way (once, what "
                             "trainer.cuda_graph does), per layer (autocast), or both variants")
    parser.add_argument("--gn-tunings", default="",
                        help="also run ours (triton kernels) with these GroupNorm launch choices, ';'-separated, each "
                             "','-separated GroupNormTuning fields, e.g. 'forward_tile=4096'")
    parser.add_argument("--weight-copies", action="store_true",
                        help="also run ours' netgraph variants with the graphed weights read from bf16 copies that "
                             "AdamW writes, no casts (trainer.bf16_weight_copies, ldm/engine/weight_copies.py; needs "
                             "--graph-network and bf16)")
    parser.add_argument("--compile", default="", metavar="MODES",
                        help=f"also run MONAI's and our eager variants with their networks torch.compile'd in each of "
                             f"these ','-separated modes ({', '.join(COMPILE_MODES)}); the first warm-up step "
                             f"compiles (the row's first_step_s)")
    parser.add_argument("--compile-backend", default="inductor", help=argparse.SUPPRESS)  # tests: a backend that
    # compiles no code (eager, aot_eager)
    parser.add_argument("--match", default=None, metavar="REGEX",
                        help="run only the variants whose label matches REGEX (re.search), e.g. one variant's memory "
                             "with no other variant's leftovers held in the process")
    parser.add_argument("--compvis-decoder", action="store_true",
                        help="our AE decoder with num_res_blocks + 1 blocks per level (not MONAI's architecture)")
    parser.add_argument("--attention-backend", default=None, help="our attention backend (ldm.modules.attention)")
    parser.add_argument("--profile", type=int, nargs="?", const=15, default=0, metavar="TOP",
                        help="print the top TOP (15) kernels of one step per variant, GPU time per kernel category, "
                        "and the ops behind the kernels with their input shapes")
    parser.add_argument("--trace", action="store_true",
                        help="with --profile: also write each profiled step's timeline to DIR/trace_CASE_VARIANT.json.gz "
                             "and print where its GPU idled (benchmarks/trace_summary.py)")
    parser.add_argument("--memory-cap-gib", type=float, default=None,
                        help="cap this process's GPU memory at this many GiB (79: an 80 GB H100 on a larger GPU)")
    parser.add_argument("--no-cudnn-benchmark", action="store_true",
                        help="cuDNN's heuristics instead of autotuning (cudnn.benchmark), e.g. where autotuning every "
                        "convolution at 256^3 takes longer than the run")
    parser.add_argument("--quick", action="store_true", help="tiny models and few steps: a smoke test on any device")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--precision", choices=("bf16", "fp32"), default=None,
                        help="bf16 autocast (default on CUDA) or fp32 (default elsewhere: CPU bf16 convolutions are "
                             "slow and their 3D weight gradients overflow on some CPUs)")
    parser.add_argument("--out", default=os.environ.get("OUT", "."), help="folder for bench_models.json")
    args = parser.parse_args(argv)
    args.steps = args.steps if args.steps is not None else (2 if args.quick else 9)
    args.warmup = args.warmup if args.warmup is not None else (1 if args.quick else 3)
    args.precision = args.precision or ("bf16" if args.device.startswith("cuda") else "fp32")
    if args.steps < 1 or args.warmup < 0:
        parser.error("--steps must be >= 1 and --warmup >= 0")
    if args.netgraph_only and not args.graph_network:
        parser.error("--netgraph-only needs --graph-network")
    if args.weight_copies and (args.precision != "bf16" or not args.graph_network):
        parser.error("--weight-copies needs --graph-network and --precision bf16 (the copies stand in for the "
                     "graphed networks' bf16 casts)")
    unknown = [k for k in args.kernels.split(",") if k not in ("torch", "triton")]
    if unknown:
        parser.error(f"--kernels: unknown {unknown} (choose torch, triton)")
    unknown = [m for m in args.compile.split(",") if m and m not in COMPILE_MODES]
    if unknown:
        parser.error(f"--compile: unknown {unknown} (choose from {', '.join(COMPILE_MODES)})")
    if args.compile and args.warmup < 1:
        parser.error("--compile needs --warmup >= 1: the first step compiles, and no timed step should")
    if args.compile and args.compile_backend != "inductor":
        from torch._dynamo import list_backends

        if args.compile_backend not in list_backends(exclude_tags=()):
            parser.error(f"--compile-backend: unknown {args.compile_backend!r}")
    unknown = [n for n in args.cases.split(",") if n not in CASES]
    if unknown:
        parser.error(f"--cases: unknown {unknown} (choose from {', '.join(CASES)})")
    return args


def selected_cases(args: argparse.Namespace) -> list[Case]:
    cases = list(QUICK_CASES.values()) if args.quick else [CASES[n] for n in args.cases.split(",")]
    return [c for c in cases if args.only is None or c.kind == args.only]


def variants(args: argparse.Namespace, device: torch.device) -> list[Variant]:
    kernels = args.kernels.split(",")
    if "triton" in kernels and device.type != "cuda" and os.environ.get("TRITON_INTERPRET") != "1":
        print("kernels=triton skipped: it needs a CUDA device (or TRITON_INTERPRET=1 on CPU)")
        kernels.remove("triton")
    layouts = (["channels_last"] if args.channels_last_only else
               ["contiguous", "channels_last"] if args.channels_last else ["contiguous"])
    recompute = [False, True] if args.recompute_cheap else [False]
    graphs = [False, True] if args.cuda_graph and device.type == "cuda" else [False]
    modes = [dict(graph=g) for g in graphs]
    if args.graph_network and device.type == "cuda":
        casts = ["once", "autocast"] if args.weight_casts == "both" else [args.weight_casts]
        modes = [] if args.netgraph_only else modes
        modes += [dict(graph_network=True, weight_casts=c) for c in casts]
    ours = [Variant("ours", k, layout, recompute=r, **mode)
            for layout in layouts for k in kernels for r in recompute for mode in modes]
    ours += [Variant("ours", "triton", layout, recompute=r, gn_tuning=spec, **mode)
             for spec in filter(None, args.gn_tunings.split(";")) if "triton" in kernels
             for layout in layouts for r in recompute for mode in modes]
    if args.weight_copies:  # also with each GroupNorm tuning: the two changes together
        tunings = [(k, "") for k in kernels] + [("triton", spec) for spec in filter(None, args.gn_tunings.split(";"))
                                                if "triton" in kernels]
        ours += [Variant("ours", k, layout, recompute=r, gn_tuning=spec, weight_copies=True, **mode)
                 for k, spec in tunings for layout in layouts for r in recompute for mode in modes
                 if mode.get("graph_network") and mode["weight_casts"] == "once"]
    flash = [True] if args.only_flash else [False] if args.no_flash else [False, True]
    monai = [Variant("monai", flash=f, **mode) for f in flash for mode in modes]
    compiled = [c for c in args.compile.split(",") if c]  # each eager variant (no graph, no GroupNorm tuning) compiled
    monai += [Variant("monai", flash=f, compile=c) for c in compiled for f in flash]
    ours += [Variant("ours", k, layout, recompute=r, compile=c)
             for c in compiled for layout in layouts for k in kernels for r in recompute]
    if args.no_monai:
        monai = []
    chosen = monai + ours
    if args.match is not None:
        chosen = [v for v in chosen if re.search(args.match, v.label)]
        if not chosen:
            raise SystemExit(f"--match {args.match!r}: no variant's label matches")
    return chosen


def cap_memory(device: torch.device, gib: float) -> float:
    """Caps this process's GPU memory at `gib` GiB (the caching allocator refuses more: out of memory); returns it."""
    if device.type != "cuda":
        raise SystemExit("--memory-cap-gib needs a CUDA device")
    index = device.index if device.index is not None else torch.cuda.current_device()
    total = torch.cuda.get_device_properties(index).total_memory / GIB
    if not 0 < gib <= total:
        raise SystemExit(f"--memory-cap-gib {gib}: must be in (0, {total:.1f}], this GPU's memory")
    torch.cuda.set_per_process_memory_fraction(gib / total, index)
    return gib


def main(argv: list[str] | None = None) -> list[dict]:
    args = parse_args(argv)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)  # before any variant: --trace writes there as it goes
    device = torch.device(args.device)
    torch.backends.cudnn.benchmark = not args.no_cudnn_benchmark
    if args.attention_backend is not None:
        set_attention_backend(args.attention_backend)
    import monai

    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "CPU"
    if args.memory_cap_gib is not None:
        name += f" capped at {cap_memory(device, args.memory_cap_gib):.1f} GiB"
    matmul = matmul_tflops(device, args.precision)
    print(f"device: {name}, torch {torch.__version__}, MONAI {monai.__version__}; "
          f"{args.precision} matmul {matmul:.1f} TFLOP/s", flush=True)
    rows = []
    case_variants = variants(args, device)
    for case in selected_cases(args):
        counts = {variant.model: None for variant in case_variants}
        for variant in case_variants:
            row = run_variant(case, variant, args, device)
            rows.append(row)
            counts[variant.model] = counts[variant.model] or row.get("params")
            print(json.dumps({k: v for k, v in row.items() if k not in ("steps_ms", "warmup_ms")}), flush=True)
        print(f"{case.name}: parameters " + " / ".join(f"{'MONAI' if m == 'monai' else m} {n:,}"
                                                       for m, n in counts.items())
              if None not in counts.values() else f"{case.name}: a model failed to build", flush=True)
    add_ratios(rows, matmul)
    report = dict(device=name, torch=torch.__version__, monai=monai.__version__, matmul_tflops=matmul,
                  args=vars(args), rows=rows)
    (out / "bench_models.json").write_text(json.dumps(report, indent=1))
    precision = "bf16 autocast" if args.precision == "bf16" else "fp32"
    print(f"\nTraining step, {precision}, fused AdamW, {args.warmup} warm-up + {args.steps} timed steps, {name}; "
          f"{args.precision} matmul {matmul:.1f} TFLOP/s")
    print(markdown_table(rows))
    return rows


if __name__ == "__main__":
    main()
