"""`sample.py` for a DiffusionEngine run (sgm's formulation): the run's sampler class, or another of
`ldm.models.diffusion.edm.samplers.SAMPLERS`, over the run's discretization, with classifier-free guidance from
`--scale` (VanillaCFG; 1 = IdentityGuider).

Conditions (`--cond`) are batch entries of the conditioner's input keys: `labels:i,j` for a conditioner with one
class-label input, `split:<name>` (every input key of the split's items), or a folder of mask files for a
conditioner with one spatial input; `--prompt` / `--prompt_file` (and `--negative_prompt`) for a conditioner
that reads text only. Sample i starts from unit noise seeded with `seed + i`; the solvers' ancestral
and churn noise, and the seed of the SDE solvers' Brownian tree, come from the global generator, seeded with the
batch's first seed, so with --batch_size 1 every sample is reproducible alone.
"""
from __future__ import annotations

import argparse
import contextlib
import copy
import datetime
import time
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch
from omegaconf import DictConfig, OmegaConf
from tqdm.auto import tqdm

from ldm.models.diffusion.edm.guiders import IdentityGuider, VanillaCFG
from ldm.models.diffusion.edm.samplers import ETA_SAMPLERS, SAMPLERS, EDMSampler
from ldm.models.diffusion.engine import DiffusionEngine
from ldm.modules.embedders import SpatialMaskEmbedder
from ldm.sample_conditions import (Condition, ConditionError, dataset_mask_labels, engine_batch_conditionings,
                                   engine_prompt_items, read_mask, read_prompts, sample_folder_masks)
from ldm.util import ConfigError, file_sha256, instantiate_from_config


def engine_sampler(opt: argparse.Namespace, model: DiffusionEngine) -> tuple[EDMSampler, dict[str, Any]]:
    """The sampler the flags ask for (default: the run's sampler_config) and its settings for the manifest."""
    if model.sampler is None:
        raise ConfigError("model.params.sampler_config: the DiffusionEngine run has no sampler to take the "
                          "discretization from; add a sampler_config")
    if opt.spacing is not None or opt.quadratic:
        raise ConfigError("--spacing / --quadratic: a DiffusionEngine samples at its discretization's noise levels "
                          "(model.params.sampler_config.params.discretization_config)")
    if opt.cuda_graph:
        raise ConfigError("--cuda_graph: not available for a DiffusionEngine run")
    configured = next((name for name, cls in SAMPLERS.items() if type(model.sampler) is cls), None)
    name = opt.sampler or configured
    if name not in SAMPLERS:
        raise ConfigError(f"--sampler {name}: a DiffusionEngine run samples with {', '.join(SAMPLERS)}")
    if opt.eta is not None and name not in ETA_SAMPLERS:
        raise ConfigError(f"--eta {opt.eta}: only the ancestral samplers and the SDE samplers "
                          f"({', '.join(ETA_SAMPLERS)}) have an eta")
    steps = opt.steps if opt.steps is not None else model.sampler.num_steps
    configured_scale = model.sampler.guider.scale if isinstance(model.sampler.guider, VanillaCFG) else 1.0
    scale = float(opt.scale if opt.scale is not None else configured_scale)
    if scale != 1.0 and not model.conditioner.dropped_keys:
        raise ConfigError(f"--scale {scale}: classifier-free guidance needs an unconditional prediction, but no "
                          f"embedder of the model was trained with a ucg_rate > 0 (use --scale 1)")
    if name == configured:  # with the run's churn / eta / order settings
        sampler = copy.copy(model.sampler)
    else:
        sampler = SAMPLERS[name]()
        sampler.discretization = model.sampler.discretization
    sampler.num_steps = steps
    sampler.guider = VanillaCFG(scale) if scale != 1.0 else IdentityGuider()
    if opt.eta is not None:
        sampler.options = {**sampler.options, "eta": opt.eta}
    try:
        sigmas = sampler.sigmas(None, "cpu")
    except ValueError as err:
        raise ConfigError(f"--steps: {err}") from None
    options = {k: v if not isinstance(v, float) or np.isfinite(v) else str(v)  # JSON has no infinity
               for k, v in sampler.solver_options().items()}
    settings = {"name": name, "steps": steps, "scale": scale, "options": options,
                "discretization": type(sampler.discretization).__name__, "sigmas": sigmas.tolist()}
    return sampler, settings


