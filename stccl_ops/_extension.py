"""The compiled extensions: stccl_ops._C (the C++ CPU kernels, and the CUDA
kernels where a toolkit was found) and, when built, stccl_ops._C_cuda_emulated
(the CUDA kernels run on the CPU under the emulator). Importing them registers
their ops (csrc/ops.h) in torch.ops.stccl_ops and torch.ops.stccl_ops_cuda_emulated."""

import importlib.util
import os
from types import ModuleType
from typing import Any, Optional

try:
    from . import _C
    EXTENSION_ERROR: Optional[ImportError] = None
except ImportError as error:  # a source checkout that was not built
    _C = None
    EXTENSION_ERROR = error

NAMESPACE = "stccl_ops"
EMULATED_NAMESPACE = "stccl_ops_cuda_emulated"


def _load_cuda_emulated() -> Optional[ModuleType]:
    """stccl_ops._C_cuda_emulated (built with STCCL_CUDA_EMULATION=1), or the
    build that $STCCL_CUDA_EMULATED_LIBRARY names instead (a sanitizer or
    memory-counting build, see stccl_ops._cuda_emulation); None when neither."""
    path = os.environ.get("STCCL_CUDA_EMULATED_LIBRARY")
    if not path:
        try:
            from . import _C_cuda_emulated
        except ImportError:
            return None
        return _C_cuda_emulated
    spec = importlib.util.spec_from_file_location("_C_cuda_emulated", path)
    if spec is None or spec.loader is None:
        raise ImportError(f"stccl_ops: STCCL_CUDA_EMULATED_LIBRARY={path!r} is not a module")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


_C_cuda_emulated = _load_cuda_emulated()


def require_extension(backend: str) -> None:
    if _C is None:
        raise ImportError(
            f"stccl_ops: backend '{backend}' needs the compiled extension stccl_ops._C, which "
            f"could not be imported ({EXTENSION_ERROR}). Build it from the source tree with "
            "`pip install --no-build-isolation .` (see README: Install).")


def build_info() -> dict[str, Any]:
    """How the extension was built: CUDA (and its arch list), OpenMP, CPU SIMD paths.

    Without a built extension: {"extension": False, "error": ...}.
    """
    if _C is None:
        return {"extension": False, "error": str(EXTENSION_ERROR)}
    return {"extension": True, **_C.build_info(), "cuda_emulated": _C_cuda_emulated is not None}
