"""The ShapeWorld experiment: every arm and seed as stages of one graph, resumable, summarised with intervals.

    python -m dress_lightning experiment [--seeds 0 1 2] [--arms sft sft_control crl] [--split test]

The graph (``experiment_stages``), with ``R = --run-dir`` (default ``runs/repro``)::

    clip (runs/clip, shared with the main job) -> grounding warm-up (R/warmup, shared by the seeds)
      -> per seed s:  R/seed{s}/sft -> R/seed{s}/nlf (rollout of that SFT model, sampled with seed s)
                      -> every other arm, from that SFT model (``crl``, its ablations and levers, ``rft``,
                         ``dpo`` on that NLF; ``crl_round2`` rolls out ``crl`` and trains it again; a
                         rollout lever such as ``crl_samples4`` trains on its own rollout, R/seed{s}/{arm}_nlf)
                      -> evaluate every arm on the split: R/seed{s}/eval/{split}/{arm}, conditioned arms
                         also under ``low`` and ``none`` conditions ({arm}@low, {arm}@none: steerability);
                         a decoding row (``crl_dropout_guided_none``) evaluates another arm's model with
                         classifier-free guidance and trains nothing

Each stage is a ``fit`` / ``rollout`` / ``evaluate`` over the arm's configs (``ARMS``: the base
config plus its ``configs/reproduce/`` overlay, which holds the science: steps, learning rate,
options) and overrides that hold the plumbing (the seed, where it writes, what it starts from). A
stage whose output exists is skipped, so an interrupted experiment resumes where it stopped;
``--dry-run`` prints the commands. Several processes may share a run directory (e.g. one seed per core,
or the arms of one seed split over cores): a stage being run is claimed by a ``{output}.running`` file
holding the runner's process id (``atomic.try_claim``), and another process that reaches it goes on with
the stages it can run (their inputs written, held by nobody), coming back to it instead of running it
twice (a claim whose process is gone is taken over). Each seed draws its own
training data order (``seed_everything``, which the data modules follow), rollout samples (the rollout
seed) and evaluation sampling; the evaluation prompts are the same for every seed and arm (fixed
shards), so arms are compared paired, prompt by prompt.

``summarize`` reads every evaluation's ``responses.jsonl`` and writes one JSON object: one object per
arm (its name as the key) with the mean over seeds of each headline key, ``per_seed``, ``ci95``
(bootstrap over seeds and prompts, ``evaluation.intervals``) and ``seeds``; ``comparisons`` (each arm
minus the SFT control and minus CRL, paired); ``diagnostics`` (steerability, grounding per arm, the
feedback data of each seed's rollout); the stage wall times; ``provenance``.
"""

from __future__ import annotations

import argparse
import json
import logging
import platform
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, replace
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Literal

from dress_lightning.atomic import atomic_write_text, try_claim
from dress_lightning.stages import GROUNDING_WARMUP, Stage, exists, producer, run_stage

log = logging.getLogger(__name__)

PROG = "dress-lightning experiment"
RESULTS_FORMAT = "dress-shapeworld-experiment-v1"
"""Version of the summary JSON's layout."""


@dataclass(frozen=True)
class Arm:
    """A model of the experiment: the configs it trains with and what it starts from."""

    description: str
    configs: tuple[str, ...]
    starts_from: Literal["warmup", "sft"] = "sft"
    """``warmup``: the grounding warm-up the seeds share (SFT itself); ``sft``: this seed's SFT model."""
    reads_feedback: bool = False
    """Trains on this seed's NLF shards (``data.init_args.nlf_shards``)."""
    conditioned: bool = False
    """Answers under a feedback condition: also evaluated under a low-score condition and none (steerability)."""
    continues: str | None = None
    """Another round of that arm (online bootstrapping, as FCP and Quark re-collect): roll out that arm's model,
    judge its answers, and train it again on them (``reads_feedback`` then reads this round's NLF)."""
    rollout_configs: tuple[str, ...] = ()
    """Configs over the seed's rollout (its breadth: samples per prompt, temperature, prompt count): the arm
    trains on its own rollout of the seed's SFT model, ``R/seed{s}/{arm}_nlf``, instead of the shared one."""
    model_of: str | None = None
    """A decoding row: train nothing, evaluate that arm's model with ``eval_overrides`` (classifier-free guidance)."""
    eval_overrides: tuple[str, ...] = ()
    """Overrides of every evaluation of this arm (``--generation.guidance_scale 1.5``)."""

    @property
    def own_rollout(self) -> bool:
        """Trains on a rollout of its own (``R/seed{s}/{arm}_nlf``): a later round's, or a rollout lever's."""
        return self.continues is not None or bool(self.rollout_configs)


