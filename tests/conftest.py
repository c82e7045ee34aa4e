import os

# Without a GPU, the Triton kernels run in Triton's interpreter on CPU tensors.
# The variable must be set before Triton kernels are defined (at import).
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
