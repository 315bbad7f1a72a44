"""Inpainting in the samplers (`Inpainting(mask, x0)`) and per-item noise generators, with analytic denoisers."""
import pytest
import torch

from ldm.models.diffusion.gaussian_diffusion import GaussianDiffusion
from ldm.models.diffusion.sampling import Inpainting, get_sampler, timestep_schedule
from tests.models.diffusion.test_sampling import MU, STD, T, _diffusion, analytic_model

pytestmark = pytest.mark.usefixtures("single_thread")

SAMPLERS = [("ddpm", {}), ("ddim", {"eta": 0.0}), ("ddim", {"eta": 1.0}), ("plms", {}), ("dpmpp_2m", {})]


def constant_image_model(diffusion: GaussianDiffusion):
    """The exact eps-network for images whose elements all equal one c ~ N(MU, STD^2): the mean m of x_t's n
    elements is sufficient, E[c | x_t] = MU + sqrt(a) STD^2 (m - sqrt(a) MU) / (a STD^2 + (1 - a) / n), and
    E[eps | x_t] = (x_t - sqrt(a) E[x0 | x_t]) / sqrt(1 - a). Unlike `analytic_model` it couples all elements, so
    the known region must steer the generated one."""
    def model(x_t, t):
        a = diffusion.alpha_bar(t, x_t.ndim)
        n = x_t[0].numel()
        m = x_t.double().flatten(1).mean(1).view(-1, *([1] * (x_t.ndim - 1)))
        x0 = MU + a.sqrt() * STD ** 2 * (m - a.sqrt() * MU) / (a * STD ** 2 + (1 - a) / n)
        return ((x_t.double() - a.sqrt() * x0) / (1 - a).sqrt()).float()
    return model


