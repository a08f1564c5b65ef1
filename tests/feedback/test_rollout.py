"""The NLF data engine end to end: a tiny policy, ShapeWorld prompts, the annotation judge, K = 2."""

import json
import subprocess
import sys
from pathlib import Path

from dress_lightning.aspects import ASPECTS
from dress_lightning.cli import main
from dress_lightning.data.datamodule import ShardDataModule
from dress_lightning.data.shards import expand_shard_urls, iter_samples
from dress_lightning.data.skips import SkipLog

ROOT = Path(__file__).resolve().parents[2]
PROMPTS = 4
NUM_SAMPLES = 2


def _rollout(checkpoint, tmp_path, *extra):
    args = ["feedback", "rollout", "-c", str(ROOT / "configs/rollout.yaml"), "--checkpoint", str(checkpoint),
            "--prompts", str(tmp_path / "prompts"),
            "--prompts_shapeworld.samples", "8", "--prompts_shapeworld.shard_size", "4",
            "--out", str(tmp_path / "nlf"), "--samples", str(PROMPTS), "--batch_size", "2", "--num_workers", "0",
            "--generation.max_new_tokens", "12", "--generation.num_samples", str(NUM_SAMPLES), *extra]
    assert main(args) == 0
    return json.loads((tmp_path / "nlf" / "summary.json").read_text())


def test_rollout_writes_refinement_trajectories_with_feedback(policy_checkpoint, tmp_path):
    summary = _rollout(policy_checkpoint, tmp_path)
    assert summary["samples"] == PROMPTS * NUM_SAMPLES
    judge = summary["runs"][-1]["judge"]
    assert judge["name"] and summary["judge_failures"] == 0
    assert set(summary["mean_score_fraction"]["turn0"]) == set(ASPECTS)

    samples = list(iter_samples(expand_shard_urls([str(tmp_path / "nlf")]), SkipLog()))
    assert len(samples) == PROMPTS * NUM_SAMPLES
    for sample in samples:
        record = sample.record
        turns = record["conversation"]
        assistant_turns = [t for t in turns if t["role"] == "assistant"]
        assert len(record["feedback"]) == len(assistant_turns) <= 1 + 2  # K = 2 refinement turns at most
        assert record["source"] == "rollout"
        for k, feedback in enumerate(record["feedback"]):
            assert set(feedback["scores"]) == set(ASPECTS)
            assert feedback["judge"] == {"name": judge["name"], "version": judge["version"]}
            if k + 1 < len(assistant_turns):
                # The refinement NLF became the next user turn.
                assert turns[2 * k + 2] == {"role": "user", "content": feedback["refinement"]}
        provenance = record["provenance"]
        assert provenance["checkpoint"] == str(policy_checkpoint)
        assert provenance["generation"]["num_samples"] == NUM_SAMPLES and provenance["seed"] == 0
    assert any(len(s.record["feedback"]) > 1 for s in samples), "a barely trained policy must get refinements"

    # Readable by `data inspect` and by the DataModule.
    inspect = subprocess.run([sys.executable, "-m", "dress_lightning", "data", "inspect", str(tmp_path / "nlf"),
                              "--json"], capture_output=True, text=True, timeout=120)
    report = json.loads(inspect.stdout)
    assert report["samples"] == PROMPTS * NUM_SAMPLES and report["feedback_turns"] >= PROMPTS * NUM_SAMPLES
    dm = ShardDataModule(val_shards=str(tmp_path / "nlf"), batch_size=4, num_workers=0)
    assert sum(len(b["ids"]) for b in dm.val_dataloader()) == PROMPTS * NUM_SAMPLES


def test_rerun_resumes_without_repeating_prompts(policy_checkpoint, tmp_path):
    first = _rollout(policy_checkpoint, tmp_path, "--samples", "2")
    assert first["samples"] == 2 * NUM_SAMPLES
    resumed = _rollout(policy_checkpoint, tmp_path)  # --samples 4: only the 2 missing prompts
    this_run = resumed["runs"][-1]
    assert this_run["samples_written"] == 2 * NUM_SAMPLES and this_run["skipped_prompts"]["already done"] == 2
    # The summary counts every run's trajectories, read from the shards.
    assert resumed["samples"] == PROMPTS * NUM_SAMPLES and resumed["prompts"] == PROMPTS
    assert [run["samples_written"] for run in resumed["runs"]] == [2 * NUM_SAMPLES, 2 * NUM_SAMPLES]
    samples = list(iter_samples(expand_shard_urls([str(tmp_path / "nlf")]), SkipLog()))
    prompts = [s.record["provenance"]["prompt_id"] for s in samples]
    assert len(set(prompts)) == PROMPTS and len(prompts) == PROMPTS * NUM_SAMPLES
    again = _rollout(policy_checkpoint, tmp_path)
    assert again["runs"][-1]["samples_written"] == 0 and again["samples"] == PROMPTS * NUM_SAMPLES  # nothing left


def test_two_ranks_write_their_own_shards(policy_checkpoint, tmp_path):
    args = ["feedback", "rollout", "-c", str(ROOT / "configs/rollout.yaml"), "--checkpoint", str(policy_checkpoint),
            "--prompts", str(tmp_path / "prompts"),
            "--prompts_shapeworld.samples", "8", "--prompts_shapeworld.shard_size", "4",
            "--out", str(tmp_path / "nlf"), "--samples", str(PROMPTS), "--batch_size", "2", "--num_workers", "0",
            "--generation.max_new_tokens", "8", "--generation.num_samples", "1", "--refinement_turns", "1",
            "--trainer.devices", "2", "--trainer.strategy", "ddp"]
    result = subprocess.run([sys.executable, "-m", "dress_lightning", *args], capture_output=True, text=True,
                            timeout=600, cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    prompts_by_rank = []
    for rank in range(2):
        shards = sorted(str(p) for p in (tmp_path / "nlf").glob(f"rollout-rank{rank}-*.tar"))
        prompts_by_rank.append({s.record["provenance"]["prompt_id"] for s in iter_samples(shards, SkipLog())})
        assert json.loads((tmp_path / "nlf" / f"summary-rank{rank}.json").read_text())["samples"] == 2
    assert all(prompts_by_rank) and not prompts_by_rank[0] & prompts_by_rank[1]


def test_trajectories_outgrowing_max_length_end_at_their_last_answer(policy_checkpoint, tmp_path):
    """A refinement prompt longer than max_length ends the trajectory (counted) instead of failing the rollout."""
    summary = _rollout(policy_checkpoint, tmp_path, "--max_length", "73")  # first prompts: 50-54 tokens (9 image)
    samples = list(iter_samples(expand_shard_urls([str(tmp_path / "nlf")]), SkipLog()))
    assert len(samples) == PROMPTS * NUM_SAMPLES
    ended = summary["runs"][-1]["ended_at_max_length"]
    assert ended > 0
    # An ended trajectory stops at a judged answer whose feedback offers no next turn, as a perfect one does.
    last_without_refinement = [s for s in samples if s.record["feedback"][-1].get("refinement") is None]
    assert len(last_without_refinement) == len(samples)
    with_refinement_turns = sum(len(s.record["feedback"]) > 1 for s in samples)
    unlimited = _rollout(policy_checkpoint, tmp_path / "unlimited")
    assert with_refinement_turns < sum(len(s.record["feedback"]) > 1 for s in iter_samples(
        expand_shard_urls([str(tmp_path / "unlimited" / "nlf")]), SkipLog()))
    assert unlimited["runs"][-1]["ended_at_max_length"] == 0
