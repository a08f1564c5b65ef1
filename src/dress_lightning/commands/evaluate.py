"""``python -m dress_lightning evaluate -c configs/eval.yaml [--checkpoint PATH] [--out DIR]`` and ``probe-tower``.

Both parse their options without importing torch (``--help`` is instant); the work imports it.
"""

from __future__ import annotations

import argparse
import json
import logging
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Literal

from dress_lightning.conditions import TARGET, condition_for
from dress_lightning.data.shapeworld import ShapeWorldShards
from dress_lightning.decoding import GenerationSettings
from dress_lightning.commands.jobs import PredictJob, warn_deprecated
from dress_lightning.feedback.judges import Judge

log = logging.getLogger(__name__)

PROG = "dress-lightning evaluate"

REPORT_FORMAT = "dress-eval-report-v1"
"""Version of ``report.json``'s layout; bump it when keys change."""


@dataclass
class EvalSet:
    """One eval set: prompt shards and which prompts each axis reads."""

    name: str
    """Name in the report (e.g. shapeworld, vlsafe, chair, llava_bench)."""
    shards: str
    """Prompt shards (directory, brace pattern or URL); each sample's first user turn is the prompt."""
    shapeworld: ShapeWorldShards | None = None
    """Generate ShapeWorld shards into ``shards`` when it holds none."""
    samples: int | None = None
    """Prompts to evaluate at most (None: all)."""
    categories: list[str] = field(default_factory=lambda: ["conversation", "description", "reasoning"])
    """Helpfulness categories of the benign prompts (``record["category"]``)."""
    vocabulary: Literal["coco", "shapeworld"] = "coco"
    """Object vocabulary CHAIR counts mentions with."""
    chair_categories: list[str] | None = None
    """Benign categories whose first answers CHAIR counts (None: all benign prompts)."""
    refinement_turns: int = 0
    """K for the interaction axis: judge-refinement rounds after the first answer (0: first answers only)."""
    generation: GenerationSettings | None = None
    """Decoding of this set (None: the job's ``generation``), e.g. CHAIR's long greedy captions."""
    controls: list[Literal["blank", "shuffled"]] = field(default_factory=list)
    """Blind controls: answer the same prompts again with a blank image / another prompt's image (grounding)."""


@dataclass
class EvalConfig(PredictJob):
    """An evaluation job: a checkpoint answers eval sets, a judge scores them, metrics go into a report."""

    checkpoint: str = "runs/crl/checkpoints/last.ckpt"
    """Checkpoint to evaluate (a LightningCLI checkpoint of any task, or a folder written by ``export``)."""
    ckpt: str | None = None
    """Deprecated alias of ``checkpoint`` (the name every command uses)."""
    out: str = "runs/eval/crl"
    """Report directory: report.json, report.md, plots and responses.jsonl."""
    sets: list[EvalSet] = field(default_factory=list)
    """The eval sets, in report order."""
    generation: GenerationSettings = field(default_factory=GenerationSettings)
    """Decoding (default greedy, one answer per prompt), recorded in the report."""
    condition: str = TARGET
    """``target`` (the checkpoint's own: CRL's target condition), ``none`` (no condition), ``low`` (a low score
    on every aspect: steerability), or the condition text every answer gets."""
    batch_size: int = 32

    def __post_init__(self) -> None:
        if self.ckpt is not None:
            warn_deprecated("--ckpt", f"use --checkpoint (taking {self.ckpt} as the checkpoint).")
            self.checkpoint, self.ckpt = self.ckpt, None


