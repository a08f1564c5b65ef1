"""What one round of feedback data holds: score histograms, perfect answers, refinements that helped, best-of-n.

``feedback_data_report`` reads a rollout's NLF shards (the policy's own samples, judged) and says
what conditional RL, rejection sampling or DPO can learn from them: how the first answers score
(per-aspect histograms on the 0-10 scale, the share with every aspect at the top), how often the
answer after a refinement scored higher than the one before, and the headroom of best-of-n: per
prompt, the best of its n first answers under the judge against their average (the ceiling that
choosing among its own samples offers).
"""

from __future__ import annotations

from collections import Counter, defaultdict
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from dress_lightning.aspects import ASPECTS
from dress_lightning.data.shards import iter_samples
from dress_lightning.data.skips import SkipLog
from dress_lightning.feedback.rollout import rollout_shards

HISTOGRAM_SCALE = 10
"""Scores are binned on a 0-10 scale (rescaled from each feedback's own ``score_max``)."""


def _fractions(feedback: Mapping[str, Any]) -> dict[str, float]:
    return {aspect: feedback["scores"][aspect] / feedback["score_max"] for aspect in ASPECTS if aspect in feedback["scores"]}


def feedback_data_report(nlf_dir: str | Path) -> dict[str, Any]:
    """Histograms, perfect share, refinement improvements and best-of-n of the NLF shards in ``nlf_dir``."""
    skips = SkipLog()
    first_by_prompt: dict[str, list[dict[str, float]]] = defaultdict(list)
    histograms = {aspect: Counter() for aspect in ASPECTS}
    perfect = judged = refined = improved = 0
    for sample in iter_samples(rollout_shards(Path(nlf_dir)), skips):
        feedback = sample.record["feedback"]
        if not feedback or feedback[0] is None:
            continue
        first = _fractions(feedback[0])
        judged += 1
        perfect += all(value >= 1.0 for value in first.values())
        for aspect, value in first.items():
            histograms[aspect][round(value * HISTOGRAM_SCALE)] += 1
        first_by_prompt[sample.record["provenance"]["prompt_id"]].append(first)
        # Consecutive judged turns: did the answer to the refinement score higher than the one before?
        for before, after in zip(feedback, feedback[1:]):
            if before is None or after is None:
                break
            refined += 1
            improved += sum(_fractions(after).values()) > sum(_fractions(before).values())
    if judged == 0:
        raise ValueError(f"no judged trajectories in {nlf_dir}: is it a rollout's output directory?")
    best, mean = defaultdict(list), defaultdict(list)
    for answers in first_by_prompt.values():
        for key in (*ASPECTS, "mean"):
            values = [sum(a.values()) / len(a) if key == "mean" else a[key] for a in answers if key == "mean" or key in a]
            best[key].append(max(values))
            mean[key].append(sum(values) / len(values))
    samples_per_prompt = Counter(len(answers) for answers in first_by_prompt.values())
    return {
        "trajectories": judged,
        "prompts": len(first_by_prompt),
        "samples_per_prompt": dict(sorted(samples_per_prompt.items())),
        "score_histograms": {aspect: {str(b): histograms[aspect][b] for b in range(HISTOGRAM_SCALE + 1)}
                             for aspect in ASPECTS},
        "perfect_share": perfect / judged,
        "refinements": refined,
        "improved_after_refinement_share": improved / refined if refined else None,
        "best_of_n": {key: sum(v) / len(v) for key, v in best.items()},
        "sample_mean": {key: sum(v) / len(v) for key, v in mean.items()},
        "unreadable": skips.counts(),
    }
