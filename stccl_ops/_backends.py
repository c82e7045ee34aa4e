"""The backends behind the public API and how one is chosen.

A backend turns checked arguments into a differentiable correlation. The
compiled ones expose four ops (forward, backward, self-forward, self-backward)
with registered autograd, fake kernels and autocast; the public functions call
the forward ops, the autograd.Function drop-ins call all four.
"""

import os
import warnings
from typing import Union

import torch

from . import _extension, reference

NAMES = ("reference", "cpp", "cuda", "triton", "cuda_emulated")


class Backend:
    name = ""
    devices = ()  # device types it runs on

    def unavailable(self, device):
        """None when usable for tensors on `device`, else the reason why not."""
        if device.type not in self.devices:
            return f"it runs on {' or '.join(self.devices)} tensors, got {device}"
        return None

    def require(self, fn, device):
        reason = self.unavailable(device)
        if reason is not None:
            raise ValueError(f"stccl_ops.{fn}: backend '{self.name}' cannot be used: {reason}")

    def local(self, a, b, kernel_size, dilation, normalize, eps):
        return self.forward_op(a, b, kernel_size, dilation, normalize, eps)

    def self_correlation(self, x, kernel_size, dilation, normalize, eps):
        return self.self_forward_op(x, kernel_size, dilation, normalize, eps)

    def temporal(self, v, kernel_size, dilation, normalize, eps, frame_stride):
        """Frame t against t + frame_stride: the local correlation of two views."""
        return self.local(v[:, :-frame_stride], v[:, frame_stride:], kernel_size, dilation,
                          normalize, eps)

    def spatiotemporal(self, v, kernel_size, dilation, temporal_kernel_size, temporal_dilation,
                       frame_stride, normalize, eps):
        """(spatial, temporal) of a clip; backends with a fused op read it once."""
        return (self.self_correlation(v, kernel_size, dilation, normalize, eps),
                self.temporal(v, temporal_kernel_size, temporal_dilation, normalize, eps,
                              frame_stride))


class ReferenceBackend(Backend):
    name = "reference"

    def unavailable(self, device):
        return None

    def local(self, a, b, kernel_size, dilation, normalize, eps):
        return reference.local_correlation(a, b, kernel_size, dilation, normalize, eps)

    def self_correlation(self, x, kernel_size, dilation, normalize, eps):
        return reference.local_correlation(x, x, kernel_size, dilation, normalize, eps)


class ExtensionBackend(Backend):
    """The C++ (CPU) and CUDA kernels: torch.ops.stccl_ops.*, dispatched by device."""

    namespace = _extension.NAMESPACE

    def __init__(self, name, device_type):
        self.name, self.devices = name, (device_type,)

    @property
    def ops(self):
        return getattr(torch.ops, self.namespace)

    def require(self, fn, device):
        _extension.require_extension(self.name)
        if self.name == "cuda" and not _extension.build_info()["cuda"]:
            raise ImportError(
                "stccl_ops: backend 'cuda' is not built: this stccl_ops._C was compiled without "
                "CUDA. Rebuild with a CUDA toolkit and a CUDA build of torch "
                "(STCCL_FORCE_CUDA=1 pip install --no-build-isolation .).")
        super().require(fn, device)

    def unavailable(self, device):
        if _extension._C is None:
            return "the extension stccl_ops._C is not built"
        if self.name == "cuda" and not _extension.build_info()["cuda"]:
            return "stccl_ops._C was built without CUDA"
        if self.name == "cuda" and not torch.cuda.is_available():
            return "no CUDA GPU is visible"
        return super().unavailable(device)

    def temporal(self, v, kernel_size, dilation, normalize, eps, frame_stride):
        # One op whose backward writes the clip gradient directly.
        return self.ops.temporal_correlation(v, kernel_size, dilation, normalize, eps, frame_stride)

    def spatiotemporal(self, v, kernel_size, dilation, temporal_kernel_size, temporal_dilation,
                       frame_stride, normalize, eps):
        return self.ops.spatiotemporal_correlation(v, kernel_size, dilation, temporal_kernel_size,
                                                   temporal_dilation, frame_stride, normalize,
                                                   eps)

    forward_op = property(lambda self: self.ops.local_correlation)
    backward_op = property(lambda self: self.ops._local_correlation_backward)
    self_forward_op = property(lambda self: self.ops.self_correlation)
    self_backward_op = property(lambda self: self.ops._self_correlation_backward)


class CudaEmulatedBackend(ExtensionBackend):
    """The CUDA kernels and their host path run on CPU tensors under the
    emulator (torch.ops.stccl_ops_cuda_emulated.*): for tests, sanitizers and
    debugging without a GPU. Slow; `auto` never picks it."""

    namespace = _extension.EMULATED_NAMESPACE

    def __init__(self):
        super().__init__("cuda_emulated", "cpu")

    def require(self, fn, device):
        if _extension._C_cuda_emulated is None:
            raise ImportError(
                "stccl_ops: backend 'cuda_emulated' is not built: install with "
                "STCCL_CUDA_EMULATION=1 (pip install --no-build-isolation .), which needs the "
                "CUDA toolkit's headers")
        Backend.require(self, fn, device)

    def unavailable(self, device):
        if _extension._C_cuda_emulated is None:
            return "stccl_extension._C_cuda_emulated is not built (STCCL_CUDA_EMULATION=1)"
        return Backend.unavailable(self, device)


