"""torch.library integration, autograd drop-ins, modules, autocast, compile,
backend selection."""

import subprocess
import sys
import warnings

import pytest
import torch

import stccl_ops
from stccl_ops import _backends, reference

from helpers import assert_close, grads, leaf, needs_extension, samples

pytestmark = needs_extension
OPS = torch.ops.stccl_ops


@pytest.mark.parametrize("sample", samples(torch.float64), ids=lambda s: s.name)
def test_opcheck_local_correlation(sample):
    a, b = leaf(sample.a), leaf(sample.b, sample.name != "k1")
    torch.library.opcheck(OPS.local_correlation, (a, b, *sample.window))
    torch.library.opcheck(OPS.self_correlation, (leaf(sample.a), *sample.window))


def test_opcheck_backward_ops_and_clips():
    a, b = torch.randn(2, 3, 4, 5, dtype=torch.float64), torch.randn(2, 3, 4, 5,
                                                                      dtype=torch.float64)
    out = OPS.local_correlation(a, b, 3, 1, True, 1e-8)
    g = torch.randn_like(out)
    for need in [(True, True), (True, False), (False, True)]:
        torch.library.opcheck(OPS._local_correlation_backward,
                              (g, a, b, out, 3, 1, True, 1e-8, *need))
    torch.library.opcheck(OPS._self_correlation_backward,
                          (g, a, OPS.self_correlation(a, 3, 1, True, 1e-8), 3, 1, True, 1e-8))
    v = torch.randn(2, 3, 2, 4, 4, dtype=torch.float64, requires_grad=True)
    torch.library.opcheck(OPS.local_correlation, (v[:, :-1], v[:, 1:], 3, 1, True, 1e-8))
    torch.library.opcheck(OPS.self_correlation, (v, 3, 1, True, 1e-8))
    for stride in (1, 2):
        w = torch.randn(2, 4, 3, 5, 4, dtype=torch.float64, requires_grad=True)
        torch.library.opcheck(OPS.temporal_correlation, (w, 3, 1, True, 1e-8, stride))
        w = w.detach()
        out = OPS.temporal_correlation(w, 3, 2, False, 1e-8, stride)
        torch.library.opcheck(OPS._temporal_correlation_backward,
                              (torch.randn_like(out), w, out, 3, 2, False, 1e-8, stride))


def test_autograd_function_drop_ins_match_the_ops():
    a, b = leaf(torch.randn(2, 4, 6, 7)), leaf(torch.randn(2, 4, 6, 7))
    g = torch.randn(2, 25, 6, 7)
    out, got = grads(lambda x, y: stccl_ops.LocalCorrelationFunction.apply(x, y, 5, 1, True, 1e-8,
                                                                           "cpp"), (a, b), g)
    ref, want = grads(lambda x, y: stccl_ops.local_correlation(x, y, 5, backend="cpp"), (a, b), g)
    assert torch.equal(out, ref) and all(torch.equal(p, q) for p, q in zip(got, want))
    x = leaf(torch.randn(2, 4, 6, 7))
    out, (gx,) = grads(lambda v: stccl_ops.SelfCorrelationFunction.apply(v, 5), (x,), g)
    ref, (rx,) = grads(lambda v: reference.spatial_correlation(v, 5), (x,), g)
    assert_close(out, ref)
    assert_close(gx, rx, "grad")
    a64 = leaf(torch.randn(1, 2, 3, 4, dtype=torch.float64))
    b64 = torch.randn(1, 2, 3, 4, dtype=torch.float64)
    assert torch.autograd.gradcheck(
        lambda v: stccl_ops.LocalCorrelationFunction.apply(v, b64, 3), (a64,))
    with pytest.raises(ValueError, match="needs a compiled backend"):
        stccl_ops.LocalCorrelationFunction.apply(a, b, 3, 1, True, 1e-8, "reference")


def test_modules():
    v = torch.randn(2, 4, 3, 6, 6)
    st = stccl_ops.SpatioTemporalCorrelation(3, temporal_kernel_size=3, frame_stride=2)(v)
    assert_close(st.spatial, reference.spatial_correlation(v, 3))
    assert_close(st.temporal, reference.temporal_correlation(v, 3, frame_stride=2))
    assert_close(stccl_ops.SpatialCorrelation(5, 2)(v), reference.spatial_correlation(v, 5, 2))
    assert_close(stccl_ops.TemporalCorrelation(frame_stride=3)(v),
                 reference.temporal_correlation(v, frame_stride=3))
    a, b = v[:, 0], v[:, 1]
    assert_close(stccl_ops.LocalCorrelation(3, normalize=False)(a, b),
                 reference.local_correlation(a, b, 3, normalize=False))
    assert "frame_stride=2" in repr(stccl_ops.SpatioTemporalCorrelation(frame_stride=2))


