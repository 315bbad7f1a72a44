"""Text encoders against transformers' own CLIP text models (tiny, random), on the same token ids."""
import warnings

import pytest
import torch

from ldm.modules import text_encoders
from ldm.modules.text_encoders import (CLIPTextEmbedder, FrozenCLIPEmbedder, FrozenOpenCLIPEmbedder,
                                       FrozenOpenCLIPEmbedder2, MissingTextEncoder, char_tokenizer)

transformers = pytest.importorskip("transformers")

PROMPTS = ["a handwritten seven", "", "zero!"]


def tiny_config(**overrides):
    tokenizer = char_tokenizer()
    return transformers.CLIPTextConfig(**{
        "vocab_size": len(tokenizer), "hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 3,
        "num_attention_heads": 4, "max_position_embeddings": 24, "projection_dim": 16,
        "bos_token_id": tokenizer.bos_token_id, "eos_token_id": tokenizer.eos_token_id,
        "pad_token_id": tokenizer.pad_token_id, **overrides})


@pytest.fixture(scope="module")
def pipeline(tmp_path_factory):
    """A diffusers-style pipeline folder: text_encoder/ + tokenizer/ (CLIPTextModel), text_encoder_2/ + tokenizer_2/
    (CLIPTextModelWithProjection)."""
    root = tmp_path_factory.mktemp("pipe")
    torch.manual_seed(0)
    first = transformers.CLIPTextModel(tiny_config()).eval()
    second = transformers.CLIPTextModelWithProjection(tiny_config(hidden_size=48, num_attention_heads=4)).eval()
    for model, sub in ((first, ""), (second, "_2")):
        model.save_pretrained(root / f"text_encoder{sub}")
        char_tokenizer().save_pretrained(root / f"tokenizer{sub}")
    return root, first, second


def ids(max_length=24, prompts=PROMPTS):
    return char_tokenizer()(prompts, padding="max_length", max_length=max_length, truncation=True,
                            return_tensors="pt").input_ids


def test_sd1_last_layer_equals_transformers(pipeline):
    root, first, _ = pipeline
    encoder = FrozenCLIPEmbedder(str(root), subfolder="text_encoder", max_length=24)
    with torch.no_grad():
        expected = first(ids()).last_hidden_state
        torch.testing.assert_close(encoder(PROMPTS), expected, rtol=0, atol=0)
        # the empty prompt's features are the null condition (CFG as in Stable Diffusion)
        torch.testing.assert_close(encoder.null_condition(expected), expected[1:2].expand_as(expected))


def test_penultimate_equals_the_model_without_its_last_layer(pipeline):
    """SD 2.x's setting: diffusers ships its text encoder with the last layer removed; the final norm stays."""
    root, first, _ = pipeline
    encoder = FrozenOpenCLIPEmbedder(str(root), max_length=24)
    shorter = transformers.CLIPTextModel(tiny_config(num_hidden_layers=2)).eval()
    missing, unexpected = shorter.load_state_dict(first.state_dict(), strict=False)
    assert not missing and all(".layers.2." in key for key in unexpected)
    with torch.no_grad():
        torch.testing.assert_close(encoder(PROMPTS), shorter(ids()).last_hidden_state, rtol=0, atol=1e-6)


def test_sdxl_pair_hidden_features_and_pooled_projection(pipeline):
    root, first, second = pipeline
    clip_l = FrozenCLIPEmbedder(str(root), subfolder="text_encoder", layer="hidden", layer_idx=-2, max_length=24)
    big_g = FrozenOpenCLIPEmbedder2(str(root), max_length=24)
    with torch.no_grad():
        features, pooled = big_g(PROMPTS)
        reference = second(ids(), output_hidden_states=True)
        torch.testing.assert_close(features, reference.hidden_states[-2], rtol=0, atol=0)
        torch.testing.assert_close(pooled, reference.text_embeds, rtol=0, atol=0)
        torch.testing.assert_close(clip_l(PROMPTS), first(ids(), output_hidden_states=True).hidden_states[-2])
    assert torch.cat([clip_l(PROMPTS), features], dim=-1).shape == (3, 24, 32 + 48)


def test_long_prompt_is_truncated_with_a_warning(pipeline):
    root, first, _ = pipeline
    encoder = FrozenCLIPEmbedder(str(root / "text_encoder"), max_length=24)  # the component folder itself
    long = "seven " * 10
    with pytest.warns(UserWarning, match="prompt of 52 tokens was truncated to 24"):
        out = encoder([long])
    with torch.no_grad():
        torch.testing.assert_close(out, first(ids(prompts=[long])).last_hidden_state)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        encoder(["short"])