BACKENDS = {
    "reference": ReferenceBackend(),
    "cpp": ExtensionBackend("cpp", "cpu"),
    "cuda": ExtensionBackend("cuda", "cuda"),
    "cuda_emulated": CudaEmulatedBackend(),
}

# Preference of `auto` per device type, fastest first. On device types in
# MEASURED_DEVICES, the usable compiled backends are re-ordered by a one-off
# timing on the device itself (set STCCL_AUTO_MEASURE=0 to keep this order).
AUTO_ORDER = {"cpu": ("cpp", "reference"), "cuda": ("cuda", "triton", "reference")}
MEASURED_DEVICES = {"cuda"}
MEASURE_SHAPE = (8, 64, 48, 48)  # N, C, H, W of the timed forward+backward, K = 3
_warned = set()
_measured = {}


def _time_backend(backend, device, repeats=5):
    """Median seconds of one forward+backward of MEASURE_SHAPE with `backend`."""
    import time

    g = torch.Generator(device="cpu").manual_seed(0)
    a, b = (torch.randn(MEASURE_SHAPE, generator=g).to(device).requires_grad_()
            for _ in range(2))
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    times = []
    for _ in range(repeats + 1):  # the first run compiles / autotunes
        sync()
        start = time.perf_counter()
        out = backend.local(a, b, 3, 1, True, 1e-8)
        torch.autograd.grad(out.sum(), (a, b))
        sync()
        times.append(time.perf_counter() - start)
    return sorted(times[1:])[repeats // 2]


def _fastest_first(candidates, device):
    """The candidates with the usable compiled ones ordered by measured time,
    measured once per device."""
    usable = [c for c in candidates if c.name != "reference" and c.unavailable(device) is None]
    if (device.type not in MEASURED_DEVICES or len(usable) < 2
            or os.environ.get("STCCL_AUTO_MEASURE") == "0" or torch.compiler.is_compiling()):
        return candidates
    key = (str(device), tuple(c.name for c in usable))
    if key not in _measured:
        times = {c.name: _time_backend(c, device) for c in usable}
        _measured[key] = sorted(times, key=times.get)
    rank = {name: i for i, name in enumerate(_measured[key])}
    return sorted(candidates, key=lambda c: rank.get(c.name, len(rank)))


def register(backend):
    """Adds a backend (the Triton one registers itself when Triton imports)."""
    BACKENDS[backend.name] = backend


def requested_name(fn, backend):
    name = backend if backend is not None else os.environ.get("STCCL_BACKEND", "") or "auto"
    if not isinstance(name, str) or name not in NAMES + ("auto",):
        raise ValueError(f"stccl_ops.{fn}: backend must be one of {', '.join(NAMES)} or 'auto', "
                         f"got {name!r}")
    return name


def resolve(fn, backend, device, compiled_only=False):
    """The Backend for `backend` (None: $STCCL_BACKEND, else 'auto') on `device`."""
    name = requested_name(fn, backend)
    if name != "auto":
        if name not in BACKENDS:
            raise ImportError(f"stccl_ops: backend '{name}' is not part of this build")
        chosen = BACKENDS[name]
        if compiled_only and chosen.name == "reference":
            raise ValueError(f"stccl_ops.{fn}: needs a compiled backend (cpp, cuda, triton); "
                             "for the reference call stccl_ops.reference directly")
        chosen.require(fn, device)
        return chosen
    order = AUTO_ORDER.get(device.type, ("reference",))
    candidates = _fastest_first([BACKENDS[n] for n in order if n in BACKENDS], device)
    if compiled_only:
        candidates = [c for c in candidates if c.name != "reference"]
    for chosen in candidates:
        if chosen.unavailable(device) is None:
            break
    else:
        raise ValueError(f"stccl_ops.{fn}: no compiled backend is available for {device}")
    if chosen is not candidates[0] and device.type not in _warned:
        _warned.add(device.type)
        reasons = "; ".join(f"{c.name}: {c.unavailable(device)}" for c in candidates
                            if c is not chosen and c.unavailable(device))
        warnings.warn(f"stccl_ops: backend 'auto' falls back to '{chosen.name}' on "
                      f"{device.type} ({reasons})", RuntimeWarning, stacklevel=3)
    return chosen


def available_backends(device: Union[str, torch.device] = "cpu") -> list[str]:
    """Names of the backends usable for tensors on `device`."""
    device = torch.device(device)
    return [name for name, b in BACKENDS.items() if b.unavailable(device) is None]
