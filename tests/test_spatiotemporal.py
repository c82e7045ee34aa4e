"""The fused spatiotemporal op (stccl_ops::spatiotemporal_correlation): both
volumes and the clip gradient of both, on every backend, against the
reference self + temporal correlations."""

import pytest
import torch

import stccl_ops
from stccl_ops import _extension, reference

from helpers import (CPU_PATHS, DTYPES, HAS_CUDA_GPU, assert_close, leaf, needs_extension,
                     require_cuda_emulated)

BACKENDS = [
    pytest.param("cpp", id="cpp", marks=needs_extension),
    pytest.param("cuda_emulated", id="cuda_emulated", marks=pytest.mark.cuda_emulated),
    pytest.param("cuda", id="cuda", marks=[pytest.mark.cuda, pytest.mark.skipif(
        not HAS_CUDA_GPU, reason="needs a CUDA GPU")]),
    # On a GPU; without one see test_triton_interpreted below.
    pytest.param("triton", id="triton", marks=[pytest.mark.cuda, pytest.mark.skipif(
        not HAS_CUDA_GPU or "triton" not in stccl_ops.available_backends("cuda"),
        reason="needs a CUDA GPU and Triton")]),
]

# (kernel_size, dilation, temporal_kernel_size, temporal_dilation, frame_stride, normalize)
WINDOWS = {
    "stccl": (3, 1, 3, 1, 1, True),
    "temporal-1x1": (3, 1, 1, 1, 1, True),
    "wider-temporal": (1, 1, 5, 2, 1, True),
    "wider-spatial-stride2-raw": (5, 2, 3, 1, 2, False),
    "window-past-map": (7, 2, 3, 1, 1, True),
}
# (B, T, C, H, W)
SHAPES = {
    "basic": (2, 4, 5, 9, 11),
    "narrow-flat": (1, 3, 6, 7, 7),
    "1x1": (2, 3, 4, 1, 1),
    "two-frames": (1, 2, 3, 5, 6),
    "several-bands": (1, 3, 3, 37, 9),
}


def device_of(name):
    return "cuda" if name in ("cuda", "triton") else "cpu"


@pytest.fixture(params=BACKENDS)
def backend(request):
    if request.param == "cuda_emulated":
        require_cuda_emulated()
    return request.param


