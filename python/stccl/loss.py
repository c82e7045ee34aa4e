"""The STCCL loss: spatial and temporal coherent correlations of source and
generated clip features must agree, with correlation-aware adaptive weighting.
Built on the public API of stccl_ops only."""

from dataclasses import dataclass, field
from typing import Any, Callable, Optional, Sequence, Union

import torch
import torch.nn.functional as F
from torch import nn

import stccl_ops

CRITERIA = ("l1", "nce")
# A feature clip (B, T, C, H, W), a list of them (one per layer), or the clips
# themselves when the loss has a feature_extractor.
Clips = Union[torch.Tensor, Sequence[torch.Tensor]]
WEIGHTINGS = ("adaptive", "none")


def adaptive_weights(source_corr: torch.Tensor, temperature: float = 0.5, threshold: float = 0.8,
                     scale: float = 2.0) -> torch.Tensor:
    """Correlation-aware adaptive weights from the (detached) source volume.

    Disparity ``1 - S`` is squashed to ``t = sigmoid((1 - S) / temperature)``;
    a location with ``t > threshold`` (a hard region: low correlation with its
    neighbour) gets weight ``scale * t**2``, every other one weight 1 - the rule
    of the original ASCCL/STCCL code, applied to correlation disparity. With
    the defaults, cosines below about 0.31 are up-weighted by 1.28 to 1.93.
    """
    t = torch.sigmoid((1 - source_corr.detach()) / temperature)
    return torch.where(t > threshold, scale * t * t, torch.ones_like(t))


@dataclass
class STCCLResult:
    """The loss and its parts; ``total`` is the tensor to backpropagate."""

    total: torch.Tensor
    spatial: torch.Tensor
    temporal: torch.Tensor
    per_layer: list[dict[str, torch.Tensor]] = field(default_factory=list)  # [{"spatial": t, "temporal": t}, ...]
    mean_weight: Optional[torch.Tensor] = None

    def log(self) -> dict[str, float]:
        """Plain floats for a progress bar or a log file."""
        out = {"stccl": self.total.item(), "spatial": self.spatial.item(),
               "temporal": self.temporal.item()}
        if self.mean_weight is not None:
            out["mean_weight"] = self.mean_weight.item()
        for i, layer in enumerate(self.per_layer):
            out.update({f"layer{i}_{k}": v.item() for k, v in layer.items()})
        return out


def _check_clip(name, t):
    if not isinstance(t, torch.Tensor) or t.dim() != 5:
        got = tuple(t.shape) if isinstance(t, torch.Tensor) else type(t).__name__
        raise ValueError(f"stccl.STCCLLoss: {name} must be (B, T, C, H, W) tensors, got {got}")


