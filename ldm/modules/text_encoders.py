"""Text encoders for text-to-image conditioning: prompts -> token features (B, max_length, width) for cross-attention,
and for SDXL the pooled text embedding (B, projection_dim) for the `vector` route. Each is a `cond_stage_config`
target (a module called on batch[cond_stage_key], a list of strings, with `null_condition` = the empty prompt's
features, as Stable Diffusion's classifier-free guidance uses) and an embedder for a conditioner.

Networks are transformers' CLIP text models; weights come from a local folder (a transformers model folder, or a
diffusers pipeline folder with `subfolder: text_encoder`) or the Hugging Face cache, never from the network. With
`text_config` instead of `version`, a randomly initialised model of that transformers CLIPTextConfig and a
character-level CLIP tokenizer that needs no files (tests, the CPU demo, trained from scratch).

Which features (`layer`): `last` the final layer norm of the last layer (SD 1.x); `penultimate` the final layer norm
of the layer before it (SD 2.x's OpenCLIP setting, and diffusers' `clip_skip=1`); `hidden` with `layer_idx` the
output of that layer without the final norm (SDXL: -2 on both encoders).
"""
from __future__ import annotations

import string
import warnings
from pathlib import Path
from typing import Any, Mapping, Sequence

import torch
from torch import nn

LAYERS = ("last", "penultimate", "hidden")
_SOT, _EOT = "<|startoftext|>", "<|endoftext|>"


class MissingTextEncoder(FileNotFoundError):
    """Pretrained text-encoder weights that are neither in a local folder nor in the Hugging Face cache."""


def char_tokenizer() -> Any:
    """A CLIP tokenizer over single characters (lowercase letters, digits, punctuation; no merges): CLIP's
    tokenisation rules with a 138-entry vocabulary, for randomly initialised encoders."""
    from transformers import CLIPTokenizer

    chars = sorted(set(string.ascii_lowercase + string.digits + string.punctuation))
    vocab = {c: i for i, c in enumerate(chars)}
    vocab.update({c + "</w>": len(chars) + i for i, c in enumerate(chars)})
    vocab.update({_SOT: len(vocab), _EOT: len(vocab) + 1})
    return CLIPTokenizer(vocab=vocab, merges=[])


_WEIGHT_FILES = ("model.safetensors", "pytorch_model.bin")


def _pretrained(version: str, subfolder: str | None, owner: str) -> tuple[Any, Any]:
    """(text model, tokenizer) from a local folder or the Hugging Face cache (offline); absent: MissingTextEncoder."""
    from transformers import CLIPTextConfig, CLIPTokenizer

    def missing(what: str) -> MissingTextEncoder:
        return MissingTextEncoder(
            f"{owner}: {what} for text encoder {version!r}{f' ({subfolder}/)' if subfolder else ''}. Fetch it on a "
            f"machine with network (`hf download {version}`) and copy the Hugging Face cache, or give version: a "
            f"local folder with config.json, model.safetensors and the tokenizer files")

    root = Path(version).expanduser()
    if not root.is_dir():
        from huggingface_hub import snapshot_download
        try:
            root = Path(snapshot_download(version, local_files_only=True))
        except Exception as err:  # not cached (LocalEntryNotFoundError), or not a repo id at all (HFValidationError)
            raise missing(f"not a local folder and not in the Hugging Face cache ({type(err).__name__})") from None
    folder = root / subfolder if subfolder else root
    if not (folder / "config.json").is_file() or not any((folder / name).is_file() for name in _WEIGHT_FILES):
        raise missing(f"no config.json with {' or '.join(_WEIGHT_FILES)} in {folder}")
    # the tokenizer beside the weights (a transformers folder) or in the pipeline's tokenizer[_2]/ (diffusers)
    candidates = [folder, folder.parent / folder.name.replace("text_encoder", "tokenizer")]
    tokenizer_dir = next((c for c in candidates if (c / "tokenizer.json").is_file()
                          or ((c / "vocab.json").is_file() and (c / "merges.txt").is_file())), None)
    if tokenizer_dir is None:
        raise missing(f"no tokenizer files (tokenizer.json, or vocab.json and merges.txt) in "
                      f"{' or '.join(map(str, dict.fromkeys(candidates)))}")
    config = CLIPTextConfig.from_pretrained(folder)
    return _model_class(config).from_pretrained(folder), CLIPTokenizer.from_pretrained(tokenizer_dir)


