"""The fused GroupNorm kernels against a float64 PyTorch reference: output, h and every gradient.

Without CUDA these run through Triton's interpreter on CPU tensors (tests/conftest.py sets TRITON_INTERPRET=1), with
small shapes; on a GPU machine (interpreter off) the same cases run on the GPU, which also runs bf16/fp16 shapes where
the single-launch barrier path has many programs per segment.
"""
import os

import pytest
import torch

from kernels import group_norm as gn
from kernels.group_norm import GroupNormTuning, group_norm_act, group_norm_reference

CUDA = torch.cuda.is_available()
# Where the kernels run: CPU tensors need Triton's interpreter, which is on where there is no GPU (or when asked for).
DEVICE = "cuda" if CUDA and os.environ.get("TRITON_INTERPRET") != "1" else "cpu"
# Forward-only tolerances per dtype (relative L2 error against float64); bf16/fp16 outputs are rounded once.
TOLERANCE = {torch.float32: 2e-5, torch.bfloat16: 1e-2, torch.float16: 2e-3}


def channels_last(x: torch.Tensor) -> torch.Tensor:
    return x.to(memory_format=torch.channels_last_3d if x.ndim == 5 else torch.channels_last)


def is_channels_last(x: torch.Tensor) -> bool:
    return not x.is_contiguous() and x.movedim(1, -1).is_contiguous()


def rel_err(got: torch.Tensor, ref: torch.Tensor, norm: torch.Tensor | None = None) -> float:
    """Relative L2 error of got against ref, relative to `norm` where given (else ref's norm)."""
    assert torch.isfinite(got).all(), "non-finite values (an element was not written?)"
    return ((got.double() - ref).norm() / (ref.norm() if norm is None else norm).clamp_min(1e-30)).item()


def run_case(shape, groups, *, device=DEVICE, dtype=torch.float32, layout="contiguous", act=True, scale_shift=False,
             residual=False, input_bias=False, sample_bias=False, tuning=None, seed=0):
    """Forward + backward of ours and of the float64 reference on the same inputs; returns a dict of errors.

    input_bias (True: (C,), "per_sample": (N, C)) stays fp32 whatever x's dtype (the convolution's bias under
    autocast); ours then returns no h. sample_bias: an (N, C) one added to a (C,) input_bias."""
    gen = torch.Generator().manual_seed(seed)
    N, C = shape[:2]
    x = torch.randn(shape, generator=gen, dtype=torch.float64) * 2 + 3  # an offset mean: cancellation must not hurt
    inputs = {"x": x, "weight": torch.randn(C, generator=gen, dtype=torch.float64),
              "bias": torch.randn(C, generator=gen, dtype=torch.float64)}
    if scale_shift:
        inputs["scale"] = 0.5 * torch.randn(N, C, generator=gen, dtype=torch.float64)
        inputs["shift"] = torch.randn(N, C, generator=gen, dtype=torch.float64)
    if residual:
        inputs["residual"] = torch.randn(shape, generator=gen, dtype=torch.float64)
    if input_bias:  # per-channel offsets larger than x's spread: X = sum(xhat) differs between a group's channels
        bias_shape = (N, C) if input_bias == "per_sample" else (C,)
        inputs["input_bias"] = 4 * torch.randn(bias_shape, generator=gen, dtype=torch.float64)
    if sample_bias:
        inputs["sample_bias"] = 2 * torch.randn(N, C, generator=gen, dtype=torch.float64)
    # Round the inputs to the tested dtype first, so both sides see the same numbers.
    ours_in = {k: v.to(dtype if k in ("x", "residual") else torch.float32).to(device) for k, v in inputs.items()}
    ref_in = {k: v.to(ours_in[k].dtype).double() for k, v in inputs.items()}
    grad_y = torch.randn(shape, generator=gen, dtype=torch.float64)
    grad_h = torch.randn(shape, generator=gen, dtype=torch.float64)

    def forward_backward(fn, tensors, cast):
        leaves = {k: v.detach().clone().requires_grad_() for k, v in tensors.items()}
        x_in = leaves["x"]
        if layout == "channels_last":
            x_in = channels_last(x_in)
        kwargs = {"tuning": tuning} if fn is group_norm_act else {}
        y, h = fn(x_in, leaves["weight"], leaves["bias"], groups, 1e-5, act, leaves.get("scale"), leaves.get("shift"),
                  leaves.get("residual"), input_bias=leaves.get("input_bias"),
                  sample_bias=leaves.get("sample_bias"), **kwargs)
        loss = (y.double() * grad_y.to(y.device)).sum()
        if residual:
            loss = loss + (h.double() * grad_h.to(h.device)).sum()
        loss.backward()
        return y, h, {k: v.grad for k, v in leaves.items()}

    y_ref, h_ref, grads_ref = forward_backward(group_norm_reference, ref_in, torch.float64)
    y, h, grads = forward_backward(group_norm_act, ours_in, dtype)
    assert y.dtype == dtype and y.shape == shape
    if layout == "channels_last" and min(shape[2:]) > 1:
        assert is_channels_last(y) and (not residual or is_channels_last(h))
    errors = {"y": rel_err(y.cpu(), y_ref)}
    if input_bias:
        assert h is None
    else:
        errors["h"] = rel_err(h.cpu(), h_ref)
    errors.update({f"d{k}": rel_err(grads[k].cpu(), grads_ref[k]) for k in grads_ref})
    for name in ("input_bias", "sample_bias"):  # they vanish where groups = C (xhat ignores a per-group offset):
        if name in grads_ref:                    # measured against dx, their summand
            errors[f"d{name}"] = rel_err(grads[name].cpu(), grads_ref[name],
                                         torch.maximum(grads_ref[name].norm(), grads_ref["x"].norm()))
    return errors


