"""Kernel tests run on CUDA when present, else on CPU under the Triton interpreter.

triton.jit picks interpreter vs compiler when a kernel module is imported, so the variable
is set here, before collection imports the test modules. It stays set for the process:
the other test folders do not use triton.
"""

import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
