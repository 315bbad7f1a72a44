"""kernels/master_adamw.py: the one-launch AdamW with fp32 masters against its reference, and the reference against
torch.optim.AdamW (Triton's interpreter on CPU tensors; on a GPU machine the same cases on the GPU)."""
import pytest
import torch

from kernels.master_adamw import BLOCK, MasterAdamWLaunch, master_adamw_reference, master_adamw_step

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
HYPER = dict(lr=1e-2, beta1=0.9, beta2=0.99, eps=1e-8, weight_decay=0.05)


def state(shapes, channels_last_5d=True, seed=0):
    """(weights bf16, masters, exp_avgs, exp_avg_sqs) for `shapes`, 5-D ones channels-last."""
    generator = torch.Generator().manual_seed(seed)
    masters = []
    for shape in shapes:
        m = torch.randn(shape, generator=generator)
        if len(shape) == 5 and channels_last_5d:
            m = m.to(memory_format=torch.channels_last_3d)
        masters.append(m.to(DEVICE))
    weights = [m.to(torch.bfloat16) for m in masters]
    return weights, masters, [torch.zeros_like(m) for m in masters], [torch.zeros_like(m) for m in masters]


def gradients(weights, seed):
    """bf16 gradients with each weight's strides."""
    generator = torch.Generator().manual_seed(seed)
    return [torch.empty_like(w).copy_(torch.randn(w.shape, generator=generator)) for w in weights]


SHAPES = [(16, 8, 3, 3, 3), (BLOCK + 1,), (7,), (12, 40)]


def test_one_launch_follows_the_reference_over_steps():
    weights, masters, exp_avgs, exp_avg_sqs = state(SHAPES)
    ref = [[t.clone() for t in group] for group in (weights, masters, exp_avgs, exp_avg_sqs)]
    tables = None
    for step in range(1, 4):
        grads = gradients(weights, seed=step)
        tables = master_adamw_step(weights, grads, masters, exp_avgs, exp_avg_sqs, step=step, tables=tables, **HYPER)
        master_adamw_reference(*ref[:1], grads, *ref[1:], step=step, **HYPER)
    for got, want in zip(masters + exp_avgs + exp_avg_sqs, ref[1] + ref[2] + ref[3]):
        torch.testing.assert_close(got, want, rtol=2e-6, atol=1e-7)
    for weight, master, want in zip(weights, masters, ref[0]):
        assert weight.stride() == master.stride()
        assert torch.equal(weight, master.to(torch.bfloat16))  # the weight is the master rounded
        torch.testing.assert_close(weight.float(), want.float(), rtol=1e-2, atol=1e-2)


@pytest.mark.parametrize("launch", [MasterAdamWLaunch(block=256, blocks_per_program=3),
                                    MasterAdamWLaunch(block=2048, blocks_per_program=2, num_warps=8)])
def test_programs_of_several_blocks_cover_every_element(launch):
    """Several passes per program: a tensor of a whole number of programs, one ending inside a program's last
    block, one ending inside its first, and one shorter than a block."""
    shapes = [(launch.span * 2,), (launch.span + launch.block + 5,), (launch.span + 3,), (7,)]
    weights, masters, exp_avgs, exp_avg_sqs = state(shapes)
    ref = [[t.clone() for t in group] for group in (weights, masters, exp_avgs, exp_avg_sqs)]
    grads = gradients(weights, seed=3)
    master_adamw_step(weights, grads, masters, exp_avgs, exp_avg_sqs, step=1, launch=launch, **HYPER)
    master_adamw_reference(*ref[:1], grads, *ref[1:], step=1, **HYPER)
    for got, want in zip(masters + exp_avgs + exp_avg_sqs, ref[1] + ref[2] + ref[3]):
        torch.testing.assert_close(got, want, rtol=2e-6, atol=1e-7)
    assert all(torch.equal(w, m.to(torch.bfloat16)) for w, m in zip(weights, masters))


def test_launch_choices_are_checked():
    with pytest.raises(ValueError, match="block must be a power of two"):
        MasterAdamWLaunch(block=1000)


def test_reference_is_torch_adamw_on_the_upcast_gradients():
    weights, masters, exp_avgs, exp_avg_sqs = state([(5, 6), (9,)], seed=1)
    params = [torch.nn.Parameter(m.clone()) for m in masters]
    optimizer = torch.optim.AdamW(params, lr=HYPER["lr"], betas=(HYPER["beta1"], HYPER["beta2"]), eps=HYPER["eps"],
                                  weight_decay=HYPER["weight_decay"])
    for step in range(1, 6):
        grads = gradients(weights, seed=10 + step)
        for p, g in zip(params, grads):
            p.grad = g.float()
        optimizer.step()
        master_adamw_reference(weights, grads, masters, exp_avgs, exp_avg_sqs, step=step, **HYPER)
    for p, master in zip(params, masters):
        torch.testing.assert_close(master, p.detach(), rtol=1e-6, atol=1e-7)


def test_new_gradient_addresses_are_read():
    """The address table is rebuilt when a gradient moves (an eager step allocates new ones)."""
    weights, masters, exp_avgs, exp_avg_sqs = state([(BLOCK * 2 + 3,)])
    ref = [[t.clone() for t in group] for group in (weights, masters, exp_avgs, exp_avg_sqs)]
    tables = None
    for step in (1, 2):
        grads = [g.clone() for g in gradients(weights, seed=step)]  # fresh allocations
        tables = master_adamw_step(weights, grads, masters, exp_avgs, exp_avg_sqs, step=step, tables=tables, **HYPER)
        master_adamw_reference(*ref[:1], grads, *ref[1:], step=step, **HYPER)
    torch.testing.assert_close(masters[0], ref[1][0], rtol=2e-6, atol=1e-7)


def test_bad_tensors_are_named():
    weights, masters, exp_avgs, exp_avg_sqs = state([(4, 4), (3,)])
    grads = gradients(weights, seed=0)
    with pytest.raises(ValueError, match="tensor 0: gradient, master and moments must have the weight's shape"):
        master_adamw_step(weights, [grads[0].t(), grads[1]], masters, exp_avgs, exp_avg_sqs, step=1, **HYPER)
    with pytest.raises(ValueError, match="tensor 1: weight and gradient must both be bf16 or fp16"):
        master_adamw_step(weights, [grads[0], grads[1].float()], masters, exp_avgs, exp_avg_sqs, step=1, **HYPER)
    def sliced(dtype):
        return torch.zeros(4, 8, dtype=dtype, device=DEVICE)[:, ::2]
    with pytest.raises(ValueError, match="tensor 0 is not dense"):
        master_adamw_step([sliced(torch.bfloat16)], [sliced(torch.bfloat16)], [sliced(torch.float32)],
                          [sliced(torch.float32)], [sliced(torch.float32)], step=1, **HYPER)
