"""Seconds per sample of the BraTS LDM (configs/latent-diffusion/brats_mask_concat_3d.yaml, random weights): DDIM
with the denoiser eager against replayed from a CUDA graph (`sample.py --cuda_graph`), through sample.py's own
`draw_batch`; with `--edm`, also the same UNet in sgm's formulation (configs/sgm/edm_brats_3d.yaml: EDM
preconditioning, Heun over the Karras schedule, `--edm-steps` 25 = 49 network calls) through sample.py's
`draw_engine_batch`; with `--monai`, MONAI 1.6's `LatentDiffusionInferer` (DDIM, same steps, concat mode) on MONAI
networks of the same architecture (AutoencoderKL and DiffusionModelUNet sized from the config, random weights, flash
attention on CUDA, MONAI's own contiguous layout), the mask area-pooled to the latent grid as ours does.

    python benchmarks/bench_sampling.py [--steps 50] [--samples 4] [--batch-size 1] [--scale 1.0] [--edm] [--monai] [--out DIR]
    python benchmarks/bench_sampling.py --quick      # a narrow model at a 32^3 image: a CPU smoke run

Each variant draws `--samples` samples in batches of `--batch-size` for random tumour masks (one-hot, 4 classes, at
the image size), bf16 autocast and channels-last on CUDA as the config trains, and decodes them to images; the
first batch of each variant is a warm-up (cuDNN autotuning, Triton compilation, the graph's capture, which later
batches of the same size reuse) and the median over the others is reported, as seconds per sample. The graphed samples are checked against the eager ones (max abs
difference of the decoded images). `--scale` > 1 samples with classifier-free guidance (two network passes per
step). Writes DIR/bench_sampling.json ($OUT when set) and prints a markdown table last.
"""
from __future__ import annotations

import argparse
import copy
import json
import os
import statistics
import sys
import time
from pathlib import Path

import torch
from omegaconf import OmegaConf
from tqdm.auto import tqdm

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from ldm.cli import model_config_for  # noqa: E402
from ldm.engine.memory_format import model_to_channels_last  # noqa: E402
from ldm.models.diffusion.edm.guiders import IdentityGuider, VanillaCFG  # noqa: E402
from ldm.models.diffusion.sampling import timestep_schedule  # noqa: E402
from ldm.sample_engine import draw_engine_batch  # noqa: E402
from ldm.sample_cli import GuidedDenoiser, SamplerSettings, draw_batch  # noqa: E402
from ldm.sample_conditions import Condition  # noqa: E402
from ldm.util import instantiate_from_config  # noqa: E402

CONFIG = ROOT / "configs" / "latent-diffusion" / "brats_mask_concat_3d.yaml"
EDM_CONFIG = ROOT / "configs" / "sgm" / "edm_brats_3d.yaml"
QUICK = ["model.params.image_size=8", "model.params.unet_config.params.image_size=8",
         "model.params.unet_config.params.model_channels=32", "model.params.first_stage_config.params.ddconfig.ch=32",
         "model.params.first_stage_config.params.ddconfig.resolution=32"]
EDM_QUICK = ["model.params.latent_shape=[4,8,8,8]", "model.params.network_config.params.image_size=8",
             "model.params.network_config.params.model_channels=32",
             "model.params.first_stage_config.params.ddconfig.ch=32",
             "model.params.first_stage_config.params.ddconfig.resolution=32"]


def build_model(overrides: list[str], device: torch.device, config_file: Path = CONFIG) -> torch.nn.Module:
    """The config's LatentDiffusion (or DiffusionEngine) with random weights (no stage-1 checkpoint, scale_factor 1),
    in eval mode."""
    engine = config_file == EDM_CONFIG
    config = OmegaConf.merge(OmegaConf.load(config_file), OmegaConf.from_dotlist(
        ["model.params.first_stage_config.params.ckpt_path=null", "model.params.use_ema=false",
         *(["model.params.scale_factor=1.0"] if engine else ["model.params.scale_by_std=false"]), *overrides]))
    torch.manual_seed(0)
    model = instantiate_from_config(model_config_for(config.model, training=False)).to(device).eval()
    if device.type == "cuda":
        model_to_channels_last(model)
    return model


def random_masks(count: int, image_size: tuple[int, ...], seed: int = 0) -> list[Condition]:
    """One-hot masks (4, *image_size) of random blobs: labels from a smooth random field."""
    generator = torch.Generator().manual_seed(seed)
    field = torch.nn.functional.interpolate(torch.randn(count, 1, *(4,) * len(image_size), generator=generator),
                                            size=image_size, mode="trilinear")
    labels = (field > -0.5).long() + (field > 0.3).long() + (field > 0.9).long()
    onehot = torch.nn.functional.one_hot(labels[:, 0], 4).movedim(-1, 1).float()
    return [Condition(onehot[i], f"random[{i}]") for i in range(count)]


