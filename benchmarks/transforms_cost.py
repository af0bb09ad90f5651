"""The cost of the transforms that run on the reference engine (issue 17): torch.func.grad, and a
second-order gradient (create_graph, re-run on the reference in the backward), against
torch.nn.LSTM, with the eager first-order step for scale. 2 layers, I = 64, H = 128, B = 16, T = 32,
float32, torch's default threads; medians of 7 interleaved rounds.

    python benchmarks/transforms_cost.py
"""
import torch, fastlstm, time, statistics
torch.manual_seed(0)
theirs = torch.nn.LSTM(64, 128, 2); ours = fastlstm.LSTM(64, 128, 2); ours.load_state_dict(theirs.state_dict())
x = torch.randn(32, 16, 64)
def func_grad(m):
    p = dict(m.named_parameters())
    return torch.func.grad(lambda p: torch.func.functional_call(m, p, (x,))[0].square().sum())(p)
def eager(m):
    m.zero_grad(); m(x)[0].square().sum().backward()
def second(m):
    xx = x.clone().requires_grad_(); g, = torch.autograd.grad(m(xx)[0].square().sum(), xx, create_graph=True); g.square().sum().backward()
for name, fn in [("eager f+b", eager), ("torch.func.grad", func_grad), ("second order", second)]:
    t = {"torch": [], "fastlstm": []}
    for _ in range(7):
        for k, m in (("torch", theirs), ("fastlstm", ours)):
            s = time.perf_counter(); fn(m); t[k].append(time.perf_counter() - s)
    a, b = statistics.median(t["torch"]) * 1e3, statistics.median(t["fastlstm"]) * 1e3
    print(f"{name:18s} torch {a:7.1f} ms  fastlstm {b:7.1f} ms  ratio {b/a:.2f}")
