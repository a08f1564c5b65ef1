"""Print the Markdown table of issue 18's targets from bench/results/*.json (pasted into bench/README.md).

One row per target, each read from the field of the JSON that measures it, then the benchmarks without a
target (their ``speedup``). A JSON that is missing prints "not run".
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

RESULTS = Path(__file__).resolve().parent / "results"

# (bench, what is measured, path of keys into its JSON, target as text, predicate on the value or None)
TARGETS: list[tuple[str, str, tuple[str, ...], str, Any]] = [
    ("train_throughput", "training, fixed length 256: ours / HF LLaVA plain loop, tokens/s, paired",
     ("speedup",), ">= 1.2", lambda v: v >= 1.2),
    ("train_throughput", "training, the same, LM compiled", ("fixed_length_compiled_speedup",), ">= 1.2",
     lambda v: v >= 1.2),
    ("train_throughput", "training, ShapeWorld: ours grouped / HF LLaVA ungrouped, real tokens/s",
     ("shapeworld_grouped_vs_hf_ungrouped", "shapeworld_grouped_vs_hf_ungrouped"), ">= 1.5", lambda v: v >= 1.5),
    ("train_throughput", "training, the same, LM compiled",
     ("shapeworld_grouped_vs_hf_ungrouped", "shapeworld_grouped_vs_hf_ungrouped_compiled"), ">= 1.5",
     lambda v: v >= 1.5),
    ("crl_step_cost", "CRL step s per real token / SFT's, each batched as its config does",
     ("crl_over_sft_per_real_token", "configs"), "<= 1.0", lambda v: v <= 1.0),
    ("generation_throughput", "generation, batch 32: ours / HF LLaVA one prompt per call", ("speedup",), ">= 8",
     lambda v: v >= 8),
    ("generation_throughput", "generation, batch 32: ours / HF LLaVA's batched `generate`",
     ("speedup_vs_hf_batched",), ">= 1.5", lambda v: v >= 1.5),
    ("generation_throughput", "greedy outputs identical to HF's", ("identical_outputs",), "yes", lambda v: v is True),
    ("generation_throughput", "guided / unguided decoding s (classifier-free guidance)", ("guidance_cost",), "<= 2",
     lambda v: v <= 2),
    ("main_job", "`fit -c configs/crl.yaml` from a fresh clone: wall seconds", ("wall_s",), "<= 300 (5 min)",
     lambda v: v <= 300),
    ("memory", "peak RSS, HF LLaVA / ours: SFT training", ("hf_over_ours_peak_rss", "sft"), "(reported)", None),
    ("memory", "peak RSS, HF LLaVA / ours: CRL training", ("hf_over_ours_peak_rss", "crl"), "(reported)", None),
    ("memory", "peak RSS, HF LLaVA / ours: generation", ("hf_over_ours_peak_rss", "generate"), "(reported)", None),
    ("memory", "SFT checkpoint's weights / trainable bytes",
     ("checkpoints", "sft", "state_dict_over_trainable"), "1.0", lambda v: abs(v - 1) < 1e-3),
    ("memory", "CRL checkpoint's weights / trainable bytes",
     ("checkpoints", "crl", "state_dict_over_trainable"), "1.0", lambda v: abs(v - 1) < 1e-3),
]

OTHERS = [
    ("tower_layout", "clip-stage step, default layout / channels-last (ResNet tower)"),
    ("train_step_profile", "training step before / after the loss-position fix (ShapeWorld)"),
    ("data_throughput", "data pipeline samples/s / training-step samples/s"),
    ("utilization", "training-step FLOP/s / measured fp32 matmul peak"),
    ("feature_cache", "training step, uncached / cached frozen-tower features (sft)"),
]


def read(name: str) -> dict[str, Any] | None:
    path = RESULTS / f"{name}.json"
    return json.loads(path.read_text()) if path.exists() else None


def dig(result: dict[str, Any], keys: tuple[str, ...]) -> Any:
    for key in keys:
        if not isinstance(result, dict) or key not in result:
            return None
        result = result[key]
    return result


def show(value: Any) -> str:
    if isinstance(value, bool):
        return "yes" if value else "no"
    return f"{value:.3g}" if isinstance(value, float) else str(value)


def main() -> None:
    print("| benchmark | what is measured | measured | target (issue 18) | met | commit |")
    print("|---|---|---|---|---|---|")
    for name, what, keys, target, met in TARGETS:
        result = read(name)
        value = None if result is None else dig(result, keys)
        if value is None:
            print(f"| `{name}` | {what} | not run | {target} | | |")
            continue
        verdict = "" if met is None else ("yes" if met(value) else "no")
        commit = (result.get("machine") or {}).get("git_commit") or ""  # absent in runs before the field
        print(f"| `{name}` | {what} | {show(value)} | {target} | {verdict} | {commit[:8]} |")
    for name, what in OTHERS:
        result = read(name)
        if result is None:
            print(f"| `{name}` | {what} | not run | | | |")
            continue
        commit = (result.get("machine") or {}).get("git_commit") or ""
        print(f"| `{name}` | {what} | {show(result['speedup'])} | | | {commit[:8]} |")


if __name__ == "__main__":
    main()
