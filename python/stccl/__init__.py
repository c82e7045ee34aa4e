"""stccl: the STCCL training layer on top of stccl_ops.

- STCCLLoss, adaptive_weights: the loss (spatial + temporal coherent
  correlations, L1 or PatchNCE, correlation-aware adaptive weighting).
- CorrelationMetric, SmallBackbone, train_metric: stage 1, the learned metric.
- train_spfem, setup_distributed, make_loader: stage 2, SPFEM training
  (one process or torchrun + DDP).
"""

from .loss import STCCLLoss, STCCLResult, adaptive_weights
from .metric import CorrelationMetric, SmallBackbone, train_metric
from .train import make_loader, setup_distributed, train_spfem

__all__ = ["CorrelationMetric", "STCCLLoss", "STCCLResult", "SmallBackbone", "adaptive_weights",
           "make_loader", "setup_distributed", "train_metric", "train_spfem"]
