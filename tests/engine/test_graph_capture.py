"""ldm/engine/graph_capture.py: forward and backward as CUDA graphs, parameter gradients handed over by the backward.

On CPU: the hand-over rules. On CUDA: a captured call's outputs and the gradients of its parameters and of its inputs
equal eager autograd's, over several replays with new inputs, for a network with two outputs (one of them not
differentiable), an input that requires grad, a frozen parameter and one whose gradient comes in another layout than its own.
"""
import pytest
import torch
from torch import nn

from ldm.engine.graph_capture import CapturedTraining, hand_over_gradients

cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA graphs need a CUDA device")


def test_hand_over_adopts_the_buffer_then_keeps_it_then_adds_to_another():
    params = [torch.zeros(3, requires_grad=True) for _ in range(3)]
    buffers = [torch.ones(3), torch.full((3,), 2.0), None]
    hand_over_gradients(params, buffers)
    assert params[0].grad.data_ptr() == buffers[0].data_ptr()  # adopted, no copy
    assert params[2].grad is None  # no gradient: untouched
    buffers[0].fill_(5.0)  # the next replay rewrites the buffer that .grad is
    hand_over_gradients(params[:1], buffers[:1])
    assert torch.equal(params[0].grad, torch.full((3,), 5.0))  # not doubled
    params[1].grad = torch.full((3,), 10.0)  # a gradient from elsewhere in the step
    hand_over_gradients(params[1:2], buffers[1:2])
    assert torch.equal(params[1].grad, torch.full((3,), 12.0))
    assert torch.equal(buffers[1], torch.full((3,), 2.0))


class TwoHeads(nn.Module):
    """(x, scale) -> (prediction, argmax index): a differentiable and an integer output; `frozen` gets no gradient;
    autograd.grad returns `mix`'s gradient contiguous, not in mix's transposed layout (fused AdamW needs the latter)."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv3d(2, 4, 3, padding=1)
        self.norm = nn.GroupNorm(2, 4)
        self.frozen = nn.Linear(4, 4)
        self.frozen.requires_grad_(False)
        self.mix = nn.Parameter(torch.randn(4, 4).t())  # stored transposed, read through .contiguous()

    def forward(self, x, scale):
        h = torch.nn.functional.silu(self.norm(self.conv(x)))
        h = (self.frozen(h.movedim(1, -1)) @ self.mix.contiguous()).movedim(-1, 1) * scale[:, None, None, None, None]
        return h, h.detach().flatten(1).argmax(1)


@cuda
def test_replays_match_eager_autograd():
    torch.manual_seed(0)
    eager, graphed = TwoHeads().cuda(), TwoHeads().cuda()
    graphed.load_state_dict(eager.state_dict())
    samples = (torch.randn(2, 2, 6, 6, 6, device="cuda", requires_grad=True), torch.rand(2, device="cuda"))
    captured = CapturedTraining(graphed, samples, list(graphed.parameters()))
    assert graphed.frozen.weight.grad is None  # the warm-up's gradients are discarded
    for step in range(3):
        x = torch.randn(2, 2, 6, 6, 6, device="cuda", requires_grad=True)
        scale = torch.rand(2, device="cuda")
        target = torch.randn(2, 4, 6, 6, 6, device="cuda")
        x_eager = x.detach().clone().requires_grad_()
        out_eager, index_eager = eager(x_eager, scale)
        (out_eager - target).pow(2).mean().backward()
        out, index = captured(x, scale)
        assert out.requires_grad and not index.requires_grad
        (out - target).pow(2).mean().backward()
        torch.testing.assert_close(out, out_eager)
        assert torch.equal(index, index_eager)
        torch.testing.assert_close(x.grad, x_eager.grad)
        for (name, p_eager), p in zip(eager.named_parameters(), graphed.parameters()):
            if p_eager.requires_grad:
                torch.testing.assert_close(p.grad, p_eager.grad, msg=f"step {step}: {name}")
                assert p.grad.stride() == p.stride(), name
            else:
                assert p.grad is None, name
        for model in (eager, graphed):
            model.zero_grad(set_to_none=step % 2 == 0)  # both ways: None, and zeroed in place
