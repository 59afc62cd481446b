import pytest

from sparsekern.ops import _backend


@pytest.fixture(autouse=True)
def _fresh_warnings():
    """Every test sees the warn-once fallback warnings afresh."""
    _backend._warned.clear()
    yield


@pytest.fixture
def cpu_isa(request):
    """Runs the test with the C++ CPU kernels forced to ``request.param`` (parametrise with helpers.isa_params(),
    indirect=True): every op is checked on every instruction set the machine has."""
    from sparsekern import _extension

    with _extension.use_cpu_isa(request.param):
        yield request.param
