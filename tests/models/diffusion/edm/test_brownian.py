import pytest
import torch

from ldm.models.diffusion.edm import k_samplers
from ldm.models.diffusion.edm.brownian import BrownianTreeNoiseSampler
from tests.models.diffusion.edm.reference import k_sampling

LEVELS = [(20.0, 7.5), (7.5, 1.2), (1.2, 0.03), (7.5, 3.0), (0.03, 1.2)]


@pytest.mark.parametrize("seed", [11, [11, 12, 13]])
def test_noise_equals_k_diffusion_for_the_same_seed(seed):
    x = torch.zeros(3, 2, 4, 4, dtype=torch.float64)
    ours = BrownianTreeNoiseSampler(x, 0.03, 20.0, seed=seed)
    reference = k_sampling().BrownianTreeNoiseSampler(x, 0.03, 20.0, seed=seed)
    for sigma, sigma_next in LEVELS:
        noise = ours(torch.tensor(sigma, dtype=torch.float64), torch.tensor(sigma_next, dtype=torch.float64))
        assert noise.shape == x.shape and noise.dtype == torch.float64
        torch.testing.assert_close(noise, reference(torch.tensor(sigma, dtype=torch.float64),
                                                    torch.tensor(sigma_next, dtype=torch.float64)), rtol=0, atol=1e-12)


def test_draws_are_increments_of_one_path():
    """noise(a, c) sqrt|c - a| = noise(a, b) sqrt|b - a| + noise(b, c) sqrt|c - b|, in any query order; reversing
    an interval negates its noise; each draw is N(0, 1)."""
    x = torch.zeros(4000, dtype=torch.float64)
    noise = BrownianTreeNoiseSampler(x, 0.01, 10.0, seed=3)
    a, b, c = (torch.tensor(v, dtype=torch.float64) for v in (10.0, 2.0, 0.01))
    whole = noise(a, c) * (a - c).sqrt()
    parts = noise(a, b) * (a - b).sqrt() + noise(b, c) * (b - c).sqrt()
    torch.testing.assert_close(whole, parts, rtol=0, atol=1e-9)
    torch.testing.assert_close(noise(c, b), -noise(b, c), rtol=0, atol=1e-12)
    draw = noise(a, b)
    assert draw.mean().item() == pytest.approx(0.0, abs=0.06) and draw.std().item() == pytest.approx(1.0, abs=0.04)
    assert torch.corrcoef(torch.stack([draw, noise(b, c)]))[0, 1].abs() < 0.06  # disjoint intervals: independent


def test_per_item_seeds_make_an_item_independent_of_its_batch():
    x = torch.zeros(3, 1, 4, 4)
    batch = BrownianTreeNoiseSampler(x, 0.1, 5.0, seed=[7, 8, 9])(torch.tensor(5.0), torch.tensor(1.0))
    alone = BrownianTreeNoiseSampler(x[1:2], 0.1, 5.0, seed=[8])(torch.tensor(5.0), torch.tensor(1.0))
    torch.testing.assert_close(batch[1:2], alone)
    assert not torch.allclose(batch[0], batch[1])
    with pytest.raises(ValueError, match="2 seeds for a batch of 3"):
        BrownianTreeNoiseSampler(x, 0.1, 5.0, seed=[1, 2])
    with pytest.raises(ValueError, match="needs sigma_min < sigma_max"):
        BrownianTreeNoiseSampler(x, 5.0, 5.0)


@pytest.mark.filterwarnings("ignore:Should have tb<=t1")  # k-diffusion queries e^(ln sigma_max), a rounding above
@pytest.mark.parametrize("name", ["dpmpp_sde", "dpmpp_2m_sde", "dpmpp_3m_sde"])
def test_sde_solvers_default_to_a_tree_seeded_from_the_global_generator(name):
    """Without a noise_sampler the SDE solvers draw from a Brownian tree whose seed comes from torch's global
    generator: the same global seed gives the same sample, another seed another one, and k-diffusion's default
    (the same seed draw) gives the same sample too. One step (a single positive level) needs no noise."""
    sigmas = torch.tensor([10.0, 3.0, 0.5, 0.0], dtype=torch.float64)
    x = torch.randn(2, 1, 4, 4, generator=torch.Generator().manual_seed(0), dtype=torch.float64) * 10.0
    denoiser = lambda x, sigma: torch.tanh(x / (1 + sigma.view(-1, 1, 1, 1)))  # noqa: E731
    solver, reference = getattr(k_samplers, f"sample_{name}"), getattr(k_sampling(), f"sample_{name}")
    runs = []
    for function, seed in ((solver, 4), (solver, 4), (solver, 5), (reference, 4)):
        torch.manual_seed(seed)
        runs.append(function(denoiser, x, sigmas, disable=True))
    torch.testing.assert_close(runs[0], runs[1], rtol=0, atol=0)
    assert not torch.allclose(runs[0], runs[2])
    torch.testing.assert_close(runs[0], runs[3], rtol=0, atol=1e-9)
    one_step = solver(denoiser, x, torch.tensor([10.0, 0.0], dtype=torch.float64), disable=True)
    torch.testing.assert_close(one_step, denoiser(x, torch.full((2,), 10.0, dtype=torch.float64)))


def test_sde_solver_options_are_checked_and_eta_zero_2m_is_dpmpp_2m():
    sigmas = torch.tensor([10.0, 3.0, 0.5, 0.1, 0.0], dtype=torch.float64)
    x = torch.randn(2, 1, 4, 4, generator=torch.Generator().manual_seed(1), dtype=torch.float64) * 10.0
    denoiser = lambda x, sigma: torch.tanh(x / (1 + sigma.view(-1, 1, 1, 1)))  # noqa: E731
    torch.testing.assert_close(k_samplers.sample_dpmpp_2m_sde(denoiser, x, sigmas, disable=True, eta=0.0),
                               k_samplers.sample_dpmpp_2m(denoiser, x, sigmas, disable=True), rtol=0, atol=1e-12)
    with pytest.raises(ValueError, match="solver_type must be 'midpoint' or 'heun', got 'euler'"):
        k_samplers.sample_dpmpp_2m_sde(denoiser, x, sigmas, disable=True, solver_type="euler")
    with pytest.raises(ValueError, match=r"r \(where the intermediate level lies, in t\) must be in \(0, 1\]"):
        k_samplers.sample_dpmpp_sde(denoiser, x, sigmas, disable=True, r=0.0)
