"""Autocast's weight casts done once per call (ldm/engine/weight_cast.py), on CPU under bf16 autocast: which parameters
are found, and that loss and every gradient are autocast's own bit for bit."""
import pytest
import torch
from torch import nn
from torch.nn import functional as F

from ldm.engine.weight_cast import call_with_weights_cast, parameters_cast_by_autocast, parameters_replaced
from tests.engine.test_cuda_graph import tiny_unet

BF16 = torch.bfloat16


class Mixed(nn.Module):
    """Layers autocast casts (convs, a linear), one it does not (GroupNorm), a weight used as it is (scale) and one
    used twice (shared)."""

    def __init__(self):
        super().__init__()
        self.conv_in = nn.Conv3d(2, 8, 3, padding=1)
        self.norm = nn.GroupNorm(2, 8)
        self.embed = nn.Linear(4, 8)
        self.shared = nn.Conv3d(8, 8, 1)
        self.scale = nn.Parameter(torch.full((8,), 0.5))
        self.conv_out = nn.Conv3d(8, 2, 1, bias=False)

    def forward(self, x, e):
        h = self.conv_in(x) + self.embed(e)[:, :, None, None, None]
        h = F.silu(self.norm(h.float()))
        h = self.shared(self.shared(h)) * self.scale[:, None, None, None]
        return self.conv_out(h)


def loss_and_grads(model: nn.Module, call) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    model.zero_grad(set_to_none=True)
    with torch.autocast("cpu", dtype=BF16):
        out = call()
    loss = out.float().pow(2).mean()
    loss.backward()
    return loss.detach(), {name: p.grad.clone() for name, p in model.named_parameters()}


def assert_same_bits(model: nn.Module, inputs: tuple, names: list[str]) -> None:
    loss, grads = loss_and_grads(model, lambda: model(*inputs))
    cast_loss, cast_grads = loss_and_grads(
        model, lambda: call_with_weights_cast(model, names, BF16, type(model).forward.__get__(model), *inputs))
    assert torch.equal(cast_loss, loss)
    for name, grad in grads.items():
        assert cast_grads[name].dtype == grad.dtype == torch.float32
        assert torch.equal(cast_grads[name], grad), name


def probe(model: nn.Module, *inputs, cache_enabled: bool = True) -> list[str]:
    with torch.autocast("cpu", dtype=BF16, cache_enabled=cache_enabled):
        return parameters_cast_by_autocast(model, model(*inputs), BF16)


@pytest.mark.parametrize("cache_enabled", [True, False])
def test_finds_the_parameters_only_autocast_casts_and_matches_autocast_bit_for_bit(cache_enabled):
    """With autocast's cast cache (eager training) the shared weight is cast once, as here; without it (CUDA-graph
    capture) it is cast at each use and its fp32 gradient summed, so it is left to autocast."""
    torch.manual_seed(0)
    model = Mixed()
    inputs = (torch.randn(2, 2, 4, 4, 4), torch.randn(2, 4))
    names = probe(model, *inputs, cache_enabled=cache_enabled)
    shared = ["shared.weight", "shared.bias"] if cache_enabled else []
    assert names == ["conv_in.weight", "conv_in.bias", "embed.weight", "embed.bias", *shared, "conv_out.weight"]
    assert_same_bits(model, inputs, names)


def test_tiny_unet_casts_its_convolutions_and_linears_and_matches_autocast_bit_for_bit():
    torch.manual_seed(0)
    model = tiny_unet(dims=2, context_dim=6)
    inputs = (torch.randn(2, 2, 8, 8), torch.tensor([3, 700]), torch.randn(2, 5, 6))
    names = probe(model, *inputs)
    kinds = {type(model.get_submodule(name.rpartition(".")[0])).__name__ for name in names}
    assert {"Conv2d", "Linear"} <= kinds and not any("norm" in name for name in names)
    assert len(names) > 20
    assert_same_bits(model, inputs, names)


def test_without_autocast_nothing_is_cast():
    model = Mixed()
    out = model(torch.randn(1, 2, 4, 4, 4), torch.randn(1, 4))
    assert parameters_cast_by_autocast(model, out, BF16) == []


def test_parameters_are_put_back_after_an_exception():
    model = Mixed()
    weight = model.conv_in.weight
    with pytest.raises(ValueError):
        with parameters_replaced(model, {"conv_in.weight": weight.detach().to(BF16)}):
            assert model.conv_in.weight.dtype == BF16
            raise ValueError
    assert model.conv_in.weight is weight


class Joined(nn.Module):
    """Weights joined for one matmul (as self-attention's q, k and v): a and b only so; c and d joined, but d also used
    alone; e and f joined and used in fp32 (no cast)."""

    def __init__(self):
        super().__init__()
        self.a, self.b = nn.Linear(4, 3, bias=False), nn.Linear(4, 3, bias=False)
        self.c, self.d = nn.Linear(4, 2, bias=False), nn.Linear(4, 2, bias=False)
        self.e, self.f = nn.Parameter(torch.randn(3)), nn.Parameter(torch.randn(3))

    def forward(self, x):
        ab = F.linear(x, torch.cat([self.a.weight, self.b.weight]))
        cd = F.linear(x, torch.cat([self.c.weight, self.d.weight])) + self.d(x).sum(-1, keepdim=True)
        return torch.cat([ab.float(), cd.float()], dim=-1) * torch.cat([self.e, self.f]).sum()


def test_parts_of_a_concatenation_that_is_only_cast_are_cast_before_it_bit_for_bit():
    torch.manual_seed(0)
    model = Joined()
    inputs = (torch.randn(5, 4),)
    names = probe(model, *inputs)
    assert names == ["a.weight", "b.weight"]
    assert_same_bits(model, inputs, names)


def test_tiny_unet_casts_its_joined_attention_and_embedding_weights():
    model = tiny_unet(dims=2)
    names = probe(model, torch.randn(2, 2, 8, 8), torch.tensor([3, 700]))
    joined = [n for n in names if ".to_q." in n or ".to_k." in n or ".to_v." in n or "emb_proj" in n]
    assert any(".to_k." in n for n in joined) and any(n.endswith("emb_proj.1.bias") for n in joined)
    # every linear and convolution weight (biases of convolutions before a GroupNorm are added by it, in fp32)
    weights = [f"{n}.weight" for n, m in model.named_modules() if isinstance(m, (nn.Linear, nn.Conv2d))]
    assert len(weights) > 20 and set(weights) <= set(names)
