"""What `sample.py` conditions on: `--cond` a folder of mask NIfTI files, a split of the run's dataset, or class
labels; `--prompt` / `--prompt_file` text prompts, with `--negative_prompt` in place of the empty prompt.

Each becomes a list of `Condition`s, one per input, whose `value` is what a dataset item holds under the model's
`cond_stage_key`, so sampling builds the UNet inputs exactly as training did (`LatentDiffusion.get_conditioning`).
Masks are read like the training data's: reoriented to RAS, label maps turned into one-hot channels (or one binary
channel), and checked against the model's mask channels and image size. A text condition's value is the prompt
string; its `negative` prompt, when given, is encoded as the null condition that classifier-free guidance steers
away from (as diffusers' `negative_prompt`), instead of the empty prompt the model was trained to drop captions to.
"""
from __future__ import annotations

from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch
from omegaconf import DictConfig
from torch import nn

from ldm.models.diffusion.conditioning import Conditioning
from ldm.modules.text_encoders import CLIPTextEmbedder
from ldm.util import instantiate_from_config

NIFTI_SUFFIXES = (".nii", ".nii.gz")


class ConditionError(ValueError):
    """A `--cond` input that cannot condition the model; the message names the file, split or value at fault."""


@dataclass(frozen=True)
class Condition:
    """One conditioning input: `value` as batch[cond_stage_key] without the batch axis (a mask (K, *spatial) float32,
    a class label () int64, a prompt str), `source` (where it came from, for the manifest), the voxel-to-world
    `affine` (4, 4) of the grid it lives on (None: unknown) and, for a prompt, the `negative` prompt that replaces
    the null condition in guidance (None: the model's own null condition, the empty prompt)."""

    value: torch.Tensor | str
    source: str
    affine: np.ndarray | None = None
    negative: str | None = None


# --------------------------------------------------------------------------------------------- the model's side
def conditioning_kind(model: nn.Module) -> str:
    """What the model is conditioned on: "none", "labels" (class labels), "text" (prompts, through a CLIP text
    encoder), "image" (the conditioning image's own latent, `__is_first_stage__`) or "mask" (a spatial map such as a
    segmentation)."""
    key = getattr(model, "conditioning_key", None)
    if key is None:
        return "none"
    stage = getattr(model, "cond_stage_model", None)
    if key == "adm" or hasattr(stage, "n_classes"):
        return "labels"
    if isinstance(stage, CLIPTextEmbedder):
        return "text"
    if getattr(model, "cond_stage_is_first_stage", False):
        return "image"
    return "mask"


def first_conv_in_channels(module: nn.Module | None) -> int | None:
    """Input channels of the first convolution inside `module` (None without one)."""
    if module is None:
        return None
    return next((m.in_channels for m in module.modules() if isinstance(m, nn.modules.conv._ConvNd)), None)


def mask_channels(model: nn.Module) -> int | None:
    """Channels K of the masks the model takes: the UNet's extra input channels for a raw (Identity) mask
    concatenated to the latent, the conditioning encoder's input channels otherwise (None: unknown)."""
    stage = getattr(model, "cond_stage_model", None)
    if isinstance(stage, nn.Identity):
        if getattr(model, "conditioning_key", None) in ("concat", "hybrid"):
            unet_in = first_conv_in_channels(model.model)
            return None if unet_in is None else unet_in - model.channels
        return None
    return first_conv_in_channels(stage)


def image_shape(model: nn.Module) -> tuple[int, ...] | None:
    """Spatial shape of the images the model generates: the latent grid times the first stage's downsampling factor
    (the grid itself in pixel space); None when the first stage does not say its factor."""
    first_stage = getattr(model, "first_stage_model", None)
    if first_stage is None:
        return tuple(model.image_size)
    factor = getattr(first_stage, "factor", None) or getattr(getattr(first_stage, "decoder", None), "factor", None)
    return None if factor is None else tuple(int(s) * int(factor) for s in model.image_size)


def number_of_classes(model: nn.Module) -> int | None:
    """How many class labels a label-conditioned model knows (None: unknown)."""
    stage = getattr(model, "cond_stage_model", None)
    if hasattr(stage, "n_classes"):
        return int(stage.n_classes)
    return getattr(model.model, "num_classes", None)


