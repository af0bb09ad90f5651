"""``fastlstm bench``: the smoke preset end to end, the correctness gate, the CLI wiring.

Speed is reported, never asserted: nothing here depends on how fast anything ran.
"""

from __future__ import annotations

import dataclasses
import datetime
import json
import math
import sys
import types

import pytest
import torch

from fastlstm import bench, cli, functional
from fastlstm.bench import check, impls
from fastlstm.bench import run as bench_run
from fastlstm.bench import timing
from fastlstm.bench.presets import PRESETS

ROW_FIELDS = {
    "device", "device_name", "dtype", "shape", "options", "engine", "mode", "median_ms", "spread", "repeats",
    "peak_memory_bytes", "versions", "git_sha", "timestamp", "check", "mode_detail", "ratio_vs_torch",
}


@pytest.fixture(scope="module")
def smoke_run(tmp_path_factory):
    """One in-process run of the smoke preset with --json and --plot (shared: it is the slow part).

    One thread: on a busy machine torch's two-thread parallel regions stall for milliseconds per
    op, which would make this test slow, not wrong; the thread count is restored afterwards.
    """
    out = tmp_path_factory.mktemp("bench")
    threads = torch.get_num_threads()
    try:
        rc = bench.main(["--preset", "smoke", "--device", "cpu", "--threads", "1",
                         "--json", str(out / "rows.json"), "--plot", str(out / "plot.png")])
    finally:
        torch.set_num_threads(threads)
    return rc, json.loads((out / "rows.json").read_text()), out / "plot.png"


def test_smoke_preset_writes_sane_rows(smoke_run):
    rc, rows, _ = smoke_run
    assert rc == 0
    labels = {config.label for config in PRESETS["smoke"].configs}
    assert {row["row"] for row in rows} == labels

    for row in rows:
        assert ROW_FIELDS <= row.keys(), ROW_FIELDS - row.keys()
        assert row["device"] == "cpu" and row["device_name"]
        assert row["dtype"] == "float32"
        assert set(row["shape"]) >= {"B", "T", "I", "H", "layers", "directions", "proj"}
        assert row["mode"] in ("fwd", "fwd+bwd")
        spread = row["spread"]
        assert 0 < spread["min_ms"] <= spread["q25_ms"] <= row["median_ms"] <= spread["q75_ms"] <= spread["max_ms"]
        assert row["repeats"] >= PRESETS["smoke"].min_repeats
        assert row["versions"]["torch"] == torch.__version__ and row["versions"]["fastlstm"]
        assert row["git_sha"] == "unknown" or len(row["git_sha"]) == 40
        datetime.datetime.fromisoformat(row["timestamp"])
        if row["mode"] == "fwd+bwd":
            assert isinstance(row["peak_memory_bytes"], int) and row["peak_memory_bytes"] > 0
        else:
            assert row["peak_memory_bytes"] is None
        if row["role"] == "torch":
            assert row["ratio_vs_torch"] == pytest.approx(1.0)
        else:
            assert math.isfinite(row["ratio_vs_torch"]) and row["ratio_vs_torch"] > 0
            assert 0 <= row["check"]["max_rel_err"] <= row["check"]["bound"]

    for label in labels:
        mine = [row for row in rows if row["row"] == label]
        names = {row["engine"] for row in mine}
        assert any(name.startswith("torch.nn.LSTM") for name in names)
        assert any(name.startswith("fastlstm:") for name in names)
        assert sum(row["auto"] for row in mine) == 2, "one engine per mode is the one backend='auto' picks"
        if mine[0]["options"]:
            assert {"fastlstm:reference", "eager loop"} <= names
            assert all(row["mode_detail"].startswith("eval") for row in mine if row["mode"] == "fwd+bwd"), (
                "the smoke option row has zoneout: its fwd+bwd runs in eval mode")


def test_plot_is_a_png(smoke_run):
    import matplotlib.image  # a test dependency: the smoke run above already needed it

    _, _, path = smoke_run
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    height, width, _ = matplotlib.image.imread(path).shape
    assert height > 100 and width > 100


