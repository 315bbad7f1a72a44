"""WeightCopies: bf16 working copies written by the optimizer train as autocast's casts of fp32 weights do.

On CPU (bf16 autocast, 2D layers: this CPU's bf16 conv3d weight gradients are unsound, ldm/engine/cpu_bf16.py) the
copies' update runs kernels/master_adamw.py's reference, which orders its fp32 operations as torch's single-tensor
AdamW does, so the fp32 parameters follow plain AdamW's. The graphed path is exercised with the capture replaced by
an eager call of the same function (as tests/engine/test_cuda_graph.py does); tests/engine/test_cuda_graph.py runs
the real capture on CUDA.
"""
import copy

import pytest
import torch
from torch import nn

from ldm.engine import cuda_graph
from ldm.engine.cuda_graph import GraphedTrainingForward, graph_training_forward
from ldm.engine.guard import gradient_norm
from ldm.engine.weight_cast import parameters_replaced
from ldm.engine.weight_copies import WeightCopies, copies_from, unsupported
from ldm.modules.diffusionmodules.openaimodel import UNetModel

HYPER = dict(lr=1e-2, betas=(0.9, 0.99), eps=1e-8, weight_decay=0.05)


class Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3, padding=1)
        self.norm = nn.GroupNorm(2, 8)
        self.head = nn.Linear(8, 4)

    def forward(self, x):
        return self.head(self.norm(self.conv(x)).mean(dim=(2, 3)))


COPIED = ("conv.weight", "head.weight")  # the weights autocast casts and nothing else reads


def batches(steps, seed=0):
    generator = torch.Generator().manual_seed(seed)
    return [torch.randn(2, 3, 6, 6, generator=generator).to(memory_format=torch.channels_last) for _ in range(steps)]


def train(model, optimizer, xs, copies=None):
    """AdamW steps under bf16 autocast; with `copies` (name -> copy) the forward reads those in the weights' place."""
    for x in xs:
        with torch.autocast("cpu", dtype=torch.bfloat16), parameters_replaced(model, copies or {}):
            loss = model(x).float().square().mean()
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)


def with_copies(model, **hyper):
    optimizer = torch.optim.AdamW(model.parameters(), **(hyper or HYPER))
    owner = WeightCopies(optimizer)
    named = dict(model.named_parameters())
    copies = dict(zip(COPIED, owner.attach([named[n] for n in COPIED])))
    return optimizer, owner, copies


def fresh():
    torch.manual_seed(0)
    return Net().to(memory_format=torch.channels_last)


def test_copies_train_like_autocasts_casts_of_the_fp32_weights():
    reference, ours = fresh(), fresh()
    train(reference, torch.optim.AdamW(reference.parameters(), **HYPER), batches(4))
    optimizer, owner, copies = with_copies(ours)
    assert copies["conv.weight"].dtype == torch.bfloat16
    assert copies["conv.weight"].stride() == ours.conv.weight.stride()  # channels-last kept
    train(ours, optimizer, batches(4), copies)
    for (name, mine), theirs in zip(ours.named_parameters(), reference.parameters()):
        assert mine.dtype == torch.float32, name
        torch.testing.assert_close(mine, theirs, rtol=1e-6, atol=1e-7, msg=name)
    for name, copied in copies.items():
        assert torch.equal(copied, dict(ours.named_parameters())[name].detach().to(torch.bfloat16)), name


def test_the_copies_take_their_parameters_place_in_the_optimizer():
    model = fresh()
    optimizer, owner, copies = with_copies(model)
    held = [p for group in optimizer.param_groups for p in group["params"]]
    assert [p.dtype for p in held] == [torch.bfloat16, torch.float32, torch.float32, torch.float32,
                                       torch.bfloat16, torch.float32]
    assert held[0] is copies["conv.weight"] and held[4] is copies["head.weight"]
    assert owner.attach([model.conv.weight])[0] is copies["conv.weight"]  # made once
    with torch.autocast("cpu", dtype=torch.bfloat16), parameters_replaced(model, copies):
        model(batches(1)[0]).float().sum().backward()
    assert model.conv.weight.grad is None and copies["conv.weight"].grad.dtype == torch.bfloat16
    assert torch.isfinite(gradient_norm(held)) and gradient_norm(held) > 0  # the loop's norm sees the copies
    optimizer.step()
    state = optimizer.state[copies["conv.weight"]]
    assert state["exp_avg"].dtype == torch.float32 and state["exp_avg"].stride() == model.conv.weight.stride()
    assert state["step"].device.type == "cpu" and int(state["step"]) == 1
    optimizer.zero_grad(set_to_none=True)
    assert all(p.grad is None for p in held)