def _model_class(config: Any) -> type:
    from transformers import CLIPTextModel, CLIPTextModelWithProjection

    architectures = getattr(config, "architectures", None) or []
    return CLIPTextModelWithProjection if "CLIPTextModelWithProjection" in architectures else CLIPTextModel


class CLIPTextEmbedder(nn.Module):
    """Prompts (list of B strings) -> features (B, max_length, width), or (features, pooled (B, projection_dim))
    with `return_pooled` (a CLIPTextModelWithProjection: text_projection of the end token's final-norm features).

    version / subfolder: pretrained weights (see the module docstring); text_config: a random model instead.
    layer / layer_idx: which features (module docstring). freeze: no gradients and eval mode (the default for a
    pretrained encoder); a random one for training from scratch sets freeze: false (and cond_stage_trainable: true).
    Prompts longer than max_length tokens are truncated with a warning, as diffusers does.
    """

    def __init__(self, version: str | None = None, subfolder: str | None = None,
                 text_config: Mapping[str, Any] | None = None, layer: str = "last", layer_idx: int | None = None,
                 max_length: int = 77, freeze: bool = True, return_pooled: bool = False):
        super().__init__()
        owner = type(self).__name__
        if (version is None) == (text_config is None):
            raise ValueError(f"{owner}: give either version (pretrained weights) or text_config (a random model)")
        if layer not in LAYERS:
            raise ValueError(f"{owner}: layer must be one of {', '.join(LAYERS)}, got {layer!r}")
        if (layer == "hidden") != (layer_idx is not None):
            raise ValueError(f"{owner}: layer_idx goes with layer: hidden (and only with it)")
        if version is not None:
            self.transformer, self.tokenizer = _pretrained(version, subfolder, owner)
        else:
            from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

            self.tokenizer = char_tokenizer()
            config = CLIPTextConfig(**{"vocab_size": len(self.tokenizer), "max_position_embeddings": max_length,
                                       "bos_token_id": self.tokenizer.bos_token_id,
                                       "eos_token_id": self.tokenizer.eos_token_id,
                                       "pad_token_id": self.tokenizer.pad_token_id, **text_config})
            self.transformer = (CLIPTextModelWithProjection if return_pooled else CLIPTextModel)(config)
        config = self.transformer.config
        if max_length > config.max_position_embeddings:
            raise ValueError(f"{owner}: max_length={max_length} exceeds the model's {config.max_position_embeddings} "
                             f"positions")
        if return_pooled and not hasattr(self.transformer, "text_projection"):
            raise ValueError(f"{owner}: return_pooled needs a CLIPTextModelWithProjection (SDXL's text_encoder_2)")
        if layer == "hidden" and not -config.num_hidden_layers <= layer_idx <= config.num_hidden_layers:
            raise ValueError(f"{owner}: layer_idx={layer_idx} is not a layer of {config.num_hidden_layers}")
        self.layer, self.layer_idx = layer, layer_idx
        self.max_length = max_length
        self.return_pooled = return_pooled
        self.width = config.hidden_size
        self.frozen = freeze
        if freeze:
            self.requires_grad_(False)
            self.eval()

    def train(self, mode: bool = True) -> "CLIPTextEmbedder":
        return super().train(mode and not self.frozen)

    def tokenize(self, prompts: Sequence[str]) -> torch.Tensor:
        """B prompts -> token ids (B, max_length) int64: start token, tokens, end token, padding."""
        if isinstance(prompts, str) or not all(isinstance(p, str) for p in prompts):
            raise ValueError(f"{type(self).__name__}: expected a list of prompt strings, got {type(prompts).__name__}")
        full = self.tokenizer(list(prompts), truncation=False)["input_ids"]
        longest = max((len(ids) for ids in full), default=0)
        if longest > self.max_length:
            warnings.warn(f"{type(self).__name__}: a prompt of {longest} tokens was truncated to {self.max_length} "
                          f"(the end was dropped)", stacklevel=3)
        return self.tokenizer(list(prompts), padding="max_length", max_length=self.max_length, truncation=True,
                              return_tensors="pt")["input_ids"]

    def encode(self, ids: torch.Tensor) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
        """ids (B, L) -> features (B, L, width) [, pooled (B, projection_dim)]."""
        out = self.transformer(ids.to(self.transformer.device), output_hidden_states=self.layer != "last")
        if self.layer == "last":
            features = out.last_hidden_state
        elif self.layer == "penultimate":
            # CLIPTextModelWithProjection wraps the text model; transformers 5's CLIPTextModel is it
            text_model = getattr(self.transformer, "text_model", self.transformer)
            features = text_model.final_layer_norm(out.hidden_states[-2])
        else:
            features = out.hidden_states[self.layer_idx]
        return (features, out.text_embeds) if self.return_pooled else features

    def forward(self, prompts: Sequence[str]) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
        return self.encode(self.tokenize(prompts))

    def null_condition(self, c: torch.Tensor) -> torch.Tensor:
        """The empty prompt's features, shaped like an output c: (B, max_length, width)."""
        null = self([""])
        null = null[0] if self.return_pooled else null
        return null.to(c.dtype).expand_as(c)


