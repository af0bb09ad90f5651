"""Print the README's tables from a recorded `fastlstm bench --json` run (so the README quotes one
run, verbatim): python benchmarks/readme_tables.py benchmarks/results/cpu-quick-2core-epyc.json
(CPU or GPU: fastlstm's column is the engine backend='auto' picked)."""

import json
import sys
from collections import defaultdict

def label(row: str) -> str:
    """A row's label without its input size (I = H everywhere) and the float32 default."""
    text = " ".join(p for p in row.split(" ") if not p.startswith("I") and p != "fp32")
    if " packed" in text:
        text += " (lengths U[T/4, T])"
    if text.startswith("cell") or " cell" in text:
        text += " (per call)"
    return text


def option_name(row: str) -> str:
    """The option part of a row label: what follows its dtype."""
    for dtype in ("fp32 ", "bf16 ", "fp16 "):
        if dtype in row:
            return row.split(dtype, 1)[1].replace("  (eval)", "").strip()
    return row


def main(path: str) -> None:
    rows = json.load(open(path))
    times, memory, options = defaultdict(dict), defaultdict(dict), {}
    auto = {r["engine"] for r in rows if r["auto"]}
    if len(auto) != 1:
        raise SystemExit(f"expected one engine picked by backend='auto', got {sorted(auto)}")
    ours = auto.pop()
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
        of, ob = t[(ours, "fwd")], t[(ours, "fwd+bwd")]
        if options[row]:
            variants.append((row, ob, ob / tb, t[("fastlstm:reference", "fwd+bwd")] / ob, t[("eager loop", "fwd+bwd")] / ob))
            continue
        m = memory[row]
        print(f"| {label(row)} | {tf:.3g} | {of:.3g} | {of / tf:.2f} | {tb:.3g} | {ob:.3g} | {ob / tb:.2f} | "
              f"{m[torch_name] / 1e6:.3g} / {m[ours] / 1e6:.3g} |")
    print()
    print("| option | fastlstm fwd+bwd | vs torch plain | reference / fastlstm | eager loop / fastlstm |")
    print("|---|---|---|---|---|")
    for row, ob, vs_torch, ref, eager in variants:
        print(f"| {option_name(row)} | {ob:.3g} | {vs_torch:.2f} | {ref:.2f} | {eager:.2f} |")


if __name__ == "__main__":
    main(sys.argv[1])