def assert_close(errors, dtype, grad_factor=4.0):
    tol = TOLERANCE[dtype]
    for name, err in errors.items():
        limit = tol if name in ("y", "h") else grad_factor * tol
        assert err < limit, f"{name}: relative error {err:.2e} > {limit:.0e} (all: {errors})"


# Shapes: odd sizes, C not a power of two (10 channels per group: padded blocks), groups=1, groups=C, 1D/2D/3D.
SHAPES = [((2, 8, 5, 6, 7), 4), ((2, 30, 9, 10), 3), ((3, 6, 17), 1), ((2, 6, 3, 4, 5), 6), ((1, 64, 3, 5), 32)]


@pytest.mark.parametrize("shape,groups", SHAPES)
@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
def test_matches_reference_every_shape_and_layout(shape, groups, layout):
    if layout == "channels_last" and len(shape) == 3:
        pytest.skip("no channels-last format for 1D")
    assert_close(run_case(shape, groups, layout=layout, scale_shift=True, residual=True), torch.float32)


@pytest.mark.parametrize("act,scale_shift,residual", [(False, False, False), (True, False, False),
                                                      (False, True, False), (True, True, False),
                                                      (False, False, True), (True, True, True)])
def test_every_fusion_option(act, scale_shift, residual):
    errors = run_case((2, 12, 6, 7), 3, act=act, scale_shift=scale_shift, residual=residual)
    assert_close(errors, torch.float32)


# Launch plans: the single launch with one tile per program and with many (the multi-tile loops), two launches with
# several splits (the partials' combination), and the single launch with its barrier (one split in the interpreter;
# many on a GPU). The single launch is forced: in the interpreter the planner would choose two.
PLANS = {
    "one-launch": GroupNormTuning(fused=True),
    "multi-tile": GroupNormTuning(forward_tile=64, backward_tile=64, fused=True),
    "two-launch": GroupNormTuning(forward_tile=64, backward_tile=64, splits=3, fused=False),
    "barrier": GroupNormTuning(forward_tile=64, backward_tile=64, fused=True, barrier=True),
}


@pytest.mark.parametrize("plan", list(PLANS))
@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
def test_launch_plans(plan, layout):
    errors = run_case((2, 12, 9, 11), 3, layout=layout, scale_shift=True, residual=True, tuning=PLANS[plan])
    assert_close(errors, torch.float32)


def test_dense_lanes_only_where_no_lane_is_padding():
    """The contiguous-arange lane form (vectorised channels-last loads) is taken exactly where lanes and channels
    coincide; the shapes above run both forms."""
    from kernels.group_norm import _plan

    cpu = torch.device("cpu")
    assert _plan(1, 64, 100, 32, True, 8192, cpu).dense_lanes  # 2 channels per group, 32 groups
    assert _plan(2, 48, 60, 6, False, 8192, cpu).dense_lanes  # contiguous: one group of 8 channels per segment
    assert not _plan(2, 48, 60, 6, True, 8192, cpu).dense_lanes  # channels-last: 6 groups padded to 8
    assert not _plan(2, 30, 90, 3, True, 8192, cpu).dense_lanes  # 10 channels per group padded to 16
    assert not _plan(2, 30, 90, 3, False, 8192, cpu).dense_lanes