# --------------------------------------------------------------------------------------------- class labels
def class_labels(spec: str, model: nn.Module) -> list[Condition]:
    """`labels:0,1,2` -> one condition per label, () int64 each."""
    try:
        labels = [int(part) for part in spec.split(",") if part.strip()]
    except ValueError:
        raise ConditionError(f"--cond labels:{spec}: expected comma-separated integers like labels:0,1,2") from None
    if not labels:
        raise ConditionError("--cond labels: no labels given (e.g. labels:0,1,2)")
    classes = number_of_classes(model)
    bad = [label for label in labels if label < 0 or (classes is not None and label >= classes)]
    if bad:
        raise ConditionError(f"--cond labels:{spec}: label(s) {bad} out of range [0, {classes}) for this model")
    return [Condition(torch.tensor(label, dtype=torch.int64), f"label {label}") for label in labels]


# --------------------------------------------------------------------------------------------- dataset split
def split_conditions(name: str, data_config: DictConfig, model: nn.Module, count: int | None) -> list[Condition]:
    """The first `count` items (all with None) of the run's `split` dataset: their batch[cond_stage_key], with the
    item's `affine` entry (4, 4) when the dataset gives one (identity is used otherwise)."""
    from ldm.data.transforms import split_name

    try:
        split = split_name(name)
    except ValueError as err:
        raise ConditionError(f"--cond split:{name}: {err}") from None
    splits = data_config.get("params", {}) or {}
    if splits.get(split) is None:
        have = [s for s in ("train", "validation", "test") if splits.get(s) is not None]
        raise ConditionError(f"--cond split:{name}: the run's data config has no '{split}' split "
                             f"(data.params has: {', '.join(have) or 'none'})")
    dataset = instantiate_from_config(splits[split])
    total = len(dataset) if count is None else min(count, len(dataset))
    conditions = []
    for index in range(total):
        item = dataset[index]
        if model.cond_stage_key not in item:
            raise ConditionError(f"--cond split:{split}: items have no {model.cond_stage_key!r} entry "
                                 f"(cond_stage_key; keys: {', '.join(map(str, item))})")
        affine = item.get("affine")
        where = f" ({item['path']})" if isinstance(item.get("path"), str) else ""
        value = item[model.cond_stage_key]
        if not isinstance(value, str):  # a caption stays a string
            value = torch.as_tensor(value).as_subclass(torch.Tensor)  # MetaTensor -> plain
        conditions.append(Condition(value, f"split:{split}[{index}]{where}",
                                    None if affine is None else np.asarray(affine, dtype=np.float64)))
    return conditions


# --------------------------------------------------------------------------------------------- mask files
def dataset_mask_labels(data_config: DictConfig) -> list[int] | None:
    """The label values the run's datasets turn into mask channels, in channel order: a split's `labels` parameter
    (NiftiFolder), BraTS' SEG_LABELS for BraTS2021_3D; None when the config does not say."""
    splits = data_config.get("params", {}) or {}
    for split in ("test", "validation", "train"):
        config = splits.get(split)
        if config is None or not hasattr(config, "get"):
            continue
        params = config.get("params", {}) or {}
        if params.get("labels") is not None:
            return [int(v) for v in params["labels"]]
        if str(config.get("target", "")).endswith("BraTS2021_3D"):
            from ldm.data.brats2021 import SEG_LABELS
            return list(SEG_LABELS)
    return None


def labels_to_channels(label_map: np.ndarray, labels: Sequence[int], channels: int, file: Path) -> np.ndarray:
    """A label map (*spatial) -> float32 mask (channels, *spatial): one binary channel (label != labels[0], the
    background) when channels is 1, else one channel per entry of `labels`, in that order."""
    rounded = np.rint(label_map)
    if not np.allclose(rounded, label_map, atol=1e-3):
        raise ConditionError(f"mask {file}: a label map must hold integer labels, found fractional values")
    unexpected = sorted(set(np.unique(rounded).astype(int).tolist()) - set(labels))
    if unexpected:
        raise ConditionError(f"mask {file}: unexpected label values {unexpected[:8]} (expected {list(labels)}; "
                             f"--mask_labels sets them)")
    if channels == 1:
        return (rounded != labels[0])[None].astype(np.float32)
    if channels != len(labels):
        raise ConditionError(f"mask {file}: the model takes {channels} mask channels but there are {len(labels)} "
                             f"labels {list(labels)} to one-hot encode (--mask_labels sets them)")
    return np.stack([rounded == label for label in labels]).astype(np.float32)


