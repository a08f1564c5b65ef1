"""Collect the ShapeWorld reproduction's evaluation reports into one JSON object per model and a table.

    python bench/shapeworld_table.py runs/repro --json bench/results/shapeworld_reproduction.json \
        --markdown bench/results/shapeworld_reproduction.md

Reads ``RUN_DIR/eval/<model>/report.json`` (written by ``evaluate``), the seeds from the configs the
Lightning CLI saved next to each training run, and ``RUN_DIR/timings.tsv`` (stage wall times).
Values are fractions in [0, 1] (CHAIR: lower is better), as the reports hold them.
"""

from __future__ import annotations

import argparse
import json
import platform
from datetime import UTC, datetime
from pathlib import Path

import yaml

from dress_lightning.evaluation.report import format_percent

MODELS = {
    "sft": "SFT",
    "sft_more": "SFT + as many steps as CRL (control)",
    "crl": "CRL (score + critique condition, refinement data)",
    "crl_score_only": "CRL ablation: score-only condition",
    "crl_no_refinement": "CRL ablation: no refinement data",
}
"""Model key (run and eval directory name) -> description, in table order."""

HEADLINE = ("helpfulness", "chair_i", "chair_s", "safety", "improved_after_refinement")
EXTRA = ("honesty_score", "harmlessness_score", "relevance", "persuasiveness", "mean_gain", "top_within_k")
STAGES = {"sft": ("pretrain", "sft"), "sft_more": ("sft_more",), "crl": ("rollout", "crl"),
          "crl_score_only": ("crl_score_only",), "crl_no_refinement": ("crl_no_refinement",)}
"""Stages each model adds on top of the ones it starts from (timings.tsv)."""


def seed_of(run: Path) -> int | None:
    """``seed_everything`` of a training run, from the config the Lightning CLI saved with it."""
    configs = sorted(run.glob("**/config.yaml"))
    return yaml.safe_load(configs[-1].read_text()).get("seed_everything") if configs else None


def collect(run_dir: Path) -> dict[str, dict]:
    timings = {}
    if (run_dir / "timings.tsv").is_file():
        for line in (run_dir / "timings.tsv").read_text().splitlines():
            name, seconds = line.split("\t")
            timings[name] = int(seconds)
    results = {}
    for model, description in MODELS.items():
        path = run_dir / "eval" / model / "report.json"
        if not path.is_file():
            continue
        report = json.loads(path.read_text())
        summary = report["summary"]
        evaluated = report["sets"]["shapeworld"]
        results[model] = {
            **{key: summary[key]["value"] for key in HEADLINE + EXTRA},
            "description": description,
            "checkpoint": report["provenance"]["checkpoint"],
            "generation_condition": report["provenance"]["generation_condition"],
            "train_seed": seed_of(run_dir / model),
            "eval_seed": report["provenance"]["seed"],
            "eval_prompts": evaluated["prompts"],
            "eval_shards": evaluated["shards"],
            "refinement_turns": evaluated["refinement_turns"],
            "judge": report["provenance"]["judge"],
            "stage_seconds": {stage: timings.get(stage) for stage in STAGES[model]},
        }
    return results


def markdown(results: dict[str, dict]) -> str:
    lines = [
        (
            "| model | helpfulness | CHAIR_i | CHAIR_s | safety | improved after 1 refinement | honesty (judge) | "
            "persuasiveness | top score within K |"
        ),
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for model, r in results.items():
        values = [r[k] for k in (*HEADLINE, "honesty_score", "persuasiveness", "top_within_k")]
        lines.append(f"| {model} | " + " | ".join(format_percent(v) for v in values) + " |")
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("run_dir", type=Path)
    parser.add_argument("--json", type=Path, help="write the per-model JSON here")
    parser.add_argument("--markdown", type=Path, help="write the table (with the date and machine) here")
    args = parser.parse_args()
    results = collect(args.run_dir)
    if not results:
        raise SystemExit(f"no evaluation reports under {args.run_dir / 'eval'}; run bench/reproduce_shapeworld.sh")
    table = markdown(results)
    print(table)
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(results, indent=2) + "\n")
    if args.markdown:
        header = (f"ShapeWorld reproduction, `bash bench/reproduce_shapeworld.sh`, "
                  f"{datetime.now(UTC):%Y-%m-%d}, {platform.processor() or platform.machine()}; "
                  "values in % (CHAIR: lower is better).\n\n")
        args.markdown.write_text(header + table)


if __name__ == "__main__":
    main()
