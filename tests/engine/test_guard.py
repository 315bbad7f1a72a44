"""The NaN guard's gradient norm (ldm/engine/guard.py) against a float64 norm of all gradients as one vector."""
import math

import torch
from torch import nn

from ldm.engine.guard import gradient_norm, weights_finite


def parameters_with_grads(*grads: torch.Tensor) -> list[nn.Parameter]:
    params = []
    for grad in grads:
        p = nn.Parameter(torch.zeros_like(grad))
        p.grad = grad
        params.append(p)
    return params


def test_gradient_norm_is_the_norm_of_all_gradients_in_fp32():
    gen = torch.Generator().manual_seed(0)
    grads = [torch.randn(7, 3, generator=gen), torch.randn(5, generator=gen).bfloat16(),
             torch.randn(2, 2, 2, generator=gen)]
    params = parameters_with_grads(*grads) + [nn.Parameter(torch.ones(3))]  # one without a gradient
    expected = torch.cat([g.double().flatten() for g in grads]).norm()
    norm = gradient_norm(params)
    assert norm.dtype == torch.float32 and norm.ndim == 0
    torch.testing.assert_close(norm.double(), expected, rtol=1e-3, atol=0)  # the bf16 gradient's norm is bf16


def test_gradient_norm_is_not_finite_when_a_gradient_is_not():
    for bad in (math.nan, math.inf):
        grads = [torch.ones(4), torch.tensor([1.0, bad])]
        assert not torch.isfinite(gradient_norm(parameters_with_grads(*grads)))


def test_gradient_norm_without_gradients_is_zero():
    assert gradient_norm([nn.Parameter(torch.ones(2))]) == 0


def test_weights_finite_matches_an_elementwise_check_and_does_not_overflow():
    big = torch.full((3, 3), 3e38)  # finite; the squares of a 2-norm would overflow
    for tensors, expected in [([big, torch.ones(2)], True), ([big, torch.tensor([1.0, float("nan")])], False),
                              ([torch.tensor([float("-inf")]), big], False), ([], True)]:
        params = [torch.nn.Parameter(t) for t in tensors]
        assert bool(weights_finite(params)) is expected
        assert expected is all(bool(torch.isfinite(p).all()) for p in params)
