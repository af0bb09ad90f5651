"""A bfloat16 / float16 autocast training step on the CPU (issue 14's target): a float32
``fastlstm.LSTM`` under ``torch.autocast("cpu", dtype)`` against ``torch.nn.LSTM``, one step being
forward, a loss over every output, backward and an SGD update.

torch.nn.LSTM under CPU autocast runs oneDNN's RNN primitive in the autocast dtype, which some CPUs
refuse (an AVX2 machine: "could not create a primitive"); that failure is printed, and torch's
module converted to the dtype (``.to(dtype)``, what autocast would compute in) is timed instead:
the "same dtype" baseline. Every implementation is timed interleaved in one process, medians of
``--rounds`` rounds; the float64 torch.nn.LSTM gives each one's output error.

    python benchmarks/autocast_step.py > benchmarks/results/autocast-step-<machine>.txt
"""

from __future__ import annotations

import argparse
import platform
import re
import statistics
import time

import torch

import fastlstm


def _cpu() -> str:
    try:
        flags = open("/proc/cpuinfo").read()
        model = re.search(r"model name\s*:\s*(.*)", flags).group(1)
        wanted = ("avx2", "fma", "avx512f", "avx512_bf16", "amx_bf16", "amx_fp16")
        found = [f for f in wanted if re.search(rf"\b{f}\b", flags)]
        return f"{model}, flags: {' '.join(found)}"
    except (OSError, AttributeError):
        return platform.processor() or platform.machine()


def _step(module, x, dtype, autocast: bool):
    """One training step; returns the output (for the error check)."""
    module.zero_grad(set_to_none=True)
    with torch.autocast("cpu", dtype=dtype, enabled=autocast):
        y, (h, c) = module(x)
    loss = y.float().square().mean() + h.float().sum() + c.float().sum()
    loss.backward()
    with torch.no_grad():
        for p in module.parameters():
            p.sub_(0.01 * p.grad)
    return y


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--rounds", type=int, default=15)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    print(f"# autocast training step on the CPU; {_cpu()}; torch {torch.__version__}, {args.threads} threads; "
          f"median of {args.rounds} interleaved rounds, ms per step")
    for dtype in (torch.bfloat16, torch.float16):
        for batch, steps, hidden in ((8, 64, 128), (32, 64, 256)):
            torch.manual_seed(0)
            reference = torch.nn.LSTM(hidden, hidden, dtype=torch.float64)
            x = torch.randn(steps, batch, hidden, dtype=torch.float64)
            truth = reference(x)[0]
            ours = fastlstm.LSTM.from_torch(reference).float()
            candidates = {"fastlstm float32 under autocast": (ours, x.float(), True)}
            theirs = torch.nn.LSTM(hidden, hidden)
            theirs.load_state_dict(ours.state_dict())
            try:
                _step(theirs, x.float(), dtype, True)  # (whether torch runs it here; the step updates...)
                theirs.load_state_dict(ours.state_dict())  # (...the weights: back to the common start)
                candidates["torch.nn.LSTM float32 under autocast"] = (theirs, x.float(), True)
            except RuntimeError as error:
                print(f"  (torch.nn.LSTM under autocast {dtype}: {type(error).__name__}: {str(error)[:80]})")
            in_dtype = torch.nn.LSTM(hidden, hidden).to(dtype)
            in_dtype.load_state_dict(ours.state_dict())
            candidates[f"torch.nn.LSTM in {str(dtype)[6:]}"] = (in_dtype.to(dtype), x.to(dtype), False)
            times: dict[str, list[float]] = {name: [] for name in candidates}
            errors = {}
            for name, (module, inputs, autocast) in candidates.items():  # warm-up, and the output error
                y = _step(module, inputs, dtype, autocast)
                errors[name] = ((y.double() - truth).abs().max() / truth.abs().max()).item()
            for _ in range(args.rounds):
                for name, (module, inputs, autocast) in candidates.items():
                    start = time.perf_counter()
                    _step(module, inputs, dtype, autocast)
                    times[name].append((time.perf_counter() - start) * 1e3)
            base = statistics.median(times[f"torch.nn.LSTM in {str(dtype)[6:]}"])
            print(f"B{batch} T{steps} H{hidden} {str(dtype)[6:]}")
            for name, samples in times.items():
                median = statistics.median(samples)
                print(f"  {name:40s} {median:9.2f} ms  [{min(samples):.2f}..{max(samples):.2f}]  "
                      f"x{median / base:.2f} of torch in {str(dtype)[6:]}  first-step output error {errors[name]:.2e}")


if __name__ == "__main__":
    main()
