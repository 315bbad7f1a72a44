"""sgm's `GeneralConditioner`: a list of embedders, each reading its batch entries, routed by output shape.

Routes (sgm's): an output (B, D) goes to `vector` (the UNet's `y`, added to the timestep embedding; widths of several
embedders are concatenated), (B, L, D) to `crossattn` (the cross-attention context, concatenated along D) and a
spatial map (B, C, *S) with 2 or 3 spatial axes to `concat` (stacked on the noisy input along channels).

Any `nn.Module` can be an embedder (sgm's `ldm.util` alias table names those its configs use); next to its `target`
and `params` a list entry may give `input_key` (one batch entry) or `input_keys` (several, passed in order),
`is_trainable` (default false: frozen, in eval mode, run without gradients) and `ucg_rate` (the probability that an
item's embedding is zeroed while training, for classifier-free guidance).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Iterable, Mapping, Sequence

import torch
from torch import nn

from ldm.util import ConfigError, instantiate_from_config

OUTPUT_DIM_TO_KEY = {2: "vector", 3: "crossattn", 4: "concat", 5: "concat"}
KEY_TO_CAT_DIM = {"vector": 1, "crossattn": 2, "concat": 1}
SPEC_KEYS = ("input_key", "input_keys", "is_trainable", "ucg_rate")


@dataclass(frozen=True)
class EmbedderSpec:
    """How the conditioner uses one embedder."""

    input_keys: tuple[str, ...]
    is_trainable: bool
    ucg_rate: float
    name: str


def _spec(config: Mapping[str, Any], where: str) -> tuple[EmbedderSpec, dict[str, Any]]:
    """The conditioner's keys of one `emb_models` entry, and the rest (target, params) to build the embedder from."""
    if not isinstance(config, Mapping):
        raise ConfigError(f"{where}: expected a mapping with target, params and input_key(s), got "
                          f"{type(config).__name__}")
    unknown = sorted(set(config) - set(SPEC_KEYS) - {"target", "params"})
    if unknown:
        raise ConfigError(f"{where}: unknown key{'s' if len(unknown) > 1 else ''} {', '.join(map(repr, unknown))} "
                          f"(known: target, params, {', '.join(SPEC_KEYS)})")
    if ("input_key" in config) == ("input_keys" in config):
        raise ConfigError(f"{where}: give exactly one of input_key and input_keys")
    keys = (config["input_key"],) if "input_key" in config else tuple(config["input_keys"])
    ucg_rate = float(config.get("ucg_rate", 0.0))
    if not 0.0 <= ucg_rate < 1.0:
        raise ConfigError(f"{where}.ucg_rate: must be in [0, 1), got {ucg_rate}")
    spec = EmbedderSpec(tuple(map(str, keys)), bool(config.get("is_trainable", False)), ucg_rate,
                        str(config.get("target", "?")).rsplit(".", 1)[-1])
    return spec, {k: v for k, v in config.items() if k not in SPEC_KEYS}


