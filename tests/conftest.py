import os
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).parent))  # tests/tiny.py, shared by the test packages

os.environ.setdefault("TORCHAO_FORCE_SKIP_LOADING_SO_FILES", "1")
# Without a GPU, Triton kernels run in its interpreter. The variable must be set before the first @triton.jit
# function is defined, i.e. before any test module imports the trainer or a kernel.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

from tiny import tiny_args


@pytest.fixture
def tiny(tmp_path):
    return lambda **kw: tiny_args(tmp_path, **kw)
