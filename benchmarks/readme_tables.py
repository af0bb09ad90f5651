"""Print the README's CPU tables from a recorded `fastlstm bench --json` run (so the README quotes
one run, verbatim): python benchmarks/readme_tables.py benchmarks/results/cpu-quick-2core-epyc.json"""

import json
import sys
from collections import defaultdict

LABELS = {
    "packed": "packed, B16 T64 H256 (lengths U[T/4, T])",
    "P64": "proj_size=64, B16 T64 H256",
    "L2 bi": "2 layers, bidirectional, B16 T64 H256",
    "cell": "LSTMCell step, B1 H128 (per call)",
}


def label(row: str) -> str:
    for key, text in LABELS.items():
        if key in row:
            return text
    return " ".join(p for p in row.split(" ") if not p.startswith("I") and p != "fp32")


def main(path: str) -> None:
    rows = json.load(open(path))
    times, memory, options = defaultdict(dict), defaultdict(dict), {}
    for r in rows:
        times[r["row"]][(r["engine"], r["mode"])] = r["median_ms"]
        if r["mode"] == "fwd+bwd":
            memory[r["row"]][r["engine"]] = r["peak_memory_bytes"]
        options[r["row"]] = r["options"]
    print("| shape | torch fwd | fastlstm fwd | ratio | torch fwd+bwd | fastlstm fwd+bwd | ratio | peak MB torch / fastlstm |")
    print("|---|---|---|---|---|---|---|---|")
    variants = []
    for row, t in times.items():
        torch_name = next(e for (e, _) in t if e.startswith("torch"))
        tf, tb = t[(torch_name, "fwd")], t[(torch_name, "fwd+bwd")]
        of, ob = t[("fastlstm:cpu", "fwd")], t[("fastlstm:cpu", "fwd+bwd")]
        if options[row]:
            variants.append((row, ob, ob / tb, t[("fastlstm:reference", "fwd+bwd")] / ob, t[("eager loop", "fwd+bwd")] / ob))
            continue
        m = memory[row]
        print(f"| {label(row)} | {tf:.3g} | {of:.3g} | {of / tf:.2f} | {tb:.3g} | {ob:.3g} | {ob / tb:.2f} | "
              f"{m[torch_name] / 1e6:.3g} / {m['fastlstm:cpu'] / 1e6:.3g} |")
    print()
    print("| option | fastlstm fwd+bwd | vs torch plain | reference / fastlstm | eager loop / fastlstm |")
    print("|---|---|---|---|---|")
    for row, ob, vs_torch, ref, eager in variants:
        name = row.split("fp32 ", 1)[1].replace("  (eval)", "").strip()
        print(f"| {name} | {ob:.3g} | {vs_torch:.2f} | {ref:.2f} | {eager:.2f} |")


if __name__ == "__main__":
    main(sys.argv[1])
