"""The Triton backend: kernels run in Triton's interpreter on CPU tensors
against the reference, and compile ahead of time to sm_80 and sm_90 cubins
without spills. (On a GPU machine the GPU tests in test_cuda.py run them for
real.)"""

import json
import os
import subprocess
import sys

import pytest
import torch

import stccl_ops
from stccl_ops import reference

from helpers import DTYPES, assert_close, check_infinite_and_nan, grads, leaf, samples

try:
    import triton  # noqa: F401

    HAS_TRITON = True
except ImportError:
    HAS_TRITON = False

INTERPRETED = pytest.mark.skipif(
    "triton" not in stccl_ops.available_backends("cpu"),
    reason="the Triton interpreter is not active (TRITON_INTERPRET=1 and no GPU)")


def rand(shape, dtype, seed):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(shape, generator=g, dtype=torch.float64).to(dtype)


@INTERPRETED
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("K,dilation", [(1, 1), (3, 1), (3, 2), (5, 1), (5, 3), (7, 1)])
@pytest.mark.parametrize("normalize", [True, False], ids=["cosine", "raw"])
def test_interpreted_forward_backward(dtype, K, dilation, normalize):
    a, b = leaf(rand((2, 5, 7, 9), dtype, K)), leaf(rand((2, 5, 7, 9), dtype, K + 1))
    g = rand((2, K * K, 7, 9), dtype, 2)
    window = (K, dilation, normalize, 1e-8)
    out, got = grads(lambda x, y: stccl_ops.local_correlation(x, y, *window, backend="triton"),
                     (a, b), g)
    ref, want = grads(lambda x, y: reference.local_correlation(x, y, *window), (a, b), g)
    assert_close(out, ref)
    for actual, expected in zip(got, want):
        assert_close(actual, expected, "grad")
    out, (gx,) = grads(lambda x: stccl_ops.spatial_correlation(x, *window, backend="triton"),
                       (a,), g)
    ref, (rx,) = grads(lambda x: reference.spatial_correlation(x, *window), (a,), g)
    assert_close(out, ref)
    assert_close(gx, rx, "grad")


@INTERPRETED
@pytest.mark.parametrize("op", ["local", "self", "temporal"])
@pytest.mark.parametrize("at_row_ends", [False, True])
def test_interpreted_infinite_and_nan_inputs(op, at_row_ends):
    check_infinite_and_nan("triton", op, at_row_ends)


@INTERPRETED
@pytest.mark.parametrize("sample", samples(), ids=lambda s: s.name)
@pytest.mark.parametrize("which", ["both", "a", "b"])
def test_interpreted_samples(sample, which):
    a = leaf(sample.a, which in ("both", "a"))
    b = leaf(sample.b, which in ("both", "b"))
    K = sample.kernel_size
    g = rand((a.shape[0], K * K, *a.shape[2:]), a.dtype, 3)
    out, got = grads(
        lambda x, y: stccl_ops.local_correlation(x, y, *sample.window, backend="triton"), (a, b), g)
    ref, want = grads(lambda x, y: reference.local_correlation(x, y, *sample.window), (a, b), g)
    assert_close(out, ref)
    for actual, expected in zip(got, want):
        assert_close(actual, expected, "grad")


@INTERPRETED
def test_interpreted_edges_and_clips():
    for shape in [(0, 3, 4, 4), (2, 0, 3, 3), (1, 2, 0, 5)]:
        a, b = leaf(torch.randn(shape)), leaf(torch.randn(shape))
        out = stccl_ops.local_correlation(a, b, 3, backend="triton")
        assert out.shape == (shape[0], 9, *shape[2:]) and (out == 0).all()
        out.sum().backward()
        assert a.grad.shape == a.shape
    z = torch.randn(1, 3, 5, 5)
    z[:, :, 2:, 1:3] = 0
    z = leaf(z)
    out = stccl_ops.spatial_correlation(z, 3, backend="triton")
    assert_close(out, reference.spatial_correlation(z, 3))
    out.sum().backward()
    assert torch.isfinite(z.grad).all()
    v = leaf(torch.randn(2, 4, 3, 5, 6, dtype=torch.float64))
    st = stccl_ops.spatiotemporal_correlation(v, 3, temporal_kernel_size=3, frame_stride=2,
                                              backend="triton")
    assert_close(st.spatial, reference.spatial_correlation(v, 3))
    assert_close(st.temporal, reference.temporal_correlation(v, 3, frame_stride=2))
    assert torch.autograd.gradcheck(
        lambda x: stccl_ops.temporal_correlation(x, 3, backend="triton"), (v[:1, :2, :2],))


