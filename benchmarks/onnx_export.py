"""onnxruntime on graphs exported by ``fastlstm.onnx.export`` against torch.nn.LSTM's exported graph
(torch's TorchScript exporter; its dynamo exporter's graph of torch.nn.LSTM fails or is wrong at
other batch sizes in torch 2.13), same weights, same shapes, one process, interleaved rounds.

Plain layers (one ``LSTM`` node per layer both ways) and the layers only fastlstm exports (layer
norm, projection: a ``Scan`` over the cell step; torch.nn.LSTM's projection graph fails in
onnxruntime), each output first checked against the float64 module: at most twice the float32
module's own error.

    python benchmarks/onnx_export.py [--rounds 11] [--threads 1] [--json PATH]
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import logging
import statistics
import time
import warnings

import numpy as np
import onnxruntime
import torch

import fastlstm
import fastlstm.onnx

SHAPES = [  # (T, B, I, H, layers, bidirectional, options)
    (64, 16, 256, 256, 1, False, {}),
    (64, 16, 256, 256, 2, True, {}),
    (256, 1, 128, 128, 1, False, {}),
    (64, 16, 256, 256, 1, False, {"layer_norm": True}),
    (64, 16, 256, 256, 1, False, {"proj_size": 128}),
]


def _session(model: bytes, threads: int):
    options = onnxruntime.SessionOptions()
    options.intra_op_num_threads = options.inter_op_num_threads = threads
    return onnxruntime.InferenceSession(model, options, providers=["CPUExecutionProvider"])


def _exports(steps, batch, inputs, hidden, layers, bidirectional, options):
    torch.manual_seed(0)
    ours = fastlstm.LSTM(inputs, hidden, layers, bidirectional=bidirectional, **options).eval()
    x = torch.randn(steps, batch, inputs)
    with warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()):
        warnings.simplefilter("ignore")
        graphs = {"fastlstm.onnx.export": fastlstm.onnx.export(ours, (x[:, :2] if batch > 2 else x,)).model_proto}
        if not options:
            theirs = torch.nn.LSTM(inputs, hidden, layers, bidirectional=bidirectional).eval()
            theirs.load_state_dict(ours.state_dict())
            buffer = io.BytesIO()
            torch.onnx.export(theirs, (x,), buffer, dynamo=False, input_names=["input"],
                              dynamic_axes={"input": {0: "T", 1: "B"}})
            graphs["torch.nn.LSTM (TorchScript exporter)"] = buffer.getvalue()
    with torch.no_grad():  # the float64 module's output, and the float32 module's error from it
        expected = ours.double()(x.double())[0].numpy()
        own_error = float(np.abs(ours.float()(x)[0].numpy() - expected).max())
    return ({name: g if isinstance(g, bytes) else g.SerializeToString() for name, g in graphs.items()}, x.numpy(),
            expected, own_error)


def measure(shape, rounds: int, threads: int) -> dict[str, float]:
    graphs, x, expected, own_error = _exports(*shape)
    sessions = {name: _session(g, threads) for name, g in graphs.items()}
    for name, session in sessions.items():  # within twice the float32 module's error (and a float32 floor)
        error = float(np.abs(session.run(None, {session.get_inputs()[0].name: x})[0].reshape(expected.shape)
                             - expected).max())
        assert error <= 2 * own_error + 1e-6, f"{name}: error {error:.3g}, the float32 module's {own_error:.3g}"
    times = {name: [] for name in sessions}
    for _ in range(rounds):
        for name, session in sessions.items():
            feed = {session.get_inputs()[0].name: x}
            start = time.perf_counter()
            session.run(None, feed)
            times[name].append((time.perf_counter() - start) * 1e3)
    return {name: statistics.median(t) for name, t in times.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=11)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--json")
    args = parser.parse_args()
    logging.disable(logging.WARNING)
    model = next((line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo") if line.startswith("model name")), "?")
    flags = sorted({f for line in open("/proc/cpuinfo") if line.startswith("flags") for f in line.split()
                    if f.startswith(("avx512", "avx2", "fma"))})
    print(f"# {model}, flags {' '.join(flags)}, torch {torch.__version__}, onnxruntime {onnxruntime.__version__}, "
          f"{args.threads} thread(s), float32, median of {args.rounds} interleaved rounds, ms per call")
    rows = []
    for shape in SHAPES:
        steps, batch, inputs, hidden, layers, bidirectional, options = shape
        medians = measure(shape, args.rounds, args.threads)
        label = f"T{steps} B{batch} I{inputs} H{hidden} L{layers}{' bi' if bidirectional else ''} {options or ''}"
        base = medians.get("torch.nn.LSTM (TorchScript exporter)")
        print(f"\n{label}")
        for name, ms in medians.items():
            ratio = f"   {ms / base:5.2f}x torch's graph" if base else "   (torch: no working graph)"
            print(f"  {name:40s} {ms:9.3f} ms{ratio}")
        rows.append({"shape": label, "ms": medians})
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"cpu": model, "flags": flags, "torch": torch.__version__,
                       "onnxruntime": onnxruntime.__version__, "threads": args.threads, "rows": rows}, f, indent=1)


if __name__ == "__main__":
    main()