def read_mask(file: Path, dims: int, channels: int | None, labels: Sequence[int] | None,
              spatial: Sequence[int] | None) -> Condition:
    """One mask file -> Condition((K, *spatial) float32, file, RAS affine). A file of `dims` axes is a label map;
    one with an extra last axis holds the K channels already (as `sample.py` and the test stage write them)."""
    import nibabel as nib

    try:
        image = nib.as_closest_canonical(nib.load(str(file)))  # RAS, as the training pipeline orients volumes
        data = np.asarray(image.dataobj, dtype=np.float32)
    except Exception as err:
        raise ConditionError(f"mask {file}: cannot read NIfTI file ({type(err).__name__}: {err})") from None
    if data.ndim == dims:
        if channels is None:
            raise ConditionError(f"mask {file}: a label map, but how many channels the model's masks have is "
                                 f"unknown; save the mask with its channels along the last axis")
        labels = list(labels) if labels is not None else list(range(max(channels, 2)))
        mask = labels_to_channels(data, labels, channels, file)
    elif data.ndim == dims + 1:
        mask = np.moveaxis(data, -1, 0)
        if channels is not None and mask.shape[0] != channels:
            raise ConditionError(f"mask {file}: {mask.shape[0]} channels along its last axis, the model takes "
                                 f"{channels}")
    else:
        raise ConditionError(f"mask {file}: shape {list(data.shape)}, expected a {dims}D label map or {dims}D with "
                             f"channels along a last axis")
    if spatial is not None and tuple(mask.shape[1:]) != tuple(spatial):
        raise ConditionError(f"mask {file}: spatial shape {list(mask.shape[1:])} (after RAS reorientation) does not "
                             f"match the {list(spatial)} images the model generates")
    return Condition(torch.from_numpy(np.ascontiguousarray(mask)), str(file), np.asarray(image.affine))


def sample_folder_masks(folder: Path) -> list[Path] | None:
    """The mask files a `sample.py` folder's manifest lists, in sample order (None: not such a folder)."""
    import json

    manifest = folder / "manifest.json"
    if not manifest.is_file():
        return None
    try:
        entries = json.loads(manifest.read_text()).get("samples", [])
    except ValueError as err:
        raise ConditionError(f"--cond {folder}: cannot read {manifest.name} ({err})") from None
    masks = [folder / entry["mask"] for entry in entries if isinstance(entry, dict) and entry.get("mask")]
    if not masks:
        raise ConditionError(f"--cond {folder}: a sample.py folder whose samples have no masks to condition on")
    return masks


def mask_folder(folder: Path, model: nn.Module, labels: Sequence[int] | None) -> list[Condition]:
    """Every `*.nii` / `*.nii.gz` file in `folder` (sorted by name) as a mask condition; in a folder `sample.py`
    wrote, the masks its samples were drawn for (`sample_XXXX_mask.nii.gz`), not the samples."""
    if not folder.is_dir():
        raise ConditionError(f"--cond {folder}: no such folder (expected a folder of mask NIfTI files, "
                             f"split:<name> or labels:<i,j,...>)")
    files = sample_folder_masks(folder)
    if files is None:
        files = sorted(p for p in folder.iterdir() if p.is_file() and p.name.endswith(NIFTI_SUFFIXES))
    if not files:
        raise ConditionError(f"--cond {folder}: the folder holds no .nii or .nii.gz files")
    channels, spatial = mask_channels(model), image_shape(model)
    return [read_mask(file, len(model.image_size), channels, labels, spatial) for file in files]


# --------------------------------------------------------------------------------------------- text prompts
def read_prompts(prompt: str | None, prompt_file: str | None) -> list[str] | None:
    """`--prompt` (one prompt) or `--prompt_file` (a UTF-8 file, one prompt per non-empty line, stripped) -> the
    prompts; None without either."""
    if prompt is not None and prompt_file is not None:
        raise ConditionError("--prompt and --prompt_file: give one of them")
    if prompt_file is None:
        return None if prompt is None else [prompt]
    try:
        lines = Path(prompt_file).read_text(encoding="utf-8").splitlines()
    except (OSError, UnicodeDecodeError) as err:
        raise ConditionError(f"--prompt_file {prompt_file}: cannot read it ({type(err).__name__}: {err})") from None
    prompts = [line.strip() for line in lines if line.strip()]
    if not prompts:
        raise ConditionError(f"--prompt_file {prompt_file}: holds no prompts (one per line)")
    return prompts


