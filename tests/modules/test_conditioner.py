import pytest
import torch
from torch import nn

from ldm.modules.conditioner import GeneralConditioner
from ldm.util import ConfigError, get_obj_from_str

EMB = "ldm.modules.embedders."


def _conditioner(**class_options):
    return GeneralConditioner([
        {"target": EMB + "ClassEmbedder", "params": {"embed_dim": 8, "n_classes": 10}, "input_key": "cls",
         "is_trainable": True, **class_options},
        {"target": EMB + "ConcatTimestepEmbedderND", "params": {"outdim": 4}, "input_key": "original_size_as_tuple"},
        {"target": EMB + "ClassEmbedder", "params": {"embed_dim": 6, "n_classes": 3, "add_sequence_dim": True},
         "input_key": "style"},
        {"target": EMB + "ClassEmbedder", "params": {"embed_dim": 5, "n_classes": 3, "add_sequence_dim": True},
         "input_key": "style"},
        {"target": EMB + "SpatialMaskEmbedder", "params": {"downsample_factor": 2}, "input_key": "mask"},
    ])


def _batch():
    return {"cls": torch.tensor([1, 7, 3]), "original_size_as_tuple": torch.tensor([[64, 48], [32, 32], [8, 16]]),
            "style": torch.tensor([0, 2, 1]), "mask": torch.rand(3, 2, 8, 8)}


def test_routes_by_shape_and_concatenates_as_sgm():
    """2D outputs concatenate along features into `vector`, 3D along features into `crossattn`, spatial maps along
    channels into `concat`, in the order of `emb_models`."""
    conditioner, batch = _conditioner(), _batch()
    out = conditioner(batch)
    assert set(out) == {"vector", "crossattn", "concat"}
    assert out["vector"].shape == (3, 8 + 2 * 4) and out["crossattn"].shape == (3, 1, 11)
    assert out["concat"].shape == (3, 2, 4, 4)
    embedders = conditioner.embedders
    torch.testing.assert_close(out["vector"][:, :8], embedders[0](batch["cls"]))
    torch.testing.assert_close(out["vector"][:, 8:], embedders[1](batch["original_size_as_tuple"]))
    torch.testing.assert_close(out["crossattn"], torch.cat([embedders[2](batch["style"]),
                                                            embedders[3](batch["style"])], dim=2))


def test_trainable_and_frozen_embedders():
    conditioner = _conditioner()
    assert all(p.requires_grad for p in conditioner.embedders[0].parameters())
    assert not any(p.requires_grad for p in conditioner.embedders[2].parameters())
    conditioner.train()
    assert conditioner.embedders[0].training and not conditioner.embedders[2].training
    out = conditioner(_batch())
    out["vector"].sum().backward()
    assert conditioner.embedders[0].embedding.weight.grad is not None
    assert not out["crossattn"].requires_grad


def test_ucg_rate_zeroes_whole_items_while_training_only():
    torch.manual_seed(0)
    conditioner = _conditioner(ucg_rate=0.5)
    batch = {k: v.repeat(200, *[1] * (v.ndim - 1)) for k, v in _batch().items()}
    reference = conditioner.eval()(batch)["vector"][:, :8]
    dropped = conditioner.train()(batch)["vector"][:, :8]
    zero = (dropped == 0).all(dim=1)
    assert bool(((dropped == reference).all(dim=1) | zero).all())
    assert 0.4 < zero.float().mean().item() < 0.6
    assert conditioner.dropped_keys == ["cls"]
    c, uc = conditioner.get_unconditional_conditioning(batch, force_uc_zero_embeddings=conditioner.dropped_keys)
    assert conditioner.training  # restored
    torch.testing.assert_close(c["vector"][:, :8], reference)
    assert bool((uc["vector"][:, :8] == 0).all()) and torch.equal(uc["vector"][:, 8:], c["vector"][:, 8:])