def _spatial_input(model: DiffusionEngine) -> str | None:
    keys = [key for spec, embedder in zip(model.conditioner.specs, model.conditioner.embedders)
            if isinstance(embedder, SpatialMaskEmbedder) for key in spec.input_keys]
    return keys[0] if len(keys) == 1 else None


def engine_conditions(spec: str | None, model: DiffusionEngine, config: DictConfig, count: int | None,
                      mask_labels: Sequence[int] | None) -> list[tuple[dict[str, torch.Tensor], Condition]] | None:
    """(batch item, Condition for the writer) per condition, or None for an unconditional model without --cond."""
    keys = model.conditioner.input_keys
    if not keys:
        if spec:
            raise ConditionError(f"--cond {spec}: the model is unconditional (no conditioner embedders); leave "
                                 f"--cond out")
        return None
    if not spec:
        raise ConditionError(f"the model is conditioned on batch entries {', '.join(keys)}: pass --cond with "
                             f"split:<name>, labels:<i,j,...> or a folder of mask files")
    if spec.startswith("labels:"):
        classes = [getattr(e, "n_classes", None) for e in model.conditioner.embedders]
        if len(keys) != 1 or classes[0] is None:
            raise ConditionError(f"--cond {spec}: labels need a conditioner with one class-label input, this one "
                                 f"reads {', '.join(keys)}")
        try:
            labels = [int(part) for part in spec[len("labels:"):].split(",") if part.strip()]
        except ValueError:
            raise ConditionError(f"--cond {spec}: expected comma-separated integers like labels:0,1,2") from None
        bad = [label for label in labels if not 0 <= label < classes[0]]
        if not labels or bad:
            raise ConditionError(f"--cond {spec}: labels {bad or 'missing'}; this model knows [0, {classes[0]})")
        return [({keys[0]: torch.tensor(label)}, Condition(torch.tensor(label), f"label {label}")) for label in labels]
    if spec.startswith("split:"):
        split = spec[len("split:"):]
        splits = config.data.get("params", {}) or {}
        if splits.get(split) is None:
            raise ConditionError(f"--cond {spec}: the run's data config has no '{split}' split")
        dataset = instantiate_from_config(splits[split])
        out = []
        for index in range(len(dataset) if count is None else min(count, len(dataset))):
            item = dataset[index]
            missing = [key for key in keys if key not in item]
            if missing:
                raise ConditionError(f"--cond {spec}: items have no {', '.join(map(repr, missing))} entry "
                                     f"(keys: {', '.join(map(str, item))})")
            values = {key: torch.as_tensor(item[key]).as_subclass(torch.Tensor) for key in keys}
            affine = None if item.get("affine") is None else np.asarray(item["affine"], dtype=np.float64)
            spatial = _spatial_input(model)
            shown = values[spatial] if spatial else values[keys[0]]
            out.append((values, Condition(shown, f"split:{split}[{index}]", affine)))
        return out
    key = _spatial_input(model)
    if key is None or len(keys) != 1:
        raise ConditionError(f"--cond {spec}: a mask folder needs a conditioner with one input, a "
                             f"SpatialMaskEmbedder; this one reads {', '.join(keys)}")
    folder = Path(spec)
    if not folder.is_dir():
        raise ConditionError(f"--cond {spec}: no such folder (expected mask files, split:<name> or labels:<...>)")
    files = sample_folder_masks(folder) or sorted(p for p in folder.iterdir() if p.name.endswith((".nii", ".nii.gz")))
    if not files:
        raise ConditionError(f"--cond {spec}: the folder holds no .nii or .nii.gz mask files")
    labels = list(mask_labels) if mask_labels is not None else dataset_mask_labels(config.data)
    channels = None if labels is None else len(labels)
    conditions = [read_mask(file, model.dims, channels, labels, None) for file in files]
    return [({key: c.value}, c) for c in conditions]


