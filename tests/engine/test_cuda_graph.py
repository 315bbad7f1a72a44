"""trainer.cuda_graph: CUDA-graph replay of a network's training forward and backward (ldm/engine/cuda_graph.py).

On CPU: the configuration rules, and that the installed forward runs eagerly there. On CUDA: graphed training equals
eager training (parameters after several optimizer steps, fp32 and bf16 autocast), other input signatures and eval
mode fall back to eager, and the loop captures what the model names.
"""
import pytest
import torch
from torch import nn

from ldm.engine.config import trainer_config_from
from ldm.engine import cuda_graph
from ldm.engine.cuda_graph import GraphedTrainingForward, graph_training_forward
from ldm.engine.weight_copies import WeightCopies, copies_from
from ldm.modules.diffusionmodules.openaimodel import UNetModel
from ldm.util import ConfigError
from tests.engine.helpers import load_last, only_run_dir, run_cli

cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA graphs need a CUDA device")


def test_accumulation_is_refused_with_cuda_graph():
    with pytest.raises(ConfigError, match="cuda_graph.*accumulate_grad_batches"):
        trainer_config_from({"max_steps": 1, "cuda_graph": True, "accumulate_grad_batches": 2})


@pytest.mark.parametrize("values", [{"cuda_graph": False, "precision": "bf16-mixed"},
                                    {"cuda_graph": True, "precision": "16-mixed"}])
def test_bf16_weight_copies_need_cuda_graph_and_bf16_autocast(values):
    with pytest.raises(ConfigError, match="bf16_weight_copies: needs cuda_graph: true and precision: bf16-mixed"):
        trainer_config_from({"max_steps": 1, "bf16_weight_copies": True, **values})


def test_a_model_without_graph_modules_is_named(tmp_path, capsys):
    assert run_cli(tmp_path, "-t", "--no_test", "trainer.max_steps=1", "trainer.cuda_graph=true") != 0
    assert "ToyRegressor has no cuda_graph_modules()" in capsys.readouterr().err


def test_cpu_run_is_eager_and_says_so(tmp_path, capsys):
    assert run_cli(tmp_path, "-t", "--no_test", "trainer.max_steps=2", "trainer.cuda_graph=true",
                   "model.target=tests.engine.toy.GraphableToy") == 0
    assert "trainer.cuda_graph: no effect on cpu" in capsys.readouterr().out


def test_installed_forward_is_eager_on_cpu_and_refuses_a_second_install():
    layer = nn.Linear(3, 2)
    graphed = graph_training_forward(layer, "layer")
    assert layer.forward is graphed and isinstance(graphed, GraphedTrainingForward)
    x = torch.randn(4, 3)
    assert torch.equal(layer(x), nn.functional.linear(x, layer.weight, layer.bias))
    assert (graphed.eager_calls, graphed.graph_calls, graphed.captures) == (1, 0, 0)
    assert "forward" not in str(list(layer.state_dict()))
    with pytest.raises(RuntimeError, match="already graphed"):
        graph_training_forward(layer, "layer")


def test_capture_and_replay_rebuild_the_call(monkeypatch, capsys):
    """The capture path on CPU, with the graph capture replaced by "call the positional module": arguments and
    keyword arguments (a None among them) reach the network as they were given, one capture per signature, other
    signatures eager and announced once."""
    captured = []

    def fake_capture(module, samples, params, warmup_iters):
        captured.append([tuple(t.shape) for t in samples])
        return module

    monkeypatch.setattr(cuda_graph, "CapturedTraining", fake_capture)
    monkeypatch.setattr(torch.cuda, "empty_cache", lambda: None)
    monkeypatch.setattr(GraphedTrainingForward, "_graphable",
                        lambda self, tensors: self.module.training and torch.is_grad_enabled())
    torch.manual_seed(0)
    model = tiny_unet(dims=2, context_dim=6)
    x, t, context = torch.randn(2, 2, 8, 8), torch.tensor([3, 700]), torch.randn(2, 5, 6)
    expected = model(x, t, context=context)
    graphed = graph_training_forward(model, "unet")
    torch.testing.assert_close(model(x, t, context=context), expected)
    torch.testing.assert_close(model(x, t, context), expected)  # positional: another signature, run eagerly
    torch.testing.assert_close(model(x, t, context=context), expected)
    model(x[:1], t[:1], context=context[:1])
    model(x[:1], t[:1], context=context[:1])
    assert captured == [[(2, 2, 8, 8), (2,), (2, 5, 6)]]
    assert (graphed.captures, graphed.graph_calls, graphed.eager_calls) == (1, 2, 3)
    notices = [line for line in capsys.readouterr().out.splitlines() if "running these eagerly" in line]
    assert len(notices) == 2 and "(1, 2, 8, 8) float32" in notices[1]


