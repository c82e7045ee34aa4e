"""Synthetic talking-face clips and a tiny generator: the two STCCL stages end
to end in seconds on a CPU.

    python -m stccl.demo [--steps 20] [--out runs/demo]
    torchrun --nproc_per_node 2 -m stccl.demo        # the same under DDP

A clip is a face-like ellipse whose tint is the emotion and a mouth whose
opening follows a per-clip "speech" phase: changing the emotion must keep the
mouth motion, which is what the STCCL loss preserves.
"""

import argparse
import math
import os

import torch
from torch import nn
from torch.utils.data import Dataset

from .loss import STCCLLoss
from .metric import CorrelationMetric, SmallBackbone, train_metric
from .train import make_loader, setup_distributed, train_spfem

EMOTION_TINTS = torch.tensor([[0.9, 0.8, 0.7], [0.9, 0.5, 0.4], [0.5, 0.6, 0.9],
                              [0.6, 0.9, 0.5]])


def render_clip(speech_phase, emotion, frames=6, size=32):
    """(T, 3, size, size) clip: emotion tint, mouth opening from the speech."""
    ys, xs = torch.meshgrid(torch.linspace(-1, 1, size), torch.linspace(-1, 1, size),
                            indexing="ij")
    face = ((xs / 0.8) ** 2 + (ys / 0.95) ** 2 < 1).float()
    clip = []
    for t in range(frames):
        opening = 0.05 + 0.15 * (1 + math.sin(speech_phase + 1.3 * t)) / 2
        mouth = (((xs / 0.35) ** 2 + ((ys - 0.45) / opening) ** 2) < 1).float()
        eyes = sum((((xs - ex) / 0.12) ** 2 + ((ys + 0.3) / 0.08) ** 2 < 1).float()
                   for ex in (-0.35, 0.35))
        shade = face * (1 - 0.8 * mouth) * (1 - 0.7 * eyes)
        clip.append(EMOTION_TINTS[emotion][:, None, None] * shade)
    return torch.stack(clip)


class SyntheticTalkingFaces(Dataset):
    """Items (clip, target_emotion), or with pairs=True (clip_a, clip_b): the
    same speech rendered with two different emotions (metric learning)."""

    def __init__(self, size=64, frames=6, resolution=32, pairs=False, seed=0):
        g = torch.Generator().manual_seed(seed)
        self.phases = torch.rand(size, generator=g) * 2 * math.pi
        self.emotions = torch.randint(0, len(EMOTION_TINTS), (size, 2), generator=g)
        self.emotions[:, 1] = (self.emotions[:, 0] + 1 + self.emotions[:, 1] % 3) % 4
        self.frames, self.resolution, self.pairs = frames, resolution, pairs

    def __len__(self):
        return len(self.phases)

    def __getitem__(self, i):
        phase, (source, other) = self.phases[i].item(), self.emotions[i].tolist()
        clip = render_clip(phase, source, self.frames, self.resolution)
        if self.pairs:
            return clip, render_clip(phase, other, self.frames, self.resolution)
        return clip, torch.tensor(other)


class TinyGenerator(nn.Module):
    """generated = clip + residual(clip, emotion embedding), frame by frame."""

    def __init__(self, emotions=len(EMOTION_TINTS), width=16):
        super().__init__()
        self.embed = nn.Embedding(emotions, width)
        self.inp = nn.Conv2d(3, width, 3, padding=1)
        self.out = nn.Sequential(nn.ReLU(), nn.Conv2d(width, width, 3, padding=1), nn.ReLU(),
                                 nn.Conv2d(width, 3, 3, padding=1))

    def forward(self, clip, emotion):
        B, T = clip.shape[:2]
        frames = clip.flatten(0, 1)
        h = self.inp(frames) + self.embed(emotion).repeat_interleave(T, 0)[:, :, None, None]
        return clip + self.out(h).unflatten(0, (B, T))


def expression_loss(generated, source, emotion):
    """The demo's own task loss: the face takes the target tint, the rest of
    the picture stays close to the source."""
    face = (source.sum(2, keepdim=True) > 0).float()
    tint = (generated * face).sum((1, 3, 4)) / face.sum((1, 3, 4)).clamp_min(1)
    brightest = EMOTION_TINTS.to(generated.device)[emotion] * 0.9
    return {"expression": (tint - brightest).square().mean(),
            "reconstruction": 0.1 * (generated - source).abs().mean()}


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=20, help="epochs of each stage")
    parser.add_argument("--out", default="runs/demo")
    parser.add_argument("--backend", default=None)
    args = parser.parse_args(argv)
    rank, world, device = setup_distributed()
    torch.manual_seed(0)
    metric = CorrelationMetric(SmallBackbone((16, 32)))
    if rank == 0:  # stage 1 is small: rank 0 learns it, the others load it
        pairs = make_loader(SyntheticTalkingFaces(32, pairs=True), batch_size=8)
        metric, history = train_metric(metric, pairs, epochs=args.steps, device=device)
        os.makedirs(args.out, exist_ok=True)
        torch.save(metric.state_dict(), os.path.join(args.out, "metric.pt"))
        print(f"metric NCE loss {history[0]:.3f} -> {history[-1]:.3f}")
    if world > 1:
        torch.distributed.barrier()
        metric.load_state_dict(torch.load(os.path.join(args.out, "metric.pt")))
        metric.freeze()
    metric.to(device)
    generator = TinyGenerator().to(device)
    loss = STCCLLoss(feature_extractor=metric, kernel_size=3, temporal_kernel_size=3,
                     backend=args.backend)
    loader = make_loader(SyntheticTalkingFaces(64), batch_size=8)
    optimizer = torch.optim.Adam(generator.parameters(), lr=2e-3)
    rows = train_spfem(generator, loader, loss, expression_loss, optimizer, epochs=args.steps,
                       stccl_weight=1.0, clip_grad_norm=1.0,
                       checkpoint=os.path.join(args.out, "generator.pt"),
                       log_path=os.path.join(args.out, "log.csv"), device=device)
    if rank == 0 and rows:
        print(f"SPFEM loss {rows[0]['loss']:.4f} -> {rows[-1]['loss']:.4f} "
              f"(stccl {rows[-1]['stccl']:.4f}, expression {rows[-1]['expression']:.4f})")
    if world > 1:
        torch.distributed.destroy_process_group()


if __name__ == "__main__":
    main()
