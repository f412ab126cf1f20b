import torch

from histodistill.models.batch_attention import BatchAttention
from histodistill.models.projection import ProjectionHead


def test_shape_and_finite():
    torch.manual_seed(0)
    out = BatchAttention(dim=16, num_heads=4)(torch.randn(5, 16))
    assert out.shape == (5, 16) and torch.isfinite(out).all()


def test_attention_mixes_samples_across_the_batch():
    torch.manual_seed(0)
    attention = BatchAttention(dim=16, num_heads=4)
    x = torch.randn(4, 16)
    changed = x.clone()
    changed[3] = torch.randn(16)
    before, after = attention(x), attention(changed)
    # sample 0 is identical in both batches, yet its output changes because sample 3 changed
    assert not torch.allclose(before[0], after[0], atol=1e-6)


def test_attention_matches_a_per_head_hand_computation():
    torch.manual_seed(0)
    dim, heads = 8, 2
    attention = BatchAttention(dim=dim, num_heads=heads)
    x = torch.randn(3, dim)
    q, k, v = (x @ attention.qkv.weight.T + attention.qkv.bias).split(dim, dim=1)
    hd = dim // heads
    outs = []
    for h in range(heads):
        sl = slice(h * hd, (h + 1) * hd)
        weights = torch.softmax(q[:, sl] @ k[:, sl].T / hd**0.5, dim=1)
        outs.append(weights @ v[:, sl])
    expected = attention.proj(torch.cat(outs, dim=1))
    torch.testing.assert_close(attention(x), expected)


def test_projection_head_outputs_unit_vectors():
    head = ProjectionHead(12, 6)
    out = head(torch.randn(5, 12))
    assert out.shape == (5, 6)
    torch.testing.assert_close(out.norm(dim=1), torch.ones(5))
    assert isinstance(head.net[0], torch.nn.Linear) and head.net[0].out_features == 12