def test_a_checkpoint_resumes_with_or_without_copies():
    model = fresh()
    optimizer, _, copies = with_copies(model)
    train(model, optimizer, batches(2), copies)
    saved, model_state = copy.deepcopy(optimizer.state_dict()), copy.deepcopy(model.state_dict())
    train(model, optimizer, batches(2, seed=1), copies)

    plain = fresh()  # without copies: torch's AdamW takes the state as its own
    plain.load_state_dict(model_state)
    plain_optimizer = torch.optim.AdamW(plain.parameters(), **HYPER)
    plain_optimizer.load_state_dict(copy.deepcopy(saved))  # torch's AdamW counts steps in the loaded tensor
    train(plain, plain_optimizer, batches(2, seed=1))

    again = fresh()  # copies made before the load (the loop makes them later; see the next test)
    again.load_state_dict(model_state)
    again_optimizer, _, again_copies = with_copies(again)
    again_optimizer.load_state_dict(saved)
    loaded = again_optimizer.state[again_copies["conv.weight"]]
    assert loaded["exp_avg"].dtype == torch.float32 and int(loaded["step"]) == 2  # not cast to the copy's bf16
    train(again, again_optimizer, batches(2, seed=1), again_copies)
    for (name, p), p_plain, p_again in zip(model.named_parameters(), plain.parameters(), again.parameters()):
        assert torch.equal(p_again, p), name
        torch.testing.assert_close(p_plain, p, rtol=1e-6, atol=1e-7, msg=name)


def test_copies_made_after_a_load_keep_the_loaded_state():
    model = fresh()
    optimizer = torch.optim.AdamW(model.parameters(), **HYPER)
    train(model, optimizer, batches(2))
    resumed = torch.optim.AdamW(model.parameters(), **HYPER)
    resumed.load_state_dict(copy.deepcopy(optimizer.state_dict()))
    copied = WeightCopies(resumed).attach([model.conv.weight])[0]
    state = resumed.state[copied]
    assert model.conv.weight not in resumed.state and int(state["step"]) == 2
    assert torch.equal(state["exp_avg"], optimizer.state[model.conv.weight]["exp_avg"])


def test_moments_of_another_layout_take_the_parameters_strides():
    """A checkpoint written without channels-last, resumed with it: the moved moments follow the weight's strides,
    which the one-launch update needs."""
    model = fresh()  # channels-last
    optimizer = torch.optim.AdamW(model.parameters(), **HYPER)
    optimizer.state[model.conv.weight] = {"step": torch.tensor(3.0), "exp_avg": torch.ones(8, 3, 3, 3),
                                          "exp_avg_sq": torch.ones(8, 3, 3, 3)}
    copied = WeightCopies(optimizer).attach([model.conv.weight])[0]
    state = optimizer.state[copied]
    assert state["exp_avg"].stride() == model.conv.weight.stride() != torch.ones(8, 3, 3, 3).stride()
    assert torch.equal(state["exp_avg_sq"], torch.ones(8, 3, 3, 3)) and int(state["step"]) == 3


def test_a_failing_step_leaves_the_param_groups_whole():
    model = fresh()
    optimizer, owner, copies = with_copies(model)

    def fail():
        raise RuntimeError("boom")
    owner._own_step = fail
    with pytest.raises(RuntimeError, match="boom"):
        optimizer.step()
    assert [p for group in optimizer.param_groups for p in group["params"]][0] is copies["conv.weight"]


@pytest.mark.parametrize("make, message", [
    (lambda ps: torch.optim.SGD(ps, lr=0.1), "SGD is not AdamW or Adam"),
    (lambda ps: torch.optim.Adam(ps, weight_decay=0.1), "L2 weight decay 0.1"),
    (lambda ps: torch.optim.AdamW(ps, amsgrad=True), "amsgrad=True"),
])
def test_optimizers_whose_update_differs_are_refused(make, message):
    optimizer = make(fresh().parameters())
    assert message in unsupported(optimizer)
    with pytest.raises(ValueError, match=message):
        WeightCopies(optimizer)


def test_adam_without_weight_decay_is_accepted_and_foreign_parameters_are_not():
    model = fresh()
    owner = WeightCopies(torch.optim.Adam(model.head.parameters()))
    with pytest.raises(ValueError, match=r"shape \(8, 3, 3, 3\) is not one of this Adam's"):
        owner.attach([model.conv.weight])
    with pytest.raises(ValueError, match="bf16 or fp16"):
        owner.attach([model.head.weight], torch.float32)
    assert copies_from([owner])([model.head.weight, model.conv.weight], torch.bfloat16)[1] is None