def tiny_unet(dims: int = 3, context_dim: int | None = None) -> UNetModel:
    return UNetModel(image_size=8, dims=dims, in_channels=2, model_channels=32, out_channels=2, num_res_blocks=1,
                     attention_resolutions=[2], channel_mult=[1, 2], num_head_channels=16, use_scale_shift_norm=True,
                     use_spatial_transformer=context_dim is not None, context_dim=context_dim)


def train_steps(model: nn.Module, batches: list, autocast: bool, optimizer=None) -> list[float]:
    """AdamW steps of an eps-MSE-like loss; returns the losses."""
    optimizer = optimizer or torch.optim.AdamW(model.parameters(), lr=1e-3)
    losses = []
    for x, t, context, target in batches:
        with torch.autocast("cuda", dtype=torch.bfloat16, enabled=autocast):
            out = model(x, t, context=context)
        loss = (out.float() - target).pow(2).mean()
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        losses.append(loss.item())
    return losses


def make_batches(n: int, batch: int, size: int, context_dim: int | None, seed: int = 0) -> list:
    gen = torch.Generator(device="cuda").manual_seed(seed)
    batches = []
    for _ in range(n):
        x = torch.randn(batch, 2, size, size, size, device="cuda", generator=gen)
        t = torch.randint(0, 1000, (batch,), device="cuda", generator=gen)
        context = None if context_dim is None else torch.randn(batch, 5, context_dim, device="cuda", generator=gen)
        batches.append((x, t, context, torch.randn_like(x)))
    return batches


