"""The evaluate command end to end: a tiny trained checkpoint, ShapeWorld and COCO-style sets, the report."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from dress_lightning.cli import main
from dress_lightning.data.shards import expand_shard_urls, iter_samples
from dress_lightning.data.skips import SkipLog
from dress_lightning.evaluation.module import CANDIDATE_GROUPS, candidate_group
from dress_lightning.feedback.annotation_judge import answers_correctly
from dress_lightning.feedback.synonyms import COCO, object_mentions

ROOT = Path(__file__).resolve().parents[2]


def _responses(out: Path, name: str) -> list[dict]:
    return [json.loads(line) for line in (out / name / "responses.jsonl").read_text().splitlines()]


def _approx(values: dict | list | float | None):
    """pytest.approx of each float of a metric group (or of a single metric); None (no data) must stay None."""
    if isinstance(values, dict):
        return {k: None if v is None else pytest.approx(v) for k, v in values.items()}
    if isinstance(values, list):
        return [None if v is None else pytest.approx(v) for v in values]
    return None if values is None else pytest.approx(values)


def _mean(values: list[float]) -> float:
    return sum(values) / len(values)


def test_report_files_and_provenance(evaluated, policy_checkpoint):
    out, report = evaluated.out, evaluated.report
    assert report["format"] == "dress-eval-report-v1"
    source = report["provenance"]
    assert source["checkpoint"] == str(policy_checkpoint) and source["judge"]["version"] == "annotation-v1"
    assert source["generation"]["do_sample"] is False
    markdown = (out / "report.md").read_text()
    assert "annotation-v1" in markdown and "## shapeworld" in markdown and "## coco" in markdown
    for plot in ("aspects.png", "refinement.png"):
        assert (out / plot).read_bytes().startswith(b"\x89PNG")
        assert f"]({plot})" in markdown
    assert report["sets"]["shapeworld"]["prompts"] == evaluated.shapeworld_prompts == len(_responses(out, "shapeworld"))
    assert report["sets"]["coco"]["prompts"] == 4 and report["sets"]["coco"]["generation"]["max_new_tokens"] == 10


def test_metrics_match_the_responses(evaluated):
    """Recompute the axes from responses.jsonl by hand: the metric wiring must agree with it."""
    out, report = evaluated.out, evaluated.report
    responses = _responses(out, "shapeworld")
    metrics = report["sets"]["shapeworld"]["metrics"]
    benign = [r for r in responses if not r["harmful_intent"]]
    harmful = [r for r in responses if r["harmful_intent"]]
    assert benign and harmful  # 12 test prompts hold both kinds
    assert metrics["helpfulness"]["overall"] == pytest.approx(
        _mean([r["feedback"][0]["scores"]["helpfulness"] for r in benign]) / 10)
    assert metrics["harmlessness_score"]["overall"] == pytest.approx(
        _mean([r["feedback"][0]["scores"]["harmlessness"] for r in harmful]) / 10)
    assert metrics["safety"]["safety"] == pytest.approx(_mean([r["safety_verdict"]["safe"] for r in harmful]))
    # Interaction: trajectories the judge refined, and how many of them improved at once.
    refined = [r for r in responses if len(r["feedback"]) > 1]
    improved = [r for r in refined if _mean(list(r["feedback"][1]["scores"].values()))
                > _mean(list(r["feedback"][0]["scores"].values()))]
    assert refined  # a 2-step policy answers badly: the judge asks for refinements
    assert metrics["interaction"]["improved_after_refinement"] == pytest.approx(len(improved) / len(refined))
    assert len(metrics["score_by_turn"]) == 3

    coco = _responses(out, "coco")
    chair = report["sets"]["coco"]["metrics"]["chair"]
    captions = [r["conversation"][1]["content"] for r in coco if not r["harmful_intent"]]
    mentions = [object_mentions(c, COCO) for c in captions]
    hallucinated = [[m for m in ms if m not in {"person", "bicycle"}] for ms in mentions]
    if sum(map(len, mentions)):
        assert chair["chair_i"] == pytest.approx(sum(map(len, hallucinated)) / sum(map(len, mentions)))
    else:
        assert chair["chair_i"] is None
    assert chair["chair_s"] == pytest.approx(sum(bool(h) for h in hallucinated) / len(captions))
    assert report["sets"]["coco"]["metrics"]["interaction"]["improved_after_refinement"] is None  # K = 0

    vlsafe = report["sets"]["vlsafe"]["metrics"]  # harmful prompts only: no helpfulness, no CHAIR
    assert vlsafe["helpfulness"] == {"overall": None} and vlsafe["chair"] == {"chair_i": None, "chair_s": None}
    verdicts = [r["safety_verdict"] for r in _responses(out, "vlsafe")]
    assert vlsafe["safety"]["relevance"] == pytest.approx(_mean([v["relevant"] for v in verdicts]))


def test_summary_takes_each_headline_from_the_first_set_measuring_it(evaluated):
    report = evaluated.report
    summary = report["summary"]
    assert summary["helpfulness"]["set"] == "shapeworld"
    assert summary["safety"]["value"] == report["sets"]["shapeworld"]["metrics"]["safety"]["safety"]
    assert summary["improved_after_refinement"]["set"] == "shapeworld"


def test_condition_override_reaches_prompts_and_report(evaluated, tmp_path):
    condition = "Feedback: helpfulness 2/10, honesty 2/10, harmlessness 10/10."
    args = ["evaluate", "-c", str(ROOT / "configs/eval.yaml"), "-c", str(evaluated.config), "--out", str(tmp_path),
            "--condition", condition]
    assert main(args) == 0
    report = json.loads((tmp_path / "report.json").read_text())
    assert report["provenance"]["generation_condition"] == condition
    assert f"`{condition}`" in (tmp_path / "report.md").read_text()


def test_missing_checkpoint_is_a_clear_error(tmp_path):
    with pytest.raises(FileNotFoundError, match="fit -c configs/crl.yaml"):
        main(["evaluate", "-c", str(ROOT / "configs/eval.yaml"), "--checkpoint", str(tmp_path / "none.ckpt")])


def test_ckpt_is_a_deprecated_alias_of_checkpoint(tmp_path):
    """The old option name still selects the checkpoint, with a warning that names the new one."""
    with pytest.warns(FutureWarning, match="use --checkpoint"), pytest.raises(FileNotFoundError, match="old.ckpt"):
        main(["evaluate", "-c", str(ROOT / "configs/eval.yaml"), "--ckpt", str(tmp_path / "old.ckpt")])


@pytest.mark.slow
def test_two_ranks_give_the_single_process_report(evaluated, tmp_path):
    """DDP over 2 CPU processes: each rank answers half the shards, the synced metrics equal one process's."""
    single, out = evaluated.report, tmp_path / "ddp"
    result = subprocess.run(
        [sys.executable, "-m", "dress_lightning", "evaluate", "-c", str(ROOT / "configs/eval.yaml"), "-c", str(evaluated.config),
         "--out", str(out), "--trainer.devices", "2", "--trainer.strategy", "ddp"],
        capture_output=True, text=True, timeout=600, cwd=tmp_path, check=False,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    report = json.loads((out / "report.json").read_text())
    for name in ("shapeworld", "coco", "vlsafe"):
        assert report["sets"][name]["world_size"] == 2
        assert report["sets"][name]["prompts"] == single["sets"][name]["prompts"]
        for group, values in single["sets"][name]["metrics"].items():
            assert report["sets"][name]["metrics"][group] == _approx(values), (name, group)
    ranks = [json.loads(line)["id"] for r in (0, 1)
             for line in (out / "shapeworld" / f"responses-rank{r}.jsonl").read_text().splitlines()]
    assert sorted(ranks) == sorted(r["id"] for r in _responses(evaluated.out, "shapeworld"))


def test_guided_decoding_runs_through_first_answers_and_refinements(evaluated, tmp_path):
    """Classifier-free guidance against a negative condition, in the batched evaluate loop (K = 2 refinements)."""
    negative = "Feedback: helpfulness 1/10, honesty 1/10, harmlessness 1/10."
    args = ["evaluate", "-c", str(ROOT / "configs/eval.yaml"), "-c", str(evaluated.config), "--out", str(tmp_path),
            "--generation.guidance_scale", "3.0", "--generation.negative_condition", negative]
    assert main(args) == 0
    report = json.loads((tmp_path / "report.json").read_text())
    assert report["provenance"]["generation"]["guidance_scale"] == 3.0
    # Every prompt was answered, refinement turns included (the mix itself is checked in tests/models/test_vlm.py).
    guided = [r["conversation"] for r in _responses(tmp_path, "shapeworld")]
    assert len(guided) == evaluated.shapeworld_prompts and any(len(c) > 2 for c in guided)


def test_placed_questions_are_grouped_by_their_candidates(evaluated):
    """accuracy_by_candidates recomputed by hand from the shards' annotations and responses.jsonl."""
    shards = evaluated.out.parent / "shapeworld"
    records = {s.record["id"]: s.record for s in iter_samples(expand_shard_urls([str(shards)]), SkipLog())}
    tallies: dict[str, list[bool]] = {}
    guesses: dict[str, list[float]] = {}
    for response in _responses(evaluated.out, "shapeworld"):
        annotations = records[response["id"]]["annotations"]
        query = annotations["queries"][0]
        if query["type"] in ("color", "shape"):
            verdict = answers_correctly(annotations, response["conversation"][:1], response["conversation"][1]["content"])
            group, guess = candidate_group(query, annotations["objects"])
            tallies.setdefault(f"{query['type']}: {group}", []).append(verdict)
            guesses.setdefault(f"{query['type']}: {group}", []).append(guess)
    assert tallies  # the test prompts hold placed questions
    metrics = evaluated.report["sets"]["shapeworld"]["metrics"]
    for name, values in (("accuracy_by_candidates", tallies), ("guess_by_candidates", guesses)):
        assert metrics[name] == _approx({g: _mean(values[g]) if g in values else None for g in CANDIDATE_GROUPS})
    markdown = (evaluated.out / "report.md").read_text()
    assert "a guess among the candidates |" in markdown and all(f"| {group} |" in markdown for group in tallies)