def describe_conditioning(model: nn.Module) -> str:
    """What the model is conditioned on, in words, for messages: the kind, batch entry and conditioning stage."""
    kind = conditioning_kind(model)
    if kind == "none":
        return "nothing (an unconditional model, conditioning_key null)"
    words = {"labels": "class labels", "text": "text", "image": "an image", "mask": "a mask"}[kind]
    stage = "the first stage" if kind == "image" else type(getattr(model, "cond_stage_model", None)).__name__
    return (f"{words} (batch[{model.cond_stage_key!r}] through {stage}, conditioning_key="
            f"{model.conditioning_key})")


def check_text_options(prompts: Sequence[str] | None, negative_prompt: str | None, spec: str | None,
                       model: nn.Module, guidance_scale: float, text: bool | None = None) -> None:
    """--prompt / --prompt_file / --negative_prompt need a text-conditioned model (`text`; default: a LatentDiffusion
    with a text encoder), no --cond beside the prompts, and guidance (a negative prompt only enters the unconditional
    pass)."""
    given = "--prompt" if prompts is not None else "--negative_prompt" if negative_prompt is not None else None
    if given is None:
        return
    if not (text if text is not None else conditioning_kind(model) == "text"):
        raise ConditionError(f"{given}: the model takes no text; it is conditioned on {describe_conditioning(model)}")
    if prompts is not None and spec:
        raise ConditionError(f"--prompt and --cond {spec} both say what to condition on: give one of them")
    if negative_prompt is not None and guidance_scale == 1.0:
        raise ConditionError("--negative_prompt replaces the null condition of classifier-free guidance, which "
                             "--scale 1 turns off: give a guidance scale other than 1")


# --------------------------------------------------------------------------------------------- DiffusionEngine prompts
def engine_text_key(model: nn.Module) -> str | None:
    """The batch key a DiffusionEngine's text embedders read (CLIPTextEmbedder and its subclasses; None: none)."""
    keys = {key for spec, embedder in zip(model.conditioner.specs, model.conditioner.embedders)
            if isinstance(embedder, CLIPTextEmbedder) for key in spec.input_keys}
    if len(keys) > 1:
        raise ConditionError(f"--prompt: the conditioner's text embedders read several keys ({', '.join(sorted(keys))})"
                             f"; prompts fill one")
    return next(iter(keys), None)


def engine_prompt_items(model: nn.Module, prompts: Sequence[str] | None, negative_prompt: str | None,
                        spec: str | None, guidance_scale: float) -> list[tuple[dict[str, str], Condition]]:
    """(batch item {text key: prompt}, Condition) per prompt, for a DiffusionEngine whose conditioner reads text
    only; checked as `check_text_options` checks a LatentDiffusion's."""
    given = "--prompt" if prompts is not None else "--negative_prompt"
    keys = model.conditioner.input_keys
    key = engine_text_key(model)
    if key is None:
        raise ConditionError(f"{given}: the model takes no text; its conditioner reads {', '.join(keys) or 'nothing'}")
    others = sorted(set(keys) - {key})
    if others:
        raise ConditionError(f"{given}: the conditioner also reads {', '.join(others)}, which prompts do not give; "
                             f"use --cond split:<name>")
    if prompts is None:
        raise ConditionError("--negative_prompt: give the prompts with --prompt or --prompt_file")
    check_text_options(prompts, negative_prompt, spec, model, guidance_scale, text=True)
    return [({key: prompt}, Condition(prompt, f"prompt: {prompt}", negative=negative_prompt)) for prompt in prompts]


def engine_batch_conditionings(model: nn.Module, items: Sequence[dict[str, Any]], negatives: Sequence[str] | None,
                               device: torch.device) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """A DiffusionEngine's (c, uc) for a batch of items: tensors stacked on `device`, prompts as a list. Without
    negatives uc zeroes the embedders trained with dropout (sgm); with them the text embedders encode the negative
    prompts instead (as diffusers' SDXL pipeline does with a negative prompt)."""
    batch = {key: [item[key] for item in items] if isinstance(items[0][key], str)
             else torch.stack([item[key] for item in items]).to(device) for key in items[0]}
    if negatives is None:
        return model.conditionings(batch)
    key = engine_text_key(model)
    zeroed = [k for k in model.conditioner.dropped_keys if k != key]
    return model.conditioner.get_unconditional_conditioning(batch, {**batch, key: list(negatives)}, zeroed)