@cuda
@pytest.mark.parametrize("autocast,context_dim", [(False, None), (True, None), (False, 24)])
def test_graphed_training_equals_eager(autocast, context_dim):
    torch.backends.cudnn.deterministic, torch.backends.cudnn.benchmark = True, False
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    torch.manual_seed(0)
    eager = tiny_unet(context_dim=context_dim).cuda()
    graphed_model = tiny_unet(context_dim=context_dim).cuda()
    graphed_model.load_state_dict(eager.state_dict())
    graphed = graph_training_forward(graphed_model, "unet")
    batches = make_batches(4, 2, 8, context_dim)
    eager_losses = train_steps(eager, batches, autocast)
    graphed_losses = train_steps(graphed_model, batches, autocast)
    assert (graphed.captures, graphed.graph_calls, graphed.eager_calls) == (1, 4, 0)
    tol = dict(rtol=2e-2, atol=2e-3) if autocast else dict(rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(torch.tensor(graphed_losses), torch.tensor(eager_losses), **tol)
    for (name, p_eager), p_graphed in zip(eager.named_parameters(), graphed_model.parameters()):
        torch.testing.assert_close(p_graphed, p_eager, **tol, msg=name)


@cuda
def test_weights_cast_once_train_bit_for_bit_like_autocasts_own_casts():
    torch.backends.cudnn.deterministic, torch.backends.cudnn.benchmark = True, False
    torch.manual_seed(0)
    once, per_layer = tiny_unet().cuda(), tiny_unet().cuda()
    per_layer.load_state_dict(once.state_dict())
    graphed = graph_training_forward(once, "unet")
    graph_training_forward(per_layer, "unet", cast_weights_once=False)
    batches = make_batches(3, 2, 8, None)
    assert train_steps(once, batches, autocast=True) == train_steps(per_layer, batches, autocast=True)
    assert len(graphed.weights_cast) > 20 and not any("norm" in name for name in graphed.weights_cast)
    for (name, p_once), p_per_layer in zip(once.named_parameters(), per_layer.parameters()):
        assert torch.equal(p_once, p_per_layer), name


@cuda
def test_bf16_weight_copies_train_like_weights_cast_once():
    """The graphs read bf16 copies that the optimizer writes (kernels/master_adamw.py) instead of casting. After one
    step (the same bf16 gradients on both sides) the fp32 parameters follow fused AdamW's within the order of fp32
    operations; later, a last-bit difference in a master can round its copy the other way, and AdamW moves an element
    whose gradient is near zero by up to lr either way, so the losses agree and each parameter stays within a few lr.
    Each copy is its parameter rounded, after every step."""
    torch.backends.cudnn.deterministic, torch.backends.cudnn.benchmark = True, False
    torch.manual_seed(0)
    lr = 1e-3
    cast, copied = tiny_unet().cuda(), tiny_unet().cuda()
    copied.load_state_dict(cast.state_dict())
    cast_optimizer = torch.optim.AdamW(cast.parameters(), lr=lr, fused=True)
    optimizer = torch.optim.AdamW(copied.parameters(), lr=lr, fused=True)
    owner = WeightCopies(optimizer)
    graph_training_forward(cast, "unet")
    graphed = graph_training_forward(copied, "unet", weight_copies=copies_from([owner]))
    batches = make_batches(4, 2, 8, None)
    assert train_steps(copied, batches[:1], True, optimizer) == train_steps(cast, batches[:1], True, cast_optimizer)
    assert len(graphed.weights_copied) > 20 and not graphed.weights_cast

    def compare(**tolerance):
        for (name, p_cast), p_copied in zip(cast.named_parameters(), copied.parameters()):
            torch.testing.assert_close(p_copied, p_cast, **tolerance, msg=lambda m: f"{name}: {m}")
            if name in graphed.weights_copied:
                assert torch.equal(owner.copy_of[p_copied], p_copied.detach().to(torch.bfloat16)), name

    compare(rtol=1e-5, atol=1e-7)
    later = len(batches) - 1
    losses = train_steps(copied, batches[1:], True, optimizer)
    torch.testing.assert_close(losses, train_steps(cast, batches[1:], True, cast_optimizer), rtol=1e-2, atol=1e-4)
    compare(rtol=0, atol=2 * lr * later)


@cuda
def test_other_signatures_and_eval_run_eagerly():
    torch.manual_seed(0)
    model = tiny_unet().cuda()
    graphed = graph_training_forward(model, "unet")
    full, small = make_batches(1, 2, 8, None)[0], make_batches(1, 1, 8, None, seed=1)[0]
    train_steps(model, [full, small, full], autocast=False)
    assert (graphed.captures, graphed.graph_calls, graphed.eager_calls) == (1, 2, 1)
    model.eval()
    with torch.no_grad():
        out = model(full[0], full[1])
    reference = UNetModel.forward(model, full[0], full[1])
    torch.testing.assert_close(out, reference)
    assert graphed.graph_calls == 2


@cuda
def test_loop_captures_the_named_network_and_trains_like_eager(tmp_path):
    common = ("-t", "--no_test", "trainer.max_steps=12", "trainer.accelerator=cuda",
              "model.target=tests.engine.toy.GraphableToy")
    assert run_cli(tmp_path / "eager", *common) == 0
    assert run_cli(tmp_path / "graph", *common, "trainer.cuda_graph=true") == 0
    eager, graph = load_last(only_run_dir(tmp_path / "eager")), load_last(only_run_dir(tmp_path / "graph"))
    for key in eager["state_dict"]:
        torch.testing.assert_close(graph["state_dict"][key], eager["state_dict"][key], rtol=1e-5, atol=1e-6)


@cuda
def test_loop_with_bf16_weight_copies_trains_like_the_casts_and_resumes(tmp_path):
    common = ("-t", "--no_test", "trainer.accelerator=cuda", "trainer.precision=bf16-mixed",
              "trainer.cuda_graph=true", "model.target=tests.engine.toy.GraphableToy")
    assert run_cli(tmp_path / "cast", *common, "trainer.max_steps=12") == 0
    assert run_cli(tmp_path / "copies", *common, "trainer.max_steps=6", "trainer.bf16_weight_copies=true") == 0
    from ldm.cli import main
    assert main("test", ["-r", str(only_run_dir(tmp_path / "copies")), "-t", "--no_test", "trainer.max_steps=12",
                         "trainer.bf16_weight_copies=true"]) == 0
    cast, copies = load_last(only_run_dir(tmp_path / "cast")), load_last(only_run_dir(tmp_path / "copies"))
    for key in cast["state_dict"]:
        assert copies["state_dict"][key].dtype == torch.float32, key
        torch.testing.assert_close(copies["state_dict"][key], cast["state_dict"][key], rtol=1e-4, atol=1e-6)