def _half_mask(spatial) -> torch.Tensor:
    """(1, 1, *spatial): 1 on the first half of the first spatial axis (known), 0 on the rest."""
    mask = torch.zeros(1, 1, *spatial)
    mask[:, :, : spatial[0] // 2] = 1
    return mask


@pytest.mark.parametrize("name,options", SAMPLERS)
@pytest.mark.parametrize("spatial", [(4, 4), (4, 2, 2)])
def test_known_region_follows_the_noised_x0_and_ends_exactly_on_it(name, options, spatial):
    diffusion = _diffusion("v")
    generator = torch.Generator().manual_seed(0)
    x_T, x0 = torch.randn(3, 2, *spatial, generator=generator), torch.randn(3, 2, *spatial, generator=generator)
    mask = _half_mask(spatial).bool()
    timesteps = timestep_schedule(T, 10)
    inputs, states = [], []

    def model(x_t, t):
        inputs.append((x_t.clone(), t.clone()))
        return analytic_model(diffusion)(x_t, t)

    out = get_sampler(name)(model, x_T, timesteps, diffusion, callback=states.append, inpaint=Inpainting(mask, x0),
                            generator=torch.Generator().manual_seed(1), **options)
    first_input, first_t = inputs[0]
    assert int(first_t[0]) == timesteps[0]
    noised = diffusion.q_sample(x0, first_t, x_T)  # the starting noise is the known region's noise
    torch.testing.assert_close(first_input[mask.expand_as(x0)], noised[mask.expand_as(x0)], rtol=0, atol=1e-6)
    following = timesteps.tolist()[1:] + [-1]
    for state, s in zip(states, following):
        noised = diffusion.q_sample(x0, torch.full((3,), s), x_T)
        torch.testing.assert_close(state["x"][mask.expand_as(x0)], noised[mask.expand_as(x0)], rtol=0, atol=1e-6)
    known = mask.expand_as(x0)
    assert torch.equal(out[known], x0[known])
    assert not torch.equal(out[~known], x0[~known])


@pytest.mark.parametrize("name,options", [("ddim", {"eta": 0.0}), ("plms", {}), ("dpmpp_2m", {})])
def test_elementwise_data_leave_the_generated_region_as_without_inpainting(name, options):
    """`analytic_model` treats each element alone, so the unknown region of a deterministic sampler's output is
    the sample it would have been without inpainting."""
    diffusion = _diffusion("eps")
    x_T, x0 = torch.randn(4, 1, 4, 4), torch.randn(4, 1, 4, 4)
    mask = _half_mask((4, 4))
    timesteps = timestep_schedule(T, 20)
    free = get_sampler(name)(analytic_model(diffusion), x_T, timesteps, diffusion, **options)
    painted = get_sampler(name)(analytic_model(diffusion), x_T, timesteps, diffusion, inpaint=Inpainting(mask, x0),
                                **options)
    unknown = ~mask.bool().expand_as(x0)
    torch.testing.assert_close(painted[unknown], free[unknown], rtol=0, atol=1e-6)


@pytest.mark.parametrize("name,options", SAMPLERS)
def test_known_region_steers_the_generated_region(name, options):
    """Constant images: with half of each image known, the generated half lands near the known value c, 5 to 50 times
    closer than an unconditioned sample (mean |error| ~ 0.3; replacement is an approximate conditioning, so not 0)."""
    diffusion = _diffusion("eps")
    generator = torch.Generator().manual_seed(0)
    x_T = torch.randn(256, 1, 4, 4, generator=generator)
    c = MU + STD * torch.randn(256, 1, 1, 1, generator=generator)
    x0 = c.expand_as(x_T).clone()
    timesteps, model = timestep_schedule(T, 50), constant_image_model(diffusion)
    painted = get_sampler(name)(model, x_T, timesteps, diffusion, inpaint=Inpainting(_half_mask((4, 4)), x0),
                                generator=torch.Generator().manual_seed(1), **options)
    free = get_sampler(name)(model, x_T, timesteps, diffusion, generator=torch.Generator().manual_seed(1), **options)
    free_error = (free - c).abs().mean().item()
    assert free_error > 0.2
    assert (painted[:, :, 2:] - c).abs().mean().item() < min(0.1, free_error / 3)


def test_soft_mask_blends_and_bad_shapes_are_refused():
    diffusion = _diffusion("eps")
    x_T, x0 = torch.randn(2, 1, 4, 4), torch.randn(2, 1, 4, 4)
    timesteps, model = timestep_schedule(T, 5), analytic_model(diffusion)
    states = []
    out = get_sampler("ddim")(model, x_T, timesteps, diffusion, callback=states.append,
                              inpaint=Inpainting(torch.full((1, 1, 1, 1), 0.25), x0))
    # DDIM's last step lands on its x0 prediction, which the mask then blends with the known x0
    torch.testing.assert_close(out, 0.25 * x0 + 0.75 * states[-1]["x0"], rtol=0, atol=1e-6)
    nothing_known = get_sampler("ddim")(model, x_T, timesteps, diffusion, inpaint=Inpainting(torch.zeros(1), x0))
    assert torch.equal(nothing_known, get_sampler("ddim")(model, x_T, timesteps, diffusion))
    with pytest.raises(ValueError, match=r"inpaint.x0 has shape \(2, 1, 4\)"):
        get_sampler("ddim")(analytic_model(diffusion), x_T, timestep_schedule(T, 5), diffusion,
                            inpaint=Inpainting(torch.ones(1, 1, 4, 4), x0[..., 0]))
    with pytest.raises(ValueError, match=r"inpaint.mask of shape \(1, 1, 3, 4\) does not broadcast"):
        get_sampler("ddim")(analytic_model(diffusion), x_T, timestep_schedule(T, 5), diffusion,
                            inpaint=Inpainting(torch.ones(1, 1, 3, 4), x0))


@pytest.mark.parametrize("name,options", [("ddpm", {}), ("ddim", {"eta": 0.5})])
def test_one_generator_per_item_makes_each_item_independent_of_the_batch(name, options):
    diffusion = _diffusion("eps")
    x_T = torch.randn(3, 1, 2, 2, 2)
    timesteps = timestep_schedule(T, 10)
    batch = get_sampler(name)(analytic_model(diffusion), x_T, timesteps, diffusion,
                              generator=[torch.Generator().manual_seed(10 + i) for i in range(3)], **options)
    for i in range(3):
        alone = get_sampler(name)(analytic_model(diffusion), x_T[i:i + 1], timesteps, diffusion,
                                  generator=[torch.Generator().manual_seed(10 + i)], **options)
        torch.testing.assert_close(batch[i:i + 1], alone, rtol=0, atol=1e-6)
    with pytest.raises(ValueError, match="2 generators for a batch of 3"):
        get_sampler(name)(analytic_model(diffusion), x_T, timesteps, diffusion,
                          generator=[torch.Generator(), torch.Generator()], **options)