def evaluate_set(config: EvalConfig, eval_set: EvalSet, policy, judge: Judge, out: Path,
                 image_control: str = "image") -> dict[str, Any]:
    """Answer, judge and score one eval set; writes its responses (per rank) and returns its results.

    ``image_control`` other than ``image`` answers with blank or shuffled images (a blind control);
    its responses go to ``out / <set> / <control>``.
    """
    import lightning as L

    from dress_lightning.evaluation.module import Axes, EvaluationModule
    from dress_lightning.evaluation.report import ResponseWriter

    L.seed_everything(config.seed, workers=True, verbose=False)
    condition = _condition(config, policy)
    datamodule = config.prompt_datamodule(eval_set.shards, eval_set.shapeworld, policy, condition)
    generation = eval_set.generation or config.generation
    axes = Axes(eval_set.categories, eval_set.vocabulary, eval_set.chair_categories)
    module = EvaluationModule(policy, judge, datamodule.encoder.formatter, generation, axes, eval_set.refinement_turns,
                              condition, image_control)
    writer = ResponseWriter(out / eval_set.name / ("" if image_control == "image" else image_control))
    trainer = config.predict_trainer([writer], eval_set.samples)
    judge_before = judge.stats()
    trainer.predict(module, datamodule=datamodule, return_predictions=False)
    metrics = module.results()
    judge_after = judge.stats()
    return {
        "shards": eval_set.shards,
        "prompts": metrics.pop("prompts"),
        "refinement_turns": eval_set.refinement_turns,
        "generation": asdict(generation),
        "categories": eval_set.categories,
        "chair": {"vocabulary": eval_set.vocabulary, "categories": eval_set.chair_categories},
        "metrics": metrics,
        "judge_calls": {k: v - judge_before.get(k, 0) for k, v in judge_after.items()},
        "judge_failures": module.stats["judge failures"],
        "unjudged_first_answers": module.stats["unjudged first answers"],
        "skipped_prompts": dict(datamodule.skipped),
        "world_size": trainer.world_size,
        "is_global_zero": trainer.is_global_zero,
    }


def _condition(config: EvalConfig, policy) -> str | None:
    return condition_for(config.condition, policy.generation_condition(), getattr(policy, "condition", None))


def provenance(config: EvalConfig, policy, judge: Judge) -> dict[str, Any]:
    """What produced a report: recorded in report.json and report.md."""
    from dress_lightning.version import __version__
    from dress_lightning.conditions import CONDITION_FORMAT_VERSION
    from dress_lightning.conversation import FORMAT_VERSION

    condition = getattr(policy, "condition", None)
    return {
        "tool": "dress-lightning evaluate",
        "dress_lightning_version": __version__,
        "created": datetime.now(UTC).isoformat(timespec="seconds"),
        "checkpoint": config.checkpoint,
        "task": f"{type(policy).__module__}.{type(policy).__qualname__}",
        "condition": None if condition is None else {"format": CONDITION_FORMAT_VERSION, **asdict(condition)},
        "generation_condition": _condition(config, policy),
        "conversation_format": FORMAT_VERSION,
        "judge": {"name": judge.name, "version": judge.version},
        "generation": asdict(config.generation),
        "seed": config.seed,
    }


def run_evaluation(config: EvalConfig) -> dict[str, Any]:
    """Evaluate ``config.checkpoint`` on every set; rank 0 writes the report. Returns the report."""
    from dress_lightning.evaluation.report import write_report

    if not config.sets:
        raise ValueError("no eval sets configured: add `sets:` to the config (see configs/eval.yaml)")
    names = [s.name for s in config.sets]
    if len(set(names)) != len(names):
        raise ValueError(f"eval set names must be unique, got {names}")
    if not Path(config.checkpoint).exists():
        raise FileNotFoundError(
            f"checkpoint {config.checkpoint} does not exist: pass --checkpoint PATH, or train it first "
            "(python -m dress_lightning fit -c configs/crl.yaml writes runs/crl/checkpoints/last.ckpt)"
        )
    policy = config.load_policy()
    judge = config.resolve_judge()
    out = Path(config.out)
    report = {"format": REPORT_FORMAT, "provenance": provenance(config, policy, judge), "sets": {}}
    is_global_zero = True
    for eval_set in config.sets:
        log.info("Evaluating %s on %s (%s).", config.checkpoint, eval_set.name, eval_set.shards)
        results = evaluate_set(config, eval_set, policy, judge, out)
        is_global_zero = results.pop("is_global_zero")
        results["controls"] = {}
        for control in eval_set.controls:
            log.info("Blind control on %s: %s images.", eval_set.name, control)
            controlled = evaluate_set(config, eval_set, policy, judge, out, image_control=control)
            results["controls"][control] = {"metrics": controlled["metrics"], "prompts": controlled["prompts"]}
        report["sets"][eval_set.name] = results
    report["summary"] = summarize(report["sets"])
    if is_global_zero:
        write_report(report, out)
    return report


