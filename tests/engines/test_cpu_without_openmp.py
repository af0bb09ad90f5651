"""The CPU kernels built without OpenMP, as ``setup.py`` builds them where the compiler has none
(clang on macOS, say): their teams run on threads of their own (``kernels.cpp``: ``run`` with its
start gate and spin barriers, ``run_parts``). Built here from the same source with setup.py's flags
but ``-fopenmp``, and swapped in for the installed build: row teams, column teams (which meet at
barriers twice a step) and a batch of streams split by rows give the installed (OpenMP) build's
results bit for bit. (Each output is summed by one thread in the same order either way.)"""

import importlib.util
from pathlib import Path

import pytest
import torch
from setuptools import Distribution, Extension
from setuptools.command.build_ext import build_ext

import fastlstm
from fastlstm.engines.cpu import kernels
from fastlstm.engines.cpu import threads as cpu_threads

from tests.engines.test_cpu import _force_threading

SOURCE = Path(__file__).resolve().parents[2] / "src" / "fastlstm" / "engines" / "cpu" / "kernels.cpp"
FLAGS = ["-O3", "-std=c++17", "-fno-math-errno", "-fno-trapping-math"]  # setup.py's, without -fopenmp
F64 = torch.float64


@pytest.fixture(scope="module")
def without_openmp(tmp_path_factory):
    """The kernels built without OpenMP (about a minute on 2 cores), imported under their own path."""
    out = tmp_path_factory.mktemp("kernels-without-openmp")
    extension = Extension("_kernels", [str(SOURCE)], depends=[str(SOURCE.with_suffix(".h"))],
                          extra_compile_args=FLAGS, language="c++")
    command = build_ext(Distribution({"ext_modules": [extension]}))
    command.build_lib, command.build_temp = str(out), str(out / "build")
    command.ensure_finalized()
    command.run()
    spec = importlib.util.spec_from_file_location("_kernels", command.get_ext_fullpath("_kernels"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    assert module.threading() == "threads"
    assert module.instruction_sets() == kernels.module().instruction_sets()
    module.set_instruction_set(kernels.module().instruction_set())  # (FASTLSTM_CPU_ISA may have lowered it)
    return module


def _swapped(monkeypatch, module):
    """Routes every kernel call to ``module`` (plans are ctypes structs: either build reads them)."""
    monkeypatch.setattr(kernels, "module", lambda: module)


def _layer_run(arch, batch):
    """Outputs, states and every gradient of a float64 layer forward+backward (the same inputs each call)."""
    torch.manual_seed(0)
    module = fastlstm.LSTM(5, 40, dtype=F64, backend="cpu", **arch)
    g = torch.Generator().manual_seed(1)
    x = torch.randn(6, batch, 5, dtype=F64, generator=g, requires_grad=True)
    lengths = torch.tensor([6, 2, 5, 1, 6, 3, 4, 6][:batch])
    y, (h, c) = module(x, lengths=lengths)
    loss = sum((t * torch.randn(t.shape, dtype=F64, generator=g)).sum() for t in (y, h, c))
    return [y, h, c, *torch.autograd.grad(loss, [x, *module.parameters()])]


CASES = {  # (threading mode, arch, batch)
    "rows": ("rows", dict(num_layers=2), 8),
    "rows-bidirectional": ("rows", dict(bidirectional=True), 7),
    "columns": ("columns", dict(proj_size=17), 2),
    "columns-peephole": ("columns", dict(peephole=True, layer_norm=True), 3),
}


@pytest.mark.parametrize("mode,arch,batch", CASES.values(), ids=CASES.keys())
def test_teams_on_threads_of_their_own_match_openmp(mode, arch, batch, without_openmp, monkeypatch):
    _force_threading(mode, monkeypatch)
    expected = _layer_run(arch, batch)
    _swapped(monkeypatch, without_openmp)
    got = _layer_run(arch, batch)
    for a, b in zip(got, expected, strict=True):
        assert torch.equal(a, b)


def test_a_batch_of_streams_on_threads_of_their_own_matches_openmp(without_openmp, monkeypatch):
    monkeypatch.setattr(cpu_threads, "row_threads", lambda batch: 3)
    g = torch.Generator().manual_seed(2)
    x = torch.randn(4, 7, 5, dtype=F64, generator=g)
    lengths = torch.tensor([4, 0, 3, 1, 4, 2, 4])
    runs = []
    for swap in (False, True):
        if swap:
            _swapped(monkeypatch, without_openmp)
        torch.manual_seed(0)
        module = fastlstm.LSTM(5, 24, num_layers=2, dtype=F64).eval()
        with torch.no_grad():
            y, state = module.step(x, module.initial_state(7), lengths=lengths)
        runs.append([y, *state])
    for a, b in zip(*runs, strict=True):
        assert torch.equal(a, b)
