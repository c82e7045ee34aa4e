"""One comparison table: every available backend and the peers a user would
run instead, on the standard shapes (or the shape-class grid), forward and
forward+backward, against this machine's measured floor.

    python benchmarks/compare.py [--grid] [--quick] [--device cpu|cuda] [--threads 2]
                                 [--cases S1,S3] [--rounds 5] [--out benchmarks/results]

For each case and backend: median time, speedup over the reference and over
the F.unfold implementation (and, for the raw-mode rows, over
spatial_correlation_sampler when it is importable), achieved GB/s and GFLOP/s,
the time as a multiple of the floor max(floor bytes / copy bandwidth, floor
flops / matmul rate in the case's accumulation type) measured in the same
run, and the peak extra memory. The whole table is timed in several
rounds, each time being the lowest round median: a shared machine has slow
phases of seconds to minutes, which a single median cannot average out (with
three rounds a whole run could fall into one: every case 10-20% slow against
a copy rate measured between two of its phases).
Writes JSON (with the provenance of the numbers and every round's medians)
and a PNG chart.
"""

import argparse
import datetime
import gc
import json
import os
import platform
import statistics
import subprocess
import sys
import time

import torch

import stccl_ops
# benchmarks/ is the script's directory, so cases imports as a module
from cases import (ALL_CASES, GRID_CASES, PEERS, STANDARD_CASES, make_step, runs_case,
                   sampler_available)


def synchronize(device):
    if device == "cuda":
        torch.cuda.synchronize()


# Repetitions per timing: (at least, for at least this many seconds); --quick lowers them.
TIMING = {"warmup": 2, "min_reps": 5, "min_seconds": 0.4}


def median_ms(fn, device, min_reps=None, min_seconds=None, max_reps=200):
    """Median wall time of fn() in ms after warm-up calls; the device is
    synchronised inside the timed region."""
    min_reps = min_reps or TIMING["min_reps"]
    min_seconds = TIMING["min_seconds"] if min_seconds is None else min_seconds
    for _ in range(TIMING["warmup"]):
        fn()
    synchronize(device)
    times = []
    start = time.perf_counter()
    while len(times) < max_reps and (len(times) < min_reps
                                     or time.perf_counter() - start < min_seconds):
        t0 = time.perf_counter()
        fn()
        synchronize(device)
        times.append(time.perf_counter() - t0)
    return statistics.median(times) * 1e3


def machine_rates(device):
    """(copy bandwidth GB/s counting read + write, float32 matmul GFLOP/s,
    float64 matmul GFLOP/s), measured now."""
    n = 64 * 2**20  # 256 MiB of float32 per buffer: far beyond the caches
    src = torch.randn(n, device=device)
    dst = torch.randn(n, device=device)
    copy_ms = median_ms(lambda: dst.copy_(src), device)
    del src, dst
    m = 4096 if device == "cuda" else 2048
    rates = [2 * n * 4 / copy_ms / 1e6]
    for dtype in (torch.float32, torch.float64):
        mat = torch.randn(m, m, device=device, dtype=dtype)
        rates.append(2 * m**3 / median_ms(lambda: mat @ mat, device) / 1e6)
    return tuple(rates)


def _rss_bytes(field):
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field):
                return int(line.split()[1]) * 1024
    return 0


# glibc settings under which RSS follows live CPU memory: every block over
# 64 KiB is mmapped and unmapped at free, in one arena. (By default glibc keeps
# freed memory resident and reuses it, which hides an op's allocations.) The
# peak memory is measured in a child process started with them, since they
# must hold from the first allocation and they change timings.
# STCCL_RESULT_CACHE_MB=0 for the same reason: the CPU kernels keep freed
# results of 32 MiB and more for the next call, which would hide them too.
MEMORY_ENV = {"MALLOC_MMAP_THRESHOLD_": "65536", "MALLOC_TRIM_THRESHOLD_": "0",
              "MALLOC_ARENA_MAX": "1", "MALLOC_TOP_PAD_": "0", "STCCL_RESULT_CACHE_MB": "0"}


