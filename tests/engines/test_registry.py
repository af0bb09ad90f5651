"""How ``backend=`` picks an engine, and what importing fastlstm imports (engines/__init__.py)."""

import subprocess
import sys

import pytest
import torch

from fastlstm import engines
from fastlstm.options import make_options


def test_import_fastlstm_imports_no_engine_and_no_tool():
    """``import fastlstm`` imports the core only: neither Triton, nor the C++ kernels, nor the
    engines' packages, nor matplotlib, nor torch._dynamo (which imports Triton), nor the bench or
    the demo; a CPU forward then imports the CPU engine and nothing of the GPU's."""
    code = (
        "import sys, torch\n"
        "before = set(sys.modules)\n"
        "import fastlstm\n"
        "new = set(sys.modules) - before\n"
        "print(sorted(m for m in new if m.split('.')[0] in ('triton', 'matplotlib') or m.startswith("
        "('torch._dynamo', 'fastlstm.engines.cpu', 'fastlstm.engines.triton', 'fastlstm.bench', 'fastlstm.demo'))))\n"
        "fastlstm.LSTM(3, 4)(torch.randn(2, 1, 3))\n"
        "print(sorted(m for m in sys.modules if m.split('.')[0] == 'triton' or m.startswith("
        "('fastlstm.engines.triton', 'fastlstm.engines.cpu._kernels'))))\n"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120,
                          env={k: v for k, v in __import__("os").environ.items() if k != "TRITON_INTERPRET"})
    assert done.returncode == 0, done.stderr
    at_import, after_forward = done.stdout.strip().splitlines()
    assert at_import == "[]"
    assert after_forward == "['fastlstm.engines.cpu._kernels']"


def test_the_constant_mark_is_torchs():
    """engines.constant_result sets the mark torch.compiler.assume_constant_result sets (without
    importing torch._dynamo): if torch changes it, this fails rather than compiled graphs silently
    tracing into json.dumps."""
    def mine():
        return 1

    def theirs():
        return 1

    marked = torch.compiler.assume_constant_result(theirs)
    assert {k: v for k, v in vars(engines.constant_result(mine)).items()} == {k: v for k, v in vars(marked).items()}


@pytest.mark.parametrize("device, dtype, expected", [
    ("cpu", torch.float32, "cpu"), ("cpu", torch.float64, "cpu"), ("cpu", torch.bfloat16, "cpu"),
    ("cpu", torch.float16, "cpu"), ("cuda", torch.float16, "triton"), ("cuda", torch.bfloat16, "triton"),
    ("cuda", torch.float32, "triton"), ("cuda", torch.float64, "reference"), ("meta", torch.float32, "reference"),
])
def test_auto_picks_the_first_engine_that_supports_the_call(device, dtype, expected):
    assert engines.select_engine("auto", torch.device(device), dtype, make_options()) == expected


def test_a_named_engine_that_cannot_run_the_call_is_refused():
    with pytest.raises(ValueError, match="backend='cpu' does not support device cuda"):
        engines.select_engine("cpu", torch.device("cuda"), torch.float32, make_options())
    with pytest.raises(ValueError, match="backend should be one of 'auto', 'cpu', 'triton', 'reference'"):
        engines.check_backend("cudnn")