@INTERPRETED
def test_interpreted_function_drop_in_and_determinism():
    a, b = leaf(torch.randn(1, 6, 8, 9)), leaf(torch.randn(1, 6, 8, 9))
    g = torch.randn(1, 25, 8, 9)
    first = grads(lambda x, y: stccl_ops.LocalCorrelationFunction.apply(
        x, y, 5, 1, True, 1e-8, "triton"), (a, b), g)
    second = grads(lambda x, y: stccl_ops.local_correlation(x, y, 5, backend="triton"), (a, b), g)
    assert torch.equal(first[0], second[0])
    assert all(torch.equal(p, q) for p, q in zip(first[1], second[1]))


@INTERPRETED
@pytest.mark.parametrize("call,error,pattern", [
    (lambda o: o.triton_local_correlation(torch.randn(1, 2, 4, 4), torch.randn(1, 2, 4, 5), 3,
                                          1, True, 1e-8),
     ValueError, r"triton_local_correlation: a and b must have the same shape"),
    (lambda o: o.triton_local_correlation(torch.randn(1, 2, 4, 4), torch.randn(1, 2, 4, 4), 4,
                                          1, True, 1e-8),
     ValueError, r"triton_local_correlation: kernel_size must be a positive odd integer"),
    (lambda o: o.triton_self_correlation(torch.randn(1, 2, 4, 4).long(), 3, 1, True, 1e-8),
     TypeError, r"triton_self_correlation: x must have dtype"),
    (lambda o: o.triton_self_correlation(torch.randn(1, 2, 4, 4), 3, 1, True, 0.0),
     ValueError, r"triton_self_correlation: eps must be a finite number > 0"),
    (lambda o: o.triton_self_correlation_backward(torch.randn(1, 4, 4, 4), torch.randn(1, 2, 4, 4),
                                                  torch.randn(1, 9, 4, 4), 3, 1, True, 1e-8),
     ValueError, r"triton_self_correlation_backward: grad_out must be \(1, 9, 4, 4\)"),
])
def test_triton_ops_check_their_arguments(call, error, pattern):
    """Direct callers of torch.ops get the checks of the C++ entry points."""
    with pytest.raises(error, match=pattern):
        call(torch.ops.stccl_ops)


@pytest.mark.skipif(not HAS_TRITON, reason="needs triton")
def test_triton_ops_on_cpu_tensors_outside_the_interpreter_are_a_clear_error():
    code = (
        "import os; os.environ.pop('TRITON_INTERPRET', None)\n"
        "import torch, stccl_ops\n"
        "x = torch.randn(1, 2, 4, 4)\n"
        "try:\n"
        "    torch.ops.stccl_ops.triton_self_correlation(x, 3, 1, True, 1e-8)\n"
        "except ValueError as e:\n"
        "    assert 'triton_self_correlation' in str(e) and 'got x on cpu' in str(e), e\n"
        "else:\n"
        "    raise SystemExit('no ValueError')\n"
    )
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env)
    assert result.returncode == 0, result.stderr + result.stdout


