"""The text-to-image digits demo (configs/demo/text_2d.yaml): the digits' captions, a few training steps of the config
with its tiny CLIP text encoder, and `sample.py --prompt / --prompt_file / --negative_prompt` on the run and on a
DiffusionEngine whose conditioner reads text."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from omegaconf import OmegaConf
from PIL import Image

from ldm.cli import load_config, main as train_main, model_config_for
from ldm.data.digits import CAPTION_TEMPLATES, NUMBER_WORDS, Digits
from ldm.sample_cli import build_model
from ldm.sample_conditions import Condition, batch_conditionings, engine_batch_conditionings, engine_prompt_items
from ldm.util import instantiate_from_config
from tests.engine.helpers import REPO, load_last, only_run_dir
from tests.models.diffusion.test_engine import sgm_toy_config
from tests.test_sample_cli import STANDINS, assert_error, sample, save_untrained, unconditional_2d

CONFIG = REPO / "configs" / "demo" / "text_2d.yaml"
# The demo config with an untrained autoencoder, 2 steps of batch 4, 2 sampler steps: the layout, not the quality. The
# high learning rate moves the UNet's zero-initialised cross-attention outputs enough in 2 steps for the text to
# matter to the raw (not EMA) weights.
FAST_TRAINING = ["trainer.max_steps=2", "trainer.logger=[csv]", "trainer.callbacks={}", "data.params.num_workers=0",
                 "data.params.batch_size=4", "model.params.sampler_steps=2", "model.base_learning_rate=0.01"]
FAST = ["--steps", "2", "--batch_size", "2"]

pytestmark = pytest.mark.usefixtures("single_thread")


@pytest.fixture(scope="module")
def text_run(tmp_path_factory) -> Path:
    """A run folder of the text demo after two training steps."""
    logdir = tmp_path_factory.mktemp("text")
    assert train_main("ldm", ["-b", str(CONFIG), "-t", "--no_test", "-l", str(logdir), *FAST_TRAINING]) == 0
    return only_run_dir(logdir)


def pixels(folder: Path, index: int) -> np.ndarray:
    return np.asarray(Image.open(folder / f"sample_{index:04d}.png"), dtype=np.int16)


# --------------------------------------------------------------------------------------------- captions
def test_captions_name_each_items_class():
    """Evaluation captions take the templates in turn and name the item's class; training draws them at random."""
    plain = Digits("test", size=8)
    captioned = Digits("test", size=8, caption_templates=CAPTION_TEMPLATES)
    assert "caption" not in plain[0]
    for index in range(6):
        item, label = captioned[index], int(plain[index]["class_label"])
        torch.testing.assert_close(item["image"], plain[index]["image"], rtol=0, atol=0)
        assert item["caption"] == CAPTION_TEMPLATES[index % 3].format(word=NUMBER_WORDS[label], digit=label)
    assert captioned[0]["caption"] == f"a handwritten {NUMBER_WORDS[int(plain[0]['class_label'])]}"
    assert captioned[1]["caption"] == f"the digit {int(plain[1]['class_label'])}"
    drawn = Digits("test", size=8, caption_templates=CAPTION_TEMPLATES, random_caption=True)
    torch.manual_seed(0)
    label = int(plain[0]["class_label"])
    assert {drawn[0]["caption"] for _ in range(40)} == {t.format(word=NUMBER_WORDS[label], digit=label)
                                                        for t in CAPTION_TEMPLATES}


def test_caption_options_are_checked():
    with pytest.raises(ValueError, match="caption_templates: 'a {number}'"):
        Digits("test", size=8, caption_templates=["a {number}"])
    with pytest.raises(ValueError, match="at least one template"):
        Digits("test", size=8, caption_templates=[])
    with pytest.raises(ValueError, match="random_caption: needs caption_templates"):
        Digits("test", size=8, random_caption=True)


# --------------------------------------------------------------------------------------------- the config
def test_config_trains_the_text_encoder_with_the_unet(text_run):
    """The demo config builds its random CLIP text transformer from text_config, matched to the UNet's context; the
    CLI trains it (a run exists, with the encoder in its checkpoint), and one optimizer step moves its weights."""
    config = load_config([str(CONFIG)], FAST_TRAINING)
    stage = config.model.params.cond_stage_config
    assert stage.target == "ldm.modules.text_encoders.CLIPTextEmbedder"
    assert config.model.params.unet_config.params.context_dim == stage.params.text_config.hidden_size
    for split in ("train", "validation", "test"):
        assert tuple(config.data.params[split].params.caption_templates) == CAPTION_TEMPLATES
    state = load_last(text_run)["state_dict"]
    assert state["cond_stage_model.transformer.embeddings.token_embedding.weight"].shape == (138, 32)

    model = instantiate_from_config(model_config_for(config.model, training=True))
    model.learning_rate = 1e-3
    batch = next(iter(instantiate_from_config(config.data).dataloader("train")))
    assert isinstance(batch["caption"], list) and len(batch["caption"]) == 4
    before = {k: v.clone() for k, v in model.cond_stage_model.state_dict().items()}
    optimizer = model.configure_optimizers()[0]
    model.train()
    loss, _ = model.training_step(batch, 0, 0)
    loss.backward()
    optimizer.step()
    after = model.cond_stage_model.state_dict()
    assert model.cond_stage_model.training
    assert any(not torch.equal(before[k], after[k]) for k in before if k.startswith("transformer.")), \
        "the text encoder did not train"


