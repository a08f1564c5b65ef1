"""The feedback-data report on hand-made NLF shards (tests/conftest.py: judged_nlf_shards)."""

from __future__ import annotations

import pytest

from dress_lightning.feedback.diagnostics import feedback_data_report


def test_feedback_data_report_by_hand(judged_nlf_shards):
    """6 prompts: a right answer (10/10), a wrong one (2/10) refined to right, and a third judged only on odd prompts (6/10)."""
    report = feedback_data_report(judged_nlf_shards)
    assert report["trajectories"] == 15 and report["prompts"] == 6
    assert report["samples_per_prompt"] == {2: 3, 3: 3}
    assert report["perfect_share"] == pytest.approx(6 / 15)
    assert report["refinements"] == 6 and report["improved_after_refinement_share"] == 1.0
    assert report["score_histograms"]["helpfulness"] == {**{str(b): 0 for b in range(11)}, "10": 6, "2": 6, "6": 3}
    assert report["score_histograms"]["harmlessness"]["10"] == 15
    assert report["best_of_n"]["helpfulness"] == 1.0
    assert report["sample_mean"]["helpfulness"] == pytest.approx(0.6)  # (1 + 0.2) / 2 and (1 + 0.2 + 0.6) / 3


def test_an_empty_directory_is_an_error(tmp_path):
    with pytest.raises(ValueError, match="no judged trajectories"):
        feedback_data_report(tmp_path)
