import os

# The Triton kernels run in Triton's interpreter on CPU tensors here (CI has no GPU); the flag must
# be set before triton is first imported. The GPU suite (gpu_tests/) runs them compiled.
os.environ["TRITON_INTERPRET"] = "1"

import pytest  # noqa: E402
import torch  # noqa: E402

from fastlstm import engines  # noqa: E402

# Under pytest-xdist (the README's `-n 2`) each worker takes its share of the cores: two workers
# with two torch threads each on two cores would spend their time in each other's spin-waits. The
# CPU engine's multi-threaded paths are still exercised: tests/engines/test_cpu.py sets the thread
# count the engine sees.
_WORKERS = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1"))
if _WORKERS > 1:
    torch.set_num_threads(max(1, (os.cpu_count() or 1) // _WORKERS))

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