def draw(model, settings, timesteps, conditions, batch_size: int, device, cuda_graph: bool) -> tuple[list, list]:
    """(seconds per sample of each batch, the images) for all conditions."""
    dtype = torch.bfloat16 if device.type == "cuda" else None
    denoiser = GuidedDenoiser(model, settings.scale, cuda_graph=cuda_graph)  # one per run, as sample.py keeps it
    seconds, images = [], []
    for start in range(0, len(conditions), batch_size):
        batch = conditions[start:start + batch_size]
        progress = tqdm(total=len(timesteps), leave=False, disable=True)
        began = time.perf_counter()
        out = draw_batch(model, settings, timesteps, [start + i for i in range(len(batch))], batch, device, dtype,
                         progress, channels_last=device.type == "cuda", denoiser=denoiser)
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        seconds.append((time.perf_counter() - began) / len(batch))
        images.append(out.float().cpu())
    return seconds, images


def draw_edm(model, steps: int, scale: float, conditions, batch_size: int, device) -> tuple[list, list]:
    """(seconds per sample of each batch, the images) of the DiffusionEngine's Heun sampler at `steps` steps."""
    sampler = copy.copy(model.sampler)
    sampler.num_steps = steps
    sampler.guider = VanillaCFG(scale) if scale != 1.0 else IdentityGuider()
    dtype = torch.bfloat16 if device.type == "cuda" else None
    key = model.conditioner.input_keys[0]
    seconds, images = [], []
    for start in range(0, len(conditions), batch_size):
        batch = conditions[start:start + batch_size]
        progress = tqdm(total=steps, leave=False, disable=True)
        began = time.perf_counter()
        out = draw_engine_batch(model, sampler, [start + i for i in range(len(batch))],
                                [{key: c.value} for c in batch], device, dtype, progress)
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        seconds.append((time.perf_counter() - began) / len(batch))
        images.append(out.float().cpu())
    return seconds, images


def build_monai(config_file: Path, overrides: list[str], device: torch.device):
    """(MONAI AutoencoderKL, DiffusionModelUNet, DDIMScheduler) of the LDM config's architecture and schedule."""
    from monai.networks.nets import AutoencoderKL as MonaiAutoencoderKL
    from monai.networks.nets import DiffusionModelUNet
    from monai.networks.schedulers import DDIMScheduler

    params = OmegaConf.merge(OmegaConf.load(config_file), OmegaConf.from_dotlist(overrides)).model.params
    dd, unet = params.first_stage_config.params.ddconfig, params.unet_config.params
    torch.manual_seed(0)
    autoencoder = MonaiAutoencoderKL(
        spatial_dims=3, in_channels=dd.in_channels, out_channels=dd.out_ch,
        channels=[dd.ch * m for m in dd.ch_mult], num_res_blocks=[dd.num_res_blocks] * len(dd.ch_mult),
        latent_channels=dd.z_channels, norm_num_groups=32, attention_levels=[False] * len(dd.ch_mult),
        with_encoder_nonlocal_attn=True, with_decoder_nonlocal_attn=True, use_flash_attention=device.type == "cuda")
    network = DiffusionModelUNet(
        spatial_dims=3, in_channels=unet.in_channels, out_channels=unet.out_channels,
        channels=[unet.model_channels * m for m in unet.channel_mult], num_res_blocks=unet.num_res_blocks,
        attention_levels=[2 ** i in unet.attention_resolutions for i in range(len(unet.channel_mult))],
        num_head_channels=unet.num_head_channels, resblock_updown=False, use_flash_attention=device.type == "cuda")
    # CompVis' "linear" schedule is linear in sqrt(beta): MONAI's scaled_linear_beta
    scheduler = DDIMScheduler(num_train_timesteps=params.timesteps, schedule="scaled_linear_beta",
                              beta_start=params.linear_start, beta_end=params.linear_end, clip_sample=False)
    return autoencoder.to(device).eval(), network.to(device).eval(), scheduler