class Pair(nn.Module):
    """(a, b): (B,), (B,) -> (B, 2)."""

    def forward(self, a, b):
        return torch.stack([a, b], dim=1).float()


def test_input_keys_pass_several_entries_in_order():
    conditioner = GeneralConditioner([{"target": "tests.modules.test_conditioner.Pair", "input_keys": ["a", "b"]}])
    out = conditioner({"a": torch.tensor([1, 2]), "b": torch.tensor([3, 4])})
    torch.testing.assert_close(out["vector"], torch.tensor([[1.0, 3.0], [2.0, 4.0]]))


def test_bad_conditioner_configs_name_the_culprit():
    with pytest.raises(ConfigError, match=r"emb_models\[0\]: unknown key 'ucg'"):
        GeneralConditioner([{"target": EMB + "ClassEmbedder", "params": {"embed_dim": 2}, "input_key": "c",
                             "ucg": 0.1}])
    with pytest.raises(ConfigError, match=r"emb_models\[0\]: give exactly one of input_key and input_keys"):
        GeneralConditioner([{"target": EMB + "ClassEmbedder", "params": {"embed_dim": 2}}])
    with pytest.raises(ConfigError, match=r"ucg_rate: must be in \[0, 1\)"):
        GeneralConditioner([{"target": EMB + "ClassEmbedder", "params": {"embed_dim": 2}, "input_key": "c",
                             "ucg_rate": 1.0}])
    with pytest.raises(ConfigError, match="Nope"):
        GeneralConditioner([{"target": EMB + "Nope", "input_key": "c"}])
    flat = GeneralConditioner([{"target": "torch.nn.Flatten", "params": {"start_dim": 0}, "input_key": "c"}])
    with pytest.raises(ValueError, match=r"Flatten \(input c\) gave shape \(6,\), which fits no route"):
        flat({"c": torch.zeros(2, 3)})
    with pytest.raises(KeyError, match="needs batch entry 'cls'"):
        _conditioner()({"style": torch.tensor([0])})


def test_sgm_target_names_resolve_to_ours():
    from ldm.models.diffusion.edm import denoiser, discretization, guiders, loss, loss_weighting, samplers, scalings
    from ldm.models.diffusion.edm import sigma_sampling
    from ldm.modules import embedders
    sgm = "sgm.modules.diffusionmodules."
    expected = {
        sgm + "denoiser.DiscreteDenoiser": denoiser.DiscreteDenoiser,
        sgm + "denoiser_scaling.EDMScaling": scalings.EDMScaling,
        sgm + "discretizer.LegacyDDPMDiscretization": discretization.LegacyDDPMDiscretization,
        sgm + "sigma_sampling.EDMSampling": sigma_sampling.EDMSampling,
        sgm + "denoiser_weighting.EDMWeighting": loss_weighting.EDMWeighting,
        sgm + "loss_weighting.EpsWeighting": loss_weighting.EpsWeighting,
        sgm + "loss.StandardDiffusionLoss": loss.StandardDiffusionLoss,
        sgm + "sampling.EulerEDMSampler": samplers.EulerEDMSampler,
        sgm + "guiders.VanillaCFG": guiders.VanillaCFG,
        "sgm.modules.GeneralConditioner": GeneralConditioner,
        "sgm.modules.encoders.modules.GeneralConditioner": GeneralConditioner,
        "sgm.modules.encoders.modules.ConcatTimestepEmbedderND": embedders.ConcatTimestepEmbedderND,
    }
    for name, cls in expected.items():
        assert get_obj_from_str(name) is cls, name
    with pytest.raises(ConfigError, match=r"x.target: cannot import 'sgm.modules.encoders.modules.FrozenT5' \(no "
                                          r"'FrozenT5' in ldm.modules.conditioner, ldm.modules.embedders"):
        get_obj_from_str("sgm.modules.encoders.modules.FrozenT5", where="x.target")
