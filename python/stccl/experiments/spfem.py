"""Does the STCCL loss preserve speech while the expression changes? A small
speech-preserving facial expression manipulation (SPFEM) study on rendered
talking faces (stccl.experiments.faces), on a CPU.

    python -m stccl.experiments.spfem [--quick] [--seeds 3] [--backend B] --out DIR

The task: an editor network takes a source clip and a target emotion and must
make the face show that emotion while the mouth keeps opening and closing as
in the source. Its expression objective is the unpaired kind: a frozen emotion
classifier (the judge) plus a weak reconstruction term, no target frames. The
judge learned from frames whose emotions come with different typical mouth
openings, so changing the opening is a shortcut to its verdict, one that
destroys the speech. Configurations add the STCCL loss (spatial and/or
temporal part, L1 or NCE criterion, adaptive weighting on or off) between the
source and edited clips' features from a correlation metric learned on clip
pairs with the same speech and different emotions (stage 1).

Measured on held-out clips by networks no training loss sees: the mouth
opening of every edited frame (an opening regressor trained on rendered frames
with known openings) against the source's (speech_error, and lip_sync: the
correlation over time), the expression (a second classifier, trained on
frames whose openings carry no emotion: expression_accuracy), and the change
outside the face. Writes DIR/results.json (one entry per run), results.csv,
table.md, figure.png and setup.json (the frozen networks' own accuracies).
"""

import argparse
import json
import os
import platform
import time
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from ..loss import STCCLLoss
from ..metric import CorrelationMetric, SmallBackbone, train_metric
from . import faces

# name -> STCCL settings (None: no STCCL term)
CONFIGS = {
    "none": None,
    "spatial": dict(spatial_weight=1.0, temporal_weight=0.0),
    "temporal": dict(spatial_weight=0.0, temporal_weight=1.0),
    "full": dict(spatial_weight=1.0, temporal_weight=1.0),
    "full_nce": dict(spatial_weight=1.0, temporal_weight=1.0, criterion="nce"),
    "full_uniform": dict(spatial_weight=1.0, temporal_weight=1.0, weighting="none"),
}
QUICK_CONFIGS = ("none", "full")
METRICS = ("speech_error", "lip_sync", "expression_accuracy", "judge_accuracy",
           "outside_change")


@dataclass
class Settings:
    size: int = 48
    frames: int = 8
    train_clips: int = 96
    test_clips: int = 48
    steps: int = 160          # editor training steps per run
    batch: int = 8
    lr: float = 2e-3
    reconstruction: float = 0.1   # the weak reconstruction term's weight
    stccl_weight: float = 5.0
    setup_steps: int = 300    # steps of each frozen network's training


# ---------------------------------------------------------------- networks


def conv_net(widths, out, pool="mean"):
    """Frames (N, 3, S, S) -> (N, out): strided conv stages, pooled, linear."""
    layers, prev = [], 3
    for w in widths:
        layers += [nn.Conv2d(prev, w, 3, stride=2, padding=1), nn.GroupNorm(min(8, w), w),
                   nn.ReLU()]
        prev = w
    layers += [nn.AdaptiveAvgPool2d(1) if pool == "mean" else nn.AdaptiveMaxPool2d(1),
               nn.Flatten(), nn.Linear(prev, out)]
    return nn.Sequential(*layers)


class Editor(nn.Module):
    """edited = frame + residual(frame, target emotion), frame by frame: a
    small encoder-decoder whose middle is modulated by the emotion (FiLM)."""

    def __init__(self, width: int = 32, emotions: int = len(faces.EMOTIONS)):
        super().__init__()
        self.film = nn.Embedding(emotions, 2 * width)
        self.encode = nn.Sequential(nn.Conv2d(3, width, 3, padding=1), nn.ReLU(),
                                    nn.Conv2d(width, width, 3, stride=2, padding=1), nn.ReLU())
        self.middle = nn.Sequential(nn.Conv2d(width, width, 3, padding=1), nn.ReLU(),
                                    nn.Conv2d(width, width, 3, padding=1), nn.ReLU())
        self.decode = nn.Sequential(nn.Upsample(scale_factor=2, mode="nearest"),
                                    nn.Conv2d(width, width, 3, padding=1), nn.ReLU(),
                                    nn.Conv2d(width, 3, 3, padding=1))

    def forward(self, clip, emotion):
        B, T = clip.shape[:2]
        frames = clip.flatten(0, 1)
        scale, shift = self.film(emotion.repeat_interleave(T)).chunk(2, dim=1)
        h = self.encode(frames) * (1 + scale[:, :, None, None]) + shift[:, :, None, None]
        return (frames + self.decode(self.middle(h))).unflatten(0, (B, T))


