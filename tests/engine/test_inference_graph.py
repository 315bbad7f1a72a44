"""GraphedInference: a no-grad function replayed from CUDA graphs gives what the function gives eagerly."""
import pytest
import torch

from ldm.engine.inference_graph import GraphedInference
from ldm.models.diffusion.gaussian_diffusion import GaussianDiffusion
from ldm.models.diffusion.sampling import sample_ddim, timestep_schedule
from ldm.modules.diffusionmodules.openaimodel import UNetModel

cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")


def counting(fn):
    calls = []

    def wrapped(*args):
        calls.append(args)
        return fn(*args)
    return wrapped, calls


def test_without_cuda_tensors_or_with_autograd_the_function_runs_eagerly():
    fn, calls = counting(lambda x, t: x * t[:, None])
    graphed = GraphedInference(fn)
    x, t = torch.randn(2, 3), torch.tensor([1.0, 2.0])
    with torch.no_grad():
        torch.testing.assert_close(graphed(x, t), x * t[:, None])
    graphed(x, t)  # grad enabled: eager too
    assert (len(calls), graphed.captures, graphed.replays) == (2, 0, 0)
    with pytest.raises(ValueError, match="warmup must be >= 1"):
        GraphedInference(fn, warmup=0)


def test_static_inputs_are_writable_copies_in_dense_layouts():
    """The graph's inputs take every later call's arguments by copy_: an expanded t (stride 0, what the samplers
    pass) must become a dense tensor, a channels-last x keep its layout."""
    from ldm.engine.inference_graph import static_inputs

    x = torch.randn(2, 3, 4, 5, 6).to(memory_format=torch.channels_last_3d)
    t = torch.tensor(7).expand(2)
    static_x, static_t = static_inputs((x, t))
    assert static_x.stride() == x.stride() and static_t.stride() == (1,)
    static_t.copy_(torch.tensor(9).expand(2))  # as each replay does
    static_x.copy_(x * 2)
    assert static_t.tolist() == [9, 9] and torch.equal(static_x, x * 2)


def tiny_unet() -> UNetModel:
    torch.manual_seed(0)
    return UNetModel(image_size=8, dims=3, in_channels=2, out_channels=2, model_channels=32, num_res_blocks=1,
                     attention_resolutions=[2], channel_mult=(1, 2), num_head_channels=16, kernels="auto").cuda().eval()


@cuda
def test_replays_equal_eager_calls_and_outputs_are_copies():
    unet = tiny_unet()
    fn, calls = counting(lambda x, t: unet(x, t))
    graphed = GraphedInference(fn, warmup=2)
    x = torch.randn(2, 2, 8, 8, 8, device="cuda").to(memory_format=torch.channels_last_3d)
    with torch.no_grad(), torch.autocast("cuda", dtype=torch.bfloat16):
        outputs = [graphed(x * k, torch.tensor([k, 2 * k], device="cuda")) for k in (1, 5, 9)]
        expected = [unet(x * k, torch.tensor([k, 2 * k], device="cuda")) for k in (1, 5, 9)]
        for got, want in zip(outputs, expected):
            torch.testing.assert_close(got, want, atol=2e-2, rtol=2e-2)  # bf16: a couple of ulps at most
        assert outputs[0].data_ptr() != outputs[1].data_ptr()  # each call's output survives the next
        assert (graphed.captures, graphed.replays, len(calls)) == (1, 3, 3)  # 2 warm-ups + 1 capture
        graphed(torch.randn(1, 2, 8, 8, 8, device="cuda"), torch.tensor([3], device="cuda"))  # another signature
        assert graphed.captures == 2 and len(graphed.graphs) == 2


@cuda
def test_ddim_through_the_graph_matches_eager_ddim():
    unet = tiny_unet()
    diffusion = GaussianDiffusion(torch.linspace(1e-4, 2e-2, 1000, dtype=torch.float64))
    timesteps = timestep_schedule(1000, 10)
    x_T = torch.randn(2, 2, 8, 8, 8, device="cuda", generator=torch.Generator("cuda").manual_seed(0))
    with torch.no_grad():
        eager = sample_ddim(lambda x, t: unet(x, t), x_T, timesteps, diffusion)
        graphed = GraphedInference(lambda x, t: unet(x, t))
        replayed = sample_ddim(graphed, x_T, timesteps, diffusion)
    torch.testing.assert_close(replayed, eager, atol=1e-5, rtol=1e-5)
    assert graphed.replays == 10


@cuda
def test_one_graph_serves_batches_with_other_conditioning():
    """sample.py keeps one GuidedDenoiser per run: a second batch's conditioning is copied into the graph's inputs,
    not captured again, and gives what an eager call with it gives."""
    from ldm.models.diffusion.conditioning import Conditioning
    from ldm.sample_cli import GuidedDenoiser

    class Network(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.unet = UNetModel(image_size=8, dims=3, in_channels=3, out_channels=2, model_channels=32,
                                  num_res_blocks=1, attention_resolutions=[2], channel_mult=(1, 2),
                                  num_head_channels=16).cuda().eval()

        def apply_model(self, x, t, cond):
            return self.unet(*cond.unet_inputs(x)[:1], t)

    torch.manual_seed(0)
    network = Network()
    graphed, eager = GuidedDenoiser(network, 2.0, cuda_graph=True), GuidedDenoiser(network, 2.0)
    x, t = torch.randn(1, 2, 8, 8, 8, device="cuda"), torch.tensor([7], device="cuda")
    with torch.no_grad():
        for seed in range(3):
            mask = torch.rand(1, 1, 8, 8, 8, device="cuda", generator=torch.Generator("cuda").manual_seed(seed))
            cond, null = Conditioning(concat=mask), Conditioning(concat=torch.zeros_like(mask))
            got = graphed(x, t, *graphed.arguments(cond, null))
            torch.testing.assert_close(got, eager(x, t, *eager.arguments(cond, null)), atol=1e-5, rtol=1e-5)
    assert (graphed.graphed.captures, graphed.graphed.replays) == (1, 3)
