"""`sample.py`: draw samples from a trained diffusion run (its configs and checkpoint) into NIfTI, PNG and a manifest.

    python sample.py -r logs/<run> --batch_size 1 --n_samples 8 --sampler ddim --steps 50 --eta 0 --scale 1.0
    python sample.py -r logs/<run> --cond masks/            # one sample per mask file (label maps or one-hot)
    python sample.py -r model.ckpt --config model.yaml --cond split:test
    python sample.py -r logs/<text run> --prompt "a handwritten seven" --negative_prompt "a handwritten one"

Sample i starts from noise seeded with `seed + i`, which also drives its ancestral noise, so any sample can be drawn
again alone, whatever the batch size. Written to --outdir (default <run>/samples/<timestamp>/): `sample_XXXX.nii.gz`
per 3D sample (with the conditioning file's affine) and its mask `sample_XXXX_mask.nii.gz` for mask conditions
(so a folder of samples is a training set of image-mask pairs: `ldm.data.generated.GeneratedPairs`), `sample_XXXX.png` (orthogonal mid-slices for 3D), `samples.png`
(all samples, one per row) and `manifest.json` (config, checkpoint hash, sampler settings, seed, seconds and
condition per sample, device, precision).
"""
from __future__ import annotations

import argparse
import contextlib
import datetime
import glob
import json
import math
import os
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch
from omegaconf import DictConfig, OmegaConf
from tqdm.auto import tqdm

from ldm.cli import load_config, model_config_for
from ldm.engine.checkpoint import LAST, CheckpointError, load_checkpoint, qkv_bias_hint
from ldm.engine.images import save_nifti, save_png, to_grid
from ldm.engine.inference_graph import GraphedInference
from ldm.engine.memory_format import channels_last as channels_last_tensor, model_to_channels_last
from ldm.models.diffusion.conditioning import Conditioning, classifier_free_guidance
from ldm.models.diffusion.edm.samplers import SAMPLERS as EDM_SAMPLERS
from ldm.models.diffusion.engine import DiffusionEngine
from ldm.models.diffusion.sampling import SAMPLERS, get_sampler, sampler_options, timestep_schedule
from ldm.sample_conditions import (Condition, ConditionError, batch_conditionings, conditioning_kind, load_conditions,
                                   read_prompts)
from ldm.util import TRUST_VARIABLE, TRUSTED_PREFIXES, ConfigError, file_sha256, instantiate_from_config

PRECISIONS = {"32": None, "bf16": torch.bfloat16, "16": torch.float16}
SPACING_NAMES = {"uniform": "uniform", "leading": "leading", "linspace": "linspace", "trailing": "trailing",
                 "quadratic": "quad", "quad": "quad"}
