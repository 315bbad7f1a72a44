"""Flash-attention kernel (kernels/attention.py) and the attention dispatcher (ldm/modules/attention.py).

Without CUDA the kernels run through Triton's interpreter on CPU tensors (tests/conftest.py sets TRITON_INTERPRET=1):
fp32 (and one fp16 case; the interpreter's bf16 dot products are wrong) on tiny shapes. With CUDA the same checks run in
bf16 / fp16 on larger shapes. Every output buffer is filled with NaN before the kernels run, so an element they skip
fails the comparison with the float64 reference.
"""
import logging
import math

import pytest
import torch

import kernels.attention as fa
from kernels.attention import (BACKWARD_DKDV_CONFIGS, BACKWARD_DQ_CONFIGS, FORWARD_CONFIGS, KernelConfig,
                               UnsupportedAttentionInputs, attention_backward, attention_forward, attention_reference,
                               flash_attention)
from ldm.modules import attention as dispatch
from ldm.modules.attention import (ATTENTION_BACKEND_ENV, AUTO_TABLE, BACKENDS, CrossAttention, attention,
                                   attention_backend, chosen_backend, set_attention_backend, table_row)

CUDA = torch.cuda.is_available()
cuda_only = pytest.mark.skipif(not CUDA, reason="needs CUDA (too slow for Triton's interpreter)")
DEVICE = "cuda" if CUDA else "cpu"


@pytest.fixture(autouse=True)
def poisoned_outputs(monkeypatch):
    """Every buffer the kernels allocate starts as NaN: a skipped element shows up as a mismatch."""
    def new_output(like, shape=None):
        if shape is None:
            return torch.full_like(like, float("nan"))
        return torch.full(shape, float("nan"), device=like.device, dtype=torch.float32)
    monkeypatch.setattr(fa, "_new_output", new_output)


@pytest.fixture(autouse=True)
def fresh_dispatcher(monkeypatch):
    """Each test starts with no remembered refusals or logged choices and no process-wide backend."""
    monkeypatch.delenv(ATTENTION_BACKEND_ENV, raising=False)
    dispatch.reset_dispatch_state()
    set_attention_backend(None)
    yield
    set_attention_backend(None)
    dispatch.reset_dispatch_state()


def relative_error(actual: torch.Tensor, expected: torch.Tensor) -> float:
    """||actual - expected|| / ||expected|| in float64 (NaN if actual has any NaN)."""
    return ((actual.double() - expected).norm() / expected.norm()).item()


def random_qkv(batch, heads, len_q, len_k, head_dim, dtype, seed, device=DEVICE):
    gen = torch.Generator(device=device).manual_seed(seed)
    make = lambda length: torch.randn(batch, heads, length, head_dim, generator=gen, device=device, dtype=dtype)
    return make(len_q), make(len_k), make(len_k)


def float64_reference(q, k, v, grad_out, scale=None):
    """Output and (dq, dk, dv) of the spec in float64."""
    q64, k64, v64 = (t.detach().double().requires_grad_() for t in (q, k, v))
    out = attention_reference(q64, k64, v64, scale)
    return out.detach(), torch.autograd.grad(out, (q64, k64, v64), grad_out.double())


def check_against_reference(q, k, v, tolerance, scale=None, seed=0):
    q, k, v = (t.requires_grad_() for t in (q, k, v))
    out = flash_attention(q, k, v, scale)
    grad_out = torch.randn(out.shape, generator=torch.Generator(device=q.device).manual_seed(seed + 1),
                           device=q.device, dtype=q.dtype)
    grads = torch.autograd.grad(out, (q, k, v), grad_out)
    ref_out, ref_grads = float64_reference(q, k, v, grad_out, scale)
    assert out.shape == q.shape and out.dtype == q.dtype
    errors = {name: relative_error(a, b) for name, a, b in zip(("out", "dq", "dk", "dv"), (out, *grads),
                                                               (ref_out, *ref_grads))}
    assert all(e < tolerance for e in errors.values()), errors  # NaN fails too


# (B, H, L_q, L_k, d): odd lengths, L_q != L_k both ways, every head dim, and a non-power-of-two one.
SMALL_SHAPES = [
    (1, 2, 37, 50, 32),
    (2, 1, 50, 37, 64),
    (1, 1, 37, 37, 128),
    (1, 1, 19, 23, 256),
    (1, 1, 37, 50, 512),
    (1, 2, 13, 29, 24),
    (1, 1, 1, 5, 16),       # one query
    (1, 1, 128, 128, 64),   # lengths that are multiples of every block: the unmasked paths
]


