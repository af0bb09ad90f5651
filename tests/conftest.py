import os

# The Triton kernels run in Triton's interpreter on CPU tensors here (CI has no GPU); the flag must
# be set before triton is first imported. The GPU suite (gpu_tests/) runs them compiled.
os.environ["TRITON_INTERPRET"] = "1"

import pytest  # noqa: E402
import torch  # noqa: E402

from fastlstm import engines  # noqa: E402

# Every engine that "auto" can pick here: tests that take the `backend` fixture run once per engine,
# so the reference is checked against the oracles and each faster engine is checked the same way.
CPU_BACKENDS = [name for name in engines.BACKENDS[1:] if engines.supports(name, torch.device("cpu"), torch.float64)]


@pytest.fixture(params=CPU_BACKENDS, scope="session")
def backend(request):
    return request.param


@pytest.fixture(autouse=True)
def _seed():
    """Every test starts from the same RNG state, so a failure replays exactly."""
    torch.manual_seed(0)
    yield
