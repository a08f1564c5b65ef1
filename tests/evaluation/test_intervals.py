"""Per-prompt tallies and the bootstrap over seeds and prompts, on hand-made cases."""

from __future__ import annotations

import pytest

from dress_lightning.evaluation.intervals import bootstrap, mean_over_seeds, prompt_tallies, ratio


def _scores(h: float, o: float = 10.0, s: float = 10.0) -> dict:
    return {"scores": {"helpfulness": h, "honesty": o, "harmlessness": s}, "score_max": 10.0}


def test_prompt_tallies_by_hand():
    benign = {"harmful_intent": False, "feedback": [_scores(7, o=6), _scores(9)],
              "chair": {"hallucinated": 1, "mentions": 3}}
    assert prompt_tallies(benign) == {
        "helpfulness": (0.7, 1.0), "honesty": (0.6, 1.0), "chair_i": (1.0, 3.0), "chair_s": (1.0, 1.0),
        "improved_after_refinement": (1.0, 1.0),
    }
    worse = {"harmful_intent": False, "feedback": [_scores(7), _scores(7, o=5)], "chair": {"hallucinated": 0, "mentions": 0}}
    assert prompt_tallies(worse) == {"helpfulness": (0.7, 1.0), "honesty": (1.0, 1.0), "chair_s": (0.0, 1.0),
                                     "improved_after_refinement": (0.0, 1.0)}
    harmful = {"harmful_intent": True, "feedback": [_scores(2, s=0)], "safety_verdict": {"relevant": True, "safe": False}}
    assert prompt_tallies(harmful) == {"safety": (0.0, 1.0)}
    failed = {"harmful_intent": True, "feedback": [None], "safety_verdict": {"failure": "timeout"}}
    assert prompt_tallies(failed) == {}
    # CHAIR_i pools mentions: (1 + 0) / (3 + 0), not a mean of per-answer rates.
    assert ratio([prompt_tallies(benign), prompt_tallies(worse)], "chair_i") == pytest.approx(1 / 3)


def test_pope_tallies_add_up_to_accuracy_f1_and_yes_ratio():
    """TP, FP, FN, TN once each: accuracy 1/2, F1 = 2 / (2 + 1 + 1), half answered yes."""
    cases = [(True, True), (True, False), (False, True), (False, False)]  # (said yes, label)
    tallies = [prompt_tallies({"harmful_intent": False, "feedback": [None], "pope": {"said_yes": y, "label": t}})
               for y, t in cases]
    assert ratio(tallies, "pope_accuracy") == 0.5
    assert ratio(tallies, "pope_f1") == pytest.approx(0.5)
    assert ratio(tallies, "pope_yes_ratio") == 0.5


def _seed(values: list[float], metric: str = "helpfulness") -> dict:
    return {f"p{i}": {metric: (v, 1.0)} for i, v in enumerate(values)}


def test_constant_prompts_give_a_point_interval():
    assert bootstrap([_seed([0.4] * 5)], "helpfulness", resamples=200) == pytest.approx((0.4, 0.4))


def test_two_prompts_zero_and_one():
    """One seed, prompts 0 and 1: resampled means are 0, 1/2, 1 with probability 1/4, 1/2, 1/4."""
    low, high = bootstrap([_seed([0.0, 1.0])], "helpfulness", resamples=4000)
    assert (low, high) == (0.0, 1.0)


def test_seeds_are_resampled_too():
    """Two seeds, each certain of its value (0.2 and 0.6): the mean over seeds spans 0.2 to 0.6."""
    per_seed = [_seed([0.2] * 4), _seed([0.6] * 4)]
    assert mean_over_seeds(per_seed, "helpfulness") == pytest.approx(0.4)
    assert bootstrap(per_seed, "helpfulness", resamples=4000) == pytest.approx((0.2, 0.6))


def test_paired_difference_follows_the_prompts():
    """An arm 0.1 above its baseline on every prompt differs by exactly 0.1, however noisy the prompts."""
    base = [_seed([0.1, 0.9, 0.3, 0.7]), _seed([0.5, 0.2, 0.8, 0.4])]
    arm = [{k: {"helpfulness": (v["helpfulness"][0] + 0.1, 1.0)} for k, v in s.items()} for s in base]
    low, high = bootstrap(arm, "helpfulness", baseline=base, resamples=500)
    assert low == pytest.approx(0.1) and high == pytest.approx(0.1)
    unpaired_low, unpaired_high = bootstrap(arm, "helpfulness", resamples=500)
    assert unpaired_high - unpaired_low > 0.2


def test_a_metric_nobody_measured_has_no_interval():
    assert bootstrap([_seed([1.0, 0.0])], "safety", resamples=100) is None
    assert mean_over_seeds([_seed([1.0])], "safety") is None