@pytest.mark.parametrize("shape", SMALL_SHAPES, ids=lambda s: "x".join(map(str, s)))
def test_fp32_output_and_gradients_match_float64(shape):
    batch, heads, len_q, len_k, head_dim = shape
    check_against_reference(*random_qkv(batch, heads, len_q, len_k, head_dim, torch.float32, seed=sum(shape)),
                            tolerance=1e-4)


def test_fp16_output_and_gradients_match_float64():
    check_against_reference(*random_qkv(1, 2, 37, 50, 64, torch.float16, seed=3), tolerance=1e-2)


def test_custom_scale():
    check_against_reference(*random_qkv(1, 1, 21, 34, 32, torch.float32, seed=4), tolerance=1e-4, scale=0.37)


@pytest.mark.parametrize("fwd, bwd", [
    # Small tiles: several query and key blocks with ragged tails, the head dim split over 4 programs, dK and dV in
    # separate launches.
    (KernelConfig(16, 16, 16, 4, 2), KernelConfig(16, 16, 16, 4, 2, split=True)),
    # Unequal tiles; key blocks larger than the keys.
    (KernelConfig(32, 64, 32, 4, 2), KernelConfig(16, 64, 32, 4, 2)),
    # Whole head dim per program, dK and dV in separate launches.
    (KernelConfig(16, 32, 64, 4, 2), KernelConfig(32, 16, 64, 4, 2, split=True)),
])
def test_tiled_and_column_split_paths(fwd, bwd):
    """Multi-block loops, the split of the head dim over programs and the separate dK / dV launches, which the
    table's large tiles skip on tiny inputs."""
    q, k, v = random_qkv(2, 2, 37, 50, 64, torch.float32, seed=5)
    scale = 1 / 8
    out, lse = attention_forward(q, k, v, scale, fwd)
    grad_out = torch.randn_like(out)
    dq, dk, dv = attention_backward(q, k, v, out, lse, grad_out, scale, bwd, bwd)
    ref_out, ref_grads = float64_reference(q, k, v, grad_out)
    for actual, expected in zip((out, dq, dk, dv), (ref_out, *ref_grads)):
        assert relative_error(actual, expected) < 1e-4
    scores = (q.double() @ k.double().transpose(-1, -2)) * scale
    torch.testing.assert_close(lse.double(), torch.logsumexp(scores, -1) / math.log(2), rtol=1e-5, atol=1e-5)


def test_strided_inputs_and_output_layout():
    """Heads split from (B, L, H*d) and q/k/v chunked from one (B, 1, L, 3C) projection, as the models do."""
    gen = torch.Generator(device=DEVICE).manual_seed(6)
    dtype = torch.float32 if not CUDA else torch.bfloat16
    tokens = torch.randn(2, 33, 3 * 2 * 32, generator=gen, device=DEVICE, dtype=dtype)
    q, k, v = (t.unflatten(-1, (2, 32)).transpose(1, 2) for t in tokens.chunk(3, dim=-1))  # (2, 2, 33, 32), strided
    assert not q.is_contiguous()
    out = flash_attention(q, k, v)
    assert relative_error(out, attention_reference(q.double(), k.double(), v.double())) < (1e-4 if not CUDA else 1e-2)
    dense = torch.randn(2, 33, 2, 32, device=DEVICE, dtype=dtype).transpose(1, 2)  # (B, H, L, d) view of (B, L, H, d)
    assert flash_attention(dense, k, v).stride() == dense.stride()  # the caller's transpose back is free


@pytest.mark.parametrize("make, match", [
    (lambda: random_qkv(1, 1, 4, 4, 16, torch.float64, 0), "dtypes"),
    (lambda: (torch.zeros(1, 1, 4, 16), torch.zeros(1, 1, 4, 16), torch.zeros(1, 1, 4, 8)), "k.shape == v.shape"),
    (lambda: random_qkv(1, 1, 4, 4, 1024, torch.float32, 0), "head dim 1024"),
    (lambda: (torch.zeros(1, 1, 4, 16), torch.zeros(1, 1, 0, 16), torch.zeros(1, 1, 0, 16)), "no keys"),
    (lambda: (torch.zeros(4, 16), torch.zeros(4, 16), torch.zeros(4, 16)), r"\(B, H, L, d\)"),
])
def test_rejects_unsupported_inputs(make, match):
    with pytest.raises(UnsupportedAttentionInputs, match=match):
        flash_attention(*make())