@torch.no_grad()
def draw_monai(networks, steps: int, conditions, latent: list[int], device) -> list[float]:
    """Seconds per sample (batch 1) of MONAI's LatentDiffusionInferer with DDIM at `steps` steps."""
    from monai.inferers import LatentDiffusionInferer

    autoencoder, network, scheduler = networks
    scheduler.set_timesteps(steps, device=device)
    inferer = LatentDiffusionInferer(scheduler, scale_factor=1.0)
    seconds = []
    for index, condition in enumerate(conditions):
        mask = torch.nn.functional.adaptive_avg_pool3d(condition.value[None].float(), latent[1:]).to(device)
        noise = torch.randn(1, *latent, generator=torch.Generator().manual_seed(index)).to(device)
        began = time.perf_counter()
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda"):
            inferer.sample(input_noise=noise, autoencoder_model=autoencoder, diffusion_model=network,
                           scheduler=scheduler, conditioning=mask, mode="concat", verbose=False)
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        seconds.append(time.perf_counter() - began)
    return seconds


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=None, help="DDIM steps (default 50; --quick 2)")
    parser.add_argument("--samples", type=int, default=None, help="samples per variant, the first batch a warm-up "
                        "(default 4; --quick 2)")
    parser.add_argument("--batch-size", type=int, default=1)
    parser.add_argument("--scale", type=float, default=1.0, help="classifier-free guidance scale")
    parser.add_argument("--edm", action="store_true", help="also the EDM / Heun row (configs/sgm/edm_brats_3d.yaml)")
    parser.add_argument("--monai", action="store_true", help="also MONAI's LatentDiffusionInferer (DDIM, same steps)")
    parser.add_argument("--edm-steps", type=int, default=None, help="Heun steps (default 25; --quick 2)")
    parser.add_argument("--quick", action="store_true", help="narrow networks, 32^3 images (CPU smoke run)")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--out", default=os.environ.get("OUT", "."))
    args = parser.parse_args(argv)
    steps = args.steps or (2 if args.quick else 50)
    count = args.samples or (2 if args.quick else 4)
    device = torch.device(args.device)
    torch.backends.cudnn.benchmark = device.type == "cuda"
    model = build_model(QUICK if args.quick else [], device)
    settings = SamplerSettings(name="ddim", steps=steps, eta=0.0, spacing="uniform", scale=args.scale)
    timesteps = timestep_schedule(model.diffusion.num_timesteps, steps)
    image_size = tuple(s * 4 for s in model.image_size)
    conditions = random_masks(count, image_size)
    variants = [("eager", False)] + ([("cuda graph", True)] if device.type == "cuda" else [])
    rows, reference = [], None
    latent = [model.channels, *model.image_size]
    for name, graphed in variants:
        seconds, images = draw(model, settings, timesteps, conditions, args.batch_size, device, graphed)
        timed = seconds[1:] or seconds
        row = dict(variant=name, seconds_per_sample=statistics.median(timed), batches=seconds,
                   params=sum(p.numel() for p in model.parameters()))
        if reference is None:
            reference = images
        else:
            row["max_abs_diff_vs_eager"] = max(float((a - b).abs().max()) for a, b in zip(images, reference))
        rows.append(row)
    if args.monai:
        del model  # one model's weights on the device at a time
        model = None
        monai = build_monai(CONFIG, QUICK if args.quick else [], device)
        seconds = draw_monai(monai, steps, conditions, latent, device)
        rows.append(dict(variant="MONAI LatentDiffusionInferer", seconds_per_sample=statistics.median(seconds[1:]
                                                                                                       or seconds),
                         batches=seconds, params=sum(p.numel() for net in monai[:2] for p in net.parameters())))
        del monai
    if args.edm:
        edm_steps = args.edm_steps or (2 if args.quick else 25)
        del model  # one model's weights on the device at a time
        engine = build_model(EDM_QUICK if args.quick else [], device, EDM_CONFIG)
        seconds, _ = draw_edm(engine, edm_steps, args.scale, conditions, args.batch_size, device)
        rows.append(dict(variant=f"EDM Heun {edm_steps} steps ({2 * edm_steps - 1} network calls)",
                         seconds_per_sample=statistics.median(seconds[1:] or seconds), batches=seconds,
                         params=sum(p.numel() for p in engine.parameters())))
    device_name = torch.cuda.get_device_name(device) if device.type == "cuda" else "CPU"
    result = dict(device=device_name, torch=torch.__version__, steps=steps, samples=count,
                  batch_size=args.batch_size, scale=args.scale, image=list(image_size),
                  latent=latent, rows=rows)
    Path(args.out).mkdir(parents=True, exist_ok=True)
    (Path(args.out) / "bench_sampling.json").write_text(json.dumps(result, indent=2))
    print(f"{device_name}, torch {torch.__version__}: DDIM {steps} steps, guidance {args.scale}, batch "
          f"{args.batch_size}, latent {result['latent']} -> image {list(image_size)}, {count} samples per variant "
          f"(the first batch a warm-up)")
    print("| variant | parameters (AE + UNet) | s per sample | max abs diff vs eager |\n|---|---|---|---|")
    for row in rows:
        diff = row.get("max_abs_diff_vs_eager")
        print(f"| {row['variant']} | {row['params'] / 1e6:.2f}M | {row['seconds_per_sample']:.3f} | "
              f"{'-' if diff is None else f'{diff:.2g}'} |")
    return result


if __name__ == "__main__":
    main()
