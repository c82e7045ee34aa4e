"""The cost of the STCCL loss in a training step: STCCLLoss forward+backward on a
three-layer feature pyramid of a source and a generated clip, with the cpp
backend, with the reference backend, and as a plain PyTorch implementation
written the way research code writes it (F.normalize, F.unfold, the adaptive
weights, L1). All three compute the same loss; the run checks that the values
and the gradients agree before timing.

    python benchmarks/loss.py [--threads 2] [--rounds 3] [--quick] [--out benchmarks/results]
"""

import argparse
import json
import os
import sys
import time

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "python"))
from stccl import STCCLLoss  # noqa: E402

B, T = 2, 8
PYRAMID = ((64, 64, 64), (128, 32, 32), (256, 16, 16))  # C, H, W per layer
KERNEL_SIZE = TEMPORAL_KERNEL_SIZE = 3


def unfold_correlation(a, b, kernel_size):
    """Cosine correlation of a with the K x K neighbourhood in b, (N, C, H, W)
    -> (N, K*K, H, W), by F.unfold (an (N, C*K*K, H*W) copy of b)."""
    N, C, H, W = a.shape
    a, b = F.normalize(a, dim=1), F.normalize(b, dim=1)
    cols = F.unfold(b, kernel_size, padding=kernel_size // 2).view(N, C, -1, H, W)
    return (a.unsqueeze(2) * cols).sum(1)


def plain_stccl_loss(source_layers, generated_layers, temperature=0.5, threshold=0.8, scale=2.0):
    """STCCLLoss() (L1, adaptive weights, every layer and part weighted 1) in
    plain PyTorch."""
    def volumes(v):
        frames = v.flatten(0, 1)
        spatial = unfold_correlation(frames, frames, KERNEL_SIZE)
        temporal = unfold_correlation(v[:, :-1].flatten(0, 1), v[:, 1:].flatten(0, 1),
                                      TEMPORAL_KERNEL_SIZE)
        return spatial, temporal

    def part(src, gen):
        t = torch.sigmoid((1 - src) / temperature)
        w = torch.where(t > threshold, scale * t * t, torch.ones_like(t))
        return (w * (gen - src).abs()).mean()

    total = 0.0
    for src, gen in zip(source_layers, generated_layers):
        with torch.no_grad():
            src_s, src_t = volumes(src)
        gen_s, gen_t = volumes(gen)
        total = total + part(src_s, gen_s) + part(src_t, gen_t)
    return total


def pyramid(seed):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(B, T, C, H, W, generator=g) for C, H, W in PYRAMID]


def losses():
    """name -> loss(source_layers, generated_layers)."""
    return {"cpp": STCCLLoss(backend="cpp"), "reference": STCCLLoss(backend="reference"),
            "plain": plain_stccl_loss}


def evaluate(loss, source, generated):
    """The loss value and the generated features' gradients."""
    gen = [g.detach().requires_grad_() for g in generated]
    value = loss(source, gen)
    value = value.total if hasattr(value, "total") else value
    return value, torch.autograd.grad(value, gen)


def median_ms(fn, reps, warmup=1):
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(reps):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return sorted(times)[len(times) // 2] * 1e3


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--rounds", type=int, default=3, help="the lowest round median is kept")
    parser.add_argument("--quick", action="store_true", help="one round of 2 repetitions")
    parser.add_argument("--out", default=os.path.join(os.path.dirname(__file__), "results"))
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    source, generated = pyramid(0), pyramid(1)
    candidates = losses()
    values = {name: evaluate(loss, source, generated) for name, loss in candidates.items()}
    want_value, want_grads = values["plain"]
    agreement = {}
    for name, (value, grads) in values.items():
        value_diff = abs(value.item() - want_value.item()) / abs(want_value.item())
        grad_diff = max(((g - w).abs().max() / w.abs().max()).item()
                        for g, w in zip(grads, want_grads))
        agreement[name] = {"loss": value.item(), "loss_rel_diff": value_diff,
                           "grad_rel_diff": grad_diff}
        if value_diff > 1e-5 or grad_diff > 1e-4:
            raise SystemExit(f"{name}: the loss differs from the plain implementation "
                             f"(loss {value_diff:.2e}, gradients {grad_diff:.2e} relative)")
    rounds, reps = (1, 2) if args.quick else (args.rounds, 5)
    times = {name: [] for name in candidates}
    for r in range(rounds):
        for name, loss in candidates.items():
            reps_here = 1 if name != "cpp" and not args.quick else reps
            times[name].append(median_ms(lambda: evaluate(loss, source, generated), reps_here))
            print(f"  round {r + 1}/{rounds}: {name} {times[name][-1]:.1f} ms", file=sys.stderr,
                  flush=True)
    best = {name: min(t) for name, t in times.items()}
    layers = ", ".join(f"C={C} at {H}x{W}" for C, H, W in PYRAMID)
    print(f"STCCLLoss forward+backward, B={B} T={T}, {layers}, K={KERNEL_SIZE}, "
          f"Kt={TEMPORAL_KERNEL_SIZE}, {args.threads} threads\n")
    print("| implementation | ms | vs plain | vs reference | loss | rel. diff loss / grads |")
    print("|---|---|---|---|---|---|")
    for name in candidates:
        a = agreement[name]
        print(f"| {name} | {best[name]:.1f} | {best['plain'] / best[name]:.1f}x | "
              f"{best['reference'] / best[name]:.1f}x | {a['loss']:.6f} | "
              f"{a['loss_rel_diff']:.1e} / {a['grad_rel_diff']:.1e} |")
    os.makedirs(args.out, exist_ok=True)
    path = os.path.join(args.out, "loss-cpu.json")
    with open(path, "w") as f:
        json.dump({"pyramid": PYRAMID, "B": B, "T": T, "threads": args.threads,
                   "round_ms": times, "ms": best, "agreement": agreement}, f, indent=1)
    print(f"\nwrote {path}")


if __name__ == "__main__":
    main()
