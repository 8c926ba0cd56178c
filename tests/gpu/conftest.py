"""GPU tests: collected only where CUDA is present (the lent GPU machine); CPU CI does not collect them."""

import torch

if not torch.cuda.is_available():
    collect_ignore_glob = ["test_*.py"]
