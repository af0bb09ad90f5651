import pytest
import torch

from fastlstm.engines import ENGINES

# Every engine that can run here: tests that take the `backend` fixture run once per engine, so
# the reference is checked against the oracles and each faster engine is checked the same way.
CPU_BACKENDS = [name for name, engine in ENGINES.items() if engine.supports(torch.device("cpu"), torch.float64, None)]


@pytest.fixture(params=CPU_BACKENDS, scope="session")
def backend(request):
    return request.param


@pytest.fixture(autouse=True)
def _seed():
    """Every test starts from the same RNG state, so a failure replays exactly."""
    torch.manual_seed(0)
    yield
