import math

import pytest
import torch
from torch.distributions import Normal, kl_divergence

from ldm.modules.distributions import DiagonalGaussianDistribution


def _parameters(seed: int, shape=(3, 4, 5, 6)) -> torch.Tensor:
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed))


def _normal(d: DiagonalGaussianDistribution) -> Normal:
    return Normal(d.mean, d.std)


@pytest.mark.parametrize("shape", [(3, 4, 5, 6), (2, 6, 3, 4, 5)])
def test_kl_to_standard_normal_matches_closed_form_and_torch(shape):
    d = DiagonalGaussianDistribution(_parameters(0, shape))
    mean, logvar = _parameters(0, shape).chunk(2, dim=1)
    closed_form = 0.5 * (mean.pow(2) + logvar.exp() - 1.0 - logvar).flatten(1).sum(1)
    reference = kl_divergence(_normal(d), Normal(torch.zeros_like(d.mean), torch.ones_like(d.std))).flatten(1).sum(1)
    torch.testing.assert_close(d.kl(), closed_form)
    torch.testing.assert_close(d.kl(), reference)
    assert d.kl().shape == (shape[0],)


def test_kl_between_two_gaussians_matches_torch():
    p, q = DiagonalGaussianDistribution(_parameters(1)), DiagonalGaussianDistribution(_parameters(2))
    reference = kl_divergence(_normal(p), _normal(q)).flatten(1).sum(1)
    torch.testing.assert_close(p.kl(q), reference)
    torch.testing.assert_close(p.kl(p), torch.zeros(3), atol=1e-5, rtol=0)


def test_nll_matches_torch_log_prob():
    d = DiagonalGaussianDistribution(_parameters(3))
    x = _parameters(4, (3, 2, 5, 6))
    torch.testing.assert_close(d.nll(x), -_normal(d).log_prob(x).flatten(1).sum(1))
    # at the mean, the NLL is the entropy-like constant 0.5 * sum(log(2 pi) + logvar)
    torch.testing.assert_close(d.nll(d.mode()), 0.5 * (math.log(2 * math.pi) + d.logvar).flatten(1).sum(1))


def test_sample_statistics_and_reparameterised_gradient():
    parameters = torch.tensor([1.5, math.log(0.25)]).view(1, 2, 1, 1).expand(1, 2, 200, 200).clone()
    parameters.requires_grad_(True)
    d = DiagonalGaussianDistribution(parameters)
    z = d.sample(generator=torch.Generator().manual_seed(0))
    assert abs(z.mean().item() - 1.5) < 0.01 and abs(z.std().item() - 0.5) < 0.01
    z.sum().backward()
    torch.testing.assert_close(parameters.grad[:, 0], torch.ones(1, 200, 200))  # d z / d mean = 1
    assert torch.equal(d.mode(), d.mean)


def test_logvar_is_clamped_and_statistics_are_fp32():
    parameters = torch.cat([torch.zeros(1, 1, 2, 2), torch.full((1, 1, 2, 2), 100.0)], dim=1).bfloat16()
    d = DiagonalGaussianDistribution(parameters)
    assert d.mean.dtype == torch.float32 and d.logvar.max().item() == 20.0
    assert torch.isfinite(d.var).all() and torch.isfinite(d.kl()).all()


def test_odd_channel_count_is_an_error():
    with pytest.raises(ValueError, match=r"\(B, 2\*C"):
        DiagonalGaussianDistribution(torch.zeros(1, 3, 4, 4))