def measure_memory_in_child(device, threads, cases, backends):
    if device != "cpu":
        return None
    cmd = [sys.executable, os.path.abspath(__file__), "--device", device, "--threads",
           str(threads), "--cases", ",".join(case.name for case in cases),
           "--backends", ",".join(backends), "--memory-only"]
    env = {**os.environ, **MEMORY_ENV}
    out = subprocess.run(cmd, env=env, capture_output=True, text=True)
    if out.returncode != 0:
        print("memory measurement failed:\n" + out.stderr[-2000:], file=sys.stderr)
        return None
    return {tuple(k.split("|")): v for k, v in json.loads(out.stdout.splitlines()[-1]).items()}


def peak_extra_bytes(fn, device):
    """Peak memory above the baseline while fn() runs (its results included).
    CUDA: the caching allocator's peak. CPU: the process's peak RSS, reset
    through /proc/self/clear_refs (in a child process: see MEMORY_ENV)."""
    gc.collect()
    if device == "cuda":
        torch.cuda.synchronize()
        base = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        result = fn()
        torch.cuda.synchronize()
        peak = torch.cuda.max_memory_allocated() - base
        del result
        return peak
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
    except OSError:
        return None
    base = _rss_bytes("VmRSS:")
    result = fn()
    # The kernel refreshes VmHWM only when RSS shrinks: take the live RSS too.
    peak = max(_rss_bytes("VmHWM:"), _rss_bytes("VmRSS:")) - base
    del result
    return peak


def provenance(device, threads):
    info = {
        "date": datetime.datetime.now().isoformat(timespec="seconds"),
        "torch": torch.__version__,
        "python": platform.python_version(),
        "threads": threads,
        "device": device,
        "build": stccl_ops.build_info(),
    }
    try:
        import triton

        info["triton"] = triton.__version__
    except ImportError:
        info["triton"] = None
    cpu = platform.processor()
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next(line.split(":", 1)[1].strip() for line in f if "model name" in line)
    except (OSError, StopIteration):
        pass
    info["cpu"] = cpu
    info["cores"] = os.cpu_count()
    if device == "cuda":
        info["gpu"] = torch.cuda.get_device_name()
    return info


def selected_cases(case_names, grid):
    if case_names:
        return [case for case in ALL_CASES if case.name in case_names]
    return list(GRID_CASES if grid else STANDARD_CASES)


def selected_runs(cases, backends):
    """Our backends first, then the reference and the peers: the F.unfold peer
    allocates gigabytes, after which the next timings on this machine ran
    slower for a while (so it must not precede ours)."""
    ours = [b for b in backends if b not in ("reference", *PEERS)]
    theirs = [b for b in backends if b in ("reference", *PEERS)]
    return [(case, backward, backend) for group in (ours, theirs) for case in cases
            for backward in (False, True) for backend in group if runs_case(case, backend)]


def memory_only(device, threads, cases, backends):
    """Prints {"case|pass|backend": peak bytes} as one JSON line."""
    torch.set_num_threads(threads)
    peaks = {}
    for case, backward, backend in selected_runs(cases, backends):
        step = make_step(case, backend, device, backward)
        step()
        peaks[f"{case.name}|{int(backward)}|{backend}"] = peak_extra_bytes(step, device)
    print(json.dumps(peaks))


