"""nn.Module wrappers of the correlation functions (no parameters)."""

from typing import Optional

import torch
from torch import nn

from . import functional as F


class _Correlation(nn.Module):
    def __init__(self, kernel_size: int, dilation: int = 1, normalize: bool = True,
                 eps: float = 1e-8, backend: Optional[str] = None) -> None:
        super().__init__()
        self.kernel_size, self.dilation = kernel_size, dilation
        self.normalize, self.eps, self.backend = normalize, eps, backend

    def _window(self) -> dict:
        return dict(kernel_size=self.kernel_size, dilation=self.dilation,
                    normalize=self.normalize, eps=self.eps, backend=self.backend)

    def extra_repr(self) -> str:
        return (f"kernel_size={self.kernel_size}, dilation={self.dilation}, "
                f"normalize={self.normalize}, backend={self.backend}")


class LocalCorrelation(_Correlation):
    """forward(a, b): (N, C, H, W) x 2 -> (N, K*K, H, W); see ``stccl_ops.local_correlation``."""

    def __init__(self, kernel_size: int = 3, dilation: int = 1, normalize: bool = True,
                 eps: float = 1e-8, backend: Optional[str] = None) -> None:
        super().__init__(kernel_size, dilation, normalize, eps, backend)

    def forward(self, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        return F.local_correlation(a, b, **self._window())


class SpatialCorrelation(_Correlation):
    """forward(x): (N, C, H, W) -> (N, K*K, H, W) or (B, T, C, H, W) -> (B, T, K*K, H, W)."""

    def __init__(self, kernel_size: int = 3, dilation: int = 1, normalize: bool = True,
                 eps: float = 1e-8, backend: Optional[str] = None) -> None:
        super().__init__(kernel_size, dilation, normalize, eps, backend)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.spatial_correlation(x, **self._window())


class TemporalCorrelation(_Correlation):
    """forward(v): (B, T, C, H, W) -> (B, T - frame_stride, K*K, H, W)."""

    def __init__(self, kernel_size: int = 1, dilation: int = 1, normalize: bool = True,
                 eps: float = 1e-8, frame_stride: int = 1, backend: Optional[str] = None) -> None:
        super().__init__(kernel_size, dilation, normalize, eps, backend)
        self.frame_stride = frame_stride

    def forward(self, v: torch.Tensor) -> torch.Tensor:
        return F.temporal_correlation(v, frame_stride=self.frame_stride, **self._window())

    def extra_repr(self) -> str:
        return super().extra_repr() + f", frame_stride={self.frame_stride}"


class SpatioTemporalCorrelation(_Correlation):
    """forward(v): (B, T, C, H, W) -> SpatioTemporal(spatial, temporal)."""

    def __init__(self, kernel_size: int = 3, dilation: int = 1, temporal_kernel_size: int = 1,
                 temporal_dilation: int = 1, frame_stride: int = 1, normalize: bool = True,
                 eps: float = 1e-8, backend: Optional[str] = None) -> None:
        super().__init__(kernel_size, dilation, normalize, eps, backend)
        self.temporal_kernel_size, self.temporal_dilation = temporal_kernel_size, temporal_dilation
        self.frame_stride = frame_stride

    def forward(self, v: torch.Tensor) -> F.SpatioTemporal:
        return F.spatiotemporal_correlation(
            v, temporal_kernel_size=self.temporal_kernel_size,
            temporal_dilation=self.temporal_dilation, frame_stride=self.frame_stride,
            **self._window())

    def extra_repr(self) -> str:
        return (super().extra_repr() + f", temporal_kernel_size={self.temporal_kernel_size}, "
                f"temporal_dilation={self.temporal_dilation}, frame_stride={self.frame_stride}")
