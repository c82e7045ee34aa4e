"""GPU-only checks of the CUDA (and Triton) backends beyond the shared
correctness grid of test_correctness.py: agreement with the CPU kernels,
devices other than the default, side streams, opcheck and torch.compile.
Skipped without a CUDA GPU."""

import pytest
import torch

import stccl_ops
from stccl_ops import reference

from helpers import HAS_CUDA_GPU, assert_close, grads, leaf, samples

pytestmark = [pytest.mark.cuda,
              pytest.mark.skipif(not HAS_CUDA_GPU, reason="needs a CUDA GPU")]


def gpu_backends():
    return [b for b in ("cuda", "triton") if b in stccl_ops.available_backends("cuda")]


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.float16, torch.bfloat16],
                         ids=str)
@pytest.mark.parametrize("sample", samples(), ids=lambda s: s.name)
def test_gpu_matches_cpu_kernels(sample, dtype):
    a, b = sample.a.to(dtype), sample.b.to(dtype)
    K = sample.kernel_size
    g = torch.randn(a.shape[0], K * K, *a.shape[2:], dtype=torch.float64).to(dtype)
    cpu_out, cpu_grads = grads(
        lambda x, y: stccl_ops.local_correlation(x, y, *sample.window, backend="cpp"),
        (leaf(a), leaf(b)), g)
    for backend in gpu_backends():
        out, got = grads(
            lambda x, y: stccl_ops.local_correlation(x, y, *sample.window, backend=backend),
            (leaf(a.cuda()), leaf(b.cuda())), g.cuda())
        assert_close(out.cpu(), cpu_out)
        for actual, expected in zip(got, cpu_grads):
            assert_close(actual.cpu(), expected, "grad")


def test_non_default_device_and_stream():
    device = torch.device("cuda", torch.cuda.device_count() - 1)
    a = leaf(torch.randn(2, 8, 17, 23, device=device))
    b = leaf(torch.randn(2, 8, 17, 23, device=device))
    ref = reference.local_correlation(a.detach().cpu(), b.detach().cpu(), 5, 2)
    stream = torch.cuda.Stream(device)
    for backend in gpu_backends():
        with torch.cuda.device(0), torch.cuda.stream(stream):
            out = stccl_ops.local_correlation(a, b, 5, 2, backend=backend)
            out.sum().backward()
        stream.synchronize()
        assert out.device == device and a.grad.device == device
        assert_close(out.cpu(), ref)
        a.grad = b.grad = None


def test_gpu_bitwise_determinism():
    a, b = torch.randn(2, 33, 40, 37, device="cuda"), torch.randn(2, 33, 40, 37, device="cuda")
    g = torch.randn(2, 49, 40, 37, device="cuda")
    for backend in gpu_backends():
        runs = []
        for _ in range(3):
            out, got = grads(lambda x, y: stccl_ops.local_correlation(x, y, 7, backend=backend),
                             (leaf(a), leaf(b)), g)
            runs.append([out, *got])
        for other in runs[1:]:
            assert all(torch.equal(p, q) for p, q in zip(runs[0], other))


def test_gpu_gradcheck_and_opcheck():
    opts = dict(dtype=torch.float64, device="cuda", requires_grad=True)
    a, b = torch.randn(1, 3, 5, 6, **opts), torch.randn(1, 3, 5, 6, **opts)
    v = torch.randn(1, 3, 2, 4, 4, **opts)
    for backend in gpu_backends():
        assert torch.autograd.gradcheck(
            lambda x, y: stccl_ops.local_correlation(x, y, 3, 2, backend=backend), (a, b))
        assert torch.autograd.gradcheck(
            lambda x: tuple(stccl_ops.spatiotemporal_correlation(x, 3, backend=backend)), (v,))
    for sample in samples(torch.float64, "cuda"):
        torch.library.opcheck(torch.ops.stccl_ops.local_correlation,
                              (leaf(sample.a), leaf(sample.b), *sample.window))
        torch.library.opcheck(torch.ops.stccl_ops.self_correlation,
                              (leaf(sample.a), *sample.window))


def test_gpu_torch_compile_fullgraph():
    for backend in gpu_backends():
        def loss(v):
            st = stccl_ops.spatiotemporal_correlation(v, 3, temporal_kernel_size=3,
                                                      backend=backend)
            return st.spatial.square().mean() + st.temporal.mean()

        torch._dynamo.reset()
        compiled = torch.compile(loss, fullgraph=True)
        v = leaf(torch.randn(2, 4, 8, 16, 16, device="cuda"))
        (g_eager,) = torch.autograd.grad(loss(v), v)
        (g_comp,) = torch.autograd.grad(compiled(v), v)
        torch.testing.assert_close(g_comp, g_eager, rtol=1e-4, atol=1e-6)