def test_missing_weights_offline_is_one_line_naming_the_model(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "cache"))
    with pytest.raises(MissingTextEncoder) as err:
        FrozenCLIPEmbedder()
    message = str(err.value)
    assert "'openai/clip-vit-large-patch14'" in message and "hf download" in message and "\n" not in message
    (tmp_path / "half").mkdir()
    transformers.CLIPTextModel(tiny_config()).config.save_pretrained(tmp_path / "half")  # config, no weights
    with pytest.raises(MissingTextEncoder, match="no config.json with model.safetensors or pytorch_model.bin in .*half"):
        FrozenCLIPEmbedder(str(tmp_path / "half"))
    transformers.CLIPTextModel(tiny_config()).save_pretrained(tmp_path / "half")  # weights, no tokenizer
    with pytest.raises(MissingTextEncoder, match="no tokenizer files"):
        FrozenCLIPEmbedder(str(tmp_path / "half"))


def test_random_encoder_trains_and_frozen_one_does_not(pipeline):
    root, _, _ = pipeline
    tiny = CLIPTextEmbedder(text_config={"hidden_size": 16, "intermediate_size": 32, "num_hidden_layers": 1,
                                         "num_attention_heads": 2}, max_length=16, freeze=False)
    out = tiny(["a seven", "a one"])
    assert out.shape == (2, 16, 16)
    out.square().mean().backward()
    assert all(p.grad is not None for p in tiny.transformer.encoder.parameters())
    frozen = FrozenCLIPEmbedder(str(root), subfolder="text_encoder", max_length=24)
    frozen.train()
    assert not frozen.training and not any(p.requires_grad for p in frozen.parameters())


def test_bad_options_are_named():
    with pytest.raises(ValueError, match="layer must be one of last, penultimate, hidden"):
        CLIPTextEmbedder(text_config={}, layer="pooled")
    with pytest.raises(ValueError, match="layer_idx goes with layer: hidden"):
        CLIPTextEmbedder(text_config={}, layer_idx=3)
    with pytest.raises(ValueError, match="either version .* or text_config"):
        CLIPTextEmbedder()
    with pytest.raises(ValueError, match="expected a list of prompt strings"):
        CLIPTextEmbedder(text_config={"num_hidden_layers": 1}, max_length=8).tokenize("one string")
    assert text_encoders.LAYERS == ("last", "penultimate", "hidden")


def test_hub_id_resolves_from_the_local_cache(pipeline, tmp_path, monkeypatch):
    """A repo id in the Hugging Face cache (the layout `hf download` leaves) loads offline."""
    import shutil

    import huggingface_hub

    root, first, _ = pipeline
    snapshot = tmp_path / "models--someone--tiny-sd" / "snapshots" / "0123abcd"
    for sub in ("text_encoder", "tokenizer"):
        shutil.copytree(root / sub, snapshot / sub)
    (tmp_path / "models--someone--tiny-sd" / "refs").mkdir()
    (tmp_path / "models--someone--tiny-sd" / "refs" / "main").write_text("0123abcd")
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    encoder = FrozenCLIPEmbedder("someone/tiny-sd", subfolder="text_encoder", max_length=24)
    with torch.no_grad():
        torch.testing.assert_close(encoder(PROMPTS), first(ids()).last_hidden_state, rtol=0, atol=0)


def test_as_cond_stage_of_latent_diffusion_a_training_step_reaches_the_text_encoder():
    """The random encoder as today's cond_stage_config: captions in, cross-attention context out, trained with the
    UNet; the null condition is the empty caption's."""
    from ldm.util import instantiate_from_config
    from tests.convert.test_pretrained import FIRST_STAGE

    unet = {"target": "ldm.modules.diffusionmodules.openaimodel.UNetModel", "params": {
        "image_size": 8, "in_channels": 4, "out_channels": 4, "model_channels": 32, "attention_resolutions": [1],
        "num_res_blocks": 1, "channel_mult": [1, 2], "num_heads": 2, "use_spatial_transformer": True,
        "context_dim": 16}}
    text = {"target": "ldm.modules.text_encoders.CLIPTextEmbedder", "params": {
        "text_config": {"hidden_size": 16, "intermediate_size": 32, "num_hidden_layers": 1, "num_attention_heads": 2},
        "max_length": 12, "freeze": False}}
    model = instantiate_from_config({"target": "ldm.models.diffusion.ddpm.LatentDiffusion", "params": {
        "first_stage_config": FIRST_STAGE, "cond_stage_config": text, "unet_config": unet, "image_size": 8,
        "channels": 4, "cond_stage_key": "caption", "conditioning_key": "crossattn", "cond_stage_trainable": True,
        "ucg_rate": 0.5, "use_ema": False}})
    batch = {"image": torch.randn(2, 3, 16, 16), "caption": ["a seven", "a one"]}
    cond, null, _ = model.get_conditioning(batch)
    assert cond.context.shape == (2, 12, 16)
    loss, _ = model.training_step(batch, 0, 0)
    loss.backward()
    assert model.cond_stage_model.transformer.embeddings.token_embedding.weight.grad is not None
    with torch.no_grad():
        empty = model.cond_stage_model([""])
    torch.testing.assert_close(null.context, empty.expand(2, -1, -1))