def test_double_backward_is_a_clear_error():
    a, b = leaf(torch.randn(1, 3, 4, 4)), leaf(torch.randn(1, 3, 4, 4))
    out = stccl_ops.local_correlation(a, b, backend="cpp")
    (ga,) = torch.autograd.grad(out.sum(), a, create_graph=True)
    with pytest.raises(RuntimeError, match="double backward"):
        ga.sum().backward()
    # the reference supports it
    out = stccl_ops.local_correlation(a, b, backend="reference")
    (ga,) = torch.autograd.grad(out.sum(), a, create_graph=True)
    ga.sum().backward()


def test_op_autograd_builds_a_graph_only_when_needed():
    x = torch.randn(1, 3, 5, 5)
    assert OPS.self_correlation(x, 3, 1, True, 1e-8).grad_fn is None
    with torch.inference_mode():
        assert_close(OPS.self_correlation(x, 3, 1, True, 1e-8), reference.spatial_correlation(x))
    v = leaf(torch.randn(1, 3, 2, 5, 5))
    with torch.no_grad():
        assert OPS.temporal_correlation(v, 3, 1, True, 1e-8, 1).grad_fn is None
    out = OPS.temporal_correlation(v, 3, 1, True, 1e-8, 1)
    out.sum().backward()
    expected, = torch.autograd.grad(reference.temporal_correlation(v, 3).sum(), v)
    assert_close(v.grad, expected)
    with pytest.raises(RuntimeError, match="second time"):  # saved tensors were freed
        out.sum().backward()


def test_autocast_runs_in_float32():
    a = torch.randn(1, 4, 5, 5, dtype=torch.bfloat16)
    b = torch.randn(1, 4, 5, 5)  # mixed dtypes are fine under autocast
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = stccl_ops.local_correlation(a, b, backend="cpp")
        direct = OPS.local_correlation(a, b.bfloat16(), 3, 1, True, 1e-8)
        ref = stccl_ops.local_correlation(a, b, backend="reference")
    assert out.dtype == direct.dtype == ref.dtype == torch.float32
    assert_close(out, reference.local_correlation(a.float(), b))
    assert_close(ref, out)
    assert stccl_ops.local_correlation(a, a).dtype == torch.bfloat16  # outside autocast


class STCCLToy(torch.nn.Module):
    def __init__(self):
        super().__init__()
        # Conv3d with a 1-frame kernel: per-frame features, handed to the ops
        # as a transposed (non-contiguous) clip view. (flatten(0, 1) + Conv2d
        # trips an inductor bug with dynamic shapes in torch 2.14, ops or not.)
        self.conv = torch.nn.Conv3d(3, 8, (1, 3, 3), padding=(0, 1, 1))
        self.spatial = stccl_ops.SpatialCorrelation(3, backend="cpp")
        self.temporal = stccl_ops.TemporalCorrelation(3, backend="cpp")

    def forward(self, clip):
        feats = self.conv(clip.transpose(1, 2)).transpose(1, 2)
        return self.spatial(feats).mean() + self.temporal(feats).square().mean()


@pytest.mark.slow
@pytest.mark.parametrize("dynamic", [False, True])
def test_torch_compile_fullgraph(dynamic):
    torch._dynamo.reset()
    model = STCCLToy()
    compiled = torch.compile(model, fullgraph=True, dynamic=dynamic)
    for shape in [(2, 3, 3, 8, 9), (1, 4, 3, 6, 7)]:
        clip = torch.randn(shape)
        eager_loss = model(clip)
        eager_grads = torch.autograd.grad(eager_loss, list(model.parameters()))
        loss = compiled(clip)
        got = torch.autograd.grad(loss, list(model.parameters()))
        torch.testing.assert_close(loss, eager_loss, rtol=1e-5, atol=1e-6)
        for g, e in zip(got, eager_grads):
            torch.testing.assert_close(g, e, rtol=1e-4, atol=1e-6)