DEFAULT_UNCONDITIONAL_SAMPLES = 8


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="sample.py", description="Draw samples from a trained diffusion run into NIfTI, PNG and a manifest.",
        epilog="Any further KEY=VALUE arguments are OmegaConf dotlist overrides of the run's config, merged last.")
    parser.add_argument("-r", "--resume", required=True, metavar="RUN",
                        help="a run folder (its configs/*.yaml and checkpoints/last.ckpt) or a checkpoint file")
    parser.add_argument("-c", "--config", nargs="*", default=[], metavar="config.yaml",
                        help="config files merged after the run's own (needed for a checkpoint outside a run folder)")
    parser.add_argument("--cond", default=None,
                        help="conditioning: a folder of mask NIfTI files, split:<name> (a split of the run's data "
                             "config) or labels:<i,j,...>; samples cycle through the conditions")
    parser.add_argument("--prompt", default=None,
                        help="a text-conditioned model: the prompt of every sample (instead of --cond)")
    parser.add_argument("--prompt_file", default=None, metavar="FILE",
                        help="a text-conditioned model: prompts, one per line; samples cycle through them")
    parser.add_argument("--negative_prompt", default=None,
                        help="encoded in place of the empty prompt as guidance's null condition (needs --scale != 1)")
    parser.add_argument("--mask_labels", default=None, metavar="L0,L1,...",
                        help="label values of the mask files, in channel order (default: the run's data config)")
    parser.add_argument("--n_samples", type=int, default=None,
                        help=f"default: one per condition, {DEFAULT_UNCONDITIONAL_SAMPLES} for an unconditional model")
    parser.add_argument("--batch_size", type=int, default=1, help="samples drawn together (1 for large 3D volumes)")
    parser.add_argument("--sampler", choices=sorted(set(SAMPLERS) | set(EDM_SAMPLERS)), default=None,
                        help=f"default: the run's (model.params.sampler, or a DiffusionEngine's sampler_config); "
                             f"{', '.join(SAMPLERS)} for LatentDiffusion runs, {', '.join(EDM_SAMPLERS)} for "
                             f"DiffusionEngine runs")
    parser.add_argument("--steps", type=int, default=None, help="sampler steps (default: model.params.sampler_steps)")
    parser.add_argument("--eta", type=finite_float, default=None, help="DDIM noise: 0 deterministic, 1 ancestral")
    parser.add_argument("--scale", type=finite_float, default=None,
                        help="classifier-free guidance scale (default: model.params.guidance_scale; 1 = off)")
    parser.add_argument("--spacing", choices=list(SPACING_NAMES), default=None,
                        help="timestep spacing (default: model.params.timestep_spacing); leading, linspace and "
                             "trailing as diffusers defines them, model.params.steps_offset applying to leading")
    parser.add_argument("--quadratic", action="store_true", help="same as --spacing quadratic")
    parser.add_argument("--ema", action=argparse.BooleanOptionalAction, default=None,
                        help="use the EMA weights (default: when the model has them)")
    parser.add_argument("--precision", choices=list(PRECISIONS), default="32",
                        help="autocast dtype of the networks (weights stay float32; sampler arithmetic is float32)")
    parser.add_argument("--decode_slab", type=int, default=None, metavar="ROWS",
                        help="decode in slabs of ROWS output rows along the first spatial axis (exact, for volumes "
                             "whose decode does not fit at once; default: the autoencoder's ddconfig.decode_slab)")
    parser.add_argument("--cuda_graph", action="store_true",
                        help="replay the denoiser from a CUDA graph captured once per batch size (the host launches "
                             "one graph per step instead of the network's kernels; CUDA only)")
    parser.add_argument("--device", default="auto", help="cpu, cuda, cuda:N or auto (cuda when available)")
    parser.add_argument("-s", "--seed", type=int, default=23, help="sample i uses seed + i")
    parser.add_argument("--outdir", default=None, help="default: <run>/samples/<timestamp>/")
    parser.add_argument("--trust-config", action="store_true",
                        help=f"let the run's configs name any importable target (also {TRUST_VARIABLE}=1); by "
                             f"default only {', '.join(TRUSTED_PREFIXES)} and the aliases, since a config runs the "
                             f"code it names")
    return parser


