"""The reference itself against independent implementations."""

import pytest
import torch
import torch.nn.functional as F

from stccl_ops import reference


def naive_local_correlation(a, b, K, d, normalize, eps):
    """Pixel by pixel, straight from the definition (float64, tiny inputs)."""
    a, b = a.double(), b.double()
    N, C, H, W = a.shape
    out = torch.zeros(N, K * K, H, W, dtype=torch.float64)
    r = K // 2
    for n in range(N):
        for y in range(H):
            for x in range(W):
                va = a[n, :, y, x]
                if normalize:
                    va = va / max(va.norm().item(), eps)
                for i in range(K):
                    for j in range(K):
                        yq, xq = y + (i - r) * d, x + (j - r) * d
                        if 0 <= yq < H and 0 <= xq < W:
                            vb = b[n, :, yq, xq]
                            if normalize:
                                vb = vb / max(vb.norm().item(), eps)
                            out[n, i * K + j, y, x] = (va * vb).sum()
    return out


def unfold_local_correlation(a, b, K, d, normalize, eps):
    """The F.unfold formulation (memory-hungry, but independent)."""
    if normalize:
        a, b = F.normalize(a, dim=1, eps=eps), F.normalize(b, dim=1, eps=eps)
    N, C, H, W = a.shape
    patches = F.unfold(b, K, dilation=d, padding=(K // 2) * d).view(N, C, K * K, H, W)
    return (a.unsqueeze(2) * patches).sum(1)


@pytest.mark.parametrize("K,d", [(1, 1), (3, 1), (3, 2), (5, 1), (5, 3)])
@pytest.mark.parametrize("normalize", [True, False])
def test_reference_matches_naive_definition(K, d, normalize):
    g = torch.Generator().manual_seed(K * 10 + d)
    a = torch.randn(2, 3, 5, 6, generator=g, dtype=torch.float64)
    b = torch.randn(2, 3, 5, 6, generator=g, dtype=torch.float64)
    a[0, :, 2, 3] = 0
    expected = naive_local_correlation(a, b, K, d, normalize, 1e-8)
    actual = reference.local_correlation(a, b, K, d, normalize, 1e-8)
    torch.testing.assert_close(actual, expected, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("K,d", [(3, 1), (7, 2), (9, 1)])
def test_reference_matches_unfold(K, d):
    a = torch.randn(2, 4, 9, 8, dtype=torch.float64)
    b = torch.randn(2, 4, 9, 8, dtype=torch.float64)
    torch.testing.assert_close(reference.local_correlation(a, b, K, d),
                               unfold_local_correlation(a, b, K, d, True, 1e-8),
                               rtol=1e-12, atol=1e-12)


def test_reference_cosine_properties():
    x = torch.randn(1, 6, 7, 7, dtype=torch.float64)
    out = reference.spatial_correlation(x, 5, 1)
    centre = out[:, 12]
    torch.testing.assert_close(centre, torch.ones_like(centre))  # <x̂, x̂> = 1
    assert out.abs().max() <= 1 + 1e-12
    # symmetry of the self-correlation: out[p, d] = out[p + d, -d]
    torch.testing.assert_close(out[:, 0, 2:, 2:], out[:, 24, :-2, :-2])


def test_reference_half_accumulates_in_float32():
    a = torch.randn(1, 512, 3, 3)
    b = torch.randn(1, 512, 3, 3)
    expected = reference.local_correlation(a.half().float(), b.half().float()).half()
    torch.testing.assert_close(reference.local_correlation(a.half(), b.half()), expected,
                               rtol=0, atol=0)


def test_reference_clip_and_temporal_views():
    v = torch.randn(2, 4, 3, 5, 6, dtype=torch.float64)
    spatial = reference.spatial_correlation(v, 3)
    assert spatial.shape == (2, 4, 9, 5, 6)
    torch.testing.assert_close(spatial[1, 2], reference.local_correlation(v[1, 2:3], v[1, 2:3])[0])
    temporal = reference.temporal_correlation(v, 3, frame_stride=2)
    assert temporal.shape == (2, 2, 9, 5, 6)
    torch.testing.assert_close(temporal[0, 1],
                               reference.local_correlation(v[0, 1:2], v[0, 3:4], 3)[0])


def test_reference_gradcheck():
    a = torch.randn(1, 3, 4, 5, dtype=torch.float64, requires_grad=True)
    b = torch.randn(1, 3, 4, 5, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda x, y: reference.local_correlation(x, y, 3, 2), (a, b))