def _crl(description: str, *levers: str) -> Arm:
    """A CRL arm: configs/crl.yaml + reproduce/crl.yaml, then each lever's ``reproduce/crl_<lever>.yaml``."""
    return Arm(description, ("configs/crl.yaml", "configs/reproduce/crl.yaml",
                             *(f"configs/reproduce/crl_{lever}.yaml" for lever in levers)),
               reads_feedback=True, conditioned=True)


def _crl_rollout(description: str, breadth: str) -> Arm:
    """Plain CRL on its own rollout of the SFT model, made with ``reproduce/rollout_<breadth>.yaml`` on top."""
    return replace(_crl(description), rollout_configs=(f"configs/reproduce/rollout_{breadth}.yaml",))


def _guided(arm: str, negative: str, scale: float = 1.5) -> Arm:
    """``arm``'s model decoded with classifier-free guidance away from the ``negative`` condition."""
    return Arm(f"{arm}'s model, classifier-free guidance {scale} away from the {negative!r} condition", (),
               model_of=arm, eval_overrides=("--generation.guidance_scale", str(scale),
                                             "--generation.negative_condition", negative))


ARMS: dict[str, Arm] = {
    "sft": Arm("SFT", ("configs/sft.yaml", "configs/reproduce/sft.yaml"), starts_from="warmup"),
    "sft_control": Arm(
        "SFT + as many steps as CRL (control)",
        ("configs/sft.yaml", "configs/reproduce/sft.yaml", "configs/reproduce/sft_control.yaml"),
    ),
    "crl": _crl("CRL as DRESS publishes it (score + critique condition, the model's own refinements)"),
    "crl_score_only": _crl("CRL ablation: score-only condition", "score_only"),
    "crl_no_refinement": _crl("CRL ablation: no refinement data", "no_refinement"),
    "crl_judge_target": _crl("CRL lever: the target's critique in the judge's own words for a perfect answer",
                             "judge_target"),
    "crl_tokens": _crl("CRL lever: scores as reserved tokens", "tokens"),
    "crl_templates": _crl("CRL lever: randomised condition templates in training", "templates"),
    "crl_dropout": _crl("CRL lever: 10% condition dropout (for classifier-free guidance)", "dropout"),
    "crl_reference": _crl("CRL lever: refined turns trained on the reference answer", "reference"),
    "crl_judge_target_reference": _crl(
        "CRL levers combined (configs/crl.yaml's defaults): the judge's critique as target, refined turns "
        "trained on the reference answer",
        "judge_target", "reference"),
    "crl_judge_target_reference_all": _crl(
        "CRL levers combined, every refined turn trained (the reference answer after each answer the judge "
        "found wrong), not only the improved ones", "judge_target", "reference", "all_refinements"),
    "crl_judge_target_reference_more_sft": _crl(
        "CRL levers combined, 60% SFT data in the mix instead of 30%", "judge_target", "reference", "more_sft"),
    "crl_assistant_prefix": _crl(
        "CRL lever: the condition at the start of the answer (DRESS), not before the question", "assistant_prefix"),
    "crl_tokens_in_answer": _crl("CRL lever: score tokens alone at the start of the answer (no critique)",
                                 "tokens_in_answer"),
    "crl_round2": replace(_crl("CRL, a second round on the round-1 CRL model's own judged answers"), continues="crl"),
    "crl_samples4": _crl_rollout("CRL lever: 4 sampled answers per rollout prompt instead of 2", "samples4"),
    "crl_temperature07": _crl_rollout("CRL lever: rollout temperature 0.7 instead of 1.0", "temperature07"),
    "crl_prompts600": _crl_rollout("CRL lever: 600 rollout prompts instead of 300", "prompts600"),
    "crl_dropout_guided_none": _guided("crl_dropout", "none"),
    "crl_dropout_guided_low": _guided("crl_dropout", "low"),
    "crl_judge_target_reference_guided_low": _guided("crl_judge_target_reference", "low"),
    "rft": Arm("RFT: fine-tuning on the best judged samples (rejection sampling)",
               ("configs/rft.yaml", "configs/reproduce/rft.yaml"), reads_feedback=True),
    "dpo": Arm("DPO on pairs from the judged samples (reference: the SFT model)",
               ("configs/dpo.yaml", "configs/reproduce/dpo.yaml"), reads_feedback=True),
}
"""Every arm, in table order."""