def run(device, threads, cases, backends, rounds, measure_memory=True):
    torch.set_num_threads(threads)
    # The rates drift on shared machines too: measured before the timings and
    # after each round, the floor takes the highest (the stricter floor).
    rates = [machine_rates(device)]
    rows = []
    runs = selected_runs(cases, backends)
    steps = {key: make_step(key[0], key[2], device, key[1]) for key in runs}
    round_ms = {key: [] for key in runs}
    for r in range(rounds):
        for key in runs:
            case, backward, backend = key
            round_ms[key].append(median_ms(steps[key], device))
            print(f"  round {r + 1}/{rounds}: {case.name} {'fwd+bwd' if backward else 'fwd'} "
                  f"{backend} {round_ms[key][-1]:.3f} ms", file=sys.stderr, flush=True)
        rates.append(machine_rates(device))
    del steps
    times = {key: min(medians) for key, medians in round_ms.items() if medians}
    bandwidth = max(r[0] for r in rates)
    flop_rate = {"float32": max(r[1] for r in rates), "float64": max(r[2] for r in rates)}
    child_peaks = measure_memory_in_child(device, threads, cases, backends) if measure_memory else None
    table_order = [(case, backward, backend) for case in cases for backward in (False, True)
                   for backend in backends]
    for case, backward, backend in table_order:
        if (case, backward, backend) not in times:
            continue
        ms = times[case, backward, backend]
        peer_ms = {peer: times.get((case, backward, peer)) for peer in ("reference", "unfold")}
        if backend.endswith("-raw"):
            peer_ms["sampler"] = times.get((case, backward, "sampler"))
        if case.op == "spatiotemporal" and backend not in ("reference", *PEERS):
            peer_ms["separate"] = times.get((case, backward, backend + "-separate"))
        if child_peaks is not None:
            peak = child_peaks.get((case.name, str(int(backward)), backend))
        elif measure_memory:
            peak = peak_extra_bytes(make_step(case, backend, device, backward), device)
        else:
            peak = None
        bytes_ = case.floor_bytes("fwd+bwd" if backward else "fwd")
        flops = case.floor_flops(backward)
        rate = flop_rate["float64" if case.dtype == "float64" else "float32"]
        floor_ms = max(bytes_ / bandwidth / 1e6, flops / rate / 1e6)
        rows.append({
            "case": case.name, "op": case.op, "dtype": case.dtype,
            "pass": "fwd+bwd" if backward else "fwd", "backend": backend, "ms": ms,
            "round_ms": round_ms[case, backward, backend],
            "speedup": peer_ms["reference"] / ms if peer_ms["reference"] else None,
            "vs_peer": {peer: p / ms for peer, p in peer_ms.items()
                        if p and peer != "reference"},
            "GB/s": bytes_ / ms / 1e6, "GFLOP/s": flops / ms / 1e6,
            "floor_ms": floor_ms, "x_floor": ms / floor_ms,
            "peak_extra_MiB": None if peak is None else peak / 2**20,
            "output_MiB": case.output_elements() * case.itemsize / 2**20,
        })
        print(format_row(rows[-1]), flush=True)
    return {"provenance": provenance(device, threads), "bandwidth_GBps": bandwidth,
            "matmul_GFLOPps": flop_rate["float32"], "matmul_f64_GFLOPps": flop_rate["float64"],
            "rates": rates, "rounds": rounds, "rows": rows}


COLUMNS = ("case", "pass", "backend", "ms", "vs reference", "vs unfold", "vs sampler",
           "vs separate", "GB/s", "GFLOP/s", "x floor", "peak extra MiB", "output MiB")
WIDTHS = (13, 8, 12, 9, 8, 8, 8, 8, 7, 8, 8, 9, 8)
HEADER = " ".join(f"{c if len(c) <= w else c.split()[-1]:>{w}}" for c, w in zip(COLUMNS, WIDTHS))


def cells(r):
    def ratio(x):
        return f"{x:.1f}x" if x else "-"

    peak = f"{r['peak_extra_MiB']:.1f}" if r["peak_extra_MiB"] is not None else "-"
    return (r["case"], r["pass"], r["backend"], f"{r['ms']:.3f}", ratio(r["speedup"]),
            ratio(r["vs_peer"].get("unfold")), ratio(r["vs_peer"].get("sampler")),
            ratio(r["vs_peer"].get("separate")),
            f"{r['GB/s']:.1f}", f"{r['GFLOP/s']:.1f}", f"{r['x_floor']:.2f}", peak,
            f"{r['output_MiB']:.1f}")


def format_row(r):
    return " ".join(f"{c:>{w}}" for c, w in zip(cells(r), WIDTHS))