@pytest.mark.parametrize("plan", list(PLANS))
def test_channels_last_padded_groups(plan):
    """Channels-last segments with padding lanes (12 and 10 channels per group padded to 16; 6 groups padded to 8):
    padding lanes are masked out of every load, sum and store."""
    tuning = PLANS[plan]
    for shape, groups in [((2, 48, 5, 6, 3), 4), ((2, 30, 9, 10), 3), ((1, 24, 7, 9), 6)]:
        errors = run_case(shape, groups, layout="channels_last", scale_shift=True, input_bias="per_sample",
                          tuning=tuning)
        assert_close(errors, torch.float32)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_precision(dtype):
    assert_close(run_case((2, 8, 4, 5, 6), 4, dtype=dtype, scale_shift=True, residual=True), dtype)


def test_large_mean_small_variance_is_stable():
    """mean 1e3, std 1e-1: E[x^2] - E[x]^2 in fp32 would lose every digit; the two-level moments must not."""
    x = 1000 + 0.1 * torch.randn(2, 4, 3000, device=DEVICE)
    weight, bias = torch.ones(4, device=DEVICE), torch.zeros(4, device=DEVICE)
    y, _ = group_norm_act(x, weight, bias, 2, 1e-6, tuning=GroupNormTuning(forward_tile=256, backward_tile=256))
    ref, _ = group_norm_reference(x.double(), weight.double(), bias.double(), 2, 1e-6)
    assert rel_err(y, ref) < 1e-3


def test_every_output_element_is_written(monkeypatch):
    """Outputs start as NaN (not the allocator's leftovers); every element must be overwritten."""
    real_empty_like = torch.empty_like
    monkeypatch.setattr(gn.torch, "empty_like",
                        lambda t, **kw: real_empty_like(t, **kw).fill_(float("nan")) if t.is_floating_point()
                        else real_empty_like(t, **kw))
    for plan in list(PLANS):
        errors = run_case((2, 30, 7, 9), 3, scale_shift=True, residual=True, tuning=PLANS[plan], seed=1)
        assert_close(errors, torch.float32)


def test_barrier_can_be_switched_off(monkeypatch):
    """LDM_GROUP_NORM_BARRIER=0 (read at import) turns every plan that would wait at the barrier into two launches."""
    device = torch.device("cpu")
    monkeypatch.setattr(gn, "multiprocessors", lambda device: 132)  # plan as for a GPU with 132 SMs
    gn._plan.cache_clear()
    plan = gn._plan(1, 64, 2 ** 21, 32, False, 8192, device, fused=True)
    assert plan.fused and plan.barrier and plan.splits == 16
    monkeypatch.setattr(gn, "_BARRIER_ALLOWED", False)
    gn._plan.cache_clear()
    plan = gn._plan(1, 64, 2 ** 21, 32, False, 8192, device, fused=True)
    assert not plan.fused and not plan.barrier and plan.splits == 16
    gn._plan.cache_clear()


def test_deterministic():
    x = torch.randn(2, 8, 33, 17, device=DEVICE)
    w, b = torch.randn(8, device=DEVICE), torch.randn(8, device=DEVICE)
    tuning = GroupNormTuning(forward_tile=64, backward_tile=64, splits=4, fused=False)
    first, second = (group_norm_act(x, w, b, 4, act=True, tuning=tuning)[0] for _ in range(2))
    assert torch.equal(first, second)


def test_scale_shift_accepts_broadcast_shape():
    x = torch.randn(2, 4, 3, 3, 3, device=DEVICE)
    w, b = torch.ones(4, device=DEVICE), torch.zeros(4, device=DEVICE)
    scale, shift = torch.randn(2, 4, 1, 1, 1, device=DEVICE), torch.randn(2, 4, 1, 1, 1, device=DEVICE)
    y, _ = group_norm_act(x, w, b, 2, scale=scale, shift=shift)
    ref, _ = group_norm_reference(x, w, b, 2, 1e-6, scale=scale, shift=shift)
    assert torch.allclose(y, ref, atol=1e-5)