def _perturbed(layer, where: str):
    """Every engine's layer wrong by 0.1 % in its output or in the gradient flowing into it."""

    class ScaleGrad(torch.autograd.Function):
        @staticmethod
        def forward(ctx, y):
            return y.view_as(y)

        @staticmethod
        def backward(ctx, grad):
            return grad * 1.001

    def wrong(*args, **kwargs):
        y, h, c = layer(*args, **kwargs)
        return (y * 1.001 if where == "output" else ScaleGrad.apply(y)), h, c

    return wrong


@pytest.mark.parametrize(
    "where, flags",
    [
        ("output", []),
        ("gradient", []),
        # Every engine wrong alike, the reference (the oracle's twin) included: the eager loop catches it.
        ("output", ["--layer-norm"]),
        # A layer-norm row longer than the check's horizon: its first steps still catch 0.1 %.
        ("gradient", ["--layer-norm", "-T", "40"]),
    ],
)
def test_wrong_engine_is_caught_before_timing(monkeypatch, capsys, where, flags):
    monkeypatch.setattr(functional, "layer_rows", _perturbed(functional.layer_rows, where))
    timed = []
    monkeypatch.setattr(bench_run, "measure", lambda fn, device: timed.append(fn) or 1.0)

    rc = bench.main(["-B", "3", "-T", "4", "-I", "5", "-H", "6", "--device", "cpu", *flags])

    assert rc == 1
    assert timed == [], "nothing may be timed in a row whose check failed"
    err = capsys.readouterr().err
    assert "CHECK FAILED" in err and "Not timing this row" in err


def test_cli_wires_bench_and_hands_demo_its_arguments(monkeypatch, capsys):
    assert cli.main(["bench", "--list-presets"]) == 0
    assert "cpu-quick" in capsys.readouterr().out

    seen = []
    fake_demo = types.ModuleType("fastlstm.demo")
    fake_demo.main = lambda argv=None: seen.append(argv) or 7
    monkeypatch.setitem(sys.modules, "fastlstm.demo", fake_demo)
    monkeypatch.setattr(sys.modules["fastlstm"], "demo", fake_demo, raising=False)
    assert cli.main(["demo", "--steps", "3", "--help"]) == 7
    assert seen == [["--steps", "3", "--help"]]


def test_usage_errors(monkeypatch, capsys):
    with pytest.raises(SystemExit) as exit_info:
        bench.main(["--preset", "smoke", "-H", "8"])
    assert exit_info.value.code == 2
    with pytest.raises(SystemExit) as exit_info:
        bench.main(["--zoneout", "2.0"])
    assert exit_info.value.code == 2
    assert "zoneout" in capsys.readouterr().err

    for module in [m for m in sys.modules if m.startswith("matplotlib.")]:
        monkeypatch.delitem(sys.modules, module)
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # as if it were not installed
    with pytest.raises(SystemExit, match=r"pip install 'fastlstm\[plot\]'"):
        bench.main(["--preset", "smoke", "--plot", "unused.png"])


@pytest.mark.parametrize("name", sorted(PRESETS))
def test_presets_are_valid(name):
    """Every row of every preset has valid options and a unique label (the GPU ones included)."""
    configs = PRESETS[name].configs
    assert len({config.label for config in configs}) == len(configs)
    for config in configs:
        impls.layer_options(config)
        assert config.dtype in impls.DTYPES


def test_layer_norm_rows_are_checked_on_their_first_steps(monkeypatch, tmp_path):
    """A layer-norm row is checked on CHAOTIC_CHECK_STEPS steps, with the timed row's weights, and
    says so in its JSON; other rows are checked on all of their steps."""
    assert check.check_steps(PRESETS["smoke"].configs[0]) == PRESETS["smoke"].configs[0].steps
    monkeypatch.setattr(bench_run, "measure", lambda fn, device: 1.0)
    rc = bench.main(["-B", "3", "-T", "40", "-I", "5", "-H", "6", "--device", "cpu", "--layer-norm",
                     "--repeats", "1", "--json", str(tmp_path / "rows.json")])
    assert rc == 0
    rows = json.loads((tmp_path / "rows.json").read_text())
    checked = [row for row in rows if row["check"] is not None]
    assert checked and all(f"first {check.CHAOTIC_CHECK_STEPS} of 40 steps" in row["check"]["oracle"]
                           for row in checked)


