import pytest
import torch

from ldm.modules.encoders import ClassEmbedder, MaskEncoder


def test_class_embedder_tokens_and_learned_null():
    embedder = ClassEmbedder(embed_dim=6, n_classes=4)
    labels = torch.tensor([0, 3, 3])
    tokens = embedder(labels)
    assert tokens.shape == (3, 1, 6)
    torch.testing.assert_close(tokens[:, 0], embedder.embedding.weight[labels])
    null = embedder.null_condition(tokens)
    assert null.shape == tokens.shape and torch.equal(null[2, 0], embedder.embedding.weight[4])
    null.sum().backward()
    assert embedder.embedding.weight.grad[4].abs().sum() > 0  # the null class is learned
    with pytest.raises(ValueError, match=r"labels must be in \[0, 4\), got \[0, 4\]"):
        embedder(torch.tensor([0, 4]))
    with pytest.raises(ValueError, match="must be \\(B,\\) integers"):
        embedder(torch.zeros(2))


@pytest.mark.parametrize("dims, spatial", [(2, (16, 12)), (3, (8, 16, 16))])
@pytest.mark.parametrize("n_stages", [0, 2])
def test_mask_encoder_reaches_the_latent_grid(dims, spatial, n_stages):
    encoder = MaskEncoder(in_channels=3, out_channels=4, n_stages=n_stages, dims=dims, hidden_channels=8)
    out = encoder(torch.rand(2, 3, *spatial))
    assert out.shape == (2, 4, *[s // 2 ** n_stages for s in spatial])
    with pytest.raises(ValueError, match="expected a \\(B, C"):
        encoder(torch.rand(2, 3, *spatial[1:]))
