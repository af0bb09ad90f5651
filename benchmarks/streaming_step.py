"""Per-step latency of streaming inference: one time step, B = 1 (issue 13's shape: 2 layers, I = 40,
H = 128, float32, one thread), and H = 256, 512.

Timed interleaved in one process, median of rounds, microseconds per call:
* ``torch.nn.LSTM`` called with the state of the previous step;
* ``fastlstm.LSTM`` the same, and ``fastlstm.LSTM.step`` (an ``LSTMState`` in and out);
* two ``fastlstm.LSTMCell`` (one per layer) and two ``torch.nn.LSTMCell``;
* onnxruntime (one intra-op thread) on ``torch.nn.LSTM`` exported with ``(x, h, c)`` inputs and
  ``(y, h, c)`` outputs (torch's TorchScript exporter; the state fed back each step).

Every implementation's outputs after the timed steps are checked against ``torch.nn.LSTM``'s.

    python benchmarks/streaming_step.py [--rounds 15] [--steps 200] [--json PATH]
"""

from __future__ import annotations

import argparse
import io
import json
import platform
import statistics
import time
import warnings

import torch

import fastlstm


class _Exported(torch.nn.Module):
    def __init__(self, lstm):
        super().__init__()
        self.lstm = lstm

    def forward(self, x, h, c):
        y, (h, c) = self.lstm(x, (h, c))
        return y, h, c


def _onnxruntime_step(lstm, x, h, c):
    try:
        import onnxruntime
    except ImportError:
        return None
    buffer = io.BytesIO()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(_Exported(lstm), (x, h, c), buffer, dynamo=False, input_names=["x", "h", "c"],
                          output_names=["y", "h_out", "c_out"])
    options = onnxruntime.SessionOptions()
    options.intra_op_num_threads = 1
    options.inter_op_num_threads = 1
    session = onnxruntime.InferenceSession(buffer.getvalue(), options, providers=["CPUExecutionProvider"])

    def step(x, state):
        y, h, c = session.run(None, {"x": x, "h": state[0], "c": state[1]})
        return y, (h, c)

    return step


def _implementations(hidden: int, inputs: int, layers: int):
    torch.manual_seed(0)
    theirs = torch.nn.LSTM(inputs, hidden, layers).eval()
    ours = fastlstm.LSTM(inputs, hidden, layers).eval()
    ours.load_state_dict(theirs.state_dict())
    cells_ours = [fastlstm.LSTMCell(inputs if k == 0 else hidden, hidden) for k in range(layers)]
    cells_theirs = [torch.nn.LSTMCell(inputs if k == 0 else hidden, hidden) for k in range(layers)]
    for k, (a, b) in enumerate(zip(cells_ours, cells_theirs)):
        for name in ("weight_ih", "weight_hh", "bias_ih", "bias_hh"):
            getattr(a, name).data.copy_(getattr(theirs, f"{name}_l{k}"))
            getattr(b, name).data.copy_(getattr(theirs, f"{name}_l{k}"))

    def module_step(module):
        return lambda x, state: module(x, state)

    def cells_step(cells):
        def step(x, state):
            h, c = state
            x = x[0]
            hs, cs = [], []
            for k, cell in enumerate(cells):
                x, c_k = cell(x, (h[k], c[k]))
                hs.append(x)
                cs.append(c_k)
            return x.unsqueeze(0), (torch.stack(hs), torch.stack(cs))
        return step

    zeros = (torch.zeros(layers, 1, hidden), torch.zeros(layers, 1, hidden))
    impls = {
        "torch.nn.LSTM": (module_step(theirs), zeros),
        "fastlstm.LSTM": (module_step(ours), zeros),
        "fastlstm.LSTM.step": (lambda x, state: ours.step(x, state), ours.initial_state(1)),
        "fastlstm.LSTMCell x L": (cells_step(cells_ours), zeros),
        "torch.nn.LSTMCell x L": (cells_step(cells_theirs), zeros),
    }
    ort_step = _onnxruntime_step(theirs, torch.zeros(1, 1, inputs), *zeros)
    if ort_step is not None:
        impls["onnxruntime (torch.nn.LSTM exported)"] = (ort_step, tuple(z.numpy() for z in zeros))
    return impls


def _run(step, state, xs, numpy: bool):
    y = None
    for x in xs:
        y, state = step(x.numpy() if numpy else x, state)
    return y, state


def measure(hidden: int, inputs: int, layers: int, rounds: int, steps: int) -> dict[str, float]:
    impls = _implementations(hidden, inputs, layers)
    xs = list(torch.randn(steps, 1, 1, inputs))
    times = {name: [] for name in impls}
    with torch.inference_mode():
        results = {name: _run(step, state, xs, name.startswith("onnx")) for name, (step, state) in impls.items()}
        expected = results["torch.nn.LSTM"][0]
        for name, (y, _) in results.items():
            torch.testing.assert_close(torch.as_tensor(y).reshape(expected.shape), expected, rtol=1e-4, atol=1e-5,
                                       msg=lambda m, n=name: f"{n}: {m}")
        for _ in range(rounds):
            for name, (step, state) in impls.items():  # interleaved: each round times every implementation
                start = time.perf_counter()
                _run(step, state, xs, name.startswith("onnx"))
                times[name].append((time.perf_counter() - start) / steps * 1e6)
    return {name: statistics.median(t) for name, t in times.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=15)
    parser.add_argument("--steps", type=int, default=200)
    parser.add_argument("--json")
    args = parser.parse_args()
    torch.set_num_threads(1)
    flags = sorted({f for line in open("/proc/cpuinfo") if line.startswith("flags") for f in line.split()
                    if f.startswith(("avx512", "avx2", "fma"))}) if platform.system() == "Linux" else []
    model = next((line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo") if line.startswith("model name")),
                 platform.processor()) if platform.system() == "Linux" else platform.processor()
    print(f"# {model}, flags {' '.join(flags)}, torch {torch.__version__}, 1 thread, float32, B = 1, "
          f"median of {args.rounds} interleaved rounds of {args.steps} steps, us per step")
    report = {"cpu": model, "flags": flags, "torch": torch.__version__, "rows": []}
    for hidden in (128, 256, 512):
        medians = measure(hidden, 40, 2, args.rounds, args.steps)
        print(f"\n2 layers, I = 40, H = {hidden}")
        for name, us in medians.items():
            print(f"  {name:40s} {us:8.1f} us   {us / medians['torch.nn.LSTM']:5.2f}x torch.nn.LSTM")
        report["rows"].append({"layers": 2, "input_size": 40, "hidden_size": hidden, "us_per_step": medians})
    if args.json:
        with open(args.json, "w") as f:
            json.dump(report, f, indent=1)


if __name__ == "__main__":
    main()
