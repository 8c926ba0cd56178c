import os
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))  # tests/tiny.py, shared by the test packages

os.environ.setdefault("TORCHAO_FORCE_SKIP_LOADING_SO_FILES", "1")

from tiny import tiny_args


@pytest.fixture
def tiny(tmp_path):
    return lambda **kw: tiny_args(tmp_path, **kw)
