"""nn.Module wrappers of the correlation functions (no parameters)."""

from torch import nn

from . import functional as F


class _Correlation(nn.Module):
    def __init__(self, kernel_size, dilation=1, normalize=True, eps=1e-8, backend=None):
        super().__init__()
        self.kernel_size, self.dilation = kernel_size, dilation
        self.normalize, self.eps, self.backend = normalize, eps, backend

    def _window(self):
        return dict(kernel_size=self.kernel_size, dilation=self.dilation,
                    normalize=self.normalize, eps=self.eps, backend=self.backend)

    def extra_repr(self):
        return (f"kernel_size={self.kernel_size}, dilation={self.dilation}, "
                f"normalize={self.normalize}, backend={self.backend}")


class LocalCorrelation(_Correlation):
    """forward(a, b): (N, C, H, W) x 2 -> (N, K*K, H, W); see ``stccl_ops.local_correlation``."""

    def __init__(self, kernel_size=3, dilation=1, normalize=True, eps=1e-8, backend=None):
        super().__init__(kernel_size, dilation, normalize, eps, backend)

    def forward(self, a, b):
        return F.local_correlation(a, b, **self._window())


class SpatialCorrelation(_Correlation):
    """forward(x): (N, C, H, W) -> (N, K*K, H, W) or (B, T, C, H, W) -> (B, T, K*K, H, W)."""

    def __init__(self, kernel_size=3, dilation=1, normalize=True, eps=1e-8, backend=None):
        super().__init__(kernel_size, dilation, normalize, eps, backend)

    def forward(self, x):
        return F.spatial_correlation(x, **self._window())


class TemporalCorrelation(_Correlation):
    """forward(v): (B, T, C, H, W) -> (B, T - frame_stride, K*K, H, W)."""

    def __init__(self, kernel_size=1, dilation=1, normalize=True, eps=1e-8, frame_stride=1,
                 backend=None):
        super().__init__(kernel_size, dilation, normalize, eps, backend)
        self.frame_stride = frame_stride

    def forward(self, v):
        return F.temporal_correlation(v, frame_stride=self.frame_stride, **self._window())

    def extra_repr(self):
        return super().extra_repr() + f", frame_stride={self.frame_stride}"


class SpatioTemporalCorrelation(_Correlation):
    """forward(v): (B, T, C, H, W) -> SpatioTemporal(spatial, temporal)."""

    def __init__(self, kernel_size=3, dilation=1, temporal_kernel_size=1, temporal_dilation=1,
                 frame_stride=1, normalize=True, eps=1e-8, backend=None):
        super().__init__(kernel_size, dilation, normalize, eps, backend)
        self.temporal_kernel_size, self.temporal_dilation = temporal_kernel_size, temporal_dilation
        self.frame_stride = frame_stride

    def forward(self, v):
        return F.spatiotemporal_correlation(
            v, temporal_kernel_size=self.temporal_kernel_size,
            temporal_dilation=self.temporal_dilation, frame_stride=self.frame_stride,
            **self._window())

    def extra_repr(self):
        return (super().extra_repr() + f", temporal_kernel_size={self.temporal_kernel_size}, "
                f"temporal_dilation={self.temporal_dilation}, frame_stride={self.frame_stride}")
