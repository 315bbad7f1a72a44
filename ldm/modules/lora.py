"""LoRA (Hu et al. 2021) on the UNet's attention projections, through peft.

Each targeted Linear W (out, in) of a SpatialTransformer's attention becomes W + (alpha / r) B A with A (r, in) and
B (out, r) trainable and W frozen; peft initialises B to zero, so training starts from the base model.

Files hold the LoRA weights alone, as `.safetensors`, in one of two key layouts of the community:
- `kohya`: `lora_unet_<module path, dots as underscores>.lora_down.weight` (A), `.lora_up.weight` (B) and `.alpha`
  (a scalar), module paths in diffusers' UNet names (SD 1.x / 2.x files; SDXL files use the CompVis names, which
  loading accepts too);
- `diffusers`: `unet.<diffusers module path>.lora_A.weight` / `.lora_B.weight`, alpha in the file's metadata
  (`lora_alpha`; absent means alpha = r, as diffusers assumes).

A model's `lora_config` ({rank, alpha, target_modules, save_layout}, see `lora_options`) puts LoRA on its UNet after
the base weights load; the training loop then writes the LoRA weights alone beside each checkpoint file
(`lora_file_beside`: `checkpoints/step=N.ckpt` -> `checkpoints/lora-step=N.safetensors`).
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Mapping, Sequence

import torch
from torch import nn

from ldm.convert.weights_io import ConversionError, read_state_dict, safetensors_metadata, write_state_dict
from ldm.modules.attention import CrossAttention, SpatialTransformer

TARGETS = ("to_q", "to_k", "to_v", "to_out")
LAYOUTS = ("kohya", "diffusers")
LORA_CONFIG_KEYS = ("rank", "alpha", "target_modules", "save_layout")
_ALIASES = {"to_out.0": "to_out"}  # diffusers' name of the output projection
_KOHYA_PREFIX, _DIFFUSERS_PREFIX = "lora_unet_", "unet."


def _lora_layers(unet: nn.Module) -> dict[str, nn.Module]:
    """Our module path -> peft LoRA layer, for every adapted module of `unet`."""
    from peft.tuners.lora import LoraLayer

    return {name: module for name, module in unet.named_modules() if isinstance(module, LoraLayer)}


def add_lora(unet: nn.Module, rank: int = 4, alpha: float | None = None,
             target_modules: Sequence[str] = TARGETS) -> nn.Module:
    """Wrap the `target_modules` projections of every SpatialTransformer attention of `unet` with rank-`rank` LoRA
    (alpha: default = rank, i.e. scale 1), in place; only the LoRA weights stay trainable. Returns unet."""
    targets = [_ALIASES.get(t, t) for t in target_modules]
    unknown = [t for t in targets if t not in TARGETS]
    if unknown or not targets:
        raise ValueError(f"lora target_modules: {unknown or 'none given'} not among {', '.join(TARGETS)}")
    if int(rank) != rank or rank < 1:
        raise ValueError(f"lora rank must be a positive int, got {rank!r}")
    if _lora_layers(unet):
        raise ValueError("add_lora: the UNet has LoRA layers already")
    paths = [f"{name}.{t}" for name, module in unet.named_modules() if isinstance(module, CrossAttention)
             and name.split(".transformer_blocks.")[0] in _transformer_paths(unet) for t in targets]
    if not paths:
        raise ValueError("add_lora: the UNet has no SpatialTransformer attention (use_spatial_transformer: true)")
    return _inject(unet, paths, int(rank), float(rank if alpha is None else alpha))


def lora_options(config: Mapping[str, object] | None) -> dict[str, object] | None:
    """A model's `lora_config` checked and completed: {rank (default 4), alpha (default rank), target_modules
    (default all of TARGETS), save_layout (kohya or diffusers, default kohya)}; None (no LoRA) stays None."""
    if config is None:
        return None
    if not isinstance(config, Mapping):
        raise ValueError(f"lora_config: expected a mapping with keys among {', '.join(LORA_CONFIG_KEYS)}, "
                         f"got {config!r}")
    unknown = sorted(set(map(str, config)) - set(LORA_CONFIG_KEYS))
    if unknown:
        raise ValueError(f"lora_config: unknown key(s) {', '.join(unknown)} (accepted: {', '.join(LORA_CONFIG_KEYS)})")
    rank = config.get("rank", 4)
    if isinstance(rank, bool) or not isinstance(rank, int) or rank < 1:
        raise ValueError(f"lora_config.rank: must be a positive int, got {rank!r}")
    alpha = config.get("alpha")
    if alpha is not None and (isinstance(alpha, bool) or not isinstance(alpha, (int, float)) or alpha <= 0):
        raise ValueError(f"lora_config.alpha: must be a positive number (or null for alpha = rank), got {alpha!r}")
    targets = config.get("target_modules", TARGETS)
    if isinstance(targets, str) or not isinstance(targets, Sequence):
        raise ValueError(f"lora_config.target_modules: a list among {', '.join(TARGETS)}, got {targets!r}")
    layout = config.get("save_layout", "kohya")
    if layout not in LAYOUTS:
        raise ValueError(f"lora_config.save_layout: must be one of {', '.join(LAYOUTS)}, got {layout!r}")
    return {"rank": rank, "alpha": float(rank if alpha is None else alpha), "target_modules": list(targets),
            "save_layout": layout}


def lora_file_beside(checkpoint: str | Path) -> Path:
    """Where the LoRA weights of checkpoint file `checkpoint` go: `<folder>/lora-<its stem>.safetensors`."""
    checkpoint = Path(checkpoint)
    return checkpoint.with_name(f"lora-{checkpoint.stem}.safetensors")


def _inject(unet: nn.Module, paths: Sequence[str], rank: int, alpha: float) -> nn.Module:
    """LoRA of `rank` and `alpha` on exactly the modules at `paths`; everything else frozen."""
    from peft import LoraConfig, inject_adapter_in_model

    config = LoraConfig(r=rank, lora_alpha=alpha, target_modules=list(paths), lora_dropout=0.0, bias="none")
    inject_adapter_in_model(config, unet)
    for name, param in unet.named_parameters():
        param.requires_grad_(".lora_A." in name or ".lora_B." in name)
    return unet


def _transformer_paths(unet: nn.Module) -> set[str]:
    return {name for name, module in unet.named_modules() if isinstance(module, SpatialTransformer)}


def _their_names(unet: nn.Module, layout: str) -> dict[str, str]:
    """Our attention-projection module paths -> the same module's path in the `diffusers` or `compvis` UNet layout."""
    from ldm.convert.unet import layout_of

    return {entry.ours: entry.theirs[0] for entry in layout_of(unet, layout)
            if entry.ours.rsplit(".", 1)[-1] in TARGETS}