MAIN_ARMS = ("sft", "sft_control", "crl", "crl_reference", "crl_judge_target_reference", "rft", "dpo")
"""The arms of the reported table (README, ``bench/results/shapeworld_reproduction.*``): the default of ``--arms``."""
STEERING_CONDITIONS = ("low", "none")
"""Conditions a conditioned arm is also evaluated under, beside its target (``conditions.condition_for``)."""
COMMANDS = ("fit", "rollout", "evaluate")
CONTROL, TREATMENT = "sft_control", "crl"

EVAL_CONFIGS = {
    "val": ("configs/eval.yaml", "configs/reproduce/eval_val.yaml"),
    "test": ("configs/eval.yaml", "configs/reproduce/eval_test.yaml"),
}
"""The evaluation of each split: choices are made on val; test is reported once."""


def _fit_plumbing(out: Path, seed: int, init_checkpoint: Path | None, nlf: Path | None) -> tuple[str, ...]:
    """Overrides that put a training run in ``out`` with ``seed``, starting from ``init_checkpoint``."""
    overrides = [
        "--seed_everything", str(seed),
        "--trainer.default_root_dir", str(out),
        "--trainer.logger.init_args.save_dir", str(out),
        "--trainer.callbacks.init_args.dirpath", str(out / "checkpoints"),
    ]
    if init_checkpoint is not None:
        overrides += ["--model.init_args.init_checkpoint", str(init_checkpoint)]
    if nlf is not None:
        overrides += ["--data.init_args.nlf_shards", str(nlf)]
    return tuple(overrides)


def checkpoint(run: Path) -> Path:
    """Where a training run of the experiment leaves its model."""
    return run / "checkpoints" / "last.ckpt"


def experiment_stages(
    seeds: Sequence[int], arms: Sequence[str], split: Literal["val", "test"], run_dir: Path,
    overlays: Mapping[str, Sequence[str]] | None = None,
) -> list[Stage]:
    """The stages of the experiment, in an order that runs each after its inputs.

    ``overlays`` maps a command (``fit``, ``rollout``, ``evaluate``) to configs that go after each of its
    stages' own (a smoke run: ``{"fit": ["configs/overlays/ci_tiny.yaml"], ...}``).
    """
    overlays = {command: tuple(paths) for command, paths in (overlays or {}).items()}
    unknown = sorted(set(overlays) - set(COMMANDS))
    if unknown:
        raise ValueError(f"overlays for unknown command(s) {unknown}; valid: {', '.join(COMMANDS)}")
    fit_overlays, rollout_overlays, eval_overlays = (overlays.get(command, ()) for command in COMMANDS)
    unknown = [arm for arm in arms if arm not in ARMS]
    if unknown:
        raise ValueError(f"unknown arm(s) {unknown}; valid: {', '.join(ARMS)}")
    arms = with_prerequisites(arms)
    warmup = run_dir / "warmup"
    # The tower (runs/clip) is not listed: the first fit that reads it builds it, as the main job does.
    stages = [
        Stage("warmup", "fit", (*GROUNDING_WARMUP.configs, *fit_overlays), str(checkpoint(warmup)),
              _fit_plumbing(warmup, 0, None, None)),
    ]
    for seed in seeds:
        root = run_dir / f"seed{seed}"
        sft, nlf = root / "sft", root / "nlf"
        def rollout(name: str, policy: Path, out: Path, configs: Sequence[str] = ()) -> Stage:
            return Stage(f"{name}/seed{seed}", "rollout",
                         ("configs/rollout.yaml", "configs/reproduce/rollout.yaml", *configs, *rollout_overlays),
                         str(out), ("--checkpoint", str(checkpoint(policy)), "--out", str(out), "--seed", str(seed)))

        for arm in arms:
            spec = ARMS[arm]
            if spec.model_of is not None:
                continue  # a decoding row: only evaluated, on that arm's model
            start = checkpoint(warmup if spec.starts_from == "warmup" else root / (spec.continues or "sft"))
            feedback = nlf
            if spec.own_rollout:  # the previous round's model, or the SFT model rolled out broader or cooler
                feedback = root / f"{arm}_nlf"
                policy = root / spec.continues if spec.continues is not None else sft
                stages.append(rollout(f"rollout_{arm}", policy, feedback, spec.rollout_configs))
            out = root / arm
            stages.append(Stage(f"{arm}/seed{seed}", "fit", (*spec.configs, *fit_overlays), str(checkpoint(out)),
                                _fit_plumbing(out, seed, start, feedback if spec.reads_feedback else None)))
            if arm == "sft" and any(ARMS[a].reads_feedback for a in arms):
                stages.append(rollout("rollout", sft, nlf))
        for arm in arms:
            spec = ARMS[arm]
            for condition in ("target", *(STEERING_CONDITIONS if spec.conditioned else ())):
                name = evaluation_name(arm, condition)
                out = root / "eval" / split / name
                stages.append(Stage(f"eval_{split}_{name}/seed{seed}", "evaluate",
                                    (*EVAL_CONFIGS[split], *eval_overlays), str(out / "report.json"),
                                    ("--checkpoint", str(checkpoint(root / (spec.model_of or arm))), "--out",
                                     str(out), "--seed", str(seed), "--condition", condition, *spec.eval_overrides)))
    return stages


