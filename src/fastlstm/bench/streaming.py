"""``fastlstm bench --preset streaming``: the latency of streaming inference, per step.

One step (T = 1) of a 2-layer LSTM, I = 40, float32, one thread, at H = 128 (issue 13's shape),
256 and 512, with the state of the previous step fed back; timed interleaved in one process, the
median of rounds of ``steps`` calls, microseconds per call:

* ``torch.nn.LSTM`` and ``fastlstm.LSTM`` called with ``(h, c)``;
* ``fastlstm.LSTM.step`` (an ``LSTMState`` in and out), at B = 1 and with a batch of 64 streams,
  on one thread and (where torch has more) on all of torch's threads, which split a batch's rows;
* a ``fastlstm.LSTMCell`` and a ``torch.nn.LSTMCell`` per layer;
* onnxruntime (one thread) on ``fastlstm.onnx.export_streaming``'s graph and on ``torch.nn.LSTM``
  exported by torch's TorchScript exporter, both ``(x, h, c) -> (y, h_out, c_out)`` (when
  onnxruntime and onnxscript are installed).

Every implementation's output after its steps is checked against ``torch.nn.LSTM``'s (1e-4).
"""

from __future__ import annotations

import contextlib
import io
import logging
import statistics
import time
import warnings

import torch

from ..modules import LSTM, LSTMCell

HIDDEN_SIZES = (128, 256, 512)
INPUT_SIZE, LAYERS, STREAMS = 40, 2, 64
STEPS = 200  # calls per round


def _session(model_bytes: bytes):
    import onnxruntime

    options = onnxruntime.SessionOptions()
    options.intra_op_num_threads = options.inter_op_num_threads = 1
    session = onnxruntime.InferenceSession(model_bytes, options, providers=["CPUExecutionProvider"])

    def step(x, state):
        y, h, c = session.run(None, {"x": x, "h": state[0], "c": state[1]})
        return y, (h, c)

    return step


def _onnx_steps(theirs: torch.nn.LSTM, ours: LSTM) -> dict:
    """onnxruntime on both exported graphs, or {} without onnxruntime/onnxscript."""
    try:
        import onnxruntime  # noqa: F401
        import onnxscript  # noqa: F401
    except ImportError:
        return {}
    from .. import onnx as fastlstm_onnx

    quiet = contextlib.redirect_stdout(io.StringIO())
    with warnings.catch_warnings(), quiet:
        warnings.simplefilter("ignore")
        logging.disable(logging.WARNING)
        try:
            ours_graph = fastlstm_onnx.export_streaming(ours).model_proto.SerializeToString()
            zeros = torch.zeros(LAYERS, 1, theirs.hidden_size)
            # (torch's TorchScript exporter: its dynamo exporter's graph of torch.nn.LSTM with a state
            # input computes wrong outputs in torch 2.13)
            buffer = io.BytesIO()
            torch.onnx.export(fastlstm_onnx.StreamingGraph(theirs), (torch.zeros(1, 1, INPUT_SIZE), zeros, zeros),
                              buffer, dynamo=False, input_names=["x", "h", "c"], output_names=["y", "h_out", "c_out"])
            theirs_graph = buffer.getvalue()
        finally:
            logging.disable(logging.NOTSET)
    return {"onnxruntime (fastlstm.onnx.export_streaming)": _session(ours_graph),
            "onnxruntime (torch.nn.LSTM exported)": _session(theirs_graph)}


def _cells_step(cells):
    def step(x, state):
        h, c = state
        x, hs, cs = x[0], [], []
        for k, cell in enumerate(cells):
            x, c_k = cell(x, (h[k], c[k]))
            hs.append(x)
            cs.append(c_k)
        return x.unsqueeze(0), (torch.stack(hs), torch.stack(cs))

    return step


