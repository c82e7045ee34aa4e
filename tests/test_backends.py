"""Backend selection: explicit names, $STCCL_BACKEND, `auto` (its order,
fallback warning and measured ranking), and the package without its extension."""

import subprocess
import sys
import warnings

import pytest
import torch

import stccl_ops
from stccl_ops import _backends

from helpers import needs_extension

pytestmark = needs_extension


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