# ---------------------------------------------------------------- data


@dataclass
class Clips:
    clips: torch.Tensor      # (B, T, 3, S, S)
    openings: torch.Tensor   # (B, T)
    emotions: torch.Tensor   # (B,) source emotions
    targets: torch.Tensor    # (B,) target emotions, never the source's
    identity: faces.Identity


def make_clips(n: int, settings: Settings, seed: int) -> Clips:
    g = torch.Generator().manual_seed(seed)
    openings = faces.speech(n, settings.frames, g)
    emotions = torch.randint(0, len(faces.EMOTIONS), (n,), generator=g)
    targets = (emotions + torch.randint(1, len(faces.EMOTIONS), (n,), generator=g)) \
        % len(faces.EMOTIONS)
    identity = faces.Identity.sample(n, g)
    return Clips(faces.render_clips(openings, emotions, identity, settings.size), openings,
                 emotions, targets, identity)


def random_frames(n: int, settings: Settings, g: torch.Generator, shortcut: bool):
    """n single frames of random emotions and identities: openings typical of
    their emotion (shortcut=True, the judge's data) or uniform over the
    speech range (no emotion in the opening)."""
    emotions = torch.randint(0, len(faces.EMOTIONS), (n,), generator=g)
    if shortcut:
        openings = faces.typical_openings(emotions, g)
    else:
        lo, hi = faces.OPENING_RANGE
        openings = lo + (hi - lo) * torch.rand(n, generator=g)
    frames = faces.render_frames(openings, emotions, faces.Identity.sample(n, g), settings.size)
    return frames, emotions, openings


def fit(make_net, settings, seed, shortcut, target, loss_fn, progress):
    """make_net() trained on freshly rendered frames for settings.setup_steps
    steps; its initialisation and data follow `seed`."""
    g = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    net = make_net()
    opt = torch.optim.Adam(net.parameters(), lr=2e-3)
    net.train()
    for _ in range(settings.setup_steps):
        frames, emotions, openings = random_frames(64, settings, g, shortcut)
        loss = loss_fn(net(frames), emotions if target == "emotion" else openings)
        opt.zero_grad()
        loss.backward()
        opt.step()
        progress.update(1)
    return net.eval().requires_grad_(False)


# The opening regressor predicts openings times this (about 0.2 to 2).
OPENING_SCALE = 10


def opening_loss(pred, openings):
    return F.mse_loss(pred.squeeze(1), openings * OPENING_SCALE)


def predict_openings(regressor, clips):
    """(B, T) openings of every frame of (B, T, 3, S, S) clips."""
    return regressor(clips.flatten(0, 1)).squeeze(1).unflatten(0, clips.shape[:2]) / OPENING_SCALE


@dataclass
class World:
    """The frozen networks of the study, the same for every run."""

    judge: nn.Module       # trained with the opening shortcut; the editors' objective
    referee: nn.Module     # trained without it; measures the expression
    regressor: nn.Module   # mouth opening of a frame; measures the speech
    metric: CorrelationMetric  # stage 1: the STCCL features


