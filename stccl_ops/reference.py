"""The pure-PyTorch reference: the specification every backend is tested against.

Differentiable by autograd, float64-capable and memory-lean: it loops over the
K*K offsets with shifted slices, so its extra memory is the normalized inputs
plus one (N, C, h, w) product at a time, never the (N, C*K*K, H, W) tensor of
an ``F.unfold`` implementation.
"""

import math

import torch
import torch.nn.functional as F


def accumulation_dtype(dtype: torch.dtype) -> torch.dtype:
    """float64 for float64 inputs, float32 for every other floating dtype."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def offset(k: int, kernel_size: int, dilation: int) -> tuple[int, int]:
    """(dy, dx) of output channel k: row-major over the window, like F.unfold."""
    r = kernel_size // 2
    return (k // kernel_size - r) * dilation, (k % kernel_size - r) * dilation


def local_correlation(a: torch.Tensor, b: torch.Tensor, kernel_size: int = 3, dilation: int = 1,
                      normalize: bool = True, eps: float = 1e-8) -> torch.Tensor:
    """Reference ``local_correlation``; see ``stccl_ops.local_correlation``.

    a, b: (N, C, H, W) or (B, T, C, H, W), same shape and dtype.
    Returns (..., K*K, H, W) in the input dtype, computed in float32
    (float64 for float64 inputs).
    """
    lead = a.shape[:-3]
    C, H, W = a.shape[-3:]
    work = accumulation_dtype(a.dtype)
    images = math.prod(lead)  # not -1: it is ambiguous for empty tensors
    a_w = a.reshape(images, C, H, W).to(work)
    b_w = b.reshape(images, C, H, W).to(work)
    if normalize:
        a_w = F.normalize(a_w, dim=1, eps=eps)
        b_w = F.normalize(b_w, dim=1, eps=eps)
    K = kernel_size
    out = a_w.new_zeros(a_w.shape[0], K * K, H, W)
    for k in range(K * K):
        dy, dx = offset(k, K, dilation)
        y0, y1 = max(0, -dy), min(H, H - dy)
        x0, x1 = max(0, -dx), min(W, W - dx)
        if y0 >= y1 or x0 >= x1:
            continue  # the whole neighbour lies outside the image: zeros
        a_part = a_w[:, :, y0:y1, x0:x1]
        b_part = b_w[:, :, y0 + dy:y1 + dy, x0 + dx:x1 + dx]
        out[:, k, y0:y1, x0:x1] = (a_part * b_part).sum(1)
    return out.reshape(*lead, K * K, H, W).to(a.dtype)


def spatial_correlation(x: torch.Tensor, kernel_size: int = 3, dilation: int = 1,
                        normalize: bool = True, eps: float = 1e-8) -> torch.Tensor:
    """Reference self-correlation of a map (N, C, H, W) or clip (B, T, C, H, W)."""
    return local_correlation(x, x, kernel_size, dilation, normalize, eps)


def temporal_correlation(v: torch.Tensor, kernel_size: int = 1, dilation: int = 1,
                         normalize: bool = True, eps: float = 1e-8,
                         frame_stride: int = 1) -> torch.Tensor:
    """Reference cross-frame correlation of a clip (B, T, C, H, W):
    frame t against frame t + frame_stride -> (B, T - frame_stride, K*K, H, W)."""
    return local_correlation(v[:, :-frame_stride], v[:, frame_stride:], kernel_size, dilation,
                             normalize, eps)
