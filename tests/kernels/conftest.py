"""Without CUDA the kernels run in Triton's interpreter. Triton decides that when a kernel is defined, so the
variable is set here, before any test module of this folder imports triton or sharq.kernels."""

import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
