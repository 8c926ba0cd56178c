import pytest

from tests.distributed.common import layout_args, train_and_report
from tests.distributed.launcher import run_ranks


@pytest.fixture(scope="session")
def reference(tmp_path_factory):
    """The single-process run every layout must reproduce (one forked process, no process group)."""
    folder = tmp_path_factory.mktemp("reference")
    (result,) = run_ranks(train_and_report, 1, layout_args(str(folder)))
    return result