AOT_SCRIPT = r"""
import json, os, re, subprocess, sys, glob
os.environ.pop("TRITON_INTERPRET", None)
import torch
import triton, triton.language as tl
from triton.compiler import ASTSource
from triton.backends.compiler import GPUTarget
from stccl_ops.triton import local_correlation as m

cuobjdump = glob.glob(os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia",
                                   "bin", "cuobjdump"))[0]
PTR = {"fp16": "*fp16", "bf16": "*bf16", "fp32": "*fp32", "fp64": "*fp64"}
ACC = {"fp16": tl.float32, "bf16": tl.float32, "fp32": tl.float32, "fp64": tl.float64}
ACC_PTR = {"fp16": "*fp32", "bf16": "*fp32", "fp32": "*fp32", "fp64": "*fp64"}

def signature(fn, pointers, acc_pointers, ints):
    sig = {}
    for i, name in enumerate(fn.arg_names):
        if i in fn.constexprs:
            sig[name] = "constexpr"
        elif name.endswith("_ptr"):
            sig[name] = acc_pointers if name.startswith(("inv", "pass", "eps")) else pointers
        elif name.startswith("inv_"):  # 1 / a window size
            sig[name] = "fp32"
        else:
            sig[name] = ints
    return sig

def compile_one(fn, dtype, cc, consts, num_warps, ints="i32", ones=False):
    sig = signature(fn, PTR[dtype], ACC_PTR[dtype], ints)
    if ones:  # every integer argument 1: the JIT passes those as Python ints
        consts = dict(consts, **{name: 1 for name, kind in sig.items() if kind == ints})
        sig = {name: "constexpr" if name in consts else kind for name, kind in sig.items()}
    if "ACC" in fn.arg_names:
        consts = dict(consts, ACC=ACC[dtype])
    src = ASTSource(fn, sig, constexprs=consts)
    k = triton.compile(src, target=GPUTarget("cuda", cc, 32), options={"num_warps": num_warps})
    path = f"/tmp/stccl_aot_{os.getpid()}.cubin"
    with open(path, "wb") as f:
        f.write(k.asm["cubin"])
    res = subprocess.run([cuobjdump, "-res-usage", path], capture_output=True, text=True).stdout
    os.remove(path)
    usage = dict(re.findall(r"(REG|STACK|SHARED|LOCAL):(\d+)", res))
    return {"kernel": fn.__name__, "dtype": dtype, "cc": cc, "ints": ints, "ones": ones,
            "consts": {k: str(v) for k, v in consts.items()},
            "regs": int(usage["REG"]), "local": int(usage["LOCAL"]), "stack": int(usage["STACK"]),
            "shared": k.metadata.shared}

# Every offset group size the kernels take (K = 1, 3, 5, >= 7) and its tiles.
def configs(of_window):
    unique = {str(cfg): cfg for K in (1, 3, 5, 7) for cfg in of_window(K)}
    return list(unique.values())

# The spatiotemporal forward's groups: the spatial offsets up to the centre
# plus the temporal ones, (K, Kt) = (1, 1), (3, 1), (3, 3), (5, 5), (7, 7).
CLIP_OFFSETS = (2, 6, 14, 38, 74)
TORCH_DTYPE = {"fp16": torch.float16, "bf16": torch.bfloat16, "fp32": torch.float32,
               "fp64": torch.float64}
def clip_configs(dtype):
    unique = {str(cfg): cfg for n in CLIP_OFFSETS
              for cfg in m.clip_forward_configs(n, TORCH_DTYPE[dtype])}
    return list(unique.values())

FORWARD_CONFIGS, BACKWARD_CONFIGS = configs(m.forward_configs), configs(m.backward_configs)
results = []
for cc in (80, 90):
    for dtype in PTR:
        for cfg in FORWARD_CONFIGS:
            for normalize in (True, False):
                results.append(compile_one(m._local_correlation_fwd_kernel, dtype, cc,
                                           dict(cfg.kwargs, NORMALIZE=normalize), cfg.num_warps))
        for cfg in BACKWARD_CONFIGS:
            for normalize in (True, False):
                for mode in (m.MODE_A, m.MODE_B, m.MODE_SELF):
                    results.append(compile_one(m._local_correlation_bwd_kernel, dtype, cc,
                                               dict(cfg.kwargs, NORMALIZE=normalize, MODE=mode),
                                               cfg.num_warps))
        for cfg in clip_configs(dtype):
            for normalize in (True, False):
                results.append(compile_one(m._spatiotemporal_fwd_kernel, dtype, cc,
                                           dict(cfg.kwargs, NORMALIZE=normalize), cfg.num_warps))
        for cfg in BACKWARD_CONFIGS:
            for normalize in (True, False):
                for spatial, temporal in ((True, True), (True, False), (False, True)):
                    results.append(compile_one(m._spatiotemporal_bwd_kernel, dtype, cc,
                                               dict(cfg.kwargs, NORMALIZE=normalize,
                                                    SPATIAL=spatial, TEMPORAL=temporal),
                                               cfg.num_warps))
        results.append(compile_one(m._inverse_norm_kernel, dtype, cc,
                                   {"BLOCK_P": 128, "BLOCK_C": 16}, 4))
        results.append(compile_one(m._mirror_kernel, dtype, cc, {"BLOCK_P": 256}, 4))
        # sizes or strides past 2^31: the JIT passes them as 64-bit integers
        cfg = FORWARD_CONFIGS[0]
        results.append(compile_one(m._local_correlation_fwd_kernel, dtype, cc,
                                   dict(cfg.kwargs, NORMALIZE=True), cfg.num_warps, "i64"))
        cfg = BACKWARD_CONFIGS[0]
        results.append(compile_one(m._local_correlation_bwd_kernel, dtype, cc,
                                   dict(cfg.kwargs, NORMALIZE=True, MODE=m.MODE_SELF),
                                   cfg.num_warps, "i64"))
        # integer arguments equal to 1 (one image, unit strides, 1 x 1 maps)
        for fn, cfg, extra in ((m._local_correlation_fwd_kernel, FORWARD_CONFIGS[0], {}),
                               (m._local_correlation_bwd_kernel, BACKWARD_CONFIGS[0],
                                {"MODE": m.MODE_B}),
                               (m._spatiotemporal_fwd_kernel, clip_configs(dtype)[0], {}),
                               (m._spatiotemporal_bwd_kernel, BACKWARD_CONFIGS[0],
                                {"SPATIAL": True, "TEMPORAL": True})):
            results.append(compile_one(fn, dtype, cc, dict(cfg.kwargs, NORMALIZE=True, **extra),
                                       cfg.num_warps, ones=True))
print(json.dumps(results))
"""