@pytest.mark.parametrize("kwargs,message", [
    (dict(num_groups=3), "not divisible by num_groups=3"),
    (dict(scale=torch.zeros(2, 4)), "scale and shift together"),
    (dict(scale=torch.zeros(2, 5), shift=torch.zeros(2, 5)), "scale must be (N, C)"),
    (dict(residual=torch.zeros(2, 4, 3)), "residual"),
    (dict(residual=torch.zeros(2, 4, 3, 3), input_bias=torch.zeros(4)), "input_bias and residual"),
    (dict(input_bias=torch.zeros(5)), "input_bias must be (C,)"),
    (dict(input_bias=torch.zeros(1, 4)), "input_bias must be (C,)"),
    (dict(input_bias=torch.zeros(4), sample_bias=torch.zeros(2, 5)), "sample_bias must be (N, C) = (2, 4)"),
    (dict(input_bias=torch.zeros(2, 4), sample_bias=torch.zeros(2, 4)), "added to a (C,) input_bias"),
])
def test_bad_input_is_named(kwargs, message):
    x = torch.randn(2, 4, 3, 3)
    args = dict(num_groups=2)
    args.update(kwargs)
    with pytest.raises(ValueError, match=message.replace("(", r"\(").replace(")", r"\)")):
        group_norm_act(x, torch.ones(4), torch.zeros(4), **args)


@pytest.mark.skipif(not CUDA, reason="needs a CUDA GPU")
@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
@pytest.mark.parametrize("shape", [(1, 64, 32, 32, 32), (2, 128, 16, 16, 16), (3, 320, 24, 24)])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
@pytest.mark.parametrize("added", ["residual", "input_bias"])
def test_cuda_single_launch_with_barrier(shape, layout, dtype, added):
    """On the GPU, segments are split over many programs that meet at the in-kernel barrier; with a residual or an
    input bias added to x."""
    errors = run_case(shape, 32, device="cuda", dtype=dtype, layout=layout, scale_shift=True, **{added: True},
                      tuning=GroupNormTuning(forward_tile=1024, backward_tile=1024))
    assert_close(errors, dtype, grad_factor=2.0)


# The convolution's bias added by the norm (input_bias). The shape's plans have several tiles per program, several
# splits, a split that starts on the partial last tile, and padded lanes (3 channels per group).
INPUT_BIAS_SHAPES = [((2, 30, 9, 10), 3), ((3, 6, 5, 7), 1), ((2, 6, 3, 4, 5), 6), ((2, 8, 3, 5, 7), 4)]


@pytest.mark.parametrize("shape,groups", INPUT_BIAS_SHAPES)
@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
def test_input_bias_every_shape_and_layout(shape, groups, layout):
    assert_close(run_case(shape, groups, layout=layout, scale_shift=True, input_bias=True), torch.float32)


@pytest.mark.parametrize("plan", ["two-launch", "barrier"])
@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
def test_per_sample_input_bias(plan, layout):
    """(N, C) input_bias (a conv bias plus the UNet's timestep embedding), its (N, C) gradient."""
    tuning = PLANS[plan]
    errors = run_case((3, 8, 5, 6), 2, layout=layout, input_bias="per_sample", tuning=tuning)
    assert_close(errors, torch.float32)


@pytest.mark.parametrize("act,scale_shift", [(False, False), (True, False), (False, True), (True, True)])
def test_input_bias_every_fusion_option(act, scale_shift):
    errors = run_case((2, 12, 5, 7), 3, act=act, scale_shift=scale_shift, input_bias=True)
    assert_close(errors, torch.float32)


@pytest.mark.parametrize("plan", list(PLANS))
@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
def test_input_bias_launch_plans(plan, layout):
    errors = run_case((2, 6, 7, 10), 2, layout=layout, scale_shift=True, input_bias=True,
                      tuning=PLANS[plan])
    assert_close(errors, torch.float32)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
def test_input_bias_half_precision(dtype, layout):
    """A half-precision x with an fp32 input_bias, as under autocast."""
    assert_close(run_case((2, 8, 4, 5, 6), 4, dtype=dtype, layout=layout, scale_shift=True, input_bias=True), dtype)