def lora_state(unet: nn.Module, layout: str = "kohya") -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """(tensors, safetensors metadata) of the LoRA weights of `unet` in `layout` (module docstring)."""
    if layout not in LAYOUTS:
        raise ValueError(f"LoRA layout must be one of {', '.join(LAYOUTS)}, got {layout!r}")
    layers = _lora_layers(unet)
    if not layers:
        raise ValueError("lora_state: the UNet has no LoRA layers (add_lora first)")
    names = _their_names(unet, "diffusers")
    state, alphas = {}, set()
    for ours, layer in layers.items():
        down, up = layer.lora_A["default"].weight, layer.lora_B["default"].weight
        if down.shape != (layer.r["default"], layer.in_features) or up.shape != (layer.out_features, down.shape[0]):
            raise ValueError(f"lora_state: {ours} holds LoRA weights of shapes {tuple(down.shape)} / "
                             f"{tuple(up.shape)}, not whole matrices (sharded parameters, e.g. under FSDP?)")
        alpha = layer.scaling["default"] * layer.r["default"]
        if layout == "kohya":
            key = _KOHYA_PREFIX + names[ours].replace(".", "_")
            state.update({f"{key}.lora_down.weight": down, f"{key}.lora_up.weight": up,
                          f"{key}.alpha": torch.tensor(alpha, dtype=down.dtype)})
        else:
            key = _DIFFUSERS_PREFIX + names[ours]
            state.update({f"{key}.lora_A.weight": down, f"{key}.lora_B.weight": up})
            alphas.add(alpha)
    if len(alphas) > 1:
        raise ValueError(f"the diffusers LoRA layout has one alpha per file; the layers have {sorted(alphas)}")
    metadata = {"lora_alpha": json.dumps(alphas.pop())} if alphas else {}
    return {k: v.detach().clone().contiguous() for k, v in state.items()}, metadata


def save_lora(unet: nn.Module, path: str | Path, layout: str = "kohya") -> None:
    """Write the LoRA weights of `unet` alone to the `.safetensors` file `path` in `layout`."""
    if Path(path).suffix != ".safetensors":
        raise ValueError(f"LoRA weights are written as .safetensors, got {path}")
    state, metadata = lora_state(unet, layout)
    write_state_dict(state, path, metadata=metadata)