SHARED_LIMIT = {80: 163 * 1024, 90: 227 * 1024}


@pytest.mark.slow
@pytest.mark.skipif(not HAS_TRITON, reason="needs triton")
def test_ahead_of_time_compile_for_sm80_and_sm90():
    """Every kernel, every autotune configuration, every dtype and mode (the
    spatiotemporal ones: every group size, with and without each volume)."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    out = subprocess.run([sys.executable, "-c", AOT_SCRIPT], capture_output=True, text=True,
                         env=env, timeout=1200)
    assert out.returncode == 0, out.stderr[-3000:]
    results = json.loads(out.stdout.strip().splitlines()[-1])
    m = stccl_ops.triton.kernels

    def count(of_window):
        return len({str(cfg) for K in (1, 3, 5, 7) for cfg in of_window(K)})

    forward, backward = count(m.forward_configs), count(m.backward_configs)
    clip_forward = sum(len({str(cfg) for n in (2, 6, 14, 38, 74)
                            for cfg in m.clip_forward_configs(n, dtype)})
                       for dtype in (torch.float16, torch.bfloat16, torch.float32, torch.float64))
    assert len(results) == 2 * (4 * (forward * 2 + backward * 2 * 3 + 8 + backward * 2 * 3)
                                + clip_forward * 2)
    for r in results:
        assert r["local"] == 0, f"spills: {r}"
        # 64-bit sizes turn the pixel divisions into calls, which take a stack
        # frame (not spills); the usual 32-bit sizes take none.
        # (every integer argument 1, a one-channel 1 x 1 map: it must compile, not be fast)
        assert r["stack"] == 0 or r["ints"] == "i64" or r["ones"], f"stack frame: {r}"
        assert r["shared"] <= SHARED_LIMIT[r["cc"]], r
        assert r["regs"] <= 255, r
    worst = max(results, key=lambda r: r["regs"])
    print(f"\n{len(results)} cubins, no spills; most registers: {worst}")


@INTERPRETED
def test_float64_eps_reaches_the_kernels_exactly():
    """eps is handed to the kernels in the accumulation type: a float64
    gradient at a vector clamped at eps (here a zero vector, gradient ~ 1/eps)
    matches the reference in float64 (eps as a float32 scalar was 6e-9 off)."""
    a = rand((1, 3, 4, 5), torch.float64, 1)
    a[:, :, 1, 2] = 0
    a, b = leaf(a), leaf(rand((1, 3, 4, 5), torch.float64, 2))
    g = rand((1, 9, 4, 5), torch.float64, 3)
    _, got = grads(lambda x, y: stccl_ops.local_correlation(x, y, 3, backend="triton"), (a, b), g)
    _, want = grads(lambda x, y: reference.local_correlation(x, y, 3), (a, b), g)
    for actual, expected in zip(got, want):
        assert_close(actual, expected, "grad")


@INTERPRETED
def test_request_counter_counts_each_sector_once_per_instruction():
    """A 1 x 1 window, raw, on one 8 x 16 tile: the forward's loads of a and b
    and its store of the output request exactly the floor bytes."""
    from stccl_ops.triton.traffic import count_requests

    a, b = rand((1, 8, 8, 16), torch.float32, 1), rand((1, 8, 8, 16), torch.float32, 2)
    with count_requests() as launches:
        out = stccl_ops.local_correlation(a, b, 1, normalize=False, backend="triton")
    assert [l["kernel"] for l in launches] == ["_local_correlation_fwd_kernel"]
    assert launches[0]["requested_bytes"] == (a.numel() + b.numel() + out.numel()) * 4


@INTERPRETED
@pytest.mark.parametrize("C, K, dilation, bound", [(64, 3, 1, 2.0), (128, 7, 1, 3.0),
                                                    (32, 9, 2, 3.0)])
def test_forward_requests_near_the_floor(C, K, dilation, bound):
    """Each tile's a and b (with its halo) once per channel block: the
    forward requests at most 2x the floor bytes for K = 3, 3x for K = 7, 9."""
    from stccl_ops.triton.traffic import count_requests

    a, b = rand((1, C, 16, 64), torch.float32, 3), rand((1, C, 16, 64), torch.float32, 4)
    with count_requests() as launches:
        out = stccl_ops.local_correlation(a, b, K, dilation, backend="triton")
    floor = (a.numel() + b.numel() + out.numel()) * 4
    assert sum(l["requested_bytes"] for l in launches) <= bound * floor
