"""Fine-tuning with `lora_config`: a tiny text-to-image LatentDiffusion on a diffusers pipeline folder trains its LoRA
weights alone through the CLI, writes them beside each checkpoint, the file gives diffusers' UNet2DConditionModel the
trained model's output, and `-r` resumes; gradient checkpointing gives the same LoRA gradients."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from omegaconf import OmegaConf
from PIL import Image
from safetensors.torch import load_file

from ldm.cli import main
from ldm.convert import unet as convert_unet
from ldm.models.diffusion.ddpm import LatentDiffusion
from ldm.modules.diffusionmodules.openaimodel import UNetModel
from ldm.modules.lora import add_lora, load_lora, lora_file_beside
from ldm.util import ConfigError, instantiate_from_config
from tests.convert.test_pretrained import FIRST_STAGE, UNET
from tests.convert.test_unet import reference as reference_unet
from tests.convert.test_vae import reference as reference_vae
from tests.engine.helpers import only_run_dir

diffusers = pytest.importorskip("diffusers")
pytest.importorskip("peft")
pytestmark = pytest.mark.usefixtures("single_thread")

TEXT_ENCODER = {"target": "ldm.modules.text_encoders.CLIPTextEmbedder", "params": {
    "text_config": {"hidden_size": 24, "intermediate_size": 32, "num_hidden_layers": 1, "num_attention_heads": 2},
    "max_length": 12}}  # random and frozen: a stand-in for CLIP of the UNet's context width


@pytest.fixture(scope="module")
def pipeline(tmp_path_factory):
    """A diffusers pipeline folder (unet/ SD-1.x-like, vae/) and a folder of four captioned 32 x 32 images."""
    root = tmp_path_factory.mktemp("finetune")
    reference_unet("sd1_like").save_pretrained(root / "pipe" / "unet")
    reference_vae("sd_like").save_pretrained(root / "pipe" / "vae")
    (root / "data").mkdir()
    rng = np.random.default_rng(0)
    for i, caption in enumerate(["a red square", "two dots", "a line", "noise"]):
        Image.fromarray(rng.integers(0, 256, (32, 32, 3), dtype=np.uint8)).save(root / "data" / f"{i}.png")
        (root / "data" / f"{i}.txt").write_text(caption)
    return root


def model_config(pipe, **lora):
    return {"target": "ldm.models.diffusion.ddpm.LatentDiffusion", "params": {
        "first_stage_config": FIRST_STAGE, "cond_stage_config": TEXT_ENCODER, "unet_config": UNET, "image_size": 16,
        "channels": 4, "cond_stage_key": "txt", "conditioning_key": "crossattn", "ucg_rate": 0.2, "monitor": None,
        "ckpt_path": str(pipe), "ignore_keys": ["cond_stage_model."], "use_ema": True, "ema_decay": 0.9,
        "lora_config": {"rank": 4, "alpha": 8, "target_modules": ["to_q", "to_k", "to_v", "to_out"], **lora}}}


def write_config(root, layout):
    config = {"model": {"base_learning_rate": 2e-3, **model_config(root / "pipe", save_layout=layout)},
              "data": {"target": "ldm.data.base.DataModuleFromConfig", "params": {
                  "batch_size": 2, "num_workers": 0,
                  "train": {"target": "ldm.data.captions.CaptionedImages",
                            "params": {"root": str(root / "data"), "size": 32}}}},
              "trainer": {"accelerator": "cpu", "max_steps": 3, "logger": ["csv"],
                          "checkpoint": {"every_n_steps": 1, "keep_last_k": 5}}}
    path = root / f"lora_{layout}.yaml"
    OmegaConf.save(OmegaConf.create(config), path)
    return path


def base_keys(state):
    return {k: v for k, v in state.items() if "lora_" not in k and not k.startswith("model_ema.")}


def test_lora_config_trains_the_lora_weights_alone_and_its_files_load_into_diffusers(pipeline):
    root = pipeline
    logs = root / "logs_kohya"
    assert main("ldm", ["-b", str(write_config(root, "kohya")), "-t", "--no_test", "-l", str(logs),
                        "--scale_lr", "false"]) == 0
    run = only_run_dir(logs)
    first = torch.load(run / "checkpoints" / "step=1.ckpt", weights_only=True)
    last = torch.load(run / "checkpoints" / "last.ckpt", weights_only=True)
    assert last["global_step"] == 3
    # the base weights (UNet, VAE, text encoder) are bit-identical from step 1 to 3 and to the pipeline's UNet
    assert base_keys(first["state_dict"]).keys() == base_keys(last["state_dict"]).keys()
    assert all(torch.equal(v, last["state_dict"][k]) for k, v in base_keys(first["state_dict"]).items())
    pretrained = convert_unet.load_unet(root / "pipe").state_dict()
    unet_base = {k.removeprefix("model.").replace(".base_layer.", "."): v
                 for k, v in base_keys(last["state_dict"]).items() if k.startswith("model.")}
    assert unet_base.keys() == pretrained.keys()
    assert all(torch.equal(v, pretrained[k]) for k, v in unet_base.items())
    lora_keys = [k for k in last["state_dict"] if "lora_" in k and k.startswith("model.")]
    assert any(not torch.equal(first["state_dict"][k], last["state_dict"][k]) for k in lora_keys)
    # the optimizer holds the LoRA weights alone; the EMA averages them alone
    assert len(last["optimizer_states"][0]["param_groups"][0]["params"]) == len(lora_keys)
    ema_keys = [k for k in last["state_dict"] if k.startswith("model_ema.") and k not in
                ("model_ema.decay", "model_ema.num_updates")]
    assert len(ema_keys) == len(lora_keys) and all("lora_" in k for k in ema_keys)

    files = sorted(p.name for p in (run / "checkpoints").glob("lora-*.safetensors"))
    assert files == ["lora-last.safetensors", "lora-step=1.safetensors", "lora-step=2.safetensors",
                     "lora-step=3.safetensors"]
    state = load_file(str(run / "checkpoints" / "lora-last.safetensors"))
    assert all(k.startswith("lora_unet_") for k in state) and len(state) == 3 * len(lora_keys) // 2
    assert not any(k.startswith("lora_unet_") and "base" in k for k in state)

    # the trained model (EMA weights, as the file holds them) and diffusers' UNet with the file give the same output
    model = instantiate_from_config(model_config(root / "pipe"))
    model.load_state_dict(last["state_dict"])
    from diffusers.loaders.lora_conversion_utils import _convert_non_diffusers_lora_to_diffusers
    converted, alphas = _convert_non_diffusers_lora_to_diffusers(state)
    theirs = diffusers.UNet2DConditionModel.from_pretrained(root / "pipe" / "unet").eval()
    theirs.load_lora_adapter({k: v for k, v in converted.items() if k.startswith("unet.")}, prefix="unet",
                             network_alphas=alphas)
    ours_from_file = load_lora(convert_unet.load_unet(root / "pipe"), run / "checkpoints" / "lora-last.safetensors")
    generator = torch.Generator().manual_seed(5)
    x, t, context = torch.randn(2, 4, 16, 16, generator=generator), torch.tensor([7, 900]), \
        torch.randn(2, 12, 24, generator=generator)
    with torch.no_grad(), model.ema_scope():
        trained = model.model.eval()(x, t, context)
        assert (trained - diffusers.UNet2DConditionModel.from_pretrained(root / "pipe" / "unet")(x, t, context)
                .sample).abs().max() > 1e-5  # the LoRA shows
        torch.testing.assert_close(theirs(x, t, context).sample, trained, rtol=0, atol=1e-5)
        torch.testing.assert_close(ours_from_file.eval()(x, t, context), trained, rtol=0, atol=1e-6)

    # -r continues from step 3 with the same LoRA and writes its files on
    assert main("ldm", ["-r", str(run), "-t", "--no_test", "trainer.max_steps=4"]) == 0
    resumed = torch.load(run / "checkpoints" / "last.ckpt", weights_only=True)
    assert resumed["global_step"] == 4 and (run / "checkpoints" / "lora-step=4.safetensors").is_file()
    assert all(torch.equal(v, resumed["state_dict"][k]) for k, v in base_keys(last["state_dict"]).items())


def test_diffusers_save_layout_writes_diffusers_keys_and_alpha(pipeline, tmp_path):
    model = instantiate_from_config(model_config(pipeline / "pipe", save_layout="diffusers"))
    assert model.model_ema is not None and all("lora" in name for name in model.model_ema.shadow_names)
    model.save_beside_checkpoint(tmp_path / "step=7.ckpt")
    path = lora_file_beside(tmp_path / "step=7.ckpt")
    assert path.name == "lora-step=7.safetensors"
    from ldm.convert.weights_io import safetensors_metadata
    keys = load_file(str(path))
    assert keys and all(k.startswith("unet.") and (".lora_A." in k or ".lora_B." in k) for k in keys)
    assert float(safetensors_metadata(path)["lora_alpha"]) == 8.0


def test_optimizer_sees_exactly_the_lora_weights(pipeline):
    model = instantiate_from_config(model_config(pipeline / "pipe"))
    model.learning_rate = 1e-4
    optimizer, = model.configure_optimizers()
    given = {id(p) for group in optimizer.param_groups for p in group["params"]}
    lora = {id(p) for name, p in model.named_parameters() if ".lora_A." in name or ".lora_B." in name}
    assert given == lora == {id(p) for p in model.parameters() if p.requires_grad}


def test_gradient_checkpointing_gives_the_same_lora_gradients():
    params = dict(UNET["params"])
    grads = []
    for use_checkpoint in (False, True):
        torch.manual_seed(0)
        unet = add_lora(UNetModel(**params, use_checkpoint=use_checkpoint), rank=2)
        with torch.no_grad():
            for name, p in unet.named_parameters():
                p.add_(0.05 * torch.randn(p.shape, generator=torch.Generator().manual_seed(len(name))))
        generator = torch.Generator().manual_seed(1)
        x, context = torch.randn(2, 4, 16, 16, generator=generator), torch.randn(2, 5, 24, generator=generator)
        unet(x, torch.tensor([3, 500]), context).square().mean().backward()
        grads.append({n: p.grad for n, p in unet.named_parameters() if p.requires_grad})
        assert all(p.grad is None for p in unet.parameters() if not p.requires_grad)
    assert grads[0].keys() == grads[1].keys() and len(grads[0]) > 0
    for name, grad in grads[0].items():
        torch.testing.assert_close(grads[1][name], grad, rtol=1e-5, atol=1e-7, msg=name)


@pytest.mark.parametrize("lora, extra, match", [
    ({"ranks": 4}, {}, "lora_config: unknown key.* ranks"),
    ({"save_layout": "civitai"}, {}, "lora_config.save_layout: must be one of kohya, diffusers"),
    ({"rank": 0}, {}, "lora_config.rank: must be a positive int"),
    ({"target_modules": ["proj_in"]}, {}, r"target_modules: \['proj_in'\] not among"),
    ({}, {"cond_stage_trainable": True, "cond_stage_config": {**TEXT_ENCODER, "params": {
        **TEXT_ENCODER["params"], "freeze": False}}}, "set cond_stage_trainable: false"),
])
def test_bad_lora_configs_are_named(pipeline, lora, extra, match):
    config = model_config(pipeline / "pipe", **lora)
    config["params"].update(extra)
    with pytest.raises(ConfigError, match=match):
        instantiate_from_config(config)


@pytest.mark.filterwarnings("ignore:DiffusionEngine. the first training batch")
def test_diffusion_engine_takes_lora_too(tmp_path):
    from tests.models.diffusion.test_engine import sgm_toy_config, toy_batch

    network = {"attention_resolutions": [1], "use_spatial_transformer": True, "context_dim": 8}
    config = sgm_toy_config(use_ema=True, lora_config={"rank": 2})
    config.params.network_config.params.update(network)
    embedders = config.params.conditioner_config.params.emb_models
    embedders[0].is_trainable = False
    embedders.append({"input_key": "cls", "target": "ldm.modules.embedders.ClassEmbedder",
                      "params": {"embed_dim": 8, "n_classes": 10, "add_sequence_dim": True}})
    model = instantiate_from_config(config)
    model.learning_rate = 1e-2
    optimizer, = model.configure_optimizers()
    lora = [p for n, p in model.named_parameters() if "lora_" in n]
    assert lora and {id(p) for g in optimizer.param_groups for p in g["params"]} == set(map(id, lora))
    assert all("lora" in name for name in model.model_ema.shadow_names)
    base = {k: v.clone() for k, v in base_keys(model.state_dict()).items()}
    model.train()
    for _ in range(2):
        loss, _ = model.training_step(toy_batch(), 0, 0)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in base.items())
    model.use_ema = False
    model.save_beside_checkpoint(tmp_path / "last.ckpt")
    plain = instantiate_from_config(config.params.network_config)
    plain.load_state_dict({k.removeprefix("model.diffusion_model.").replace(".base_layer.", "."): v
                           for k, v in base.items() if k.startswith("model.diffusion_model.")})
    load_lora(plain, tmp_path / "lora-last.safetensors")
    x, t, context = torch.randn(2, 1, 8, 8), torch.tensor([0.5, 2.0]), torch.randn(2, 1, 8)
    y = torch.randn(2, 16)
    with torch.no_grad():
        torch.testing.assert_close(plain(x, t, context, y), model.model.diffusion_model(x, t, context, y),
                                   rtol=0, atol=1e-6)
    with pytest.raises(ConfigError, match="is_trainable: false on every embedder"):
        instantiate_from_config(sgm_toy_config(lora_config={"rank": 2},
                                               network_config=config.params.network_config))


def test_latent_diffusion_accepts_no_lora_as_before(pipeline):
    model = instantiate_from_config({**model_config(pipeline / "pipe"), "params": {
        **model_config(pipeline / "pipe")["params"], "lora_config": None}})
    assert isinstance(model, LatentDiffusion) and model.lora is None
    assert not any("lora" in n for n in model.state_dict())
    assert all(p.requires_grad for p in model.model.parameters())


@pytest.mark.parametrize("layout", ["kohya", "diffusers"])
def test_sdxl_like_lora_file_loads_into_diffusers(tmp_path, layout):
    """sdxl_lora.yaml's files: an SDXL-like UNet (a level without attention, deeper transformers, text_time
    embedding) with LoRA, its file read by diffusers as by the SD 1.x test above."""
    from diffusers.loaders.lora_conversion_utils import _convert_non_diffusers_lora_to_diffusers

    from ldm.modules.lora import save_lora
    ref = reference_unet("sdxl_like")
    ref.save_pretrained(tmp_path / "unet")
    ours = add_lora(convert_unet.load_unet(tmp_path).eval(), rank=2, alpha=2)
    generator = torch.Generator().manual_seed(6)
    with torch.no_grad():
        for name, p in ours.named_parameters():
            if "lora_" in name:
                p.copy_(0.1 * torch.randn(p.shape, generator=generator))
    save_lora(ours, tmp_path / "lora.safetensors", layout)
    state = load_file(str(tmp_path / "lora.safetensors"))
    if layout == "kohya":
        state, alphas = _convert_non_diffusers_lora_to_diffusers(state)
        ref.load_lora_adapter({k: v for k, v in state.items() if k.startswith("unet.")}, prefix="unet",
                              network_alphas=alphas)
    else:
        ref.load_lora_adapter(state, prefix="unet")
    x, t, context = torch.randn(2, 4, 16, 16, generator=generator), torch.tensor([3, 917]), \
        torch.randn(2, 7, 24, generator=generator)
    text_embeds, time_ids = torch.randn(2, 16, generator=generator), torch.tensor([[16.0, 16, 0, 0, 16, 16]] * 2)
    y = torch.cat([text_embeds, ref.add_time_proj(time_ids.flatten()).reshape(2, -1)], dim=1)
    with torch.no_grad():
        expected = ref(x, t, context, added_cond_kwargs={"text_embeds": text_embeds, "time_ids": time_ids}).sample
        torch.testing.assert_close(ours(x, t, context, y), expected, rtol=0, atol=1e-4)


def test_lora_weights_that_are_not_whole_matrices_are_refused(tmp_path):
    """What a rank holds of a sharded (FSDP) LoRA weight must not be written as the weight."""
    from peft.tuners.lora import LoraLayer

    from ldm.modules.lora import save_lora
    unet = add_lora(UNetModel(**UNET["params"]), rank=2)
    down = next(m for m in unet.modules() if isinstance(m, LoraLayer)).lora_A["default"].weight
    down.data = down.data.flatten()[:5]
    with pytest.raises(ValueError, match=r"shapes \(5,\) / .* not whole matrices"):
        save_lora(unet, tmp_path / "lora.safetensors")
    assert not (tmp_path / "lora.safetensors").exists()
