"""Kernel tests run the Triton kernels in the interpreter (CPU tensors) unless a run sets TRITON_INTERPRET itself.

Set here, before any test module imports triton: @triton.jit reads the variable when a kernel is defined.
"""

import os

os.environ.setdefault("TRITON_INTERPRET", "1")
