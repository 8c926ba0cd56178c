import os
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).parent))  # tests/tiny.py, shared by the test packages
# `python -m pytest` from the checkout puts its root first on sys.path, where kernels/ (installed as
# titan_dsv3.kernels) would shadow the PyPI package `kernels`, which transformers (5.25.0) depends on and
# imports: its import then fails. The root goes last instead (tests/distributed imports `tests.` from it).
sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != Path(__file__).resolve().parents[1]]
sys.path.append(str(Path(__file__).resolve().parents[1]))

os.environ.setdefault("TORCHAO_FORCE_SKIP_LOADING_SO_FILES", "1")
# Without a GPU, Triton kernels run in its interpreter. The variable must be set before the first @triton.jit
# function is defined, i.e. before any test module imports the trainer or a kernel.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

from tiny import tiny_args  # noqa: E402  (after the sys.path changes above)


@pytest.fixture
def tiny(tmp_path):
    return lambda **kw: tiny_args(tmp_path, **kw)


@pytest.fixture(autouse=True)
def _determinism_restored():
    """A run with job.deterministic turns on torch's deterministic algorithms (and cuDNN's) process-wide, the
    trainer's right choice for its own process; in the test process it would outlive the test: every later
    torch.empty filled (fill_uninitialized_memory), which a kernel test counting fills saw after a tiny run."""
    cudnn = torch.backends.cudnn
    saved = (
        torch.are_deterministic_algorithms_enabled(),
        torch.is_deterministic_algorithms_warn_only_enabled(),
        cudnn.deterministic,
        cudnn.benchmark,
    )
    yield
    torch.use_deterministic_algorithms(saved[0], warn_only=saved[1])
    cudnn.deterministic, cudnn.benchmark = saved[2:]
