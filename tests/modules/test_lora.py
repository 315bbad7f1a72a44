"""LoRA on the UNet's attention projections: training touches LoRA weights only, files in the kohya and diffusers
layouts round-trip, merging matches the adapted model, and a hand-written kohya file gives W + alpha / r * up @ down."""
import pytest
import torch
from safetensors.torch import save_file

from ldm.convert.weights_io import ConversionError
from ldm.modules.diffusionmodules.openaimodel import UNetModel
from ldm.modules.lora import add_lora, load_lora, lora_state, merge_lora, save_lora

pytest.importorskip("peft")


def tiny_unet(seed=0):
    torch.manual_seed(seed)
    unet = UNetModel(image_size=8, in_channels=4, out_channels=4, model_channels=32, attention_resolutions=[1],
                     num_res_blocks=1, channel_mult=[1, 2], num_heads=2, use_spatial_transformer=True, context_dim=16)
    with torch.no_grad():  # the zero-initialised output projections too, so that attention shows in the output
        for p in unet.parameters():
            p.add_(0.05 * torch.randn_like(p))
    return unet.eval()


def inputs(dtype=torch.float32):
    generator = torch.Generator().manual_seed(1)
    return (torch.randn(2, 4, 8, 8, generator=generator, dtype=dtype), torch.tensor([3, 700]),
            torch.randn(2, 5, 16, generator=generator, dtype=dtype))


def randomise_lora(unet, seed=2):
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in unet.named_parameters():
            if "lora_" in name:
                p.copy_(0.1 * torch.randn(p.shape, generator=generator, dtype=p.dtype))


def test_zero_up_weights_leave_outputs_unchanged_and_only_lora_is_trainable():
    unet = tiny_unet()
    x, t, context = inputs()
    with torch.no_grad():
        before = unet(x, t, context)
    add_lora(unet, rank=4)
    names = [n for n, p in unet.named_parameters() if p.requires_grad]
    assert names and all(".lora_A." in n or ".lora_B." in n for n in names)
    targets = {n.split(".lora_")[0].rsplit(".", 1)[-1] for n in names}
    assert targets == {"to_q", "to_k", "to_v", "to_out"}
    assert len(names) == 2 * 4 * 2 * 4  # A and B, 4 projections, 2 attentions, 4 transformers (level 0 and middle)
    with torch.no_grad():
        torch.testing.assert_close(unet(x, t, context), before, rtol=0, atol=0)
    randomise_lora(unet)
    with torch.no_grad():  # the self-attention's fused q/k/v path must not bypass an adapted projection
        for name, p in unet.named_parameters():
            if "lora_B" in name and "attn1.to_k" not in name:
                p.zero_()
        assert (unet(x, t, context) - before).abs().max() > 1e-4


def test_training_steps_change_lora_weights_only():
    unet = add_lora(tiny_unet(), rank=4, alpha=8).train()
    start = {n: p.detach().clone() for n, p in unet.state_dict().items()}
    optimizer = torch.optim.AdamW([p for p in unet.parameters() if p.requires_grad], lr=1e-2, weight_decay=0.0)
    x, t, context = inputs()
    for _ in range(3):
        loss = (unet(x, t, context) - x).square().mean()
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    changed = {n for n, p in unet.state_dict().items() if not torch.equal(p, start[n])}
    assert changed and all("lora_" in n for n in changed)
    assert {n for n in changed if "lora_B" in n} == {n for n in start if "lora_B" in n}


@pytest.mark.parametrize("layout", ["kohya", "diffusers"])
def test_save_load_round_trips_exactly(tmp_path, layout):
    unet = add_lora(tiny_unet(), rank=4, alpha=2)
    randomise_lora(unet)
    save_lora(unet, tmp_path / "lora.safetensors", layout)
    fresh = load_lora(tiny_unet(), tmp_path / "lora.safetensors")  # LoRA added from the file's rank and modules
    assert lora_state(fresh, layout)[0].keys() == lora_state(unet, layout)[0].keys()
    for key, value in lora_state(unet, layout)[0].items():
        assert torch.equal(lora_state(fresh, layout)[0][key], value), key
    x, t, context = inputs()
    with torch.no_grad():
        assert torch.equal(fresh(x, t, context), unet(x, t, context))
    keys = lora_state(unet, layout)[0]
    if layout == "kohya":
        assert "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_out_0.lora_down.weight" in keys
        assert float(keys["lora_unet_mid_block_attentions_0_transformer_blocks_0_attn2_to_k.alpha"]) == 2.0
    else:
        assert "unet.up_blocks.1.attentions.0.transformer_blocks.0.attn2.to_v.lora_B.weight" in keys


def test_merged_weights_give_the_unmerged_output_float64():
    unet = add_lora(tiny_unet().double(), rank=3, alpha=5)
    randomise_lora(unet)
    x, t, context = inputs(torch.float64)
    with torch.no_grad():
        adapted = unet(x, t, context)
        merged = merge_lora(unet)(x, t, context)
    assert not any("lora_" in n for n in unet.state_dict())
    assert set(unet.state_dict()) == set(tiny_unet().state_dict())
    torch.testing.assert_close(merged, adapted, rtol=0, atol=1e-12)