def with_prerequisites(arms: Sequence[str]) -> list[str]:
    """``arms`` plus the arms they build on (SFT always; the round an arm continues; the model a decoding row
    decodes), in ``ARMS`` order."""
    wanted = {"sft", *arms}
    for arm in list(wanted):
        while (before := ARMS[arm].continues or ARMS[arm].model_of) is not None:
            arm = before
            wanted.add(arm)
    return [arm for arm in ARMS if arm in wanted]


def evaluation_name(arm: str, condition: str) -> str:
    """Where an arm's evaluation under a condition goes: ``crl`` (its target), ``crl@low``, ``crl@none``."""
    return arm if condition == "target" else f"{arm}@{condition}"


def run_experiment(stages: Sequence[Stage], timings: Path, poll_seconds: float = 10.0) -> None:
    """Run the stages whose output is missing, each after the stages whose outputs it reads; each one's wall
    time goes to ``timings``.

    A stage another process is running (``{output}.running``) is not run twice: this process goes on with the
    next stage it can run (in order, its inputs written, held by nobody) and comes back to it; it waits only
    when every stage left is held or waits for one that is.
    """
    numbers = {stage: i for i, stage in enumerate(stages, 1)}
    # A stage's inputs: the earlier stages that write a path its overrides name (a rollout names its own output too).
    producers = {stage: [p for value in stage.overrides if (p := producer(value, stages[:i])) is not None]
                 for i, stage in enumerate(stages)}
    left, busy = list(stages), set()

    def label(stage: Stage) -> str:
        return f"[{numbers[stage]}/{len(stages)}] {stage.name}"

    while left:
        for stage in left:
            if exists(stage.output):
                log.warning("%s: %s", label(stage), "another process ran it, skipped." if stage in busy
                            else f"{stage.output} exists, skipped.")
                break
            if any(upstream in left for upstream in producers[stage]):
                continue  # an input is still to be written
            running = Path(f"{stage.output}.running")
            if not try_claim(running, stage.name):
                if stage not in busy:
                    log.warning("%s: another process is on it (%s); going on with the stages it does not hold.",
                                label(stage), running)
                    busy.add(stage)
                continue
            try:
                if exists(stage.output):  # finished by another process between the check and the claim
                    log.warning("%s: another process ran it, skipped.", label(stage))
                    break
                log.warning("%s: %s", label(stage), stage.describe())
                seconds = round(run_stage(stage), 1)
            finally:
                running.unlink(missing_ok=True)
            # Read again just before writing: experiments over other seeds or arms may share the run directory
            # (one process per core) and record their stages in the same file meanwhile.
            recorded = json.loads(timings.read_text()) if timings.is_file() else {}
            timings.parent.mkdir(parents=True, exist_ok=True)
            atomic_write_text(timings, json.dumps({**recorded, stage.name: seconds}, indent=2) + "\n")
            break
        else:
            time.sleep(poll_seconds)  # every stage left is held by another process or waits for one that is
            continue
        left.remove(stage)