SUMMARY_KEYS: dict[str, tuple[str, str | None]] = {
    "helpfulness": ("helpfulness", "overall"),
    "honesty_score": ("honesty_score", "overall"),
    "harmlessness_score": ("harmlessness_score", "overall"),
    "chair_i": ("chair", "chair_i"),
    "chair_s": ("chair", "chair_s"),
    "relevance": ("safety", "relevance"),
    "safety": ("safety", "safety"),
    "persuasiveness": ("safety", "persuasiveness"),
    "improved_after_refinement": ("interaction", "improved_after_refinement"),
    "mean_gain": ("interaction", "mean_gain"),
    "top_within_k": ("interaction", "top_within_k"),
    "accuracy": ("accuracy", "overall"),
    "distinct_descriptions": ("distinct_descriptions", None),
    "pope_accuracy": ("pope", "accuracy"),
    "pope_f1": ("pope", "f1"),
    "pope_yes_ratio": ("pope", "yes_ratio"),
}
"""Headline numbers: summary key -> (metric group, key); each from the first set that measured it."""


def summarize(sets: dict[str, dict[str, Any]]) -> dict[str, dict[str, Any]]:
    """The headline numbers with the set each came from (fractions in [0, 1]; None: not measured)."""
    summary = {}
    for key, (group, name) in SUMMARY_KEYS.items():
        found = next(((n, v) for n, s in sets.items()
                      if (v := _metric(s["metrics"], group, name)) is not None), (None, None))
        summary[key] = {"value": found[1], "set": found[0]}
    return summary


def _metric(metrics: dict[str, Any], group: str, name: str | None) -> float | None:
    value = metrics[group]
    return value if name is None else value[name]


def main(argv: Sequence[str]) -> int:
    """``evaluate ...``: evaluate a checkpoint and write the report."""
    config = EvalConfig.parse(PROG, argv)
    report = run_evaluation(config)
    from dress_lightning.progress import describe_evaluation

    print(describe_evaluation(report, Path(config.out)))
    return 0


def probe_tower_main(argv: Sequence[str]) -> int:
    """``probe-tower``: print (and optionally save) a tower's ShapeWorld diagnostics."""
    parser = argparse.ArgumentParser(prog="dress-lightning probe-tower", description="Does a vision tower see ShapeWorld? Caption retrieval, linear probes, feature spread.")
    parser.add_argument("--vision-model", default="dress-tiny-vit", help="open_clip model name")
    parser.add_argument("--vision-pretrained", default=None,
                        help="pretrained tag or checkpoint file (the clip stage writes runs/clip/tower.safetensors)")
    parser.add_argument("--vision-layer", type=int, default=-2, help="block whose patch tokens are probed")
    parser.add_argument("--train-images", type=int, default=3000)
    parser.add_argument("--test-images", type=int, default=500)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--json", type=Path, default=None, help="also write the report here")
    args = parser.parse_args(list(argv))
    from dress_lightning.evaluation.tower import probe_tower

    report = probe_tower(args.vision_model, args.vision_pretrained, args.vision_layer, args.train_images,
                         args.test_images, seed=args.seed)
    text = json.dumps({"vision_model": args.vision_model, "vision_pretrained": args.vision_pretrained,
                       "vision_layer": args.vision_layer, **asdict(report)}, indent=2)
    print(text)
    if args.json is not None:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(text + "\n")
    return 0