class STCCLLoss(nn.Module):
    """STCCL loss between source and generated clips.

    forward(source, generated): each a feature clip ``(B, T, C, H, W)``, a list
    of them (one per backbone layer), or, when ``feature_extractor`` is given,
    the clips themselves (its ``features(clip)`` or ``clip -> list`` output is
    used). The source side is the target: no gradient flows into it (unless
    ``detach_source=False``, as in metric learning).

    Args:
        kernel_size, dilation: the spatial window (self-correlation volume).
        temporal_kernel_size, temporal_dilation, frame_stride: the temporal
            window, frame t against frame t + frame_stride.
        criterion: "l1" (weighted mean |S_gen - S_src|) or "nce" (PatchNCE on
            the L2-normalized K*K correlation descriptors of num_samples random
            locations, the same for both clips; positives on the diagonal).
        weighting: "adaptive" (see adaptive_weights) or "none".
        layer_weights, spatial_weight, temporal_weight: the mix of the parts.
        backend: passed to stccl_ops.
    """

    def __init__(self, kernel_size: int = 3, dilation: int = 1, temporal_kernel_size: int = 3,
                 temporal_dilation: int = 1, frame_stride: int = 1, criterion: str = "l1",
                 weighting: str = "adaptive", num_samples: int = 256, tau: float = 0.07,
                 temperature: float = 0.5, threshold: float = 0.8, scale: float = 2.0,
                 layer_weights: Optional[Sequence[float]] = None, spatial_weight: float = 1.0,
                 temporal_weight: float = 1.0, feature_extractor: Optional[Callable] = None,
                 detach_source: bool = True, backend: Optional[str] = None) -> None:
        super().__init__()
        if criterion not in CRITERIA:
            raise ValueError(f"stccl.STCCLLoss: criterion must be one of {CRITERIA}, got "
                             f"{criterion!r}")
        if weighting not in WEIGHTINGS:
            raise ValueError(f"stccl.STCCLLoss: weighting must be one of {WEIGHTINGS}, got "
                             f"{weighting!r}")
        if num_samples < 2:
            raise ValueError(f"stccl.STCCLLoss: num_samples must be >= 2, got {num_samples}")
        self.kernel_size, self.dilation = kernel_size, dilation
        self.temporal_kernel_size, self.temporal_dilation = temporal_kernel_size, temporal_dilation
        self.frame_stride, self.criterion, self.weighting = frame_stride, criterion, weighting
        self.num_samples, self.tau = num_samples, tau
        self.temperature, self.threshold, self.scale = temperature, threshold, scale
        self.layer_weights = layer_weights
        self.spatial_weight, self.temporal_weight = spatial_weight, temporal_weight
        self.feature_extractor = feature_extractor
        self.detach_source, self.backend = detach_source, backend

    def _features(self, source, generated):
        if self.feature_extractor is not None:
            _check_clip("source", source)
            _check_clip("generated", generated)
            with torch.no_grad() if self.detach_source else torch.enable_grad():
                source = self.feature_extractor(source)
            generated = self.feature_extractor(generated)
        src = list(source) if isinstance(source, (list, tuple)) else [source]
        gen = list(generated) if isinstance(generated, (list, tuple)) else [generated]
        if len(src) != len(gen):
            raise ValueError(f"stccl.STCCLLoss: source has {len(src)} feature layers, generated "
                             f"{len(gen)}")
        for i, (s, g) in enumerate(zip(src, gen)):
            _check_clip(f"source layer {i}", s)
            _check_clip(f"generated layer {i}", g)
            if s.shape != g.shape:
                raise ValueError(f"stccl.STCCLLoss: layer {i} shapes differ: source "
                                 f"{tuple(s.shape)}, generated {tuple(g.shape)}")
            if s.shape[1] <= self.frame_stride:
                raise ValueError(f"stccl.STCCLLoss: clips need more than frame_stride = "
                                 f"{self.frame_stride} frames, got T = {s.shape[1]}")
        if self.layer_weights is not None and len(self.layer_weights) != len(src):
            raise ValueError(f"stccl.STCCLLoss: {len(self.layer_weights)} layer_weights for "
                             f"{len(src)} layers")
        return src, gen

    def weights(self, source_corr: torch.Tensor) -> torch.Tensor:
        if self.weighting == "none":
            return torch.ones_like(source_corr)
        return adaptive_weights(source_corr, self.temperature, self.threshold, self.scale)

    def compare(self, src_corr: torch.Tensor, gen_corr: torch.Tensor,
                generator: Optional[torch.Generator] = None) -> tuple[torch.Tensor, torch.Tensor]:
        """(loss, mean weight) of two volumes (B, T', K*K, H, W)."""
        w = self.weights(src_corr)
        if self.criterion == "l1":
            return (w * (gen_corr - src_corr).abs()).mean(), w.mean()
        B, T, KK, H, W = src_corr.shape
        src = src_corr.reshape(B * T, KK, H * W)
        gen = gen_corr.reshape(B * T, KK, H * W)
        count = min(self.num_samples, H * W)
        where = torch.randperm(H * W, generator=generator, device="cpu")[:count]
        where = where.to(src.device)
        src = F.normalize(src[:, :, where].transpose(1, 2), dim=-1)  # (BT, S, KK)
        gen = F.normalize(gen[:, :, where].transpose(1, 2), dim=-1)
        logits = gen @ src.transpose(1, 2) / self.tau                # (BT, S, S)
        labels = torch.arange(count, device=src.device).expand(B * T, count)
        ce = F.cross_entropy(logits.flatten(0, 1), labels.flatten(), reduction="none")
        location_w = w.reshape(B * T, KK, H * W)[:, :, where].mean(1).flatten()
        return (location_w * ce).mean(), location_w.mean()

    def forward(self, source: Clips, generated: Clips,
                generator: Optional[torch.Generator] = None) -> STCCLResult:
        src_layers, gen_layers = self._features(source, generated)
        layer_weights = self.layer_weights or [1.0] * len(src_layers)
        spatial_total = temporal_total = 0.0
        per_layer, weight_means = [], []
        for lw, src, gen in zip(layer_weights, src_layers, gen_layers):
            if self.detach_source:
                src = src.detach()
            # Both volumes of a clip from one read of it (and one backward pass).
            window = (self.kernel_size, self.dilation, self.temporal_kernel_size,
                      self.temporal_dilation, self.frame_stride)
            sp_src, tp_src = stccl_ops.spatiotemporal_correlation(src, *window,
                                                                  backend=self.backend)
            sp_gen, tp_gen = stccl_ops.spatiotemporal_correlation(gen, *window,
                                                                  backend=self.backend)
            spatial, w_s = self.compare(sp_src, sp_gen, generator)
            temporal, w_t = self.compare(tp_src, tp_gen, generator)
            per_layer.append({"spatial": spatial.detach(), "temporal": temporal.detach()})
            weight_means += [w_s.detach(), w_t.detach()]
            spatial_total = spatial_total + lw * spatial
            temporal_total = temporal_total + lw * temporal
        total = self.spatial_weight * spatial_total + self.temporal_weight * temporal_total
        return STCCLResult(total, spatial_total.detach(), temporal_total.detach(), per_layer,
                           torch.stack(weight_means).mean())
