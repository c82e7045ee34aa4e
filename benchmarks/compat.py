"""stccl_ops.compat against the package it replaces, in one run:

    python benchmarks/compat.py [--threads 2] [--rounds 3] [--json PATH]

For optical-flow shaped cases (FlowNetC's correlation, with and without an
output stride; a PWC-Net level; a 3 x 3 kernel with padding), forward and
forward+backward medians (the lowest of the rounds, interleaved) of
``stccl_ops.compat.spatial_correlation_sample``, of the same volume by
``local_correlation(..., normalize=False)`` where the setting maps onto it
directly (what the compat layer must not cost more than), and of
spatial_correlation_sampler when it is importable (it is not a dependency).
"""

import argparse
import json
import sys
from dataclasses import asdict, dataclass, field

import torch

import stccl_ops
from cases import sampler_available
from compare import median_ms


@dataclass(frozen=True)
class CompatCase:
    name: str
    shape: tuple  # (N, C, H, W)
    args: dict = field(default_factory=dict)

    def direct_window(self):
        """(K, dilation) when the setting is one local_correlation and a view."""
        a = self.args
        patch, dil = a.get("patch_size", 1), a.get("dilation_patch", 1)
        if (a.get("kernel_size", 1), a.get("stride", 1), a.get("padding", 0)) == (1, 1, 0) \
                and isinstance(patch, int) and patch % 2 == 1 and isinstance(dil, int):
            return patch, dil
        return None


CASES = (
    # FlowNetC: conv3 features of a 384 x 512 pair, max displacement 20 in steps of 2.
    CompatCase("FlowNetC", (2, 256, 48, 64), dict(patch_size=21, dilation_patch=2)),
    CompatCase("FlowNetC-stride2", (2, 256, 48, 64),
               dict(patch_size=21, dilation_patch=2, stride=2)),
    # PWC-Net: max displacement 4 at one pyramid level.
    CompatCase("PWC-Net", (2, 96, 48, 64), dict(patch_size=9)),
    CompatCase("kernel3-pad1", (2, 64, 32, 32), dict(kernel_size=3, patch_size=7, padding=1)),
)


def steps(case, impl, backward):
    g = torch.Generator().manual_seed(0)
    a, b = (torch.randn(case.shape, generator=g).requires_grad_(backward) for _ in range(2))
    if impl == "compat":
        def run():
            return stccl_ops.compat.spatial_correlation_sample(a, b, backend="cpp", **case.args)
    elif impl == "local_correlation":
        K, dilation = case.direct_window()

        def run():
            return stccl_ops.local_correlation(a, b, K, dilation, normalize=False, backend="cpp")
    else:
        from spatial_correlation_sampler import spatial_correlation_sample

        def run():
            return spatial_correlation_sample(a, b, **case.args)
    if not backward:
        return run
    grad_out = torch.randn_like(run())
    return lambda: torch.autograd.grad(run(), (a, b), grad_out)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--json")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    rows = []
    for case in CASES:
        impls = ["compat"] + (["local_correlation"] if case.direct_window() else [])
        impls += ["sampler"] if sampler_available() else []
        for backward in (False, True):
            runs = {impl: steps(case, impl, backward) for impl in impls}
            best = {}
            for round_ in range(args.rounds):
                for impl, run in runs.items():
                    slow = impl == "sampler"  # seconds a call: fewer repetitions, one round
                    if slow and round_ > 0:
                        continue
                    ms = median_ms(run, "cpu", min_reps=2 if slow else 5,
                                   min_seconds=0 if slow else 0.4)
                    best[impl] = min(best.get(impl, ms), ms)
                    print(f"  {case.name} {'fwd+bwd' if backward else 'fwd'} {impl}: {ms:.2f} ms",
                          file=sys.stderr, flush=True)
            for impl, ms in best.items():
                rows.append(dict(case=case.name, shape=case.shape, args=case.args,
                                 pass_="fwd+bwd" if backward else "fwd", impl=impl, ms=ms,
                                 vs_sampler=best["sampler"] / ms if "sampler" in best else None))
    print(f"{args.threads} threads, torch {torch.__version__}, min over {args.rounds} rounds of "
          "medians (the sampler: one round)\n")
    print("| case | (N, C, H, W) | arguments | pass | implementation | ms | vs sampler |")
    print("|---|---|---|---|---|---|---|")
    for r in rows:
        ratio = f"{r['vs_sampler']:.1f}x" if r["vs_sampler"] else "-"
        arguments = ", ".join(f"{k}={v}" for k, v in r["args"].items())
        print(f"| {r['case']} | {r['shape']} | {arguments} | {r['pass_']} | {r['impl']} | "
              f"{r['ms']:.2f} | {ratio} |")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(dict(threads=args.threads, torch=torch.__version__, rows=rows,
                           cases=[asdict(c) for c in CASES]), f, indent=1)


if __name__ == "__main__":
    main()
