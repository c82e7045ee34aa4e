"""Memory traffic of the GPU kernels, counted without a GPU.

    python benchmarks/memory_traffic.py [--backend triton|cuda_emulated] [--json PATH]

Without --backend, every backend it can count, one after the other. The
summary table has one row per (backend, case, layout, pass): the bytes of the
32-byte sectors the kernels' loads and stores request, against the floor
bytes (inputs read once and the output written once; backward: inputs and
grad_out read once, gradients written).

triton: the Triton kernels run in Triton's interpreter with
stccl_ops.triton.traffic counting, per load or store a program executes, the
distinct sectors its addresses touch.

cuda_emulated: the CUDA kernels run under the emulator's counting build
(stccl_ops._cuda_emulation, variant "count"): every global and shared access
of every thread, grouped into warp requests (csrc/cuda/emulation/memory_traffic.h).
Per case, layout and pass, summed over the pass's launches:
- sectors/request of global loads and stores, against the ideal for the
  addresses asked (1.0x = perfectly coalesced);
- shared-memory wavefronts per request against the ideal (bank-conflict ways);
- the bytes of all sectors moved against the floor (inputs read once, output
  written once; backward: inputs and grad_out read once, gradients written).

The standard cases of cases.py keep their C, K and dilation; N and the maps
are scaled down (one image or clip pair, 16 x 64 maps) so each runs in seconds.
"""

import argparse
import json
import os
import subprocess
import sys
from dataclasses import replace

import torch

from cases import STANDARD_CASES, make_inputs, run_case

LAYOUTS = ("contiguous", "channels_last")
SCALED = {"N": 1, "H": 16, "W": 64}


def scaled_cases():
    return [replace(c, **SCALED, T=2 if c.op == "temporal" else 1) for c in STANDARD_CASES]


def summarise(launches):
    rows = {}
    for launch in launches:
        row = rows.setdefault(launch["kernel"], {"launches": 0})
        row["launches"] += 1
        for kind in ("load", "store", "shared_load", "shared_store"):
            total = row.setdefault(kind, {"requests": 0, "sectors": 0, "ideal": 0, "bytes": 0})
            for key in total:
                total[key] += launch[kind][key]
    return rows


def ratio(counts):
    return counts["sectors"] / counts["ideal"] if counts["ideal"] else float("nan")


def per_request(counts):
    return counts["sectors"] / counts["requests"] if counts["requests"] else float("nan")


def layout_inputs(case, layout, requires_grad):
    inputs = make_inputs(case, requires_grad=requires_grad)
    if layout == "channels_last":  # channels innermost; for a clip, in every frame
        inputs = tuple(t.detach().movedim(-3, -1).contiguous().movedim(-1, -3)
                       .requires_grad_(requires_grad) for t in inputs)
    return inputs


def measure(module, case, layout):
    results = []
    for backward in (False, True):
        inputs = layout_inputs(case, layout, backward)
        module.memory_traffic()  # drop what earlier passes left
        out = run_case(case, inputs, "cuda_emulated")
        if backward:
            grad_out = torch.randn_like(out)
            module.memory_traffic()  # the backward's launches only
            torch.autograd.grad(out, inputs, grad_out)
        kernels = summarise(module.memory_traffic())
        sector_bytes = 32 * sum(k[kind]["sectors"] for k in kernels.values()
                                for kind in ("load", "store"))
        floor = case.floor_bytes("bwd" if backward else "fwd")
        results.append({"case": case.name, "layout": layout,
                        "pass": "backward" if backward else "forward",
                        "shape": [case.N, case.C, case.H, case.W, case.K, case.dilation, case.T],
                        "sector_bytes": sector_bytes, "floor_bytes": floor, "kernels": kernels})
    return results


