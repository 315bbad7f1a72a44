import pytest
import torch
from torch import nn

from ldm.modules.ema import LitEma


def _model(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Linear(2, 3), nn.GroupNorm(1, 3), nn.Linear(3, 1))
    model[1].requires_grad_(False)
    return model


def test_buffers_are_named_like_litema():
    ema = LitEma(_model())
    assert set(ema.state_dict()) == {"decay", "num_updates", "0weight", "0bias", "2weight", "2bias"}


def test_updates_follow_the_warm_up_formula():
    model = _model()
    ema = LitEma(model, decay=0.9)
    expected = {name: p.detach().clone() for name, p in model.named_parameters() if p.requires_grad}
    for n in range(1, 40):
        with torch.no_grad():
            for p in model.parameters():
                p.add_(torch.randn_like(p))
        decay = min(0.9, (1 + n) / (10 + n))
        assert ema.current_decay() == pytest.approx(decay)
        ema(model)
        for name, p in model.named_parameters():
            if name in expected:
                expected[name] = decay * expected[name] + (1 - decay) * p.detach()
    assert int(ema.num_updates) == 39
    for name, value in expected.items():
        torch.testing.assert_close(getattr(ema, name.replace(".", "")), value)


def test_without_num_updates_the_decay_is_fixed():
    model = _model()
    ema = LitEma(model, decay=0.5, use_num_updates=False)
    start = model[0].weight.detach().clone()
    with torch.no_grad():
        model[0].weight.add_(1.0)
    ema(model)
    torch.testing.assert_close(ema.get_buffer("0weight"), start + 0.5)
    assert int(ema.num_updates) == -1


def test_swap_in_and_out_restores_the_weights_even_on_error():
    model = _model()
    ema = LitEma(model, decay=0.5, use_num_updates=False)
    with torch.no_grad():
        for p in model.parameters():
            p.mul_(3.0)
    ema(model)
    trained = {k: v.clone() for k, v in model.state_dict().items()}
    with ema.average_parameters(model):
        torch.testing.assert_close(model[0].weight, ema.get_buffer("0weight"))
        torch.testing.assert_close(model[2].bias, ema.get_buffer("2bias"))
        assert not torch.equal(model[0].weight, trained["0.weight"])
    for key, value in model.state_dict().items():
        torch.testing.assert_close(value, trained[key], rtol=0, atol=0)
    with pytest.raises(ZeroDivisionError):
        with ema.average_parameters(model):
            1 / 0
    torch.testing.assert_close(model[0].weight, trained["0.weight"], rtol=0, atol=0)
    with ema.average_parameters(model):
        with pytest.raises(RuntimeError, match="already stored"):
            ema.store(model)


def test_state_dict_round_trip_and_layout_check():
    model = _model()
    ema = LitEma(model)
    ema(model)
    other = LitEma(_model(seed=1))
    other.load_state_dict(ema.state_dict())
    torch.testing.assert_close(other.get_buffer("0weight"), ema.get_buffer("0weight"))
    assert int(other.num_updates) == 1
    with pytest.raises(KeyError, match="no parameters 0.bias, 0.weight"):
        ema.copy_to(nn.Sequential(nn.Identity(), nn.Identity(), nn.Linear(3, 1)))


def test_counters_follow_a_load_through_the_parent_module():
    """The host copies of decay and num_updates that `current_decay` reads are refreshed by a load_state_dict of
    a module holding the EMA (a checkpoint restore), so the warm-up resumes from the loaded count."""
    trained = nn.Module()
    trained.net = _model()
    trained.model_ema = LitEma(trained.net, decay=0.99)
    for _ in range(7):
        trained.model_ema(trained.net)
    resumed = nn.Module()
    resumed.net = _model(seed=1)
    resumed.model_ema = LitEma(resumed.net, decay=0.5)
    resumed.load_state_dict(trained.state_dict())
    assert resumed.model_ema.current_decay() == pytest.approx(min(0.99, 9 / 18))  # n = 8
    resumed.model_ema(resumed.net)
    assert int(resumed.model_ema.num_updates) == 8
    assert resumed.model_ema.current_decay() == pytest.approx(min(0.99, 10 / 19))


def test_a_parameter_of_another_dtype_is_averaged_in_the_averages_dtype():
    model = _model()
    ema = LitEma(model, decay=0.75, use_num_updates=False)
    model[2].double()  # the averages stay fp32
    with torch.no_grad():
        for p in model.parameters():
            p.add_(1.0)
    before = {k: v.clone() for k, v in ema.state_dict().items()}
    ema(model)
    for name, p in model.named_parameters():
        if p.requires_grad:
            key = name.replace(".", "")
            expected = before[key] - 0.25 * (before[key] - p.detach().float())
            assert ema.get_buffer(key).dtype == torch.float32
            torch.testing.assert_close(ema.get_buffer(key), expected)
    ema.copy_to(model)
    torch.testing.assert_close(model[2].weight, ema.get_buffer("2weight").double())


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_an_update_does_not_synchronise_with_the_gpu():
    model = _model().cuda()
    ema = LitEma(model)
    ema(model)
    torch.cuda.set_sync_debug_mode("error")
    try:
        ema(model)
    finally:
        torch.cuda.set_sync_debug_mode("default")
    assert int(ema.num_updates) == 2
