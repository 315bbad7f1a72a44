"""MasterWeightAdamW: bf16 weights with fp32 masters train as fp32 weights under bf16 autocast with AdamW do."""
import copy

import pytest
import torch
from torch import nn

from ldm.engine.master_weights import MasterWeightAdamW

HYPER = dict(lr=1e-2, betas=(0.9, 0.99), eps=1e-8, weight_decay=0.05)


class Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3, padding=1)
        self.norm = nn.GroupNorm(2, 8)
        self.head = nn.Linear(8, 4)

    def forward(self, x):
        return self.head(self.norm(self.conv(x)).mean(dim=(2, 3)))


def cast_weights(model):
    """The weights autocast casts here: the convolution's and the linear layer's."""
    return [model.conv.weight, model.head.weight]


def train(model, optimizers, steps, seed=0):
    generator = torch.Generator().manual_seed(seed)
    for _ in range(steps):
        x = torch.randn(2, 3, 6, 6, generator=generator).to(memory_format=torch.channels_last)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            loss = model(x).float().square().mean()
        loss.backward()
        for optimizer in optimizers:
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)


def pair():
    torch.manual_seed(0)
    reference = Net().to(memory_format=torch.channels_last)
    ours = copy.deepcopy(reference)
    weights = cast_weights(ours)
    rest = [p for p in ours.parameters() if all(p is not w for w in weights)]
    optimizers = [MasterWeightAdamW(weights, **HYPER), torch.optim.AdamW(rest, **HYPER)]
    return reference, ours, optimizers


def test_bf16_weights_with_masters_follow_fp32_weights_under_autocast():
    reference, ours, optimizers = pair()
    assert ours.conv.weight.dtype == torch.bfloat16 and ours.conv.bias.dtype == torch.float32
    assert ours.conv.weight.stride() == reference.conv.weight.stride()  # channels-last kept
    train(reference, [torch.optim.AdamW(reference.parameters(), **HYPER)], steps=4)
    train(ours, optimizers, steps=4)
    for mine, theirs in zip(cast_weights(ours), cast_weights(reference)):
        master = optimizers[0].state[mine]["master"]
        torch.testing.assert_close(master, theirs.detach(), rtol=1e-5, atol=1e-6)
        assert torch.equal(mine, master.to(torch.bfloat16))
    torch.testing.assert_close(ours.head.bias, reference.head.bias, rtol=1e-5, atol=1e-6)


def test_state_dict_keeps_masters_in_fp32_and_resumes_exactly():
    _, ours, optimizers = pair()
    train(ours, optimizers, steps=2)
    saved = [copy.deepcopy(o.state_dict()) for o in optimizers]
    model_state = copy.deepcopy(ours.state_dict())
    train(ours, optimizers, steps=2, seed=1)

    torch.manual_seed(5)
    resumed = Net().to(memory_format=torch.channels_last)
    weights = cast_weights(resumed)
    rest = [p for p in resumed.parameters() if all(p is not w for w in weights)]
    again = [MasterWeightAdamW(weights, **HYPER), torch.optim.AdamW(rest, **HYPER)]
    resumed.load_state_dict(model_state)
    for optimizer, state in zip(again, saved):
        optimizer.load_state_dict(state)
    loaded = again[0].state[resumed.conv.weight]
    assert loaded["master"].dtype == torch.float32 and loaded["step"] == 2  # not cast to the weight's bf16
    assert loaded["master"].stride() == resumed.conv.weight.stride()
    train(resumed, again, steps=2, seed=1)
    for mine, theirs in zip(weights, cast_weights(ours)):
        torch.testing.assert_close(again[0].state[mine]["master"], optimizers[0].state[theirs]["master"],
                                   rtol=0, atol=0)


def test_only_fp32_parameters_become_masters():
    weight = nn.Parameter(torch.zeros(3, 3, dtype=torch.float16))
    with pytest.raises(ValueError, match="parameters must be float32"):
        MasterWeightAdamW([weight])
    with pytest.raises(ValueError, match="dtype must be bfloat16 or float16"):
        MasterWeightAdamW([nn.Parameter(torch.zeros(2))], dtype=torch.float32)