def table(results):
    lines = ["| case | layout | pass | kernel | launches | load sectors/req (x ideal) | "
             "store sectors/req (x ideal) | shared ways (ld/st) | sector bytes / floor |",
             "| --- | --- | --- | --- | ---: | ---: | ---: | ---: | ---: |"]
    for r in results:
        first = True
        for name, k in r["kernels"].items():
            ways = (f"{ratio(k['shared_load']):.2f} / {ratio(k['shared_store']):.2f}"
                    if k["shared_load"]["requests"] else "-")
            total = f"{r['sector_bytes'] / r['floor_bytes']:.2f}x" if first else ""
            lines.append(
                f"| {r['case'] if first else ''} | {r['layout'] if first else ''} | "
                f"{r['pass'] if first else ''} | {name} | {k['launches']} | "
                f"{per_request(k['load']):.1f} ({ratio(k['load']):.2f}x) | "
                f"{per_request(k['store']):.1f} ({ratio(k['store']):.2f}x) | {ways} | {total} |")
            first = False
    return "\n".join(lines)


def measure_triton(case, layout):
    from stccl_ops.triton.traffic import count_requests

    results = []
    for backward in (False, True):
        inputs = layout_inputs(case, layout, backward)
        with count_requests() as launches:
            out = run_case(case, inputs, "triton")
        if backward:
            with count_requests() as launches:
                torch.autograd.grad(out, inputs, torch.randn_like(out))
        results.append({"backend": "triton", "case": case.name, "K": case.K, "layout": layout,
                        "pass": "backward" if backward else "forward",
                        "requested_bytes": sum(l["requested_bytes"] for l in launches),
                        "floor_bytes": case.floor_bytes("bwd" if backward else "fwd"),
                        "launches": launches})
    return results


def summary(rows):
    lines = ["| backend | case | K | layout | pass | requested bytes | floor bytes | x floor |",
             "| --- | --- | ---: | --- | --- | ---: | ---: | ---: |"]
    for r in rows:
        lines.append(f"| {r['backend']} | {r['case']} | {r['K']} | {r['layout']} | {r['pass']} | "
                     f"{r['requested_bytes']} | {r['floor_bytes']} | "
                     f"{r['requested_bytes'] / r['floor_bytes']:.2f}x |")
    return "\n".join(lines)


def run_backend(backend):
    """Rows of one backend, each measured in a process of its own set up for it."""
    if backend == "triton" and os.environ.get("TRITON_INTERPRET") != "1":
        env = dict(os.environ, TRITON_INTERPRET="1")
        sys.exit(subprocess.call([sys.executable, *sys.argv], env=env))
    if backend == "cuda_emulated" and "STCCL_CUDA_EMULATED_LIBRARY" not in os.environ:
        # Re-run this script on the counting build (it must be loaded at import).
        from stccl_ops import _cuda_emulation

        path = _cuda_emulation.build("count")
        env = _cuda_emulation.environment("count", path)
        sys.exit(subprocess.call([sys.executable, *sys.argv], env=env))

    import stccl_ops

    if backend == "triton":
        return [r for case in scaled_cases() for layout in LAYOUTS
                for r in measure_triton(case, layout)]
    module = stccl_ops._extension._C_cuda_emulated
    if module is None or not module.info()["counts_memory_traffic"]:
        sys.exit("memory_traffic.py: STCCL_CUDA_EMULATED_LIBRARY is not a counting build")
    results = [r for case in scaled_cases() for layout in LAYOUTS
               for r in measure(module, case, layout)]
    print(table(results))
    kernel_size = {case.name: case.K for case in scaled_cases()}
    return [dict(r, backend="cuda_emulated", K=kernel_size[r["case"]],
                 requested_bytes=r["sector_bytes"]) for r in results]


BACKENDS = ("triton", "cuda_emulated")


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--backend", choices=BACKENDS)
    parser.add_argument("--json", default=os.path.join(os.path.dirname(__file__), "results",
                                                       "memory_traffic.json"))
    args = parser.parse_args()
    if args.backend is None:  # each backend in a child of its own, then one table
        rows = []
        for backend in BACKENDS:
            path = f"{args.json}.{backend}"
            code = subprocess.call([sys.executable, __file__, "--backend", backend, "--json", path])
            if code:
                sys.exit(code)
            with open(path) as f:
                rows += json.load(f)["rows"]
            os.remove(path)
    else:
        rows = run_backend(args.backend)
    print(summary(rows))
    os.makedirs(os.path.dirname(os.path.abspath(args.json)), exist_ok=True)
    with open(args.json, "w") as f:
        json.dump({"torch": torch.__version__, "rows": rows}, f, indent=1)
    print(f"\nwritten: {args.json}")


if __name__ == "__main__":
    main()