def summarize(seeds: Sequence[int], arms: Sequence[str], split: str, run_dir: Path,
              resamples: int = 2000) -> dict[str, Any]:
    """The experiment's results: per arm the mean over seeds, per-seed values, intervals; paired comparisons."""
    from dress_lightning.evaluation.intervals import HEADLINE, POPE_KEYS, bootstrap, mean_over_seeds, ratio, read_tallies

    keys = HEADLINE + POPE_KEYS

    tallies = {arm: [read_tallies(run_dir / f"seed{s}" / "eval" / split / arm) for s in seeds] for arm in arms}
    results: dict[str, Any] = {}
    for arm in arms:
        per_seed = tallies[arm]
        results[arm] = {
            **{key: mean_over_seeds(per_seed, key) for key in keys},
            "per_seed": [{key: ratio(list(t.values()), key) for key in keys} for t in per_seed],
            "ci95": {key: bootstrap(per_seed, key, resamples=resamples) for key in keys},
            "seeds": list(seeds),
            "description": ARMS[arm].description,
            "prompts": len(per_seed[0]),
        }
    def compare(arm: str, baseline: str) -> dict[str, Any]:
        return {key: {"diff": _difference(results[arm][key], results[baseline][key]),
                      "ci95": bootstrap(tallies[arm], key, tallies[baseline], resamples=resamples)}
                for key in keys}

    comparisons = {}
    for baseline in (CONTROL, TREATMENT):
        if baseline not in tallies:
            continue
        for arm in arms:
            if arm in (baseline, "sft") or (baseline == TREATMENT and arm == CONTROL):
                continue
            comparisons[f"{arm}_vs_{baseline}"] = compare(arm, baseline)
    # A decoding row against the same model decoded plainly: what the decoding alone changes.
    comparisons |= {f"{arm}_vs_{ARMS[arm].model_of}": compare(arm, ARMS[arm].model_of)
                    for arm in arms if ARMS[arm].model_of not in (None, TREATMENT)}
    steerability = {}
    for arm in arms:
        if not ARMS[arm].conditioned:
            continue
        steerability[arm] = {}
        for condition in STEERING_CONDITIONS:
            per_seed = [read_tallies(run_dir / f"seed{s}" / "eval" / split / evaluation_name(arm, condition))
                        for s in seeds]
            steerability[arm][condition] = {
                key: {"value": mean_over_seeds(per_seed, key),
                      "minus_target": _difference(mean_over_seeds(per_seed, key), results[arm][key]),
                      "minus_target_ci95": bootstrap(per_seed, key, tallies[arm], resamples=resamples)}
                for key in HEADLINE
            }
    feedback_data = {}
    if any(ARMS[arm].reads_feedback for arm in arms):
        from dress_lightning.feedback.diagnostics import feedback_data_report

        # Each seed's rollout of its SFT model, and each arm's own (a rollout lever's best-of-n headroom).
        nlf = {f"seed{s}": run_dir / f"seed{s}" / "nlf" for s in seeds}
        nlf |= {f"seed{s}/{arm}": run_dir / f"seed{s}" / f"{arm}_nlf"
                for arm in arms if ARMS[arm].own_rollout for s in seeds}
        feedback_data = {name: feedback_data_report(path) for name, path in nlf.items()}
    timings = run_dir / "timings.json"
    return {
        **results,  # one object per arm, in table order
        "comparisons": comparisons,
        "diagnostics": {
            "steerability": steerability,
            "feedback_data": feedback_data,
            "grounding": {arm: [_grounding(run_dir / f"seed{s}" / "eval" / split / arm) for s in seeds] for arm in arms},
        },
        "stage_seconds": json.loads(timings.read_text()) if timings.is_file() else {},
        "provenance": {"format": RESULTS_FORMAT, "split": split, "run_dir": str(run_dir),
                       "created": datetime.now(UTC).isoformat(timespec="seconds"),
                       "machine": platform.processor() or platform.machine(),
                       # Per arm and seed, what each evaluation was made with (a resumed experiment may
                       # combine stages run by different versions of the code).
                       "evaluations": {arm: [_evaluation_provenance(run_dir / f"seed{s}" / "eval" / split / arm)
                                             for s in seeds] for arm in arms}},
    }


