"""The cost of the transforms that run on the reference engine (issue 17): ``torch.func.grad``, and a
second-order gradient (``create_graph``, re-run on the reference in the backward), against
torch.nn.LSTM, with the eager first-order step for scale. 2 layers, I = 64, H = 128, B = 16, T = 32,
float32, torch's default threads; medians of 7 interleaved rounds after one warm-up call each.

    python benchmarks/transforms_cost.py
"""

import platform
import statistics
import time

import torch

import fastlstm


def main() -> None:
    torch.manual_seed(0)
    theirs = torch.nn.LSTM(64, 128, 2)
    ours = fastlstm.LSTM(64, 128, 2)
    ours.load_state_dict(theirs.state_dict())
    x = torch.randn(32, 16, 64)

    def eager(module):
        module.zero_grad()
        module(x)[0].square().sum().backward()

    def func_grad(module):
        params = dict(module.named_parameters())
        return torch.func.grad(lambda p: torch.func.functional_call(module, p, (x,))[0].square().sum())(params)

    def second_order(module):
        leaf = x.clone().requires_grad_()
        (g,) = torch.autograd.grad(module(leaf)[0].square().sum(), leaf, create_graph=True)
        g.square().sum().backward()

    print(f"# {platform.processor() or platform.machine()}, torch {torch.__version__}, "
          f"{torch.get_num_threads()} threads, float32")
    for name, fn in (("eager f+b", eager), ("torch.func.grad", func_grad), ("second order", second_order)):
        times = {"torch": [], "fastlstm": []}
        fn(theirs), fn(ours)  # (warm-up: first calls build plans and caches)
        for _ in range(7):
            for key, module in (("torch", theirs), ("fastlstm", ours)):  # interleaved
                start = time.perf_counter()
                fn(module)
                times[key].append(time.perf_counter() - start)
        a, b = (statistics.median(times[k]) * 1e3 for k in ("torch", "fastlstm"))
        print(f"{name:18s} torch {a:7.1f} ms  fastlstm {b:7.1f} ms  ratio {b / a:.2f}")


if __name__ == "__main__":
    main()