def test_input_bias_in_another_dtype_than_x():
    """A bf16 input_bias with an fp32 x: added in fp32, its gradient in bf16."""
    x = torch.randn(2, 4, 3, 5, device=DEVICE)
    w, b = torch.randn(4, device=DEVICE), torch.randn(4, device=DEVICE)
    input_bias = torch.randn(4, device=DEVICE, dtype=torch.bfloat16, requires_grad=True)
    y, h = group_norm_act(x, w, b, 2, act=True, input_bias=input_bias)
    assert h is None
    torch.testing.assert_close(y, group_norm_reference(x, w, b, 2, 1e-6, True, input_bias=input_bias)[0])
    y.sum().backward()
    assert input_bias.grad.dtype == torch.bfloat16


def test_input_bias_empty_input():
    empty = torch.randn(0, 4, 3, 5, requires_grad=True)
    input_bias = torch.randn(4, requires_grad=True)
    y, h = group_norm_act(empty, torch.ones(4), torch.zeros(4), 2, act=True, input_bias=input_bias)
    assert y.shape == empty.shape and h is None
    y.sum().backward()
    assert torch.equal(input_bias.grad, torch.zeros(4))


@pytest.mark.parametrize("plan", ["two-launch", "one-launch", "barrier"])
@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
def test_sample_bias_added_to_input_bias(plan, layout):
    """A (C,) input bias (the convolution's) plus an (N, C) sample bias (the timestep embedding), added in the kernel:
    both gradients, in every launch plan."""
    errors = run_case((3, 12, 5, 7), 3, layout=layout, scale_shift=plan == "barrier", input_bias=True,
                      sample_bias=True, tuning=PLANS[plan])
    assert_close(errors, torch.float32)