# --------------------------------------------------------------------------------------------- sample.py
def test_prompt_samples_record_their_prompt(text_run, tmp_path):
    outdir, manifest = sample(tmp_path, "prompt", "-r", str(text_run), "--prompt", "a handwritten seven",
                              "--n_samples", "3", *FAST)
    assert [s["prompt"] for s in manifest["samples"]] == ["a handwritten seven"] * 3
    assert [s["negative_prompt"] for s in manifest["samples"]] == [None] * 3
    assert manifest["conditioning"]["kind"] == "text" and manifest["conditioning"]["key"] == "caption"
    assert Image.open(outdir / "sample_0002.png").size == (32, 32)

    prompts = tmp_path / "prompts.txt"
    prompts.write_text("the digit 1\n\n  two  \n")
    _, manifest = sample(tmp_path, "file", "-r", str(text_run), "--prompt_file", str(prompts), "--n_samples", "3",
                         *FAST)
    assert [s["prompt"] for s in manifest["samples"]] == ["the digit 1", "two", "the digit 1"]
    assert [s["condition"] for s in manifest["samples"]][:2] == ["prompt: the digit 1", "prompt: two"]


def test_negative_prompt_replaces_the_empty_prompt_in_guidance(text_run, tmp_path):
    """The empty negative prompt is exactly the model's own null condition; another one changes the samples; and the
    null conditioning is the model's conditioning of the negative prompt (per item, empty where not given)."""
    args = ["-r", str(text_run), "--prompt", "a handwritten three", "--n_samples", "2", "--scale", "3", "--no-ema",
            *FAST]
    plain, _ = sample(tmp_path, "plain", *args)
    empty, _ = sample(tmp_path, "empty", *args, "--negative_prompt", "")
    negative, manifest = sample(tmp_path, "negative", *args, "--negative_prompt", "a handwritten eight")
    assert [s["negative_prompt"] for s in manifest["samples"]] == ["a handwritten eight"] * 2
    for index in range(2):
        np.testing.assert_array_equal(pixels(empty, index), pixels(plain, index))
        assert np.abs(pixels(negative, index) - pixels(plain, index)).max() > 0

    model = build_model(load_config(sorted(map(str, (text_run / "configs").glob("*.yaml"))), []),
                        load_last(text_run), text_run / "checkpoints" / "last.ckpt").eval()
    conditions = [Condition("three", "prompt: three", negative="eight"), Condition("one", "prompt: one")]
    with torch.no_grad():
        cond, null = batch_conditionings(model, conditions, torch.device("cpu"))
        expected = model.cond_stage_model(["eight", ""])
        torch.testing.assert_close(cond.context, model.cond_stage_model(["three", "one"]))
    torch.testing.assert_close(null.context, expected)
    torch.testing.assert_close(null.context[1], model.cond_stage_model.null_condition(expected)[1])


def test_split_captions_condition_a_text_model(text_run, tmp_path):
    _, manifest = sample(tmp_path, "split", "-r", str(text_run), "--cond", "split:test", "--n_samples", "2", *FAST)
    expected = [Digits("test", size=32, caption_templates=CAPTION_TEMPLATES)[i]["caption"] for i in range(2)]
    assert [s["prompt"] for s in manifest["samples"]] == expected


def test_prompt_errors_name_the_conflict(text_run, tmp_path):
    run = ["-r", str(text_run), *FAST]
    assert_error([*run, "--prompt", "one", "--cond", "split:test"], r"--prompt and --cond split:test")
    assert_error([*run, "--prompt", "one", "--prompt_file", "p.txt"], r"--prompt and --prompt_file")
    assert_error([*run, "--prompt_file", str(tmp_path / "none.txt")], r"--prompt_file .*none\.txt: cannot read")
    assert_error([*run, "--prompt", "one", "--negative_prompt", "two", "--scale", "1"],
                 r"--negative_prompt .* --scale 1 turns off")
    assert_error(run, r"conditioned on text \(batch\['caption'\] through CLIPTextEmbedder.*pass --prompt")
    assert_error([*run, "--cond", "labels:1"], r"conditioned on text .*not on class labels")


