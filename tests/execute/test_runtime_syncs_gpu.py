"""The sized sends' row counts reach the device without a host sync (CUDA only)."""

import pytest
import torch

from pyengine.execute.runtime import _row_count

pytestmark = pytest.mark.gpu


@pytest.fixture
def sync_errors():
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA device (run with `pytest -m gpu` on a GPU machine)")
    torch.cuda.init()
    torch.cuda.set_sync_debug_mode("error")
    yield
    torch.cuda.set_sync_debug_mode(0)


def test_row_count_is_made_without_a_sync(sync_errors):
    count = _row_count(7, torch.device("cuda"))
    torch.cuda.set_sync_debug_mode(0)
    assert count.item() == 7 and count.dtype == torch.int64


def test_the_host_list_copy_it_replaces_does_sync(sync_errors):
    """The mode really catches the old construction, so the test above can fail."""
    with pytest.raises(RuntimeError):
        torch.tensor([7], dtype=torch.int64, device="cuda")