def tiny_unet() -> UNetModel:
    torch.manual_seed(0)
    return UNetModel(image_size=8, dims=2, in_channels=2, model_channels=32, out_channels=2, num_res_blocks=1,
                     attention_resolutions=[2], channel_mult=[1, 2], num_head_channels=16, use_scale_shift_norm=True)


def test_graphed_forward_reads_the_copies_and_trains_like_autocast(monkeypatch, capsys):
    """GraphedTrainingForward with weight copies, the capture stood in for by the captured function itself (CPU):
    the probe finds the cast weights, the call reads their copies, a batch of another shape (eager) does too, and the
    UNet's parameters follow plain AdamW under autocast."""
    monkeypatch.setattr(cuda_graph, "CapturedTraining", lambda module, samples, params, warmup_iters: module)
    monkeypatch.setattr(torch.cuda, "empty_cache", lambda: None)
    monkeypatch.setattr(GraphedTrainingForward, "_graphable",
                        lambda self, tensors: self.module.training and torch.is_grad_enabled())
    monkeypatch.setattr(cuda_graph, "_autocast_state",
                        lambda: (torch.is_autocast_enabled("cpu"), torch.get_autocast_dtype("cpu")))
    reference, ours = tiny_unet(), tiny_unet()
    optimizers = [torch.optim.AdamW(m.parameters(), **HYPER) for m in (reference, ours)]
    graphed = graph_training_forward(ours, "unet", weight_copies=copies_from([WeightCopies(optimizers[1])]))
    generator = torch.Generator().manual_seed(1)
    for batch in (2, 2, 1, 2):  # the batch of 1 runs eagerly
        x, t = torch.randn(batch, 2, 8, 8, generator=generator), torch.randint(0, 1000, (batch,), generator=generator)
        for model, optimizer in zip((reference, ours), optimizers):
            with torch.autocast("cpu", dtype=torch.bfloat16):
                loss = model(x, t).float().square().mean()
            loss.backward()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
    assert (graphed.captures, graphed.graph_calls, graphed.eager_calls) == (1, 3, 1)
    assert len(graphed.weights_copied) > 10 and not graphed.weights_cast
    assert not any("norm" in name for name in graphed.weights_copied)
    assert "weights read from bfloat16 copies the optimizer writes" in capsys.readouterr().out
    for (name, mine), theirs in zip(ours.named_parameters(), reference.parameters()):
        assert mine.dtype == torch.float32, name
        torch.testing.assert_close(mine, theirs, rtol=1e-5, atol=1e-6, msg=name)
    ours.eval()
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):  # eval reads the fp32 parameters
        torch.testing.assert_close(ours(x, t), reference.eval()(x, t), rtol=1e-2, atol=1e-2)


def test_trainer_gives_copies_to_the_optimizers_that_can_keep_them(capsys):
    """Trainer._weight_copies (trainer.bf16_weight_copies): Fabric's optimizer wrappers are looked through, an AdamW
    keeps copies whose update then runs behind Fabric's step, an SGD keeps the casts and is named."""
    from ldm.engine.config import trainer_config_from
    from ldm.engine.loop import Trainer

    trainer = Trainer(trainer_config_from({"accelerator": "cpu", "max_steps": 1}))
    model = fresh()
    adamw = torch.optim.AdamW([model.conv.weight, model.head.weight], **HYPER)
    sgd = torch.optim.SGD([model.head.bias], lr=0.1)
    module, adamw_wrapped, sgd_wrapped = trainer.fabric.setup(model, adamw, sgd)
    attach = trainer._weight_copies([adamw_wrapped, sgd_wrapped])
    assert "optimizer 1's weights keep autocast's casts: SGD is not AdamW or Adam" in capsys.readouterr().out
    conv_copy, bias_copy = attach([model.conv.weight, model.head.bias], torch.bfloat16)
    assert bias_copy is None and adamw.param_groups[0]["params"][0] is conv_copy
    before = model.conv.weight.detach().clone()
    with torch.autocast("cpu", dtype=torch.bfloat16), parameters_replaced(model, {"conv.weight": conv_copy}):
        model(batches(1)[0]).float().square().mean().backward()
    adamw_wrapped.step()  # Fabric's step -> the strategy -> the optimizer's step, which the copies wrap
    assert not torch.equal(model.conv.weight, before)
    assert torch.equal(conv_copy, model.conv.weight.detach().to(torch.bfloat16))