# --------------------------------------------------------------------------------------------- entry point
def load_conditions(spec: str | None, model: nn.Module, config: DictConfig, count: int | None,
                    mask_labels: Sequence[int] | None = None, prompts: Sequence[str] | None = None,
                    negative_prompt: str | None = None, guidance_scale: float = 1.0) -> list[Condition] | None:
    """The conditions `--cond spec` or `prompts` name for `model` (None for an unconditional model without either);
    with `negative_prompt` each text condition carries it as its `negative`. `guidance_scale`: the sampling's."""
    check_text_options(prompts, negative_prompt, spec, model, guidance_scale)
    if prompts is not None:
        conditions = [Condition(prompt, f"prompt: {prompt}") for prompt in prompts]
    else:
        conditions = cond_conditions(spec, model, config, count, mask_labels)
    if negative_prompt is not None:
        conditions = [replace(condition, negative=negative_prompt) for condition in conditions]
    return conditions


def cond_conditions(spec: str | None, model: nn.Module, config: DictConfig, count: int | None,
                    mask_labels: Sequence[int] | None = None) -> list[Condition] | None:
    """The conditions `--cond spec` names for `model` (None for an unconditional model without --cond)."""
    kind = conditioning_kind(model)
    if kind == "none":
        if spec:
            raise ConditionError(f"--cond {spec}: the model is unconditional (conditioning_key is null); "
                                 f"leave --cond out")
        return None
    if not spec:
        if kind == "text":
            raise ConditionError(f"the model is conditioned on {describe_conditioning(model)}: pass --prompt "
                                 f"\"...\" (or --prompt_file, or --cond split:<name> for a split's captions)")
        examples = {"labels": "labels:0,1,2 or split:<name>", "image": "split:<name>",
                    "mask": "a folder of mask NIfTI files or split:<name>"}[kind]
        raise ConditionError(f"the model is conditioned on batch[{model.cond_stage_key!r}] (conditioning_key="
                             f"{model.conditioning_key}): pass --cond with {examples}")
    if spec.startswith("split:"):
        return split_conditions(spec[len("split:"):], config.data, model, count)
    if spec.startswith("labels:"):
        if kind != "labels":
            raise ConditionError(f"--cond {spec}: the model is conditioned on {describe_conditioning(model)}, not "
                                 f"on class labels")
        return class_labels(spec[len("labels:"):], model)
    if kind != "mask":
        instead = {"labels": "labels:<i,j,...> or split:<name>", "text": "--prompt or split:<name>"}
        raise ConditionError(f"--cond {spec}: a mask folder, but the model is conditioned on "
                             f"{describe_conditioning(model)}; use {instead.get(kind, 'split:<name>')}")
    labels = list(mask_labels) if mask_labels is not None else dataset_mask_labels(config.data)
    return mask_folder(Path(spec), model, labels)


def stack_values(conditions: Sequence[Condition], device: torch.device) -> torch.Tensor | list[str]:
    """The batch[cond_stage_key] of several conditions: (B, ...) on `device`, or B prompts."""
    if all(isinstance(c.value, str) for c in conditions):
        return [c.value for c in conditions]
    return torch.stack([c.value for c in conditions]).to(device)


def batch_conditionings(model: nn.Module, conditions: Sequence[Condition] | None,
                        device: torch.device) -> tuple[Conditioning, Conditioning]:
    """(conditioning, null conditioning) for a batch of conditions, built as in training; conditions with a
    `negative` prompt take its encoding as the null instead (each item its own, the empty prompt where None)."""
    if conditions is None:
        return Conditioning(), Conditioning()
    cond, null, _ = model.get_conditioning({model.cond_stage_key: stack_values(conditions, device)})
    if any(c.negative is not None for c in conditions):
        negatives = [c.negative if c.negative is not None else "" for c in conditions]
        null, _, _ = model.get_conditioning({model.cond_stage_key: negatives})
    return cond, null