def test_prompt_on_a_model_without_text_is_an_error(tmp_path):
    (tmp_path / "uncond").mkdir()
    (tmp_path / "mask").mkdir()
    checkpoint, config = unconditional_2d(tmp_path / "uncond")
    assert_error(["-r", str(checkpoint), "--config", str(config), "--prompt", "seven"],
                 r"--prompt: the model takes no text; it is conditioned on nothing \(an unconditional model")
    checkpoint, config = save_untrained(tmp_path / "mask", {
        "target": "ldm.models.diffusion.ddpm.LatentDiffusion", "params": {
            "image_size": 4, "channels": 2, "timesteps": 100, "use_ema": False, "cond_stage_key": "mask",
            "conditioning_key": "concat", "cond_stage_config": {"target": "torch.nn.Identity"},
            "first_stage_config": {"target": f"{STANDINS}.PoolFirstStage",
                                   "params": {"in_channels": 1, "embed_dim": 2, "factor": 2, "dims": 2}},
            "unet_config": {"target": f"{STANDINS}.RecordingUNet",
                            "params": {"in_channels": 3, "out_channels": 2, "dims": 2}}}})
    assert_error(["-r", str(checkpoint), "--config", str(config), "--negative_prompt", "seven"],
                 r"--negative_prompt: the model takes no text; it is conditioned on a mask \(batch\['mask'\] "
                 r"through Identity, conditioning_key=concat\)")


def text_engine_config() -> dict:
    """sgm's toy DiffusionEngine (tests/models/diffusion/test_engine.py) conditioned on a prompt through a tiny CLIP
    text transformer (cross-attention) instead of a class label."""
    config = OmegaConf.to_container(sgm_toy_config(latent_shape=[1, 8, 8]))
    network = config["params"]["network_config"]["params"]
    for key in ("num_classes", "adm_in_channels"):
        del network[key]
    network.update(attention_resolutions=[1], use_spatial_transformer=True, transformer_depth=1, context_dim=16)
    config["params"]["conditioner_config"]["params"]["emb_models"] = [{
        "is_trainable": True, "input_key": "txt", "ucg_rate": 0.2,
        "target": "ldm.modules.text_encoders.CLIPTextEmbedder",
        "params": {"text_config": {"hidden_size": 16, "intermediate_size": 32, "num_hidden_layers": 1,
                                   "num_attention_heads": 2}, "max_length": 16, "freeze": False}}]
    return config


def test_prompts_condition_a_diffusion_engine(tmp_path):
    """A DiffusionEngine whose conditioner reads text: samples record their prompts; the unconditional half of
    guidance is zeros (sgm) without a negative prompt and the conditioner's encoding of it with one."""
    checkpoint, config = save_untrained(tmp_path, text_engine_config())
    args = ["-r", str(checkpoint), "--config", str(config), *FAST, "--n_samples", "2"]
    _, manifest = sample(tmp_path, "engine", *args, "--prompt", "seven", "--negative_prompt", "one")
    assert [(s["prompt"], s["negative_prompt"]) for s in manifest["samples"]] == [("seven", "one")] * 2

    model = build_model(load_config([str(config)], []), torch.load(checkpoint, weights_only=True), checkpoint).eval()
    items = [item for item, _ in engine_prompt_items(model, ["seven", "two"], None, None, 3.0)]
    encoder = model.conditioner.embedders[0]
    with torch.no_grad():
        cond, uc = engine_batch_conditionings(model, items, None, torch.device("cpu"))
        torch.testing.assert_close(cond["crossattn"], encoder(["seven", "two"]))
        assert torch.count_nonzero(uc["crossattn"]) == 0
        cond, uc = engine_batch_conditionings(model, items, ["one", "eight"], torch.device("cpu"))
        torch.testing.assert_close(cond["crossattn"], encoder(["seven", "two"]))
        torch.testing.assert_close(uc["crossattn"], encoder(["one", "eight"]))


def test_prompt_errors_on_diffusion_engine_runs(tmp_path):
    (tmp_path / "labels").mkdir()
    labels_engine = OmegaConf.to_container(sgm_toy_config(latent_shape=[1, 8, 8]))
    checkpoint, config = save_untrained(tmp_path / "labels", labels_engine)
    assert_error(["-r", str(checkpoint), "--config", str(config), "--prompt", "seven"],
                 r"--prompt: the model takes no text; its conditioner reads cls")
    (tmp_path / "text").mkdir()
    checkpoint, config = save_untrained(tmp_path / "text", text_engine_config())
    run = ["-r", str(checkpoint), "--config", str(config)]
    assert_error([*run, "--negative_prompt", "one"], r"--negative_prompt: give the prompts with --prompt")
    assert_error([*run, "--prompt", "one", "--cond", "split:test"], r"--prompt and --cond split:test")
    assert_error([*run, "--prompt", "one", "--negative_prompt", "two", "--scale", "1"], r"--scale 1 turns off")