class GeneralConditioner(nn.Module):
    """batch -> {"vector": (B, V), "crossattn": (B, L, D), "concat": (B, C, *S)} (only the routes in use).

    emb_models: list of embedder configs (see the module docstring). The embedders are `self.embedders` (state-dict
    keys `embedders.<i>.*`, as in sgm checkpoints).
    """

    def __init__(self, emb_models: Sequence[Mapping[str, Any]]):
        super().__init__()
        if isinstance(emb_models, Mapping) or not isinstance(emb_models, Iterable):
            raise ConfigError(f"emb_models: expected a list of embedder configs, got {type(emb_models).__name__}")
        specs, embedders = [], []
        for i, config in enumerate(emb_models):
            where = f"emb_models[{i}]"
            spec, build = _spec(config, where)
            embedder = instantiate_from_config(build)
            if not isinstance(embedder, nn.Module):
                raise ConfigError(f"{where}: {type(embedder).__name__} is not a torch.nn.Module")
            if not spec.is_trainable:
                embedder.requires_grad_(False)
                embedder.eval()
            specs.append(spec)
            embedders.append(embedder)
        self.specs = specs
        self.embedders = nn.ModuleList(embedders)

    def train(self, mode: bool = True) -> "GeneralConditioner":
        """Frozen embedders stay in eval mode."""
        super().train(mode)
        for spec, embedder in zip(self.specs, self.embedders):
            if not spec.is_trainable:
                embedder.eval()
        return self

    @property
    def input_keys(self) -> list[str]:
        return [key for spec in self.specs for key in spec.input_keys]

    @property
    def dropped_keys(self) -> list[str]:
        """Input keys of the embedders trained with condition dropout: the ones a guider's unconditional pass zeroes."""
        return [key for spec in self.specs if spec.ucg_rate > 0 for key in spec.input_keys]

    def _embed(self, spec: EmbedderSpec, embedder: nn.Module, batch: Mapping[str, Any]) -> list[torch.Tensor]:
        missing = [key for key in spec.input_keys if key not in batch]
        if missing:
            raise KeyError(f"GeneralConditioner: {spec.name} needs batch entr{'ies' if len(missing) > 1 else 'y'} "
                           f"{', '.join(map(repr, missing))} (batch keys: {', '.join(map(str, batch))})")
        with torch.set_grad_enabled(spec.is_trainable and torch.is_grad_enabled()):
            out = embedder(*[batch[key] for key in spec.input_keys])
        return list(out) if isinstance(out, (tuple, list)) else [out]

    def forward(self, batch: Mapping[str, Any], force_zero_embeddings: Sequence[str] = ()) -> dict[str, torch.Tensor]:
        """The routed, concatenated embeddings; embedders reading a key in `force_zero_embeddings` give zeros."""
        routed: dict[str, list[torch.Tensor]] = {}
        for spec, embedder in zip(self.specs, self.embedders):
            for emb in self._embed(spec, embedder, batch):
                route = OUTPUT_DIM_TO_KEY.get(emb.ndim)
                if route is None:
                    raise ValueError(f"GeneralConditioner: {spec.name} (input {', '.join(spec.input_keys)}) gave "
                                     f"shape {tuple(emb.shape)}, which fits no route (2 dims: vector, 3: crossattn, "
                                     f"4 or 5: concat)")
                if self.training and spec.ucg_rate > 0:
                    keep = torch.bernoulli(torch.full((emb.shape[0],), 1 - spec.ucg_rate, device=emb.device))
                    emb = emb * keep.view(-1, *[1] * (emb.ndim - 1)).to(emb.dtype)
                if any(key in force_zero_embeddings for key in spec.input_keys):
                    emb = torch.zeros_like(emb)
                routed.setdefault(route, []).append(emb)
        out = {}
        for route, embs in routed.items():
            try:
                out[route] = torch.cat(embs, dim=KEY_TO_CAT_DIM[route])
            except RuntimeError as err:
                shapes = ", ".join(str(tuple(e.shape)) for e in embs)
                raise ValueError(f"GeneralConditioner: the {route} outputs {shapes} cannot be concatenated along dim "
                                 f"{KEY_TO_CAT_DIM[route]}") from err
        return out

    def get_unconditional_conditioning(self, batch_c: Mapping[str, Any], batch_uc: Mapping[str, Any] | None = None,
                                       force_uc_zero_embeddings: Sequence[str] = ()
                                       ) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
        """(c, uc) without condition dropout: uc from `batch_uc` (default batch_c) with the embedders of
        `force_uc_zero_embeddings` zeroed."""
        mode = self.training
        self.train(False)
        try:
            c = self(batch_c)
            uc = self(batch_c if batch_uc is None else batch_uc, force_uc_zero_embeddings)
        finally:
            self.train(mode)
        return c, uc