def markdown_table(result):
    lines = ["| " + " | ".join(COLUMNS) + " |", "|" + "---|" * len(COLUMNS)]
    lines += ["| " + " | ".join(cells(r)) + " |" for r in result["rows"]]
    return "\n".join(lines)


def chart(result, path):
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib is not installed: no chart", file=sys.stderr)
        return
    rows = result["rows"]
    backends = list(dict.fromkeys(r["backend"] for r in rows))
    groups = list(dict.fromkeys((r["case"], r["pass"]) for r in rows))
    fig, ax = plt.subplots(figsize=(max(8, len(groups) * 0.9), 4.5))
    width = 0.8 / len(backends)
    for i, backend in enumerate(backends):
        values = [next((r["x_floor"] for r in rows if (r["case"], r["pass"]) == g
                        and r["backend"] == backend), 0) for g in groups]
        ax.bar([j + i * width for j in range(len(groups))], values, width, label=backend)
    ax.set_yscale("log")
    ax.axhline(1, color="black", linewidth=0.8)
    ax.set_xticks([j + 0.4 - width / 2 for j in range(len(groups))])
    ax.set_xticklabels([f"{c}\n{p}" for c, p in groups], fontsize=8)
    ax.set_ylabel("time / floor (lower is better)")
    p = result["provenance"]
    ax.set_title(f"stccl_ops on {p.get('gpu') or p['cpu']} ({p['threads']} threads), "
                 f"torch {p['torch']}", fontsize=9)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--grid", action="store_true",
                        help="the shape-class grid instead of the standard cases")
    parser.add_argument("--quick", action="store_true",
                        help="one round of fewer repetitions, no memory measurement (~1 minute)")
    parser.add_argument("--cases", default="",
                        help="comma-separated case names of either table (default: the table's)")
    parser.add_argument("--backends", default="", help="comma-separated (default: available, but cuda_emulated)")
    parser.add_argument("--rounds", type=int, default=5,
                        help="timing rounds over the whole table (the lowest median is kept)")
    parser.add_argument("--out", default=os.path.join(os.path.dirname(__file__), "results"))
    parser.add_argument("--memory-only", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    cases = selected_cases(set(filter(None, args.cases.split(","))), args.grid)
    backends = [b for b in args.backends.split(",") if b]
    if not backends:
        # cuda_emulated is the CUDA kernels on a CPU emulator: correct, not fast.
        ours = [b for b in stccl_ops.available_backends(args.device)
                if b not in ("reference", "cuda_emulated")]
        backends = ["reference", "unfold", *ours]
        if any(case.op == "spatiotemporal" for case in cases):
            backends += [f"{b}-separate" for b in ours]
        if sampler_available():  # raw mode, against our raw mode
            backends += ["sampler", *(f"{b}-raw" for b in ours)]
    if args.quick:
        TIMING.update(warmup=1, min_reps=2, min_seconds=0.05)
        args.rounds = 1
    if args.memory_only:
        return memory_only(args.device, args.threads, cases, backends)
    print(HEADER)
    result = run(args.device, args.threads, cases, backends, max(1, args.rounds),
                 measure_memory=not args.quick)
    rates = result["rates"]
    print(f"\nfloor rates (the highest of {len(rates)} measurements): copy "
          f"{result['bandwidth_GBps']:.1f} GB/s ({' / '.join(f'{r[0]:.1f}' for r in rates)}), "
          f"matmul {result['matmul_GFLOPps']:.1f} GFLOP/s float32 "
          f"({' / '.join(f'{r[1]:.1f}' for r in rates)}), "
          f"{result['matmul_f64_GFLOPps']:.1f} float64")
    print(json.dumps(result["provenance"]))
    print()
    print(markdown_table(result))
    os.makedirs(args.out, exist_ok=True)
    stem = os.path.join(args.out, f"compare-{args.device}{'-grid' if args.grid else ''}")
    with open(stem + ".json", "w") as f:
        json.dump(result, f, indent=1)
    chart(result, stem + ".png")
    print(f"\nwrote {stem}.json and {stem}.png")


if __name__ == "__main__":
    main()
