"""Evaluation outputs: per-prompt responses (JSONL, per rank), report.json, report.md and plots."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from lightning.pytorch.callbacks import BasePredictionWriter

from dress_lightning.aspects import ASPECTS
from dress_lightning.atomic import atomic_write_text

ASPECT_SCORES = {"helpfulness": "helpfulness", "honesty": "honesty_score", "harmlessness": "harmlessness_score"}
"""Bar plot: aspect -> the metric group holding its judge score."""


class ResponseWriter(BasePredictionWriter):
    """Writes every evaluated prompt (dialogue, feedback, verdict) to ``responses.jsonl`` as it goes."""

    def __init__(self, out_dir: Path) -> None:
        super().__init__(write_interval="batch")
        self.out_dir = Path(out_dir)
        self.written = 0
        self._file = None

    def setup(self, trainer, pl_module, stage: str) -> None:
        self.out_dir.mkdir(parents=True, exist_ok=True)
        name = "responses.jsonl" if trainer.world_size == 1 else f"responses-rank{trainer.global_rank}.jsonl"
        self._file = open(self.out_dir / name, "w")  # noqa: SIM115 - open for the whole predict loop

    def write_on_batch_end(self, trainer, pl_module, prediction, batch_indices, batch, batch_idx, dataloader_idx):
        for entry in prediction:
            self._file.write(json.dumps(entry) + "\n")
        self._file.flush()
        self.written += len(prediction)

    def teardown(self, trainer, pl_module, stage: str) -> None:
        if self._file is not None:
            self._file.close()
            self._file = None


def write_report(report: dict[str, Any], out: Path) -> None:
    """report.json, report.md, aspects.png and refinement.png in ``out``."""
    out.mkdir(parents=True, exist_ok=True)
    atomic_write_text(out / "report.json", json.dumps(report, indent=2) + "\n")
    plots = plot_report(report, out)
    atomic_write_text(out / "report.md", render_markdown(report, plots))


def format_percent(value: float | None) -> str:
    """A fraction as a percentage with one decimal ("n/a" for None: not measured)."""
    return "n/a" if value is None else f"{100 * value:.1f}"


def render_markdown(report: dict[str, Any], plots: list[str]) -> str:
    """Tables per axis and set (all values are % of the maximum), with what produced them."""
    source = report["provenance"]
    judge = source["judge"]
    lines = [
        "# Evaluation report",
        "",
        f"- checkpoint: `{source['checkpoint']}` ({source['task']})",
        f"- judge: `{judge['name']}`, prompt/rules version `{judge['version']}`",
        f"- condition at inference: `{source['generation_condition']}`"
        + (f" (format `{source['condition']['format']}`)" if source["condition"] else ""),
        (
            f"- conversation format `{source['conversation_format']}`, generation `{source['generation']}`, "
            f"seed {source['seed']}"
        ),
        f"- dress_lightning {source['dress_lightning_version']}, {source['created']}",
        "",
        "## Summary (% of the maximum; CHAIR: lower is better)",
        "",
        "| metric | value | set |",
        "|---|---|---|",
    ]
    lines += [f"| {key} | {format_percent(v['value'])} | {v['set'] or '-'} |" for key, v in report["summary"].items()]
    for name, result in report["sets"].items():
        metrics = result["metrics"]
        counts = (f"{result['prompts']} prompts from `{result['shards']}`; judge failures {result['judge_failures']}; "
                  f"K = {result['refinement_turns']}.")
        lines += ["", f"## {name}", "", counts, ""]
        categories = [c for c, v in metrics["helpfulness"].items() if c != "overall" and v is not None]
        lines += ["| judge score | overall | " + " | ".join(categories) + " |",
                  "|---|---|" + "---|" * len(categories)]
        for label, group in (("helpfulness", "helpfulness"), ("honesty", "honesty_score")):
            row = metrics[group]
            lines.append(f"| {label} | {format_percent(row['overall'])} | " + " | ".join(format_percent(row[c]) for c in categories) + " |")
        lines.append(f"| harmlessness (harmful prompts) | {format_percent(metrics['harmlessness_score']['overall'])} |"
                     + " |" * len(categories))
        lines += ["", "| CHAIR_i | CHAIR_s | relevance | safety | persuasiveness |", "|---|---|---|---|---|",
                  "| " + " | ".join(format_percent(metrics[g][k]) for g, k in (
                      ("chair", "chair_i"), ("chair", "chair_s"), ("safety", "relevance"), ("safety", "safety"),
                      ("safety", "persuasiveness"))) + " |"]
        if metrics.get("accuracy", {}).get("overall") is not None:
            lines += ["", *grounding_table(metrics, result.get("controls", {}))]
        if result["refinement_turns"]:
            interaction = metrics["interaction"]
            lines += ["", "| interaction | value |", "|---|---|"]
            lines += [f"| {k} | {format_percent(v)} |" for k, v in interaction.items()]
            lines.append("| mean score by turn | " + ", ".join(format_percent(v) for v in metrics["score_by_turn"]) + " |")
        pope = metrics.get("pope", {})
        if pope.get("accuracy") is not None:
            lines += ["", "| POPE | " + " | ".join(pope) + " |", "|---|" + "---|" * len(pope),
                      "| % | " + " | ".join(format_percent(v) for v in pope.values()) + " |"]
    lines += ["", *[f"![{Path(p).stem}]({p})" for p in plots], ""]
    return "\n".join(lines)


def grounding_table(metrics: dict[str, Any], controls: dict[str, dict[str, Any]]) -> list[str]:
    """Exact accuracy per question type with the real images and under each blind control (% correct)."""
    names = list(controls)
    lines = ["| exact accuracy | image | " + " | ".join(names) + " |", "|---|---|" + "---|" * len(names)]
    for key, value in metrics["accuracy"].items():
        if value is None:
            continue
        lines.append(f"| {key} | {format_percent(value)} | "
                     + " | ".join(format_percent(controls[n]["metrics"]["accuracy"][key]) for n in names) + " |")
    lines.append(f"| distinct descriptions | {format_percent(metrics['distinct_descriptions'])} | "
                 + " | ".join(format_percent(controls[n]["metrics"]["distinct_descriptions"]) for n in names) + " |")
    placed = {k: v for k, v in metrics.get("accuracy_by_candidates", {}).items() if v is not None}
    if placed:  # colour / shape questions: does the model find the place, or guess among what is there?
        lines += ["", "| placed questions | image | " + " | ".join(names) + " | a guess among the candidates |",
                  "|---|---|" + "---|" * (len(names) + 1)]
        lines += [f"| {key} | {format_percent(value)} | "
                  + "".join(f"{format_percent(controls[n]['metrics']['accuracy_by_candidates'][key])} | " for n in names)
                  + f"{format_percent(metrics['guess_by_candidates'][key])} |" for key, value in placed.items()]
    return lines


def plot_report(report: dict[str, Any], out: Path) -> list[str]:
    """Bars of the judge score per aspect and set; mean score over refinement turns. Returns file names."""
    import matplotlib

    matplotlib.use("Agg")  # files only: no display on servers and CI
    import matplotlib.pyplot as plt

    sets = report["sets"]
    fig, ax = plt.subplots(figsize=(6, 3.5))
    width = 0.8 / max(len(sets), 1)
    for i, (name, result) in enumerate(sets.items()):
        values = [result["metrics"][ASPECT_SCORES[a]]["overall"] for a in ASPECTS]
        xs = [j + i * width for j, v in enumerate(values) if v is not None]
        ax.bar(xs, [100 * v for v in values if v is not None], width, label=name)
    ax.set_xticks([j + width * (len(sets) - 1) / 2 for j in range(len(ASPECTS))], ASPECTS)
    ax.set_ylabel("judge score, % of max")
    ax.set_ylim(0, 100)
    ax.legend()
    fig.tight_layout()
    fig.savefig(out / "aspects.png", dpi=100)
    plt.close(fig)
    files = ["aspects.png"]

    refined = {n: r["metrics"]["score_by_turn"] for n, r in sets.items() if r["refinement_turns"]}
    if refined:
        fig, ax = plt.subplots(figsize=(6, 3.5))
        for name, scores in refined.items():
            turns = [t for t, v in enumerate(scores) if v is not None]
            ax.plot(turns, [100 * scores[t] for t in turns], marker="o", label=name)
        ax.set_xlabel("refinement turn (0: first answer)")
        ax.set_ylabel("mean judge score, % of max")
        ax.set_xticks(range(max(len(s) for s in refined.values())))
        ax.legend()
        fig.tight_layout()
        fig.savefig(out / "refinement.png", dpi=100)
        plt.close(fig)
        files.append("refinement.png")
    return files