def _parse(state: Mapping[str, torch.Tensor], metadata: Mapping[str, str], source: str
           ) -> dict[str, tuple[torch.Tensor, torch.Tensor, float]]:
    """Their module path -> (down A (r, in), up B (out, r), alpha), from a kohya or diffusers LoRA state."""
    found: dict[str, dict[str, torch.Tensor]] = {}
    roles = {".lora_down.weight": "down", ".lora_up.weight": "up", ".alpha": "alpha", ".lora_A.weight": "down",
             ".lora_B.weight": "up"}
    unknown = []
    for key, tensor in state.items():
        suffix = next((s for s in roles if key.endswith(s)), None)
        if key.startswith(_KOHYA_PREFIX) and suffix in (".lora_down.weight", ".lora_up.weight", ".alpha"):
            module = "kohya:" + key[len(_KOHYA_PREFIX):-len(suffix)]
        elif key.startswith(_DIFFUSERS_PREFIX) and suffix in (".lora_A.weight", ".lora_B.weight"):
            module = key[len(_DIFFUSERS_PREFIX):-len(suffix)]
        else:
            unknown.append(key)
            continue
        found.setdefault(module, {})[roles[suffix]] = tensor
    if unknown:
        raise ConversionError(f"{source}: keys of neither the kohya nor the diffusers UNet LoRA layout: "
                              f"{', '.join(unknown[:8])}{' ...' if len(unknown) > 8 else ''}")
    default_alpha = json.loads(metadata["lora_alpha"]) if "lora_alpha" in metadata else None
    parsed = {}
    for module, parts in found.items():
        if "down" not in parts or "up" not in parts:
            raise ConversionError(f"{source}: {module.removeprefix('kohya:')} lacks its "
                                  f"{'down (A)' if 'down' not in parts else 'up (B)'} weight")
        down, up = parts["down"], parts["up"]
        if down.ndim != 2 or up.ndim != 2 or up.shape[1] != down.shape[0]:
            raise ConversionError(f"{source}: {module.removeprefix('kohya:')}: up {tuple(up.shape)} and down "
                                  f"{tuple(down.shape)} are not a (out, r) @ (r, in) pair")
        alpha = float(parts["alpha"]) if "alpha" in parts else default_alpha or float(down.shape[0])
        parsed[module] = (down, up, alpha)
    return parsed


def load_lora(unet: nn.Module, path: str | Path) -> nn.Module:
    """Load a kohya or diffusers LoRA `.safetensors` file into `unet` (in place; returns it). A UNet without LoRA
    gets it on exactly the file's modules with the file's rank; one with LoRA must have the same modules and ranks. Each
    module keeps the file's alpha."""
    path = Path(path)
    parsed = _parse(read_state_dict(path), safetensors_metadata(path) if path.suffix == ".safetensors" else {},
                    str(path))
    routes = {}  # their name (diffusers dotted, kohya underscored for both layouts) -> ours
    for layout in ("diffusers", "compvis"):
        for ours, theirs in _their_names(unet, layout).items():
            routes.setdefault("kohya:" + theirs.replace(".", "_"), ours)
            if layout == "diffusers":
                routes[theirs] = ours
    unmatched = [module.removeprefix("kohya:") for module in parsed if module not in routes]
    if unmatched:
        raise ConversionError(f"{path}: LoRA modules this UNet does not have: {', '.join(unmatched[:8])}"
                              f"{' ...' if len(unmatched) > 8 else ''}")
    wanted = {routes[module]: weights for module, weights in parsed.items()}
    layers = _lora_layers(unet)
    if not layers:
        ranks = {down.shape[0] for down, _, _ in wanted.values()}
        if len(ranks) > 1:
            raise ConversionError(f"{path}: layers of different ranks {sorted(ranks)} are not loaded here")
        rank = ranks.pop()
        _inject(unet, sorted(wanted), rank, float(rank))  # each module's alpha is set below
        layers = _lora_layers(unet)
    missing = sorted(set(layers) - set(wanted))
    if missing:
        raise ConversionError(f"{path}: no LoRA weights for {', '.join(missing[:8])}"
                              f"{' ...' if len(missing) > 8 else ''}")
    for ours, (down, up, alpha) in wanted.items():
        layer = layers[ours]
        a, b = layer.lora_A["default"].weight, layer.lora_B["default"].weight
        if a.shape != down.shape or b.shape != up.shape:
            raise ConversionError(f"{path}: {ours}: down {tuple(down.shape)} / up {tuple(up.shape)} do not fit this "
                                  f"UNet's LoRA {tuple(a.shape)} / {tuple(b.shape)}")
        with torch.no_grad():
            a.copy_(down)
            b.copy_(up)
        layer.scaling["default"] = alpha / layer.r["default"]
    return unet


def merge_lora(unet: nn.Module) -> nn.Module:
    """Fold every LoRA into its base weight (W <- W + (alpha / r) B A) and put the plain Linear back, in place: a
    UNet with the original module names, for export. Returns unet."""
    for name, layer in _lora_layers(unet).items():
        layer.merge()
        parent_name, _, child = name.rpartition(".")
        setattr(unet.get_submodule(parent_name) if parent_name else unet, child, layer.get_base_layer())
    return unet