def _evaluation_provenance(report_dir: Path) -> dict[str, Any]:
    provenance = json.loads((report_dir / "report.json").read_text())["provenance"]
    return {key: provenance.get(key) for key in ("created", "dress_lightning_version", "conversation_format",
                                                 "checkpoint", "seed")}


def _grounding(report_dir: Path) -> dict[str, Any]:
    """Exact accuracy per question type with the image and under each blind control, per eval set that has them."""
    report = json.loads((report_dir / "report.json").read_text())
    return {
        name: {"image": results["metrics"]["accuracy"],
               **{control: c["metrics"]["accuracy"] for control, c in results.get("controls", {}).items()},
               "distinct_descriptions": results["metrics"]["distinct_descriptions"]}
        for name, results in report["sets"].items()
    }


def _difference(a: float | None, b: float | None) -> float | None:
    return None if a is None or b is None else a - b


def markdown(summary: dict[str, Any]) -> str:
    """The report: results (mean over seeds [95% interval], in %), paired comparisons, then beside them the
    spread over seeds, steerability, the feedback data and grounding (issue 15's diagnostics)."""
    from dress_lightning.evaluation.intervals import HEADLINE

    arms = {arm: r for arm, r in summary.items() if arm in ARMS}
    sections = [_table(["arm", "seeds", *HEADLINE],
                       [[arm, str(len(r["seeds"])), *(_cell(r[k], r["ci95"][k]) for k in HEADLINE)]
                        for arm, r in arms.items()]
                       + ([["**paired differences**", "", *[""] * len(HEADLINE)]] if summary["comparisons"] else [])
                       + [[name, "", *(_cell(c[k]["diff"], c[k]["ci95"], sign=True) for k in HEADLINE)]
                          for name, c in summary["comparisons"].items()])]
    sections.append("Each seed on its own (the spread over training, rollout and evaluation seeds):\n\n" + _table(
        ["arm", "seed", *HEADLINE],
        [[arm, str(seed), *(_cell(values[k], None) for k in HEADLINE)]
         for arm, r in arms.items() for seed, values in zip(r["seeds"], r["per_seed"])]))
    diagnostics = summary["diagnostics"]
    if diagnostics["steerability"]:
        sections.append("Steerability: each conditioned arm under a low-score condition and under none, "
                        "minus the same arm under its target condition (paired):\n\n" + _table(
                            ["arm @ condition", *HEADLINE],
                            [[f"{arm} @ {condition}",
                              *(_cell(v[k]["minus_target"], v[k]["minus_target_ci95"], sign=True) for k in HEADLINE)]
                             for arm, conditions in diagnostics["steerability"].items()
                             for condition, v in conditions.items()]))
    if diagnostics["feedback_data"]:
        aspects = list(next(iter(diagnostics["feedback_data"].values()))["best_of_n"])
        sections.append("The feedback data (each seed's rollout of its SFT model, and each arm's own): mean "
                        "judge score of the samples and of the best of each prompt's samples (best-of-n: the headroom "
                        "one round offers):\n\n"
                        + _table(["rollout", "trajectories", "perfect", "refinements improved",
                                  *(f"{a}: mean / best-of-n" for a in aspects)],
                                 [[seed, str(d["trajectories"]), _cell(d["perfect_share"], None),
                                   _cell(d["improved_after_refinement_share"], None),
                                   *(f"{_cell(d['sample_mean'][a], None)} / {_cell(d['best_of_n'][a], None)}"
                                     for a in aspects)]
                                  for seed, d in diagnostics["feedback_data"].items()]))
    sections.append(_grounding_table(diagnostics["grounding"]))
    return "\n".join(section for section in sections if section)


def _cell(value: float | None, interval: Sequence[float] | None, sign: bool = False) -> str:
    if value is None:
        return "n/a"
    text = f"{100 * value:+.1f}" if sign else f"{100 * value:.1f}"
    return text + (f" [{100 * interval[0]:.1f}, {100 * interval[1]:.1f}]" if interval else "")


