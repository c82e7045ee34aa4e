import os
import sys

# helpers.py sits beside the tests; make it importable however pytest is run.
sys.path.insert(0, os.path.dirname(__file__))

# Without a GPU, the Triton kernels run in Triton's interpreter on CPU tensors.
# The variable must be set before Triton kernels are defined (at import).
import torch  # noqa: E402

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
