import pytest
import torch
from torch.nn import functional as F

from ldm.modules.quantize import VectorQuantizer


def _quantizer(n_embed=6, embed_dim=3, seed=0, **params) -> VectorQuantizer:
    torch.manual_seed(seed)
    quantizer = VectorQuantizer(n_embed, embed_dim, **params)
    with torch.no_grad():
        quantizer.embedding.weight.copy_(torch.randn(n_embed, embed_dim))
        if quantizer.ema_decay is not None:
            quantizer.embed_sum.copy_(quantizer.embedding.weight)
    return quantizer


def test_nearest_codes_and_straight_through_gradient_3d():
    quantizer = _quantizer()
    z = torch.randn(2, 3, 2, 3, 4, requires_grad=True)
    z_q, loss, info = quantizer(z)
    flat = z.detach().movedim(1, -1).reshape(-1, 3)
    expected = torch.cdist(flat, quantizer.embedding.weight.detach()).argmin(dim=1)
    assert info["indices"].shape == (2, 2, 3, 4) and torch.equal(info["indices"].flatten(), expected)
    torch.testing.assert_close(z_q, quantizer.lookup(info["indices"]))
    z_q.sum().backward()
    torch.testing.assert_close(z.grad, torch.ones_like(z))  # identity gradient through the quantiser


def test_loss_is_commitment_plus_codebook_term_with_gradients_to_both():
    quantizer = _quantizer(beta=0.3)
    z = torch.randn(2, 3, 4, 4, requires_grad=True)
    _, loss, info = quantizer(z)
    codes = quantizer.lookup(info["indices"]).detach()
    torch.testing.assert_close(loss, 1.3 * F.mse_loss(z, codes))
    loss.backward()
    torch.testing.assert_close(z.grad, 0.3 * 2 * (z - codes).detach() / z.numel())  # commitment only reaches z
    used = torch.zeros(6, dtype=torch.bool)
    used[info["indices"].unique()] = True
    grad = quantizer.embedding.weight.grad
    assert grad[used].abs().sum(1).gt(0).all() and not grad[~used].any()


def test_ema_codebook_update_matches_the_formula():
    quantizer = _quantizer(ema_decay=0.9).train()
    assert not quantizer.embedding.weight.requires_grad
    old = quantizer.embedding.weight.clone()
    z = torch.randn(2, 3, 4, 4)
    with torch.enable_grad():
        _, loss, info = quantizer(z)
    flat, indices = z.movedim(1, -1).reshape(-1, 3), info["indices"].flatten()
    counts = torch.bincount(indices, minlength=6).float()
    sums = torch.zeros(6, 3).index_add_(0, indices, flat)
    cluster = 0.9 * torch.ones(6) + 0.1 * counts
    embed_sum = 0.9 * old + 0.1 * sums
    total = cluster.sum()
    smoothed = (cluster + 1e-5) / (total + 6 * 1e-5) * total
    torch.testing.assert_close(quantizer.cluster_size, cluster)
    torch.testing.assert_close(quantizer.embedding.weight, embed_sum / smoothed[:, None])
    torch.testing.assert_close(loss, 0.25 * F.mse_loss(z, old[indices].view(2, 4, 4, 3).movedim(-1, 1)))


def test_no_codebook_change_in_eval_or_without_gradients():
    quantizer = _quantizer(ema_decay=0.9)
    state = {k: v.clone() for k, v in quantizer.state_dict().items()}
    with torch.no_grad():
        quantizer.train()(torch.randn(1, 3, 4, 4))
    quantizer.eval()(torch.randn(1, 3, 4, 4))
    assert all(torch.equal(v, quantizer.state_dict()[k]) for k, v in state.items())


def test_perplexity_and_usage():
    quantizer = _quantizer(n_embed=4, embed_dim=4).eval()
    with torch.no_grad():
        quantizer.embedding.weight.copy_(torch.eye(4) * 5)
    every_code = (torch.eye(4) * 5).T.reshape(1, 4, 2, 2)  # position i holds code i
    _, _, info = quantizer(every_code)
    assert info["perplexity"].item() == pytest.approx(4.0) and info["usage"].item() == 1.0
    _, _, info = quantizer(every_code[:, :, :1, :1].expand(1, 4, 2, 2))
    assert info["perplexity"].item() == pytest.approx(1.0) and info["usage"].item() == 0.25


def test_dead_codes_restart_at_encoder_outputs():
    quantizer = _quantizer(n_embed=8, dead_code_threshold=2.0).train()
    z = torch.randn(1, 3, 2, 2)  # 4 vectors for 8 codes: some codes are never chosen
    with torch.enable_grad():
        _, _, info = quantizer(z)
    flat = z.movedim(1, -1).reshape(-1, 3)
    used = set(info["indices"].flatten().tolist())
    for code in set(range(8)) - used:  # decayed usage below the threshold -> a batch vector
        assert torch.isclose(quantizer.embedding.weight[code], flat).all(dim=1).any()
        assert quantizer.cluster_size[code].item() == 2.0


def test_bad_shapes_and_options_raise():
    with pytest.raises(ValueError, match=r"expected z of shape \(B, 3, \*spatial\)"):
        _quantizer()(torch.randn(1, 4, 2, 2))
    with pytest.raises(ValueError, match="ema_decay must be in"):
        VectorQuantizer(4, 3, ema_decay=1.5)