def _table(header: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    return "\n".join(lines + ["| " + " | ".join(row) + " |" for row in rows]) + "\n"


def _grounding_table(grounding: Mapping[str, list[dict[str, Any]]]) -> str:
    """Exact accuracy per question type, mean over seeds, with the image and under each blind control."""
    rows, types = [], None
    for arm, per_seed in grounding.items():
        for set_name in per_seed[0]:
            for view in ("image", "blank", "shuffled"):
                if view not in per_seed[0][set_name]:
                    continue
                types = types or [t for t in per_seed[0][set_name][view] if t not in ("describe", "overall")]
                accuracy = [seed[set_name][view] for seed in per_seed]
                means = [_mean([a.get(t) for a in accuracy]) for t in types]
                if any(m is not None for m in means):  # sets without questions (describe, harmful) have none
                    rows.append([f"{arm}: {set_name}" + ("" if view == "image" else f", {view} image"),
                                 *(_cell(m, None) for m in means)])
    distinct = [[arm, _cell(_mean([seed[s]["distinct_descriptions"] for seed in per_seed]), None)]
                for arm, per_seed in grounding.items() for s in per_seed[0]
                if per_seed[0][s].get("distinct_descriptions") is not None]
    if not rows:
        return ""
    return ("Grounding: exact accuracy per question type (mean over seeds):\n\n" + _table(["arm: set", *types], rows)
            + ("\nDistinct descriptions (distinct answers / describe prompts; 1 / n: one answer to all n):\n\n"
               + _table(["arm", "distinct"], distinct) if distinct else ""))


def _mean(values: Sequence[float | None]) -> float | None:
    present = [v for v in values if v is not None]
    return sum(present) / len(present) if present else None


def _overlay(text: str) -> tuple[str, str]:
    command, sep, path = text.partition("=")
    if not sep or command not in COMMANDS:
        raise argparse.ArgumentTypeError(f"expected COMMAND=YAML with COMMAND one of {', '.join(COMMANDS)}, got {text!r}")
    return command, path


def main(argv: Sequence[str]) -> int:
    """``experiment ...``: run the missing stages of the experiment, then write its results."""
    parser = argparse.ArgumentParser(prog=PROG, description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2], help="seeds (default: 0 1 2)")
    parser.add_argument("--arms", nargs="+", default=list(MAIN_ARMS), choices=list(ARMS),
                        help=f"arms (default: {' '.join(MAIN_ARMS)}; sft is always trained)")
    parser.add_argument("--split", choices=("val", "test"), default="val",
                        help="evaluation split: choose on val (default); report test once")
    parser.add_argument("--run-dir", type=Path, default=Path("runs/repro"))
    parser.add_argument("--overlay", action="append", default=[], metavar="COMMAND=YAML", type=_overlay,
                        help="a config after those of every fit, rollout or evaluate stage, e.g. "
                             "fit=configs/overlays/ci_tiny.yaml (repeatable)")
    parser.add_argument("--json", type=Path, default=None,
                        help="write the results here too (bench/results/shapeworld_reproduction.json for test)")
    parser.add_argument("--markdown", type=Path, default=None, help="write the table here too")
    parser.add_argument("--dry-run", action="store_true", help="print the stages and whether each is done")
    args = parser.parse_args(list(argv))
    overlays: dict[str, list[str]] = {}
    for command, path in args.overlay:
        overlays.setdefault(command, []).append(path)
    stages = experiment_stages(args.seeds, args.arms, args.split, args.run_dir, overlays)
    if args.dry_run:
        for stage in stages:
            print(f"{'done' if exists(stage.output) else 'todo'}  {stage.name}: {stage.describe()}")
        return 0
    start = time.perf_counter()
    run_experiment(stages, args.run_dir / "timings.json")
    arms = with_prerequisites(args.arms)
    summary = summarize(args.seeds, arms, args.split, args.run_dir)
    summary["provenance"].update(wall_seconds_this_run=round(time.perf_counter() - start, 1))
    text = json.dumps(summary, indent=2) + "\n"
    (args.run_dir / f"results_{args.split}.json").write_text(text)
    table = markdown(summary)
    print(table)
    if args.json is not None:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(text)
    if args.markdown is not None:
        args.markdown.parent.mkdir(parents=True, exist_ok=True)
        args.markdown.write_text(table)
    return 0