def test_sample_bias_gradient_in_its_dtype():
    """A bf16 sample bias (a Linear's output under autocast) with an fp32 input bias: the same output as their fp32 sum
    given as one (N, C) input bias, gradients in each one's dtype, the (C,) one the sum over samples of the other."""
    gen = torch.Generator().manual_seed(5)
    x = torch.randn(2, 8, 4, 5, 6, generator=gen).to(DEVICE)
    w, b = torch.randn(8, generator=gen).to(DEVICE), torch.randn(8, generator=gen).to(DEVICE)
    input_bias = torch.randn(8, generator=gen).to(DEVICE).requires_grad_()
    sample_bias = torch.randn(2, 8, generator=gen).to(DEVICE, torch.bfloat16).requires_grad_()
    joined = (input_bias.detach() + sample_bias.detach().float()).requires_grad_()
    grad_y = torch.randn(x.shape, generator=gen).to(DEVICE)
    tuning = GroupNormTuning(forward_tile=64, backward_tile=64, splits=2, fused=False)
    y, _ = group_norm_act(x, w, b, 4, act=True, input_bias=input_bias, sample_bias=sample_bias, tuning=tuning)
    y_joined, _ = group_norm_act(x, w, b, 4, act=True, input_bias=joined, tuning=tuning)
    torch.testing.assert_close(y, y_joined, rtol=0, atol=0)
    (y * grad_y).sum().backward()
    (y_joined * grad_y).sum().backward()
    assert input_bias.grad.dtype == torch.float32 and sample_bias.grad.dtype == torch.bfloat16
    # GPU: rounded to nearest as torch rounds, bit for bit; Triton's interpreter truncates to bf16: within one step
    rtol = 0 if DEVICE == "cuda" else 2 ** -7
    torch.testing.assert_close(sample_bias.grad, joined.grad.to(torch.bfloat16), rtol=rtol, atol=0)
    torch.testing.assert_close(input_bias.grad, joined.grad.sum(0), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("plan", ["one-launch", "two-launch"])
@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
@pytest.mark.parametrize("input_bias", [False, True])
def test_pass_input_gradient_is_added_in_the_kernel(plan, layout, input_bias):
    """pass_input: x comes back as the norm's second output (its values, its layout); the gradient of that output
    reaches the norm's backward, and x's gradient is the norm's plus it (float64 reference), with no add of autograd's:
    x feeds only the norm's node."""
    gen = torch.Generator().manual_seed(11)
    shape, groups = (2, 12, 5, 6, 7), 3
    x = torch.randn(shape, generator=gen, dtype=torch.float64) * 2 + 3
    w, b = torch.randn(12, generator=gen, dtype=torch.float64), torch.randn(12, generator=gen, dtype=torch.float64)
    bias = 4 * torch.randn(12, generator=gen, dtype=torch.float64) if input_bias else None
    grad_y, grad_passed = torch.randn(shape, generator=gen), torch.randn(shape, generator=gen)

    x_ref = x.clone().requires_grad_()
    y_ref, _ = group_norm_reference(x_ref, w, b, groups, 1e-5, True, input_bias=bias)
    ((y_ref * grad_y.double()).sum() + (x_ref * grad_passed.double()).sum()).backward()

    leaf = x.float().to(DEVICE).requires_grad_()
    x_in = channels_last(leaf) if layout == "channels_last" else leaf
    y, passed = group_norm_act(x_in, w.float().to(DEVICE), b.float().to(DEVICE), groups, 1e-5, True,
                               input_bias=None if bias is None else bias.float().to(DEVICE), tuning=PLANS[plan],
                               pass_input=True)
    assert torch.equal(passed, x_in) and passed.stride() == x_in.stride()
    assert type(passed.grad_fn).__name__ == "_GroupNormActFunctionBackward"
    assert rel_err(y.cpu(), y_ref) < TOLERANCE[torch.float32]
    ((y * grad_y.to(DEVICE)).sum() + (passed * grad_passed.to(DEVICE)).sum()).backward()
    assert rel_err(leaf.grad.cpu(), x_ref.grad) < 4 * TOLERANCE[torch.float32]


def test_pass_input_keeps_the_strides_of_a_single_sample():
    """The passed x has x's strides exactly, the batch axis's too where it has size 1 (autograd's view of an input
    rewrites that one, and layout checks that read strides, cuDNN's and ours, may then choose differently)."""
    x = channels_last(torch.randn(1, 8, 3, 4, 5)).to(DEVICE).requires_grad_()
    _, passed = group_norm_act(x, None, None, 4, pass_input=True)
    assert passed.stride() == x.stride() and passed.data_ptr() == x.data_ptr()


def test_pass_input_refuses_a_residual():
    x = torch.randn(1, 4, 3, 3)
    with pytest.raises(ValueError, match="pass_input with a residual"):
        group_norm_act(x, None, None, 2, residual=torch.randn(1, 4, 3, 3), pass_input=True)


def test_sample_bias_rows_apart_are_read_where_they_lie():
    """A sample bias that is a slice of a wider tensor (every ResBlock's embedding projection, computed together):
    the kernels read its rows in place, with no copy of it, and give what they give for a dense copy, gradients
    included."""
    from torch.utils._python_dispatch import TorchDispatchMode

    gen = torch.Generator().manual_seed(7)
    x = torch.randn(3, 8, 4, 5, 6, generator=gen).to(DEVICE)
    w, b = torch.randn(8, generator=gen).to(DEVICE), torch.randn(8, generator=gen).to(DEVICE)
    input_bias = torch.randn(8, generator=gen).to(DEVICE)
    projections = torch.randn(3, 24, generator=gen).to(DEVICE)
    grad_y = torch.randn(x.shape, generator=gen).to(DEVICE)
    tuning = GroupNormTuning(forward_tile=64, backward_tile=64, splits=2, fused=False)

    class Copies(TorchDispatchMode):
        def __init__(self):
            super().__init__()
            self.shapes = []

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            if func.overloadpacket.__name__ in ("clone", "copy_", "_to_copy"):
                self.shapes.append(tuple(args[0].shape))
            return func(*args, **(kwargs or {}))

    wide, dense = projections.clone().requires_grad_(), projections[:, 8:16].clone().requires_grad_()
    results = []
    for leaf, sample_bias in ((wide, wide[:, 8:16]), (dense, dense)):
        with Copies() as copies:
            y, _ = group_norm_act(x, w, b, 4, act=True, input_bias=input_bias, sample_bias=sample_bias, tuning=tuning)
        assert (3, 8) not in copies.shapes
        (y * grad_y).sum().backward()
        results.append((y, leaf.grad[:, 8:16] if leaf is wide else leaf.grad))
    torch.testing.assert_close(results[0][0], results[1][0], rtol=0, atol=0)
    torch.testing.assert_close(results[0][1], results[1][1], rtol=0, atol=0)