@torch.no_grad()
def draw_engine_batch(model: DiffusionEngine, sampler: EDMSampler, seeds: Sequence[int],
                      items: Sequence[dict[str, torch.Tensor | str]] | None, device: torch.device,
                      dtype: torch.dtype | None, progress: tqdm,
                      negatives: Sequence[str] | None = None) -> torch.Tensor:
    """Images (B, C, *S) in [-1, 1]; item i from unit noise seeded with seeds[i]; `negatives`: negative prompts."""
    noise = torch.cat([torch.randn(1, *model.latent_shape, generator=torch.Generator().manual_seed(seed))
                       for seed in seeds]).to(device)
    torch.manual_seed(seeds[0])
    autocast = torch.autocast(device.type, dtype=dtype) if dtype is not None else contextlib.nullcontext()
    with autocast:
        if items:
            cond, uc = engine_batch_conditionings(model, items, negatives, device)
        else:
            cond, uc = {}, {}
        latents = sampler(model.denoise, noise, cond, uc, callback=lambda step: progress.update(1))
        images = model.decode_first_stage(latents)
    return images.float().clamp(-1, 1)


def run_engine(opt: argparse.Namespace, model: DiffusionEngine, config: DictConfig, checkpoint: dict,
               checkpoint_path: Path, run_dir: Path, device: torch.device, ema: bool,
               mask_labels: Sequence[int] | None) -> Path:
    """sample.py's loop for a DiffusionEngine; returns the output folder."""
    from ldm.sample_cli import PRECISIONS, SampleWriter, describe_device, new_sample_folder

    if model.latent_shape is None:
        raise ConfigError("model.params.latent_shape: not set; sample.py needs the (channels, *spatial) latent shape "
                          "to draw noise of")
    sampler, settings = engine_sampler(opt, model)
    prompts = read_prompts(opt.prompt, opt.prompt_file)
    if prompts is not None or opt.negative_prompt is not None:
        items = engine_prompt_items(model, prompts, opt.negative_prompt, opt.cond, settings["scale"])
    else:
        items = engine_conditions(opt.cond, model, config, opt.n_samples, mask_labels)
    count = opt.n_samples or (len(items) if items else 8)
    outdir = Path(opt.outdir) if opt.outdir else new_sample_folder(run_dir / "samples")
    model.to(device)
    print(f"sampling {count} x DiffusionEngine {list(model.latent_shape)} from {checkpoint_path} "
          f"({'EMA' if ema else 'raw'} weights, step {checkpoint.get('global_step', '?')}): {settings['name']}, "
          f"{settings['steps']} steps, guidance {settings['scale']}, {describe_device(device)} -> {outdir}")
    writer = SampleWriter(outdir)
    bar = tqdm(total=count, desc="samples", unit="sample")
    for start in range(0, count, opt.batch_size):
        indices = list(range(start, min(start + opt.batch_size, count)))
        chosen = [items[i % len(items)] for i in indices] if items else None
        steps_bar = tqdm(total=settings["steps"], desc="steps", unit="step", leave=False)
        began = time.perf_counter()
        images = draw_engine_batch(model, sampler, [opt.seed + i for i in indices],
                                   None if chosen is None else [c[0] for c in chosen], device,
                                   PRECISIONS[opt.precision], steps_bar,
                                   None if opt.negative_prompt is None else [opt.negative_prompt] * len(indices))
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        seconds = (time.perf_counter() - began) / len(indices)
        steps_bar.close()
        for offset, index in enumerate(indices):
            writer.add(index, images[offset], opt.seed + index, seconds, None if chosen is None else chosen[offset][1])
        bar.update(len(indices))
    bar.close()
    manifest = {
        "created": datetime.datetime.now().isoformat(timespec="seconds"),
        "command": ["sample.py", *getattr(opt, "argv", [])],
        "run": str(run_dir),
        "checkpoint": {"path": str(checkpoint_path), "sha256": file_sha256(checkpoint_path),
                       "global_step": checkpoint.get("global_step")},
        "model": {"target": "DiffusionEngine", "latent_shape": list(model.latent_shape), "ema_weights": ema},
        "sampler": settings,
        "conditioning": {"cond": opt.cond, "keys": model.conditioner.input_keys},
        "seed": opt.seed, "n_samples": count, "batch_size": opt.batch_size,
        "device": describe_device(device), "precision": opt.precision,
        "config": OmegaConf.to_container(config, resolve=True),
    }
    path = writer.finish(manifest)
    print(f"wrote {count} samples to {outdir} ({path.name})")
    return outdir
