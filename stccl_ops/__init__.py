"""stccl_ops: fused local (patch-neighbourhood) and cross-frame cosine
correlation volumes for Spatial-Temporal Coherent Correlation Learning.

Public API: the functions below (shapes in their docstrings), the
autograd.Function drop-ins, the nn.Modules, ``available_backends()`` and
``build_info()``. ``stccl_ops.reference`` holds the pure-PyTorch specification;
``stccl_ops.compat`` the drop-ins for spatial-correlation-sampler and mmcv's
Correlation.
"""

from . import _registrations, reference  # noqa: F401 (registers fake kernels and autocast)
from . import compat  # noqa: F401 (drop-ins for spatial-correlation-sampler and mmcv)
from ._backends import available_backends
from ._extension import build_info
from .autograd import LocalCorrelationFunction, SelfCorrelationFunction
from .functional import (
    SpatioTemporal,
    local_correlation,
    spatial_correlation,
    spatiotemporal_correlation,
    temporal_correlation,
)
from .modules import (
    LocalCorrelation,
    SpatialCorrelation,
    SpatioTemporalCorrelation,
    TemporalCorrelation,
)

try:  # the Triton backend registers itself when Triton imports
    from . import triton as _triton_backend  # noqa: F401
except ImportError:
    pass

__version__ = "0.1.0"

__all__ = [
    "LocalCorrelation",
    "LocalCorrelationFunction",
    "SelfCorrelationFunction",
    "SpatialCorrelation",
    "SpatioTemporal",
    "SpatioTemporalCorrelation",
    "TemporalCorrelation",
    "available_backends",
    "build_info",
    "compat",
    "local_correlation",
    "reference",
    "spatial_correlation",
    "spatiotemporal_correlation",
    "temporal_correlation",
]