def clip(shape, dtype=torch.float64, device="cpu", seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(shape, generator=g, dtype=torch.float64).to(dtype).to(device)


def both(v, window, **kw):
    K, d, Kt, dt, s, normalize = window
    return stccl_ops.spatiotemporal_correlation(v, K, d, Kt, dt, s, normalize, **kw)


def reference_both(v, window):
    K, d, Kt, dt, s, normalize = window
    return (reference.spatial_correlation(v, K, d, normalize),
            reference.temporal_correlation(v, Kt, dt, normalize, frame_stride=s))


def check_against_reference(v, window, backend, grads_of=("spatial", "temporal"), seed=1):
    """Both volumes and the clip gradient of the chosen volumes."""
    x, r = leaf(v), leaf(v)
    got, want = both(x, window, backend=backend), reference_both(r, window)
    g = torch.Generator().manual_seed(seed)
    assert_close(got.spatial, want[0])
    assert_close(got.temporal, want[1])
    picks = [i for i, name in enumerate(("spatial", "temporal")) if name in grads_of]
    upstream = [torch.randn(want[i].shape, generator=g, dtype=torch.float64).to(v)
                for i in picks]
    (mine,) = torch.autograd.grad([got[i] for i in picks], x, upstream)
    (expected,) = torch.autograd.grad([want[i] for i in picks], r, upstream)
    assert_close(mine, expected, "grad")


@pytest.mark.parametrize("window", list(WINDOWS), ids=list(WINDOWS))
@pytest.mark.parametrize("shape", list(SHAPES), ids=list(SHAPES))
def test_matches_the_reference(backend, window, shape):
    v = clip(SHAPES[shape], device=device_of(backend), seed=len(shape) + len(window))
    *rest, frame_stride, normalize = WINDOWS[window]
    frame_stride = min(frame_stride, v.shape[1] - 1)  # two frames: stride 1
    check_against_reference(v, (*rest, frame_stride, normalize), backend)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_every_dtype(backend, dtype):
    v = clip((2, 4, 6, 8, 9), dtype, device_of(backend), seed=3)
    check_against_reference(v, WINDOWS["stccl"], backend)


@pytest.mark.parametrize("grads_of", [("spatial",), ("temporal",)])
def test_gradient_of_one_volume(backend, grads_of):
    """A volume the loss does not use gets no gradient term (and no zeros)."""
    v = clip((2, 5, 4, 6, 7), device=device_of(backend), seed=4)
    check_against_reference(v, WINDOWS["stccl"], backend, grads_of)


@pytest.mark.parametrize("view", ["channels_last-frames", "every-other-frame", "expanded"])
def test_views_are_read_in_place(backend, view):
    base = clip((2, 7, 9, 8, 6), device=device_of(backend), seed=5)
    v = {"channels_last-frames": base.permute(0, 1, 3, 4, 2).contiguous().permute(0, 1, 4, 2, 3),
         "every-other-frame": base[:, ::2],
         "expanded": base[:, :1].expand(2, 4, 9, 8, 6)}[view]
    assert not v.is_contiguous()
    check_against_reference(v, WINDOWS["stccl"], backend)


def test_frames_in_no_pair_and_empty_clips(backend):
    """T = 3 with frame_stride 2: frame 1 is in no pair (its gradient is the
    spatial one alone); clips with no batch, no pixels or no channels."""
    device = device_of(backend)
    check_against_reference(clip((1, 3, 4, 5, 5), device=device), (3, 1, 3, 1, 2, True), backend)
    for shape in [(0, 3, 4, 5, 5), (2, 3, 4, 0, 5), (2, 3, 0, 4, 5)]:
        v = leaf(clip(shape, device=device))
        st = both(v, WINDOWS["stccl"], backend=backend)
        ref = reference_both(v, WINDOWS["stccl"])
        assert_close(st.spatial, ref[0])
        assert_close(st.temporal, ref[1])
        (st.spatial.sum() + st.temporal.sum()).backward()
        assert v.grad.shape == v.shape and not v.grad.isnan().any()


def test_zero_vectors_give_zero_not_nan(backend):
    v = clip((1, 3, 4, 6, 6), device=device_of(backend), seed=6)
    v[:, 1, :, 2:4, 2:4] = 0
    check_against_reference(v, WINDOWS["stccl"], backend)


def test_gradcheck_float64(backend):
    v = leaf(clip((1, 3, 3, 4, 5), device=device_of(backend), seed=7))
    for window in (WINDOWS["stccl"], WINDOWS["wider-spatial-stride2-raw"],
                   WINDOWS["wider-temporal"]):
        assert torch.autograd.gradcheck(lambda x: tuple(both(x, window, backend=backend)), (v,))


def test_fused_equals_the_separate_ops(backend):
    """The fused op against self_correlation + temporal_correlation of the same
    backend, forward and gradient."""
    v = clip((2, 5, 16, 12, 10), torch.float32, device_of(backend), seed=8)
    x, y = leaf(v), leaf(v)
    st = both(x, WINDOWS["stccl"], backend=backend)
    sp = stccl_ops.spatial_correlation(y, 3, backend=backend)
    tp = stccl_ops.temporal_correlation(y, 3, backend=backend)
    assert_close(st.spatial, sp)
    assert_close(st.temporal, tp)
    gs, gt = torch.randn_like(sp), torch.randn_like(tp)
    (mine,) = torch.autograd.grad([st.spatial, st.temporal], x, [gs, gt])
    (theirs,) = torch.autograd.grad([sp, tp], y, [gs, gt])
    assert_close(mine, theirs, "grad")


@pytest.mark.slow
@pytest.mark.skipif("triton" not in stccl_ops.available_backends("cpu"),
                    reason="the Triton interpreter is not active (TRITON_INTERPRET=1, no GPU)")
@pytest.mark.parametrize("window", list(WINDOWS), ids=list(WINDOWS))
@pytest.mark.parametrize("dtype", [torch.float64, torch.bfloat16], ids=str)
def test_triton_interpreted(window, dtype):
    """The Triton kernels in the interpreter (minutes per large case): every
    window on a small clip with frames in no pair (T = 3, frame_stride 2 where
    the window has it), both volumes' gradients and each alone."""
    v = clip((1, 3, 3, 5, 6), dtype, seed=12)
    check_against_reference(v, WINDOWS[window], "triton")
    if window == "stccl":
        for grads_of in (("spatial",), ("temporal",)):
            check_against_reference(v, WINDOWS[window], "triton", grads_of)


# ---- CPU specifics: layouts, SIMD builds, chunked staging, threads --------------------------

@pytest.fixture
def cpu_mode(request):
    isa, layout = request.param
    _extension._C._set_cpu_isa(isa)
    _extension._C._set_cpu_layout(layout)
    yield
    _extension._C._set_cpu_isa("auto")
    _extension._C._set_cpu_layout("auto")


@needs_extension
@pytest.mark.parametrize("cpu_mode", [(isa, layout) for isa in CPU_PATHS
                                      for layout in ("rows", "flat", "groups", "pixels")],
                         indirect=True,
                         ids=lambda m: "-".join(m))
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("window", ["stccl", "wider-temporal", "wider-spatial-stride2-raw"])
def test_cpu_layouts_and_builds(cpu_mode, dtype, window):
    v = clip((2, 4, 6, 7, 9), dtype, seed=9)
    check_against_reference(v, WINDOWS[window], "cpp")


@needs_extension
@pytest.mark.parametrize("channels", [700], ids=["past-whole-band-staging"])
def test_cpu_many_channels(channels):
    """Channels past the whole-band staging bound: the forward runs the self
    and temporal passes one after the other, the backward stages in chunks."""
    v = clip((1, 3, channels, 13, 9), torch.float32, seed=10)
    check_against_reference(v, WINDOWS["stccl"], "cpp")


@needs_extension
def test_cpu_bitwise_deterministic_across_thread_counts():
    v = clip((2, 5, 24, 11, 10), torch.float32, seed=11)
    ops = torch.ops.stccl_ops
    threads = torch.get_num_threads()
    results = []
    try:
        for n in (1, 2, 3):
            torch.set_num_threads(n)
            sp, tp = ops.spatiotemporal_correlation(v, 3, 1, 3, 1, 1, True, 1e-8)
            g = ops._spatiotemporal_correlation_backward(sp.cos(), tp.sin(), v, sp, tp, 3, 1, 3,
                                                         1, 1, True, 1e-8)
            results.append((sp, tp, g))
    finally:
        torch.set_num_threads(threads)
    for other in results[1:]:
        for x, y in zip(results[0], other):
            assert torch.equal(x, y)


# ---- torch.library: opcheck, compile, autocast, errors --------------------------------------

@needs_extension
def test_opcheck():
    ops = torch.ops.stccl_ops
    v = leaf(clip((2, 4, 3, 5, 6)))
    torch.library.opcheck(ops.spatiotemporal_correlation, (v, 3, 1, 3, 1, 1, True, 1e-8))
    torch.library.opcheck(ops.spatiotemporal_correlation, (v, 5, 2, 1, 1, 2, False, 1e-8))
    w = v.detach()
    sp, tp = ops.spatiotemporal_correlation(w, 3, 1, 3, 1, 1, True, 1e-8)
    for gs, gt in [(torch.randn_like(sp), torch.randn_like(tp)), (None, torch.randn_like(tp)),
                   (torch.randn_like(sp), None)]:
        torch.library.opcheck(ops._spatiotemporal_correlation_backward,
                              (gs, gt, w, sp, tp, 3, 1, 3, 1, 1, True, 1e-8))


class FusedToy(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = torch.nn.Conv3d(3, 8, (1, 3, 3), padding=(0, 1, 1))

    def forward(self, clip):
        feats = self.conv(clip.transpose(1, 2)).transpose(1, 2)
        st = stccl_ops.spatiotemporal_correlation(feats, 3, temporal_kernel_size=3,
                                                  backend="cpp")
        return st.spatial.mean() + st.temporal.square().mean()


@needs_extension
@pytest.mark.slow
def test_torch_compile_fullgraph():
    torch._dynamo.reset()
    model = FusedToy()
    compiled = torch.compile(model, fullgraph=True)
    clip_ = torch.randn(2, 3, 3, 8, 9)
    eager = model(clip_)
    eager_grads = torch.autograd.grad(eager, list(model.parameters()))
    loss = compiled(clip_)
    got = torch.autograd.grad(loss, list(model.parameters()))
    torch.testing.assert_close(loss, eager, rtol=1e-5, atol=1e-6)
    for g, e in zip(got, eager_grads):
        torch.testing.assert_close(g, e, rtol=1e-4, atol=1e-6)


@needs_extension
def test_autocast_runs_in_float32():
    v = clip((1, 3, 4, 5, 5), torch.bfloat16)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        st = stccl_ops.spatiotemporal_correlation(v, backend="cpp")
        direct = torch.ops.stccl_ops.spatiotemporal_correlation(v, 3, 1, 1, 1, 1, True, 1e-8)
    assert st.spatial.dtype == st.temporal.dtype == torch.float32
    assert all(t.dtype == torch.float32 for t in direct)
    assert_close(st.spatial, reference.spatial_correlation(v.float()))


@needs_extension
def test_bad_arguments_are_clear_errors():
    ops = torch.ops.stccl_ops
    v = clip((1, 3, 2, 4, 4))
    with pytest.raises(ValueError, match="spatiotemporal_correlation: temporal_kernel_size"):
        stccl_ops.spatiotemporal_correlation(v, 3, temporal_kernel_size=4)
    with pytest.raises(RuntimeError, match="spatiotemporal_correlation: temporal_kernel_size"):
        ops.spatiotemporal_correlation(v, 3, 1, 2, 1, 1, True, 1e-8)
    with pytest.raises(RuntimeError, match="spatiotemporal_correlation: temporal_dilation"):
        ops.spatiotemporal_correlation(v, 3, 1, 3, 0, 1, True, 1e-8)
    with pytest.raises(RuntimeError, match="frame_stride must be in"):
        ops.spatiotemporal_correlation(v, 3, 1, 3, 1, 3, True, 1e-8)
    with pytest.raises(RuntimeError, match="must be .B, T, C, H, W."):
        ops.spatiotemporal_correlation(v[0], 3, 1, 3, 1, 1, True, 1e-8)
    sp, tp = ops.spatiotemporal_correlation(v, 3, 1, 3, 1, 1, True, 1e-8)
    with pytest.raises(RuntimeError, match="grad_temporal must have shape"):
        ops._spatiotemporal_correlation_backward(sp, sp, v, sp, tp, 3, 1, 3, 1, 1, True, 1e-8)
    with pytest.raises(RuntimeError, match="temporal must have shape"):
        ops._spatiotemporal_correlation_backward(sp, None, v, sp, sp, 3, 1, 3, 1, 1, True, 1e-8)