@pytest.mark.parametrize("names", ["diffusers", "compvis"])
def test_hand_written_kohya_file_gives_w_plus_alpha_over_r_up_down(tmp_path, names):
    base = tiny_unet().double()
    generator = torch.Generator().manual_seed(3)
    rank, alpha = 2, 3.0
    down, up = torch.randn(rank, 32, generator=generator), torch.randn(32, rank, generator=generator)
    module = ("down_blocks_0_attentions_0_transformer_blocks_0_attn2_to_q" if names == "diffusers" else
              "input_blocks_1_1_transformer_blocks_0_attn2_to_q")
    state = {f"lora_unet_{module}.lora_down.weight": down, f"lora_unet_{module}.lora_up.weight": up,
             f"lora_unet_{module}.alpha": torch.tensor(alpha)}
    save_file(state, str(tmp_path / "hand.safetensors"))
    unet = load_lora(tiny_unet().double(), tmp_path / "hand.safetensors")
    adapted = unet.input_blocks[1][1].transformer_blocks[0].attn2.to_q
    weight = base.input_blocks[1][1].transformer_blocks[0].attn2.to_q.weight
    tokens = torch.randn(3, 32, generator=generator, dtype=torch.float64)
    expected = tokens @ (weight + alpha / rank * up.double() @ down.double()).T
    with torch.no_grad():
        torch.testing.assert_close(adapted(tokens), expected, rtol=0, atol=1e-12)
        merge_lora(unet)
    torch.testing.assert_close(unet.input_blocks[1][1].transformer_blocks[0].attn2.to_q.weight,
                               weight + alpha / rank * up.double() @ down.double(), rtol=0, atol=1e-12)


def test_bad_targets_keys_and_shapes_are_named(tmp_path):
    with pytest.raises(ValueError, match=r"target_modules: \['proj_in'\] not among to_q, to_k, to_v, to_out"):
        add_lora(tiny_unet(), target_modules=["to_q", "proj_in"])
    with pytest.raises(ValueError, match="rank must be a positive int"):
        add_lora(tiny_unet(), rank=0)
    module = "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn2_to_q"
    cases = {"stray": ({"text_encoder.x.lora_A.weight": torch.zeros(2, 32)}, r"neither the kohya.*text_encoder\.x"),
             "elsewhere": ({"lora_unet_down_blocks_9_to_q.lora_down.weight": torch.zeros(2, 32),
                            "lora_unet_down_blocks_9_to_q.lora_up.weight": torch.zeros(32, 2)},
                           "does not have: down_blocks_9_to_q"),
             "no_up": ({f"{module}.lora_down.weight": torch.zeros(2, 32)}, "lacks its up"),
             "shape": ({f"{module}.lora_down.weight": torch.zeros(2, 32),
                        f"{module}.lora_up.weight": torch.zeros(16, 2)}, r"do not fit.*\(32, 2\)")}
    for name, (state, message) in cases.items():
        save_file(state, str(tmp_path / f"{name}.safetensors"))
        with pytest.raises(ConversionError, match=message):
            load_lora(tiny_unet(), tmp_path / f"{name}.safetensors")
    with pytest.raises(ValueError, match="no LoRA layers"):
        save_lora(tiny_unet(), tmp_path / "none.safetensors")


@pytest.mark.parametrize("layout", ["diffusers", "kohya"])
def test_saved_file_loads_into_diffusers_and_gives_the_same_output(tmp_path, layout):
    """Our LoRA file on a tiny SD-1.x-like UNet, loaded by diffusers into the same UNet converted to diffusers'."""
    from safetensors.torch import load_file

    from ldm.convert import unet as convert_unet
    from tests.convert.test_unet import reference

    diffusers = pytest.importorskip("diffusers")
    ref = reference("sd1_like")
    ref.save_pretrained(tmp_path / "unet")
    ours = add_lora(convert_unet.load_unet(tmp_path).eval(), rank=4, alpha=4 if layout == "diffusers" else 2)
    randomise_lora(ours)
    save_lora(ours, tmp_path / "lora.safetensors", layout)
    state = load_file(str(tmp_path / "lora.safetensors"))
    if layout == "kohya":  # diffusers reads kohya files through its pipeline-level converter
        from diffusers.loaders.lora_conversion_utils import _convert_non_diffusers_lora_to_diffusers
        state, alphas = _convert_non_diffusers_lora_to_diffusers(state)
        state = {k: v for k, v in state.items() if k.startswith("unet.")}
        ref.load_lora_adapter(state, prefix="unet", network_alphas=alphas)
    else:
        ref.load_lora_adapter(state, prefix="unet")
    generator = torch.Generator().manual_seed(4)
    x, t = torch.randn(2, 4, 16, 16, generator=generator), torch.tensor([3, 917])
    context = torch.randn(2, 7, 24, generator=generator)
    with torch.no_grad():
        expected = ref(x, t, context).sample
        assert (expected - diffusers.UNet2DConditionModel.from_pretrained(tmp_path / "unet")(x, t, context).sample
                ).abs().max() > 1e-3  # the LoRA shows
        torch.testing.assert_close(ours(x, t, context), expected, rtol=0, atol=1e-4)