def train_metric_on_pairs(settings, seed, progress):
    """Stage 1: clip pairs with the same speech and identity, two emotions."""
    torch.manual_seed(seed)
    batches = []
    for i in range(settings.setup_steps // 10):
        pairs = make_clips(settings.batch, settings, seed + 1000 + i)
        other = faces.render_clips(pairs.openings, pairs.targets, pairs.identity, settings.size)
        batches.append((pairs.clips, other))
    metric = CorrelationMetric(SmallBackbone((16, 32)))
    metric, _ = train_metric(metric, batches, epochs=1, progress=False)
    progress.update(settings.setup_steps)
    return metric


def build_world(settings: Settings, progress, seed: int = 0) -> World:
    emotions = len(faces.EMOTIONS)
    judge = fit(lambda: conv_net((16, 32, 64), emotions), settings, seed, True, "emotion",
                F.cross_entropy, progress)
    referee = fit(lambda: conv_net((24, 48, 48), emotions, pool="max"), settings, seed + 1,
                  False, "emotion", F.cross_entropy, progress)
    regressor = fit(lambda: conv_net((16, 32, 64), 1), settings, seed + 2, False, "opening",
                    opening_loss, progress)
    metric = train_metric_on_pairs(settings, seed + 3, progress)
    return World(judge, referee, regressor, metric)


# ---------------------------------------------------------------- runs


def measure(world: World, clips: Clips, edited: torch.Tensor) -> dict:
    """The study's measurements of edited clips against their sources."""
    T = edited.shape[1]
    predicted = predict_openings(world.regressor, edited)
    truth = clips.openings
    centred_p = predicted - predicted.mean(1, keepdim=True)
    centred_t = truth - truth.mean(1, keepdim=True)
    sync = (centred_p * centred_t).sum(1) / (centred_p.norm(dim=1) * centred_t.norm(dim=1)
                                             ).clamp_min(1e-8)
    targets = clips.targets.repeat_interleave(T)
    frames = edited.flatten(0, 1)
    outside = 1 - faces.face_mask(clips.identity.repeat(T), frames.shape[-1])
    change = ((frames - clips.clips.flatten(0, 1)).abs().mean(1) * outside).sum() / outside.sum()
    return {
        "speech_error": (predicted - truth).abs().mean().item(),
        "lip_sync": sync.mean().item(),
        "expression_accuracy": (world.referee(frames).argmax(1) == targets).float().mean().item(),
        "judge_accuracy": (world.judge(frames).argmax(1) == targets).float().mean().item(),
        "outside_change": change.item(),
    }


def run(config: str, seed: int, world: World, train: Clips, test: Clips, settings: Settings,
        backend, progress):
    """Trains one editor; returns its measurements and its edit of the first
    test clips."""
    torch.manual_seed(seed)
    editor = Editor()
    opt = torch.optim.Adam(editor.parameters(), lr=settings.lr)
    stccl = None
    if CONFIGS[config] is not None:
        stccl = STCCLLoss(feature_extractor=world.metric, kernel_size=3,
                          temporal_kernel_size=3, backend=backend, **CONFIGS[config])
    g = torch.Generator().manual_seed(seed)
    nce_g = torch.Generator().manual_seed(seed + 1)
    for _ in range(settings.steps):
        idx = torch.randint(0, len(train.clips), (settings.batch,), generator=g)
        source, target = train.clips[idx], train.targets[idx]
        edited = editor(source, target)
        frames = edited.flatten(0, 1)
        loss = F.cross_entropy(world.judge(frames), target.repeat_interleave(settings.frames))
        loss = loss + settings.reconstruction * (edited - source).abs().mean()
        if stccl is not None:
            loss = loss + settings.stccl_weight * stccl(source, edited, generator=nce_g).total
        opt.zero_grad()
        loss.backward()
        opt.step()
        progress.update(1)
    editor.eval()
    with torch.no_grad():
        edited = editor(test.clips, test.targets)
    weight = settings.stccl_weight if stccl is not None else 0.0
    return {"config": config, "seed": seed, "stccl_weight": weight,
            **measure(world, test, edited)}, edited[:4]


# ---------------------------------------------------------------- reports


def summarize(runs: list[dict]) -> list[dict]:
    """Per configuration, in CONFIGS order: mean and std of each metric."""
    rows = []
    for config in CONFIGS:
        mine = [r for r in runs if r["config"] == config]
        if not mine:
            continue
        row = {"config": config, "seeds": len(mine)}
        for m in METRICS:
            values = torch.tensor([r[m] for r in mine], dtype=torch.float64)
            row[m] = values.mean().item()
            row[m + "_std"] = values.std().item() if len(mine) > 1 else 0.0
        rows.append(row)
    return rows


def markdown_table(rows: list[dict]) -> str:
    head = ["config", "seeds", "speech error (lower is better)", "lip sync", "expression accuracy",
            "judge accuracy", "change outside the face"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in rows:
        cells = [r["config"], str(r["seeds"])] + [f"{r[m]:.4f} ± {r[m + '_std']:.4f}"
                                                  for m in METRICS]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def figure(path, test: Clips, edits: dict, world: World):
    """Frame strips (source, each shown configuration) and the mouth opening
    over time of the first test clip."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = list(edits)
    T = test.clips.shape[1]
    fig = plt.figure(figsize=(0.95 * T + 4.5, 1.05 * (len(names) + 1) + 0.5))
    grid = fig.add_gridspec(len(names) + 1, T + 1, width_ratios=[1] * T + [4.5], wspace=0.06,
                            hspace=0.08)
    strips = [("source (" + faces.EMOTIONS[test.emotions[0]] + ")", test.clips[0])] + [
        (f"{n} -> {faces.EMOTIONS[test.targets[0]]}", edits[n][0]) for n in names]
    for row, (label, clip) in enumerate(strips):
        for t in range(T):
            ax = fig.add_subplot(grid[row, t])
            ax.imshow(clip[t].permute(1, 2, 0).clamp(0, 1).numpy())
            ax.set_xticks([])
            ax.set_yticks([])
            if t == 0:
                ax.set_ylabel(label, fontsize=7)
    ax = fig.add_subplot(grid[:, T])
    steps = range(T)
    ax.plot(steps, test.openings[0].numpy(), "k-o", label="source (rendered)")
    with torch.no_grad():
        for n in names:
            ax.plot(steps, predict_openings(world.regressor, edits[n][:1])[0].numpy(), "-o",
                    label=f"{n} (measured)")
    ax.set_xlabel("frame")
    ax.set_ylabel("mouth opening")
    ax.yaxis.set_label_position("right")
    ax.yaxis.tick_right()
    ax.legend(fontsize=7)
    fig.savefig(path, dpi=110, bbox_inches="tight")
    plt.close(fig)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true",
                        help=f"only the configurations {', '.join(QUICK_CONFIGS)}")
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--configs", default=None,
                        help=f"comma-separated, of {', '.join(CONFIGS)} (default: all)")
    parser.add_argument("--backend", default=None, help="the stccl_ops backend")
    parser.add_argument("--steps", type=int, default=Settings.steps,
                        help="editor training steps per run")
    parser.add_argument("--stccl-weight", type=float, default=Settings.stccl_weight,
                        help="the STCCL term's weight in the editors' loss")
    parser.add_argument("--setup-steps", type=int, default=Settings.setup_steps,
                        help="training steps of each frozen network")
    parser.add_argument("--out", required=True)
    args = parser.parse_args(argv)
    from tqdm.auto import tqdm

    configs = args.configs.split(",") if args.configs else list(
        QUICK_CONFIGS if args.quick else CONFIGS)
    unknown = [c for c in configs if c not in CONFIGS]
    if unknown:
        parser.error(f"unknown configurations {unknown}; known: {list(CONFIGS)}")
    if min(args.seeds, args.steps, args.setup_steps) < 1:
        parser.error("--seeds, --steps and --setup-steps must be at least 1")
    settings = Settings(steps=args.steps, setup_steps=args.setup_steps,
                        stccl_weight=args.stccl_weight)
    os.makedirs(args.out, exist_ok=True)
    started = time.time()
    total = 3 * settings.setup_steps + settings.setup_steps \
        + len(configs) * args.seeds * settings.steps
    with tqdm(total=total, desc="spfem study", unit="step") as progress:
        world = build_world(settings, progress)
        train = make_clips(settings.train_clips, settings, seed=100)
        test = make_clips(settings.test_clips, settings, seed=200)
        with torch.no_grad():
            setup = {"settings": settings.__dict__,
                     "source_clips": measure(world, test, test.clips),
                     "target_rendered": measure(
                         world, test, faces.render_clips(test.openings, test.targets,
                                                         test.identity, settings.size))}
        runs, edits = [], {}
        for config in configs:
            for seed in range(args.seeds):
                progress.set_postfix(run=f"{config} seed {seed}")
                result, edited = run(config, seed, world, train, test, settings, args.backend,
                                     progress)
                runs.append(result)
                if seed == 0:
                    edits[config] = edited
    setup["seconds"] = round(time.time() - started, 1)
    setup["machine"] = f"{platform.machine()}, {os.cpu_count()} cores, torch " \
                       f"{torch.__version__}, {torch.get_num_threads()} threads"
    rows = summarize(runs)
    with open(os.path.join(args.out, "results.json"), "w") as f:
        json.dump(runs, f, indent=1)
    with open(os.path.join(args.out, "setup.json"), "w") as f:
        json.dump(setup, f, indent=1)
    with open(os.path.join(args.out, "results.csv"), "w") as f:
        f.write(",".join(["config", "seed", "stccl_weight", *METRICS]) + "\n")
        for r in runs:
            f.write(",".join([r["config"], str(r["seed"]), str(r["stccl_weight"])]
                             + [f"{r[m]:.6f}" for m in METRICS]) + "\n")
    table = markdown_table(rows)
    with open(os.path.join(args.out, "table.md"), "w") as f:
        f.write(table)
    shown = [c for c in ("none", "full") if c in edits] or list(edits)[:2]
    figure(os.path.join(args.out, "figure.png"), test, {c: edits[c] for c in shown}, world)
    print(table)
    print(f"source clips measured as themselves: {setup['source_clips']}")
    print(f"wrote {args.out}/results.json, results.csv, table.md, figure.png, setup.json "
          f"({setup['seconds']} s)")


if __name__ == "__main__":
    main()