def implementations(hidden: int, threads: int = 1) -> dict[str, tuple]:
    """``{name: (step(x, state) -> (y, state), initial state, batch, threads)}``, every one with
    torch.nn.LSTM's weights; one thread each but the batch of streams named with ``threads`` (> 1)."""
    torch.manual_seed(0)
    theirs = torch.nn.LSTM(INPUT_SIZE, hidden, LAYERS).eval()
    ours = LSTM(INPUT_SIZE, hidden, LAYERS).eval()
    ours.load_state_dict(theirs.state_dict())
    cells_ours = [LSTMCell(INPUT_SIZE if k == 0 else hidden, hidden).eval() for k in range(LAYERS)]
    cells_theirs = [torch.nn.LSTMCell(INPUT_SIZE if k == 0 else hidden, hidden).eval() for k in range(LAYERS)]
    for k in range(LAYERS):
        for name in ("weight_ih", "weight_hh", "bias_ih", "bias_hh"):
            for cell in (cells_ours[k], cells_theirs[k]):
                getattr(cell, name).data.copy_(getattr(theirs, f"{name}_l{k}"))
    zeros = (torch.zeros(LAYERS, 1, hidden), torch.zeros(LAYERS, 1, hidden))
    impls = {
        "torch.nn.LSTM": (lambda x, state: theirs(x, state), zeros, 1, 1),
        "fastlstm.LSTM": (lambda x, state: ours(x, state), zeros, 1, 1),
        "fastlstm.LSTM.step": (ours.step, ours.initial_state(1), 1, 1),
        f"fastlstm.LSTM.step, {STREAMS} streams": (ours.step, ours.initial_state(STREAMS), STREAMS, 1),
        **({f"fastlstm.LSTM.step, {STREAMS} streams, {threads} threads":
            (ours.step, ours.initial_state(STREAMS), STREAMS, threads)} if threads > 1 else {}),
        "fastlstm.LSTMCell per layer": (_cells_step(cells_ours), zeros, 1, 1),
        "torch.nn.LSTMCell per layer": (_cells_step(cells_theirs), zeros, 1, 1),
    }
    numpy_zeros = tuple(z.numpy() for z in zeros)
    impls.update({name: (step, numpy_zeros, 1, 1) for name, step in _onnx_steps(theirs, ours).items()})
    return impls


def _run(step, state, xs, numpy: bool):
    y = None
    for x in xs:
        y, state = step(x.numpy() if numpy else x, state)
    return y, state


def measure(hidden: int, rounds: int, steps: int, threads: int = 1) -> dict[str, float]:
    """Median microseconds per step of each implementation at ``hidden``, each on one thread but the
    batch of streams named with ``threads`` (more than 1)."""
    impls = implementations(hidden, threads)
    g = torch.Generator().manual_seed(1)
    inputs = {b: list(torch.randn(steps, 1, b, INPUT_SIZE, generator=g)) for b in {impl[2] for impl in impls.values()}}
    times = {name: [] for name in impls}
    with torch.inference_mode():
        expected = _run(*impls["torch.nn.LSTM"][:2], inputs[1], False)[0]
        for name, (step, state, batch, _) in impls.items():
            y = torch.as_tensor(_run(step, state, inputs[batch], name.startswith("onnx"))[0])
            if batch == 1:
                torch.testing.assert_close(y.reshape(expected.shape), expected, rtol=1e-4, atol=1e-5,
                                           msg=lambda m, n=name: f"{n}: {m}")
        for _ in range(rounds):
            for name, (step, state, batch, threads_used) in impls.items():  # interleaved: each round times every one
                torch.set_num_threads(threads_used)
                start = time.perf_counter()
                _run(step, state, inputs[batch], name.startswith("onnx"))
                times[name].append((time.perf_counter() - start) / steps * 1e6)
    return {name: statistics.median(t) for name, t in times.items()}


def run(rounds: int = 15, steps: int | None = None, hidden_sizes=None) -> dict[str, object]:
    """Every hidden size (default :data:`HIDDEN_SIZES`), on one thread (the batch of streams also on
    all of torch's), ``steps`` calls per round (default :data:`STEPS`): ``{"rows": [{"hidden_size",
    "us_per_step": {...}}, ...], ...}``."""
    steps = STEPS if steps is None else steps
    hidden_sizes = HIDDEN_SIZES if hidden_sizes is None else hidden_sizes
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        rows = [{"layers": LAYERS, "input_size": INPUT_SIZE, "hidden_size": h, "batch": 1,
                 "us_per_step": measure(h, rounds, steps, threads)} for h in hidden_sizes]
    finally:
        torch.set_num_threads(threads)
    return {"threads": 1, "all_threads": threads, "dtype": "float32", "rounds": rounds, "steps": steps, "rows": rows}


def format_report(report: dict[str, object], header: str) -> str:
    lines = [f"# {header}; 1 thread and B = 1 unless named, float32, median of {report['rounds']} interleaved rounds "
             f"of {report['steps']} steps, us per step"]
    for row in report["rows"]:
        medians = row["us_per_step"]
        lines.append(f"\n{row['layers']} layers, I = {row['input_size']}, H = {row['hidden_size']}")
        for name, us in medians.items():
            lines.append(f"  {name:48s} {us:8.1f} us   {us / medians['torch.nn.LSTM']:5.2f}x torch.nn.LSTM")
    return "\n".join(lines)
