"""Stage 1: the correlation metric, a feature extractor whose local correlations
agree between clips with the same speech and different emotions."""

from typing import Callable, Iterable, Optional, Sequence, Union

import torch
from torch import nn

from .loss import STCCLLoss


class SmallBackbone(nn.Module):
    """A small CNN returning one feature map per stage: (N, 3, H, W) ->
    [(N, c1, H/2, W/2), (N, c2, H/4, W/4), ...]."""

    def __init__(self, channels: Sequence[int] = (32, 64), in_channels: int = 3) -> None:
        super().__init__()
        stages, prev = [], in_channels
        for c in channels:
            stages.append(nn.Sequential(
                nn.Conv2d(prev, c, 3, padding=1), nn.GroupNorm(min(8, c), c), nn.ReLU(),
                nn.Conv2d(c, c, 3, stride=2, padding=1), nn.ReLU()))
            prev = c
        self.stages = nn.ModuleList(stages)

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        features = []
        for stage in self.stages:
            x = stage(x)
            features.append(x)
        return features


class CorrelationMetric(nn.Module):
    """Backbone (any module mapping frames (N, 3, H, W) to a list of feature
    maps; SmallBackbone by default) plus optional 1x1 projection heads per layer.

    forward(clip): (B, T, 3, H, W) -> list of (B, T, C_l, H_l, W_l), the
    input STCCLLoss expects.
    """

    def __init__(self, backbone: Optional[nn.Module] = None,
                 head_channels: Optional[Sequence[int]] = None) -> None:
        super().__init__()
        self.backbone = backbone if backbone is not None else SmallBackbone()
        self.heads = None
        if head_channels is not None:
            self.heads = nn.ModuleList(nn.LazyConv2d(c, 1) for c in head_channels)

    def forward(self, clip: torch.Tensor) -> list[torch.Tensor]:
        if clip.dim() != 5:
            raise ValueError(f"stccl.CorrelationMetric: clip must be (B, T, C, H, W), got shape "
                             f"{tuple(clip.shape)}")
        B, T = clip.shape[:2]
        features = self.backbone(clip.flatten(0, 1))
        if self.heads is not None:
            if len(self.heads) != len(features):
                raise ValueError(f"stccl.CorrelationMetric: {len(self.heads)} heads for "
                                 f"{len(features)} backbone layers")
            features = [head(f) for head, f in zip(self.heads, features)]
        return [f.unflatten(0, (B, T)) for f in features]

    def freeze(self) -> "CorrelationMetric":
        """Fixed from here on: eval mode, no parameter gradients."""
        self.eval()
        self.requires_grad_(False)
        return self


def train_metric(metric: CorrelationMetric, loader: Iterable, epochs: int = 1, lr: float = 1e-3,
                 device: Union[str, torch.device] = "cpu", loss: Optional[STCCLLoss] = None,
                 log: Optional[Callable[[dict], None]] = None,
                 progress: bool = True) -> tuple[CorrelationMetric, list[float]]:
    """Learns `metric` on clip pairs (clip_a, clip_b) with the same speech and
    different emotions: the NCE form of the STCCL loss between the two
    clips' features, gradients through both sides. Returns the frozen metric
    and the list of per-step losses."""
    from tqdm.auto import tqdm

    metric.to(device).train()
    loss = loss or STCCLLoss(criterion="nce", weighting="none", detach_source=False)
    if loss.detach_source:
        raise ValueError("stccl.train_metric: the metric loss must use detach_source=False")
    history = []
    optimizer = None
    for epoch in range(epochs):
        bar = tqdm(loader, desc=f"metric {epoch + 1}/{epochs}", disable=not progress)
        for clip_a, clip_b in bar:
            clip_a, clip_b = clip_a.to(device), clip_b.to(device)
            result = loss(metric(clip_a), metric(clip_b))
            if optimizer is None:
                optimizer = torch.optim.Adam(
                    [p for p in metric.parameters() if p.requires_grad], lr=lr)
            optimizer.zero_grad(set_to_none=True)
            result.total.backward()
            optimizer.step()
            history.append(result.total.item())
            bar.set_postfix(loss=f"{history[-1]:.4f}")
            if log is not None:
                log({"stage": "metric", "epoch": epoch, **result.log()})
    return metric.freeze(), history