def test_rejects_non_positive_scale():
    with pytest.raises(UnsupportedAttentionInputs, match="scale"):
        flash_attention(*random_qkv(1, 1, 4, 4, 16, torch.float32, 0), scale=-1.0)


def test_config_tables_fit_their_head_dims():
    for table in (FORWARD_CONFIGS, BACKWARD_DKDV_CONFIGS, BACKWARD_DQ_CONFIGS):
        for block_d, configs in table.items():
            for cfg in configs:
                assert block_d % cfg.block_c == 0 and cfg.num_warps in (4, 8), (block_d, cfg)
                assert all(b & (b - 1) == 0 and b >= 16 for b in (cfg.block_m, cfg.block_n, cfg.block_c)), cfg


def test_launch_falls_back_to_the_next_config_that_fits(monkeypatch):
    """A config whose shared memory exceeds the GPU's is skipped, and later calls start at the one that fitted."""
    monkeypatch.setattr(fa, "_FIRST_WORKING", {})
    configs = (KernelConfig(128, 64, 64, 8, 3), KernelConfig(64, 64, 64, 4, 2), KernelConfig(32, 16, 64, 4, 2))
    tried = []

    def launch(cfg):
        tried.append(cfg)
        if cfg.block_m > 64:
            raise fa.OutOfResources(cfg.block_m * 2048, 232448, "shared memory")
    assert fa._launch_first_that_fits("forward", configs, ("key",), launch) == configs[1]
    assert fa._launch_first_that_fits("forward", configs, ("key",), launch) == configs[1]
    assert tried == [configs[0], configs[1], configs[1]]
    with pytest.raises(fa.OutOfResources):
        fa._launch_first_that_fits("forward", configs[:1], None, launch)


# -- on CUDA: bf16 / fp16, larger shapes ----------------------------------------------------------------------------

@cuda_only
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("shape", [(2, 3, 300, 517, 32), (1, 4, 1000, 1000, 64), (2, 2, 513, 129, 128),
                                   (1, 1, 700, 901, 256), (1, 1, 1031, 777, 512), (1, 2, 64, 4096, 64)],
                         ids=lambda s: "x".join(map(str, s)))
def test_cuda_half_output_and_gradients_match_float64(shape, dtype):
    batch, heads, len_q, len_k, head_dim = shape
    check_against_reference(*random_qkv(batch, heads, len_q, len_k, head_dim, dtype, seed=sum(shape)),
                            tolerance=1e-2)


@cuda_only
def test_cuda_dispatcher_uses_the_kernel_for_large_head_dims():
    q, k, v = random_qkv(1, 1, 300, 300, 512, torch.bfloat16, seed=7)
    out = attention(q, k, v)
    assert chosen_backend(q, k, v) == "triton"
    assert relative_error(out, attention_reference(q.double(), k.double(), v.double())) < 1e-2


# -- dispatcher -------------------------------------------------------------------------------------------------------

def test_table_rows_name_known_backends_and_route_large_head_dims_to_the_kernel():
    assert all(set(row) <= set(BACKENDS) - {"auto"} for row in AUTO_TABLE.values())
    assert table_row("cuda", torch.bfloat16, 512, 32768)[0] == "triton"
    assert table_row("cuda", torch.bfloat16, 256, 32768)[0] == "cudnn"
    assert table_row("cuda", torch.float16, 64, 4096)[0] == "cudnn"
    assert table_row("cuda", torch.float32, 64, 4096)[0] == "efficient"
    assert table_row("cpu", torch.float32, 64, 4096) == ("sdpa",)


def test_override_runs_the_named_backend():
    q, k, v = random_qkv(1, 2, 37, 50, 32, torch.float32, seed=8)
    expected = attention_reference(q.double(), k.double(), v.double())
    with attention_backend("triton"):
        out = attention(q, k, v)
        assert chosen_backend(q, k, v) == "triton"
    assert relative_error(out, expected) < 1e-4
    out = attention(q, k, v, backend="math")
    assert chosen_backend(q, k, v, backend="math") == "math"
    assert relative_error(out, expected) < 1e-5


def test_triton_backend_runs_in_autocast_dtype():
    """Inside an autocast region fp32 inputs run in autocast's dtype, as SDPA's do (fp16: the interpreter's bf16
    products are wrong)."""
    q, k, v = random_qkv(1, 2, 21, 30, 32, torch.float32, seed=14)
    with torch.autocast(DEVICE, dtype=torch.float16):
        out = attention(q, k, v, backend="triton")
        assert chosen_backend(q, k, v, backend="triton") == "triton"
    assert out.dtype == torch.float16
    assert relative_error(out, attention_reference(q.double(), k.double(), v.double())) < 1e-2


