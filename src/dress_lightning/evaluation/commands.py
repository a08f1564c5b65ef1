"""``python -m dress_lightning evaluate -c configs/eval.yaml [--ckpt PATH] [--out DIR]``."""

from __future__ import annotations

import logging
import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Literal

from jsonargparse import ActionConfigFile, ArgumentParser

from dress_lightning.data.datamodule import ShapeWorldShards
from dress_lightning.feedback.commands import TrainerSettings
from dress_lightning.feedback.judges import Judge
from dress_lightning.tasks.base import GenerationSettings

log = logging.getLogger(__name__)

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
class EvalConfig:
    """An evaluation job: a checkpoint answers eval sets, a judge scores them, metrics go into a report."""

    ckpt: str = "runs/crl/checkpoints/last.ckpt"
    """Checkpoint to evaluate (a LightningCLI checkpoint of any task, or a folder written by ``export``)."""
    out: str = "runs/eval/crl"
    """Report directory: report.json, report.md, plots and responses.jsonl."""
    sets: list[EvalSet] = field(default_factory=list)
    """The eval sets, in report order."""
    generation: GenerationSettings = field(default_factory=GenerationSettings)
    """Decoding (default greedy, one answer per prompt), recorded in the report."""
    judge: Judge | None = None
    """The judge (class_path + init_args); None: the exact annotation judge."""
    condition: str | None = None
    """Condition text every answer gets instead of the checkpoint's own (None: its own; CRL: the target)."""
    batch_size: int = 32
    """Prompts per generation batch on each rank."""
    num_workers: int = 1
    """Prompt loader workers per rank."""
    seed: int = 0
    """Seed set on every rank before each set (matters only when sampling)."""
    trainer: TrainerSettings = field(default_factory=TrainerSettings)


def build_parser() -> ArgumentParser:
    parser = ArgumentParser(prog="dress-lightning evaluate", description=EvalConfig.__doc__, parser_mode="omegaconf")
    parser.add_argument("-c", "--config", action=ActionConfigFile, help="YAML config (several compose).")
    parser.add_class_arguments(EvalConfig, nested_key=None, fail_untyped=False)
    return parser


def evaluate_set(config: EvalConfig, eval_set: EvalSet, policy, judge: Judge, out: Path,
                 image_control: str = "image") -> dict[str, Any]:
    """Answer, judge and score one eval set; writes its responses (per rank) and returns its results.

    ``image_control`` other than ``image`` answers with blank or shuffled images (a blind control);
    its responses go to ``out / <set> / <control>``.
    """
    import lightning as L

    from dress_lightning.data.datamodule import ShardDataModule
    from dress_lightning.evaluation.module import Axes, EvaluationModule
    from dress_lightning.evaluation.report import ResponseWriter

    L.seed_everything(config.seed, workers=True, verbose=False)
    datamodule = ShardDataModule(
        predict_shards=eval_set.shards,
        predict_shapeworld=eval_set.shapeworld,
        predict_condition=_condition(config, policy),
        model=policy.model_config,
        batch_size=config.batch_size,
        num_workers=config.num_workers,
    )
    datamodule.prepare_data()
    datamodule.setup()
    generation = eval_set.generation or config.generation
    axes = Axes(eval_set.categories, eval_set.vocabulary, eval_set.chair_categories)
    module = EvaluationModule(policy, judge, datamodule.encoder.formatter, generation, axes, eval_set.refinement_turns,
                              config.condition, image_control)
    writer = ResponseWriter(out / eval_set.name / ("" if image_control == "image" else image_control))
    trainer = config.trainer.build_trainer([writer])
    if eval_set.samples is not None:
        trainer.limit_predict_batches = math.ceil(eval_set.samples / (config.batch_size * trainer.world_size))
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
    return policy.generation_condition() if config.condition is None else config.condition


def provenance(config: EvalConfig, policy, judge: Judge) -> dict[str, Any]:
    """What produced a report: recorded in report.json and report.md."""
    from dress_lightning import __version__
    from dress_lightning.conditions import CONDITION_FORMAT_VERSION
    from dress_lightning.conversation import FORMAT_VERSION

    condition = getattr(policy, "condition", None)
    return {
        "tool": "dress-lightning evaluate",
        "dress_lightning_version": __version__,
        "created": datetime.now(UTC).isoformat(timespec="seconds"),
        "checkpoint": config.ckpt,
        "task": f"{type(policy).__module__}.{type(policy).__qualname__}",
        "condition": None if condition is None else {"format": CONDITION_FORMAT_VERSION, **asdict(condition)},
        "generation_condition": _condition(config, policy),
        "conversation_format": FORMAT_VERSION,
        "judge": {"name": judge.name, "version": judge.version},
        "generation": asdict(config.generation),
        "seed": config.seed,
    }


def run_evaluation(config: EvalConfig) -> dict[str, Any]:
    """Evaluate ``config.ckpt`` on every set; rank 0 writes the report. Returns the report."""
    from dress_lightning.evaluation.report import write_report
    from dress_lightning.feedback.annotation_judge import AnnotationJudge
    from dress_lightning.inference import load_task

    if not config.sets:
        raise ValueError("no eval sets configured: add `sets:` to the config (see configs/eval.yaml)")
    names = [s.name for s in config.sets]
    if len(set(names)) != len(names):
        raise ValueError(f"eval set names must be unique, got {names}")
    checkpoint = Path(config.ckpt)
    if not checkpoint.exists():
        raise FileNotFoundError(
            f"checkpoint {checkpoint} does not exist: pass --ckpt PATH, or train it first "
            "(python -m dress_lightning fit -c configs/crl.yaml writes runs/crl/checkpoints/last.ckpt)"
        )
    policy = load_task(str(checkpoint))
    judge = config.judge or AnnotationJudge()
    out = Path(config.out)
    report = {"format": REPORT_FORMAT, "provenance": provenance(config, policy, judge), "sets": {}}
    is_global_zero = True
    for eval_set in config.sets:
        log.info("Evaluating %s on %s (%s).", config.ckpt, eval_set.name, eval_set.shards)
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
    parser = build_parser()
    namespace = parser.parse_args(list(argv))
    config = parser.instantiate_classes(namespace)
    config = EvalConfig(**{k: v for k, v in vars(config).items() if k in EvalConfig.__dataclass_fields__})
    report = run_evaluation(config)
    from dress_lightning.progress import describe_evaluation

    print(describe_evaluation(report, Path(config.out)))
    return 0