@pytest.mark.slow
def test_compiled_autograd_traces_the_backward():
    from torch._dynamo import compiled_autograd

    torch._dynamo.reset()
    v = leaf(torch.randn(1, 3, 4, 6, 6))
    other = torch.randn(1, 4, 6, 6)  # no gradient asked for it

    def loss():
        return (stccl_ops.temporal_correlation(v, 3, backend="cpp").square().mean()
                + stccl_ops.spatial_correlation(v, 3, backend="cpp").mean()
                + stccl_ops.local_correlation(other, v[:, 1], 5, backend="cpp").mean())

    (eager,) = torch.autograd.grad(loss(), v)
    with compiled_autograd._enable(torch.compile(backend="eager", fullgraph=True)):
        loss().backward()
    torch.testing.assert_close(v.grad, eager, rtol=1e-6, atol=1e-7)


def test_backend_env_and_auto(monkeypatch):
    a = torch.randn(1, 2, 3, 3)
    monkeypatch.setenv("STCCL_BACKEND", "reference")
    assert _backends.resolve("f", None, a.device).name == "reference"
    monkeypatch.setenv("STCCL_BACKEND", "auto")
    assert _backends.resolve("f", None, a.device).name == "cpp"
    assert _backends.resolve("f", "reference", a.device).name == "reference"
    monkeypatch.setenv("STCCL_BACKEND", "fastest")
    with pytest.raises(ValueError, match="backend must be one of"):
        stccl_ops.local_correlation(a, a)
    assert stccl_ops.available_backends("cpu")[:2] == ["reference", "cpp"]


def test_explicit_unavailable_backends_are_errors():
    a = torch.randn(1, 2, 3, 3)
    if not stccl_ops.build_info()["cuda"]:
        with pytest.raises(ImportError, match="compiled without CUDA"):
            stccl_ops.local_correlation(a, a, backend="cuda")
    elif not torch.cuda.is_available():
        with pytest.raises(ValueError, match="backend 'cuda' cannot be used: no CUDA GPU"):
            stccl_ops.local_correlation(a, a, backend="cuda")
    else:
        with pytest.raises(ValueError, match="runs on cuda tensors"):
            stccl_ops.local_correlation(a, a, backend="cuda")
    if "triton" not in _backends.BACKENDS:
        with pytest.raises(ImportError, match="triton"):
            stccl_ops.local_correlation(a, a, backend="triton")


def test_auto_falls_back_with_one_warning(monkeypatch):
    monkeypatch.setattr(_backends, "_warned", set())
    monkeypatch.setitem(_backends.AUTO_ORDER, "cpu", ("cuda", "cpp", "reference"))
    a = torch.randn(1, 2, 3, 3)
    with pytest.warns(RuntimeWarning, match="falls back to 'cpp'"):
        stccl_ops.local_correlation(a, a)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        stccl_ops.local_correlation(a, a)


def test_imports_without_the_extension():
    code = (
        "import sys; sys.modules['stccl_ops._C'] = None\n"
        "import torch, stccl_ops\n"
        "backends = stccl_ops.available_backends()\n"
        "assert 'reference' in backends and 'cpp' not in backends, backends\n"
        "assert stccl_ops.build_info()['extension'] is False\n"
        "x = torch.randn(1, 2, 4, 4)\n"
        "import warnings\n"
        "with warnings.catch_warnings(record=True) as w:\n"
        "    warnings.simplefilter('always')\n"
        "    out = stccl_ops.spatial_correlation(x)\n"
        "assert out.shape == (1, 9, 4, 4) and len(w) == 1, w\n"
        "try:\n"
        "    stccl_ops.spatial_correlation(x, backend='cpp')\n"
        "except ImportError as e:\n"
        "    assert 'pip install --no-build-isolation' in str(e), e\n"
        "else:\n"
        "    raise SystemExit('no ImportError')\n"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr


def test_auto_orders_backends_by_measured_speed(monkeypatch):
    """Where two compiled backends can run, `auto` times them once on the device
    and prefers the faster (here the interpreted Triton backend against cpp)."""
    if "triton" not in stccl_ops.available_backends("cpu"):
        pytest.skip("needs the Triton interpreter on the CPU")
    monkeypatch.setattr(_backends, "_measured", {})
    monkeypatch.setattr(_backends, "MEASURED_DEVICES", {"cpu"})
    monkeypatch.setattr(_backends, "MEASURE_SHAPE", (1, 4, 8, 8))
    monkeypatch.setitem(_backends.AUTO_ORDER, "cpu", ("triton", "cpp", "reference"))
    device = torch.device("cpu")
    assert _backends.resolve("f", None, device).name == "cpp"
    assert list(_backends._measured.values()) == [["cpp", "triton"]]
    monkeypatch.setenv("STCCL_AUTO_MEASURE", "0")
    assert _backends.resolve("f", None, device).name == "triton"