def finite_float(value: str) -> float:
    """argparse type: a float that is neither NaN nor infinite (a NaN eta or scale makes every sample NaN)."""
    number = float(value)
    if not math.isfinite(number):
        raise argparse.ArgumentTypeError(f"expected a finite number, got {value!r}")
    return number


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    argv = list(sys.argv[1:] if argv is None else argv)
    opt, dotlist = parser.parse_known_args(argv)
    opt.argv = argv
    if opt.trust_config:
        os.environ[TRUST_VARIABLE] = "1"
    try:
        run(opt, dotlist)
    except (ConfigError, CheckpointError, ConditionError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    return 0


# ------------------------------------------------------------------------------------------------ set-up
def locate_run(resume: str, extra_configs: Sequence[str]) -> tuple[Path, Path, list[str]]:
    """(run folder, checkpoint, config files) for `-r`: a run folder, or a checkpoint file (in a run's
    checkpoints/ folder, or anywhere with --config)."""
    path = Path(resume)
    if not path.exists():
        raise CheckpointError(f"-r {resume}: no such run folder or checkpoint file")
    if path.is_dir():
        run_dir, checkpoint = path, path / "checkpoints" / LAST
        if not checkpoint.is_file():
            raise CheckpointError(f"-r {resume}: the run folder has no checkpoints/{LAST} to sample from")
    else:
        checkpoint = path
        run_dir = path.parent.parent if path.parent.name == "checkpoints" else path.parent
    for config in extra_configs:
        if not Path(config).is_file():
            raise ConfigError(f"--config {config}: no such file")
    configs = sorted(glob.glob(str(run_dir / "configs" / "*.yaml"))) + list(extra_configs)
    if not configs:
        raise ConfigError(f"-r {resume}: no configs/*.yaml in {run_dir}; pass the model's config with --config")
    return run_dir, checkpoint, configs


def pick_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError:
        raise ConfigError(f"--device {name}: expected cpu, cuda, cuda:N or auto") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError(f"--device {name}: no CUDA device is available (use --device cpu)")
    if device.type not in ("cpu", "cuda"):
        raise ConfigError(f"--device {name}: expected cpu, cuda, cuda:N or auto")
    return device


def build_model(config: DictConfig, checkpoint: dict, checkpoint_path: Path) -> torch.nn.Module:
    """The config's model (test-stage target and params) with every weight from the checkpoint, in eval mode.

    Weight files named in the config (`ckpt_path` of the model and of its first stage) are not read: the checkpoint
    holds those weights too, so a run still samples after the autoencoder's run folder has moved."""
    model_config = model_config_for(config.model, training=False)
    params = model_config.params
    if params.get("ckpt_path") is not None:
        params.ckpt_path = None
    first_stage = params.get("first_stage_config")
    if isinstance(first_stage, DictConfig) and (first_stage.get("params") or {}).get("ckpt_path") is not None:
        first_stage.params.ckpt_path = None
    model = instantiate_from_config(model_config)
    if not isinstance(model, DiffusionEngine) and not all(hasattr(model, name)
                                                          for name in ("diffusion", "apply_model", "decode")):
        raise ConfigError(f"model.target: {type(model).__name__} is not a diffusion model (sample.py needs "
                          f"ldm.models.diffusion.ddpm.DDPM, LatentDiffusion or ldm.models.diffusion.engine."
                          f"DiffusionEngine)")
    try:
        missing, unexpected = model.load_state_dict(checkpoint["state_dict"], strict=False)
    except RuntimeError as err:  # shape mismatches
        details = "; ".join(line.strip() for line in str(err).splitlines()[1:4])
        raise CheckpointError(f"checkpoint {checkpoint_path} does not fit the config's {type(model).__name__}: "
                              f"{details}") from None
    if missing or unexpected:
        raise CheckpointError(f"checkpoint {checkpoint_path} does not fit the config's {type(model).__name__}: "
                              f"{len(missing)} missing keys {missing[:3]}, {len(unexpected)} unexpected keys "
                              f"{unexpected[:3]}{qkv_bias_hint(missing, unexpected)}")
    return model.eval()


def use_ema_weights(model: torch.nn.Module, wanted: bool | None) -> bool:
    """Copy the EMA weights into the network when `wanted` (True: required, None: when there are any)."""
    ema = getattr(model, "model_ema", None)
    if wanted and ema is None:
        raise ConfigError("--ema: the model has no EMA weights (model.params.use_ema is false); use --no-ema")
    if wanted is False or ema is None:
        return False
    ema.copy_to(model.model)
    return True


@dataclass(frozen=True)
class SamplerSettings:
    """How to sample: solver `name`, requested `steps`, DDIM `eta`, timestep `spacing`, guidance `scale`, and the
    model's diffusers-style conventions (`steps_offset`, `set_alpha_to_one`, `clip_sample` / `clip_sample_range`)."""

    name: str
    steps: int
    eta: float
    spacing: str
    scale: float
    steps_offset: int = 0
    set_alpha_to_one: bool = True
    clip_sample: bool = False
    clip_sample_range: float = 1.0

    def options(self) -> dict[str, Any]:
        return sampler_options(self.name, self.eta, self.set_alpha_to_one, self.clip_sample, self.clip_sample_range)


def sampler_settings(opt: argparse.Namespace, params: DictConfig, model: torch.nn.Module) -> SamplerSettings:
    """Flags over the model's configured sampler (model.params.sampler, sampler_steps, ...), checked."""
    name = opt.sampler or params.get("sampler", "ddim")
    if name not in SAMPLERS:
        raise ConfigError(f"--sampler {name}: a {type(model).__name__} run samples with {', '.join(SAMPLERS)} "
                          f"({', '.join(EDM_SAMPLERS)} are for DiffusionEngine runs)")
    configured_eta = float(params.get("sampler_eta", 0.0)) if params.get("sampler", "ddim") == "ddim" else 0.0
    eta = opt.eta if opt.eta is not None else (configured_eta if name == "ddim" else 0.0)
    if name != "ddim" and eta:
        raise ConfigError(f"--eta {eta}: only the ddim sampler has an eta (sampler is {name})")
    if opt.quadratic and opt.spacing not in (None, "quadratic", "quad"):
        raise ConfigError(f"--quadratic and --spacing {opt.spacing} contradict each other")
    spacing = "quadratic" if opt.quadratic else (opt.spacing or params.get("timestep_spacing", "uniform"))
    spacing = SPACING_NAMES.get(spacing, spacing)  # a bad configured name fails in timestep_schedule, named
    scale = float(opt.scale if opt.scale is not None else getattr(model, "guidance_scale", 1.0))
    kind = conditioning_kind(model)
    if scale != 1.0 and (kind == "none" or getattr(model, "conditioning_key", None) == "adm"):
        raise ConfigError(f"--scale {scale}: classifier-free guidance needs a null condition, which a model with "
                          f"conditioning_key={getattr(model, 'conditioning_key', None)} has not (use --scale 1)")
    if scale != 1.0 and not getattr(model, "ucg_rate", 0.0):
        print(f"warning: --scale {scale}, but the model was trained with ucg_rate 0: its unconditional prediction "
              f"never saw the null condition", file=sys.stderr)
    steps = opt.steps if opt.steps is not None else params.get("sampler_steps", 50)
    configured_spacing = SPACING_NAMES.get(params.get("timestep_spacing", "uniform"))
    steps_offset = int(params.get("steps_offset", 0)) if spacing == configured_spacing else 0  # the configured one's
    settings = SamplerSettings(name, int(steps), float(eta), spacing, scale, steps_offset,
                               bool(params.get("set_alpha_to_one", True)), bool(params.get("clip_sample", False)),
                               float(params.get("clip_sample_range", 1.0)))
    try:
        settings.options()
    except ValueError as err:
        raise ConfigError(f"{err}; the model's config sets it (override it with a dotlist, e.g. "
                          f"model.params.set_alpha_to_one=true)") from None
    return settings


def new_sample_folder(parent: Path) -> Path:
    """`parent/<timestamp>`, with a `_N` suffix when a run in the same second took that name."""
    stem = parent / datetime.datetime.now().strftime("%Y-%m-%dT%H-%M-%S")
    folder, suffix = stem, 0
    while folder.exists():
        suffix += 1
        folder = stem.with_name(f"{stem.name}_{suffix}")
    return folder


def describe_device(device: torch.device) -> str:
    if device.type == "cuda":
        return f"{device} ({torch.cuda.get_device_name(device)})"
    return str(device)


# ------------------------------------------------------------------------------------------------ outputs
class SampleWriter:
    """Writes each sample as it is drawn, then the montage and the manifest.

    Per sample: `sample_XXXX.nii.gz` for volumes (C, D, H, W) (the condition's affine, else identity), with a mask
    condition of the same grid also `sample_XXXX_mask.nii.gz` (its K channels along the last axis, a label map for
    K = 1; `sample.py --cond` reads it back), and `sample_XXXX.png` (orthogonal mid-slices for volumes); at the end
    `samples.png` and `manifest.json`.
    """

    def __init__(self, outdir: Path):
        self.outdir = outdir
        self.outdir.mkdir(parents=True, exist_ok=True)
        self.rows: list[np.ndarray] = []
        self.entries: list[dict[str, Any]] = []

    def add(self, index: int, image: torch.Tensor, seed: int, seconds: float, condition: Condition | None) -> None:
        """image: (C, *spatial) in [-1, 1], on any device."""
        image = image.detach().float().cpu()
        stem = f"sample_{index:04d}"
        files = []
        mask = None
        if image.ndim == 4:
            affine = None if condition is None else condition.affine
            save_nifti(image, self.outdir / f"{stem}.nii.gz", affine)
            files.append(f"{stem}.nii.gz")
            if condition is not None and condition.value.shape[1:] == image.shape[1:]:
                mask = f"{stem}_mask.nii.gz"  # the spatial condition, on the sample's grid
                save_nifti(condition.value, self.outdir / mask, affine)
        grid = to_grid(image[None])
        save_png(grid, self.outdir / f"{stem}.png")
        files.append(f"{stem}.png")
        self.rows.append(grid)
        self.entries.append({
            "index": index, "seed": seed, "seconds": round(seconds, 4), "files": files,
            "condition": None if condition is None else condition.source, "mask": mask,
            **({"prompt": condition.value, "negative_prompt": condition.negative}
               if condition is not None and isinstance(condition.value, str) else {}),
            "affine": None if image.ndim != 4 else ("identity" if condition is None or condition.affine is None
                                                    else f"from {condition.source}"),
        })

    def finish(self, manifest: dict[str, Any]) -> Path:
        save_png(np.concatenate(self.rows, axis=0), self.outdir / "samples.png")
        seconds = [entry["seconds"] for entry in self.entries]
        manifest = {**manifest, "samples": self.entries, "montage": "samples.png",
                    "seconds_per_sample_mean": round(sum(seconds) / len(seconds), 4)}
        path = self.outdir / "manifest.json"
        path.write_text(json.dumps(manifest, indent=2) + "\n")
        return path


# ------------------------------------------------------------------------------------------------ sampling
class GuidedDenoiser:
    """The classifier-free-guided network as a function of tensors only: (x_t, t, *conditioning) -> output, where the
    conditioning is `arguments(cond, null)` (the set fields of cond, then of null when guidance needs it). With
    `cuda_graph` it is replayed from a CUDA graph (ldm/engine/inference_graph.py); kept across a run's batches, one
    graph serves every batch of a shape, since the conditioning is an input of the graph, not a captured constant."""

    def __init__(self, model: torch.nn.Module, scale: float, cuda_graph: bool = False):
        self.model, self.scale = model, scale
        self.names: tuple[str, ...] | None = None
        self.graphed = GraphedInference(self.evaluate) if cuda_graph else None

    def arguments(self, cond: Conditioning, null: Conditioning) -> tuple[torch.Tensor, ...]:
        names = tuple(cond.tensors())
        if self.names is None:
            self.names = names
        elif names != self.names:
            raise ValueError(f"GuidedDenoiser: conditioning fields {names}, earlier batches had {self.names}")
        tensors = tuple(getattr(cond, name) for name in names)
        return tensors + (tuple(getattr(null, name) for name in names) if self.scale != 1.0 else ())

    def evaluate(self, x: torch.Tensor, t: torch.Tensor, *conditioning: torch.Tensor) -> torch.Tensor:
        count = len(self.names or ())
        cond = Conditioning(**dict(zip(self.names or (), conditioning[:count])))
        null = Conditioning(**dict(zip(self.names or (), conditioning[count:]))) if self.scale != 1.0 else cond
        return classifier_free_guidance(self.model.apply_model, cond, null, self.scale)(x, t)

    def __call__(self, x: torch.Tensor, t: torch.Tensor, *conditioning: torch.Tensor) -> torch.Tensor:
        return (self.graphed or self.evaluate)(x, t, *conditioning)


@torch.no_grad()
def draw_batch(model: torch.nn.Module, settings: SamplerSettings, timesteps: torch.Tensor, seeds: Sequence[int],
               conditions: Sequence[Condition] | None, device: torch.device, dtype: torch.dtype | None,
               progress: tqdm, channels_last: bool = False,
               denoiser: GuidedDenoiser | None = None) -> torch.Tensor:
    """Images (B, C, *spatial) in [-1, 1] for one batch; item i from noise seeded with seeds[i]; with
    `channels_last` the noise is stored channels-last (as the model's weights are then). `denoiser`: the run's
    GuidedDenoiser (default: a new, eager one)."""
    generators = [torch.Generator().manual_seed(seed) for seed in seeds]
    x_T = torch.cat([torch.randn(1, model.channels, *model.image_size, generator=g) for g in generators]).to(device)
    if channels_last:
        x_T = channels_last_tensor(x_T)
    autocast = torch.autocast(device.type, dtype=dtype) if dtype is not None else contextlib.nullcontext()
    with autocast:
        cond, null = batch_conditionings(model, conditions, device)
        denoiser = denoiser or GuidedDenoiser(model, settings.scale)
        arguments = denoiser.arguments(cond, null)
        latents = get_sampler(settings.name)(lambda x, t: denoiser(x, t, *arguments), x_T, timesteps, model.diffusion,
                                             callback=lambda step: progress.update(1), generator=generators,
                                             **settings.options())
        images = model.decode(latents)
    return images.float().clamp(-1, 1)


def set_decode_slab(model: torch.nn.Module, rows: int) -> None:
    """Every autoencoder Decoder in `model` decodes in slabs of `rows` output rows (slab_decode.py)."""
    from ldm.modules.diffusionmodules.model import Decoder

    if rows < 1:
        raise ConfigError(f"--decode_slab must be >= 1 (output rows per slab), got {rows}")
    decoders = [m for m in model.modules() if isinstance(m, Decoder)]
    if not decoders:
        raise ConfigError(f"--decode_slab: {type(model).__name__} has no autoencoder Decoder to decode in slabs")
    for decoder in decoders:
        decoder.decode_slab = rows


def run(opt: argparse.Namespace, dotlist: list[str]) -> Path:
    """Sample as `opt` says; returns the output folder."""
    if opt.batch_size < 1:
        raise ConfigError(f"--batch_size must be >= 1, got {opt.batch_size}")
    if opt.n_samples is not None and opt.n_samples < 1:
        raise ConfigError(f"--n_samples must be >= 1, got {opt.n_samples}")
    mask_labels = None
    if opt.mask_labels is not None:
        try:
            mask_labels = [int(v) for v in opt.mask_labels.split(",") if v.strip()]
        except ValueError:
            raise ConfigError(f"--mask_labels {opt.mask_labels}: expected comma-separated integers") from None
    run_dir, checkpoint_path, config_paths = locate_run(opt.resume, opt.config)
    config = load_config(config_paths, dotlist)
    device = pick_device(opt.device)
    checkpoint = load_checkpoint(checkpoint_path)
    model = build_model(config, checkpoint, checkpoint_path)
    if opt.decode_slab is not None:
        set_decode_slab(model, opt.decode_slab)
    ema = use_ema_weights(model, opt.ema)
    if isinstance(model, DiffusionEngine):
        from ldm.sample_engine import run_engine
        return run_engine(opt, model, config, checkpoint, checkpoint_path, run_dir, device, ema, mask_labels)
    settings = sampler_settings(opt, model_config_for(config.model, training=False).params, model)
    try:
        timesteps = timestep_schedule(model.diffusion.num_timesteps, settings.steps, settings.spacing,
                                      settings.steps_offset)
    except ValueError as err:
        raise ConfigError(f"--steps {settings.steps} / --spacing {settings.spacing}: {err}") from None
    conditions = load_conditions(opt.cond, model, config, opt.n_samples, mask_labels,
                                 read_prompts(opt.prompt, opt.prompt_file), opt.negative_prompt, settings.scale)
    count = opt.n_samples or (len(conditions) if conditions else DEFAULT_UNCONDITIONAL_SAMPLES)
    outdir = Path(opt.outdir) if opt.outdir else new_sample_folder(run_dir / "samples")
    model.to(device)
    use_channels_last = device.type == "cuda" and bool(OmegaConf.select(config, "trainer.channels_last", default=False))
    if use_channels_last:  # as the run trained (trainer.channels_last)
        model_to_channels_last(model)
    torch.manual_seed(opt.seed)
    if opt.cuda_graph and device.type != "cuda":
        print(f"--cuda_graph: {device} is not a CUDA device, sampling eagerly")

    source = opt.cond or opt.prompt_file or repr(opt.prompt)
    print(f"sampling {count} x {type(model).__name__} {model.channels} x {list(model.image_size)} from "
          f"{checkpoint_path} ({'EMA' if ema else 'raw'} weights, step {checkpoint.get('global_step', '?')}): "
          f"{settings.name}, {len(timesteps)} steps, eta {settings.eta}, {settings.spacing} spacing, guidance "
          f"{settings.scale}, {describe_device(device)}, precision {opt.precision}, conditioning "
          f"{'none' if conditions is None else f'{len(conditions)} from {source}'} -> {outdir}")
    writer = SampleWriter(outdir)
    denoiser = GuidedDenoiser(model, settings.scale, cuda_graph=opt.cuda_graph and device.type == "cuda")
    samples_bar = tqdm(total=count, desc="samples", unit="sample")
    for start in range(0, count, opt.batch_size):
        indices = list(range(start, min(start + opt.batch_size, count)))
        batch_conditions = [conditions[i % len(conditions)] for i in indices] if conditions else None
        steps_bar = tqdm(total=len(timesteps), desc="steps", unit="step", leave=False)
        began = time.perf_counter()
        images = draw_batch(model, settings, timesteps, [opt.seed + i for i in indices], batch_conditions, device,
                            PRECISIONS[opt.precision], steps_bar, use_channels_last, denoiser)
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        seconds = (time.perf_counter() - began) / len(indices)
        steps_bar.close()
        for offset, index in enumerate(indices):
            writer.add(index, images[offset], opt.seed + index, seconds,
                       None if batch_conditions is None else batch_conditions[offset])
        samples_bar.update(len(indices))
    samples_bar.close()

    manifest = {
        "created": datetime.datetime.now().isoformat(timespec="seconds"),
        "command": ["sample.py", *getattr(opt, "argv", [])],
        "run": str(run_dir),
        "checkpoint": {"path": str(checkpoint_path), "sha256": file_sha256(checkpoint_path),
                       "global_step": checkpoint.get("global_step")},
        "model": {"target": type(model).__name__, "channels": model.channels, "latent_size": list(model.image_size),
                  "ema_weights": ema},
        "sampler": {**asdict(settings), "timesteps": timesteps.tolist()},
        "conditioning": {"cond": opt.cond, "kind": conditioning_kind(model),
                         "key": getattr(model, "cond_stage_key", None) if conditions is not None else None},
        "seed": opt.seed, "n_samples": count, "batch_size": opt.batch_size,
        "device": describe_device(device), "precision": opt.precision,
        "cuda_graph": denoiser.graphed is not None,
        "config": OmegaConf.to_container(config, resolve=True),
    }
    path = writer.finish(manifest)
    print(f"wrote {count} samples to {outdir} ({path.name})")
    return outdir
