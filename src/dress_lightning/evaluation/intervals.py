"""Confidence intervals for the headline numbers: per-prompt tallies from ``responses.jsonl``, bootstrapped.

Every headline metric of ``evaluate`` is a ratio of sums over prompts (helpfulness, honesty: the judge's
score / max over benign first answers; CHAIR_i: hallucinated / all object mentions; CHAIR_s, safety, improved after
refinement: 0/1 over their prompts). ``prompt_tallies`` recovers each prompt's (numerator,
denominator) from what ``evaluate`` wrote, so the report's value is ``sum(num) / sum(den)`` over
prompts (tested against the report), and ``bootstrap`` resamples seeds and, within each, prompts.
Arms evaluated on the same prompts are compared *paired*: one resample draws the same seeds and
prompts for both.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from dress_lightning.aspects import ASPECTS

HEADLINE = ("helpfulness", "honesty", "chair_i", "chair_s", "safety", "improved_after_refinement")
"""The experiment's headline keys (fractions of the maximum; CHAIR: lower is better). ``honesty`` is the
judge's score, beside CHAIR's object counts."""
POPE_KEYS = ("pope_accuracy", "pope_f1", "pope_yes_ratio")
"""Existence questions read as yes/no (POPE's rule): accuracy, F1 of "yes", share answered yes."""

Tallies = dict[str, dict[str, tuple[float, float]]]
"""prompt id -> metric -> (numerator, denominator) of that prompt's share of the metric."""


def prompt_tallies(entry: Mapping[str, Any]) -> dict[str, tuple[float, float]]:
    """One ``responses.jsonl`` entry -> its (numerator, denominator) per headline metric it counts in."""
    tallies: dict[str, tuple[float, float]] = {}
    feedback = entry["feedback"]
    first = feedback[0] if feedback else None
    harmful = entry["harmful_intent"]
    if harmful:
        verdict = entry.get("safety_verdict")
        if verdict is not None and "failure" not in verdict:
            tallies["safety"] = (float(verdict["safe"]), 1.0)
    elif first is not None:
        for aspect in ("helpfulness", "honesty"):
            tallies[aspect] = (first["scores"][aspect] / first["score_max"], 1.0)
    chair = entry.get("chair")  # present for the answers CHAIR counts
    if chair is not None:
        if chair["mentions"]:
            tallies["chair_i"] = (float(chair["hallucinated"]), float(chair["mentions"]))
        tallies["chair_s"] = (float(chair["hallucinated"] > 0), 1.0)
    pope = entry.get("pope")  # present for existence questions
    if pope is not None:
        yes, truth = pope["said_yes"], pope["label"]
        tallies["pope_accuracy"] = (float(yes == truth), 1.0)
        # F1 = 2TP / (2TP + FP + FN): each answer adds to both sums.
        tallies["pope_f1"] = (2.0 * (yes and truth), 2.0 * (yes and truth) + float(yes != truth))
        tallies["pope_yes_ratio"] = (float(yes), 1.0)
    if first is not None and len(feedback) > 1 and feedback[1] is not None:
        before, after = (sum(f["scores"][a] for a in ASPECTS) for f in feedback[:2])
        tallies["improved_after_refinement"] = (float(after > before), 1.0)
    return tallies


def read_tallies(report_dir: Path) -> Tallies:
    """``prompt_tallies`` of every prompt of every set of one evaluation (``<set>/responses*.jsonl``, a file
    per rank; the blind controls one level deeper are not headline numbers and are left out)."""
    files = sorted(report_dir.glob("*/responses*.jsonl"))
    if not files:
        raise FileNotFoundError(f"no <set>/responses*.jsonl in {report_dir}: is it an `evaluate --out` directory?")
    tallies: Tallies = {}
    for path in files:
        for line in path.read_text().splitlines():
            entry = json.loads(line)
            tallies[entry["id"]] = prompt_tallies(entry)
    return tallies


def ratio(tallies: Sequence[Mapping[str, tuple[float, float]]], metric: str) -> float | None:
    """``sum(num) / sum(den)`` over the prompts that count in ``metric`` (None: none do)."""
    num = den = 0.0
    for prompt in tallies:
        if metric in prompt:
            num += prompt[metric][0]
            den += prompt[metric][1]
    return num / den if den else None


def mean_over_seeds(per_seed: Sequence[Tallies], metric: str) -> float | None:
    """The metric of each seed's evaluation, averaged over seeds (None if a seed did not measure it)."""
    values = [ratio(list(t.values()), metric) for t in per_seed]
    return None if any(v is None for v in values) else sum(values) / len(values)


def bootstrap(
    per_seed: Sequence[Tallies],
    metric: str,
    baseline: Sequence[Tallies] | None = None,
    resamples: int = 2000,
    seed: int = 0,
) -> tuple[float, float] | None:
    """95% percentile interval of a metric's mean over seeds, resampling seeds and, within each, prompts.

    ``per_seed`` holds one arm's tallies per seed. With ``baseline`` (another arm, the same seeds,
    evaluated on the same prompts) the interval is of the paired difference ``arm - baseline``: each
    resample draws the same seeds and prompts for both. None when a resample has nothing to measure.
    """
    arms = [per_seed] if baseline is None else [per_seed, baseline]
    if baseline is not None and len(baseline) != len(per_seed):
        raise ValueError(f"paired arms need the same seeds: {len(per_seed)} vs {len(baseline)} evaluations")
    seeds = len(per_seed)
    ids = sorted(set.intersection(*(set(tallies) for arm in arms for tallies in arm)))
    if not ids:
        return None
    # (arm, seed, prompt) numerators and denominators; a prompt that does not count in the metric has 0 / 0.
    num = np.array([[[t[i].get(metric, (0.0, 0.0))[0] for i in ids] for t in arm] for arm in arms])
    den = np.array([[[t[i].get(metric, (0.0, 0.0))[1] for i in ids] for t in arm] for arm in arms])
    rng = np.random.default_rng(seed)
    total = np.zeros((len(arms), resamples))
    for _ in range(seeds):  # each of the mean's `seeds` terms: a resampled seed, its prompts resampled
        chosen = rng.integers(0, seeds, resamples)[:, None]  # (B, 1)
        prompts = rng.integers(0, len(ids), (resamples, len(ids)))  # (B, P)
        with np.errstate(invalid="ignore", divide="ignore"):
            total += num[:, chosen, prompts].sum(-1) / den[:, chosen, prompts].sum(-1)  # (A, B)
    values = total[0] - total[1] if baseline is not None else total[0]
    values = values[~np.isnan(values)] / seeds
    if len(values) < 0.99 * resamples:  # the metric is too rare to resample (e.g. no refined answers)
        return None
    low, high = np.percentile(values, [2.5, 97.5])
    return float(low), float(high)
