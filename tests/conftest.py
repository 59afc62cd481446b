import pytest

from sparsekern.ops import _backend


@pytest.fixture(autouse=True)
def _fresh_warnings():
    """Every test sees the warn-once fallback warnings afresh."""
    _backend._warned.clear()
    yield
