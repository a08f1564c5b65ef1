"""Print the Markdown table of bench/results/*.json (pasted into bench/README.md)."""

from __future__ import annotations

import json
from pathlib import Path

RESULTS = Path(__file__).resolve().parent / "results"

ROWS = [
    ("train_throughput", "training step, ours (Lightning) / HF LLaVA (plain loop), fixed length", ">= 1.0"),
    ("generation_throughput", "generation, ours batch 32 / HF LLaVA per sample (CLI-style)", ">= 8"),
    ("crl_step_cost", "CRL step per real token, padded / packed (met: CRL <= SFT per real token)", "(ratio)"),
    ("train_step_profile", "training step before / after the loss-position fix (ShapeWorld)", "(fix)"),
    ("data_throughput", "data pipeline samples/s / training-step samples/s", ">= 5"),
    ("utilization", "training-step FLOP/s / measured fp32 matmul peak", "(ratio)"),
    ("memory", "peak RSS, HF LLaVA / ours", "(ratio)"),
    ("feature_cache", "training step, uncached / cached frozen-tower features (sft)", "(speed-up)"),
]


def main() -> None:
    print("| benchmark | what `speedup` is | measured | target | met |")
    print("|---|---|---|---|---|")
    for name, what, target in ROWS:
        path = RESULTS / f"{name}.json"
        if not path.exists():
            print(f"| `{name}` | {what} | not run | {target} | |")
            continue
        result = json.loads(path.read_text())
        met = {True: "yes", False: "no"}.get(result.get("met"), "")
        print(f"| `{name}` | {what} | {result['speedup']:.3g} | {target} | {met} |")


if __name__ == "__main__":
    main()