def test_modes_of_timed_runs():
    """Forward-only runs time every implementation in eval mode, torch's included; forward+backward
    of a stochastic row runs the variants in eval mode and torch (cuDNN refuses an eval-mode
    backward; a plain LSTM is the same function in either mode) in train mode."""
    config = dataclasses.replace(PRESETS["smoke"].configs[0], options=(("zoneout", 0.1),))
    built = impls.build_impls(config, torch.device("cpu"))
    timing.enter_mode(built, impls.FWD)
    assert not any(impl.module.training for impl in built)
    timing.enter_mode(built, impls.FWD_BWD)
    assert {impl.role: impl.module.training for impl in built} == {"torch": True, "engine": False, "eager": False}


def test_streaming_preset_times_every_implementation(monkeypatch, tmp_path, capsys):
    """``--preset streaming`` (small: H = 8, 3 steps a round): every implementation, onnxruntime on
    both exported graphs included, checked against torch.nn.LSTM and reported."""
    from fastlstm.bench import streaming

    monkeypatch.setattr(streaming, "HIDDEN_SIZES", (8,))
    monkeypatch.setattr(streaming, "STEPS", 3)
    assert bench.main(["--preset", "streaming", "--repeats", "2", "--json", str(tmp_path / "s.json")]) == 0
    report = json.loads((tmp_path / "s.json").read_text())
    (row,) = report["rows"]
    assert row["hidden_size"] == 8 and report["device_name"]
    names = set(row["us_per_step"])
    assert {"torch.nn.LSTM", "fastlstm.LSTM.step", "fastlstm.LSTM.step, 64 streams",
            "onnxruntime (fastlstm.onnx.export_streaming)", "onnxruntime (torch.nn.LSTM exported)"} <= names
    assert all(us > 0 for us in row["us_per_step"].values())
    assert "fastlstm.LSTM.step" in capsys.readouterr().out
    assert "streaming" in (cli.main(["bench", "--list-presets"]) == 0 and capsys.readouterr().out)


def test_autocast_rows_run_float32_modules_under_autocast(monkeypatch, capsys):
    """An autocast row builds float32 modules and inputs and runs each forward under
    torch.autocast to the row's dtype; its float64 oracle runs without autocast. The CPU presets
    have a bfloat16 autocast row at each half-precision point."""
    config = dataclasses.replace(PRESETS["smoke"].configs[0], dtype="bfloat16", autocast=True)
    assert config.label.endswith("bf16 autocast") and config.storage_dtype == "float32"
    built = impls.build_impls(config, torch.device("cpu"))
    inputs = impls.make_inputs(config, torch.device("cpu"), torch.Generator().manual_seed(0))
    assert inputs.x.dtype == torch.float32
    engine = next(impl for impl in built if impl.role == impls.ENGINE)
    assert all(p.dtype == torch.float32 for p in engine.module.parameters())
    y, h, c = engine.call(inputs)
    assert y.dtype == h.dtype == c.dtype == torch.bfloat16
    twin = check._float64_twin(engine)
    assert twin.call(inputs.to(torch.float64))[0].dtype == torch.float64
    for name in ("cpu-quick", "cpu-full"):
        assert {c.label for c in PRESETS[name].configs if c.autocast} == {
            "B8 T64 I128 H128 bf16 autocast", "B32 T64 I256 H256 bf16 autocast"}
    monkeypatch.setattr(sys, "argv", ["fastlstm", "bench", "--autocast"])
    with pytest.raises(SystemExit):
        cli.main()
    assert "--autocast runs float32 modules in a lower precision" in capsys.readouterr().err
