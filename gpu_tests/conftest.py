"""The GPU suite: the Triton kernels compiled, at real shapes, against the reference and cuDNN.

Run with ``bash gpu_tests/run.sh`` on a machine with a CUDA GPU (it also runs the h100 bench).
Every test draws fresh random inputs (the seed is reported on failure) and poisons every buffer the
kernels fill with NaN, so an element never written fails the comparison.

``FASTLSTM_GPU_TESTS_ON_CPU=1`` runs the suite's own code on CPU tensors in Triton's interpreter
(slow; a dry run of the tests themselves, not of the compiled kernels).
"""

import os

import pytest
import torch

ON_CPU = os.environ.get("FASTLSTM_GPU_TESTS_ON_CPU") == "1"
if ON_CPU:
    os.environ["TRITON_INTERPRET"] = "1"
elif not torch.cuda.is_available():
    pytest.exit("gpu_tests need a CUDA device; the CPU suite is tests/", returncode=4)

from fastlstm.engines.triton import layer as triton_layer  # noqa: E402


@pytest.fixture(autouse=True)
def fresh_seed():
    """Fresh random inputs every run; the seed goes into the report of a failure."""
    seed = int.from_bytes(os.urandom(4), "little")
    torch.manual_seed(seed)
    return seed


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
    outcome = yield
    report = outcome.get_result()
    if report.when == "call" and report.failed:
        report.sections.append(("seed", str(item.funcargs.get("fresh_seed"))))


@pytest.fixture(autouse=True)
def poisoned_buffers(monkeypatch):
    def poisoned(like, *shape, dtype=None):
        t = like.new_empty(shape, dtype=dtype)
        return t.fill_(float("nan") if t.is_floating_point() else -1)

    monkeypatch.setattr(triton_layer, "empty", poisoned)


@pytest.fixture(autouse=True)
def ieee_float32():
    """The suite compares float32 with the reference's IEEE products: the recurrence's TF32 (torch's
    default for torch.nn.LSTM, which the kernels follow) is off unless a test turns it on."""
    saved = torch.backends.cudnn.allow_tf32
    torch.backends.cudnn.allow_tf32 = False
    yield
    torch.backends.cudnn.allow_tf32 = saved