class FrozenCLIPEmbedder(CLIPTextEmbedder):
    """SD 1.x's text encoder: OpenAI CLIP ViT-L/14's text model, last layer, 77 tokens (CompVis' defaults)."""

    def __init__(self, version: str | None = "openai/clip-vit-large-patch14", subfolder: str | None = None,
                 text_config: Mapping[str, Any] | None = None, layer: str = "last", layer_idx: int | None = None,
                 max_length: int = 77, freeze: bool = True, return_pooled: bool = False):
        super().__init__(None if text_config is not None else version, subfolder, text_config, layer, layer_idx,
                         max_length, freeze, return_pooled)


class FrozenOpenCLIPEmbedder(CLIPTextEmbedder):
    """SD 2.x's text encoder: OpenCLIP ViT-H/14's text model, penultimate layer with the final norm, 77 tokens.

    The weights are read in transformers' layout (a diffusers SD 2.x pipeline's text_encoder/, whose last layer the
    penultimate setting never runs); `arch` names the OpenCLIP architecture, for messages and configs."""

    def __init__(self, version: str | None = "stabilityai/stable-diffusion-2-1", subfolder: str | None = "text_encoder",
                 text_config: Mapping[str, Any] | None = None, arch: str = "ViT-H-14", layer: str = "penultimate",
                 layer_idx: int | None = None, max_length: int = 77, freeze: bool = True,
                 return_pooled: bool = False):
        super().__init__(None if text_config is not None else version, subfolder, text_config, layer, layer_idx,
                         max_length, freeze, return_pooled)
        self.arch = arch


class FrozenOpenCLIPEmbedder2(FrozenOpenCLIPEmbedder):
    """SDXL's second text encoder: OpenCLIP ViT-bigG/14, the penultimate layer's output without the final norm for
    cross-attention, and the pooled, projected end-token embedding for the `vector` route."""

    def __init__(self, version: str | None = "stabilityai/stable-diffusion-xl-base-1.0",
                 subfolder: str | None = "text_encoder_2", text_config: Mapping[str, Any] | None = None,
                 arch: str = "ViT-bigG-14", layer: str = "hidden", layer_idx: int | None = -2, max_length: int = 77,
                 freeze: bool = True, return_pooled: bool = True):
        super().__init__(version, subfolder, text_config, arch, layer, layer_idx, max_length, freeze, return_pooled)