def test_environment_variable_selects_the_backend(monkeypatch):
    q, k, v = random_qkv(1, 1, 9, 9, 16, torch.float32, seed=9, device="cpu")
    monkeypatch.setenv(ATTENTION_BACKEND_ENV, "math")
    attention(q, k, v)
    assert chosen_backend(q, k, v) == "math"
    set_attention_backend("sdpa")  # the process-wide setting beats the environment
    attention(q, k, v)
    assert chosen_backend(q, k, v) == "sdpa"
    monkeypatch.setenv(ATTENTION_BACKEND_ENV, "fastest")
    set_attention_backend(None)
    with pytest.raises(ValueError, match=f"{ATTENTION_BACKEND_ENV}: unknown attention backend 'fastest'"):
        attention(q, k, v)


def test_unknown_backend_names_are_rejected_where_configured():
    with pytest.raises(ValueError, match="set_attention_backend: unknown attention backend 'tritn'"):
        set_attention_backend("tritn")
    with pytest.raises(ValueError, match="CrossAttention.attention_backend"):
        CrossAttention(8, attention_backend="cuDNN")


def test_refusing_backend_falls_back_logs_once_and_is_skipped_afterwards(caplog):
    """cuDNN takes no CPU tensors; the Triton kernel no value width != key width: both hand over to PyTorch's pick."""
    q, k, v = random_qkv(1, 2, 7, 5, 8, torch.float32, seed=10, device="cpu")
    v = v[..., :4]
    expected = attention_reference(q.double(), k.double(), v.double())
    with caplog.at_level(logging.INFO, logger="ldm.modules.attention"):
        for backend in ("cudnn", "triton"):
            for _ in range(3):
                out = attention(q, k, v, backend=backend)
                assert relative_error(out, expected) < 1e-5
            assert chosen_backend(q, k, v, backend=backend) == "sdpa"
    refusals = [r for r in caplog.records if "refused" in r.getMessage() and r.levelno == logging.WARNING]
    assert [r.getMessage().split()[2] for r in refusals] == ["cudnn", "triton"]
    assert "k.shape == v.shape" in refusals[1].getMessage()
    choices = [r for r in caplog.records if r.levelno == logging.INFO]
    assert len(choices) == 1 and "sdpa backend" in choices[0].getMessage()  # one shape class, one backend


def test_choice_is_logged_once_per_backend_and_shape_class(caplog):
    small = random_qkv(1, 1, 9, 9, 16, torch.float32, seed=11, device="cpu")
    wide = random_qkv(1, 1, 9, 9, 32, torch.float32, seed=12, device="cpu")
    with caplog.at_level(logging.INFO, logger="ldm.modules.attention"):
        for _ in range(3):
            attention(*small)
            attention(*wide)
            attention(*small, backend="math")
    messages = [r.getMessage() for r in caplog.records]
    assert len(messages) == 3, messages
    assert sum("sdpa backend" in m for m in messages) == 2 and sum("math backend" in m for m in messages) == 1


def test_gradients_flow_through_the_triton_backend_in_a_model_layer():
    torch.manual_seed(13)
    layer = CrossAttention(16, 12, heads=2, dim_head=8, attention_backend="triton").to(DEVICE)
    x = torch.randn(2, 11, 16, device=DEVICE, requires_grad=True)
    context = torch.randn(2, 6, 12, device=DEVICE)
    reference = CrossAttention(16, 12, heads=2, dim_head=8, attention_backend="math").to(DEVICE)
    reference.load_state_dict(layer.state_dict())
    x_ref = x.detach().clone().requires_grad_()
    layer(x, context).square().sum().backward()
    reference(x_ref, context).square().sum().backward()
    q, k, v = (torch.empty(2, 2, n, 8, device=DEVICE, requires_grad=True) for n in (11, 6, 6))
    assert chosen_backend(q, k, v, backend="triton") == "triton"
    torch.testing.assert_close(x.grad, x_ref.grad, rtol=1e-4, atol=1e-5)
    for p, p_ref in zip(layer.parameters(), reference.parameters()):
        torch.testing.assert_close(p.grad, p_ref.grad, rtol=1e-4, atol=1e-5)
