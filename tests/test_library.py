"""torch.library integration: opcheck of every op, the autograd.Function
drop-ins, autograd of the registered ops, autocast, torch.compile and
compiled autograd."""

import pytest
import torch

import stccl_ops
from stccl_ops import reference

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
