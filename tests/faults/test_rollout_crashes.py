"""``kill -9`` of a real ``feedback rollout`` at named points, each followed by a rerun: nothing lost, nothing twice.

Every run works on the same output directory, as a user's reruns would. The process kills itself
with SIGKILL where ``DRESS_LIGHTNING_CRASH_AT`` says (``dress_lightning.atomic.crash_point``), so
the point is exact and the test knows the kill happened (return code -9), not a normal exit.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from collections import Counter
from pathlib import Path

import pytest

from dress_lightning.atomic import CRASH_AT_ENV
from dress_lightning.cli import main
from dress_lightning.data.shards import iter_samples
from dress_lightning.data.skips import SkipLog

ROOT = Path(__file__).resolve().parents[2]
PROMPTS = 8
NUM_SAMPLES = 2
BATCH = 2  # prompts per batch; shard_size 4 = one batch's trajectories: every batch closes a shard

# (crash point, run limited to this many prompts or None): in this order, on one output directory.
RUNS = [
    ("rollout.generated@2", None),            # mid-generation of the 2nd batch: the 1st batch's shard is kept
    ("rollout.judging@3", None),              # mid-judging of the 1st batch: nothing of it is kept
    (None, 4),                                # a clean run of part of the job: writes a summary
    ("rollout.refinement_answered@2", None),  # after the refinement answers of the 2nd batch, before judging them
    ("rollout.shard_write@3", None),          # mid-shard write: a .partial shard is left behind
    ("rollout.shard_closed@1", None),         # shard closed but not yet renamed into place
    ("rollout.before_summary", None),         # every shard written, the summary not
    (None, None),                             # the rerun that finishes the job
]


def _rollout(checkpoint: Path, tmp_path: Path, crash_at: str | None, samples: int | None) -> subprocess.CompletedProcess:
    args = ["feedback", "rollout", "-c", str(ROOT / "configs/rollout.yaml"), "--checkpoint", str(checkpoint),
            "--prompts", str(tmp_path / "prompts"),
            "--prompts_shapeworld.samples", str(PROMPTS), "--prompts_shapeworld.shard_size", "4",
            "--out", str(tmp_path / "nlf"), "--samples", str(samples or PROMPTS), "--batch_size", str(BATCH),
            "--num_workers", "0", "--shard_size", str(BATCH * NUM_SAMPLES), "--refinement_turns", "1",
            "--generation.max_new_tokens", "8", "--generation.num_samples", str(NUM_SAMPLES)]
    env = {k: v for k, v in os.environ.items() if k != CRASH_AT_ENV}
    if crash_at:
        env[CRASH_AT_ENV] = crash_at
    return subprocess.run([sys.executable, "-m", "dress_lightning", *args], capture_output=True, text=True,
                          timeout=300, cwd=tmp_path, env=env)


def _on_disk(out: Path) -> tuple[list, SkipLog]:
    skips = SkipLog()
    return list(iter_samples(sorted(str(p) for p in out.glob("*.tar")), skips)), skips


def test_rollout_survives_kill_9_at_every_point(policy_checkpoint, tmp_path):
    out = tmp_path / "nlf"
    kills = 0
    for crash_at, samples in RUNS:
        result = _rollout(policy_checkpoint, tmp_path, crash_at, samples)
        if crash_at:
            assert result.returncode == -signal.SIGKILL, f"{crash_at} was not reached:\n{result.stderr[-3000:]}"
            kills += 1
        else:
            assert result.returncode == 0, result.stderr[-3000:]
        # After every run, killed or not: every shard reads whole, no trajectory twice, no prompt half-written.
        written, skips = _on_disk(out)
        assert skips.counts() == {}, (crash_at, skips.records)
        ids = Counter(s.record["id"] for s in written)
        assert all(n == 1 for n in ids.values()), (crash_at, ids)
        per_prompt = Counter(s.record["provenance"]["prompt_id"] for s in written)
        assert set(per_prompt.values()) <= {NUM_SAMPLES}, (crash_at, per_prompt)

    assert kills == 6
    written, _ = _on_disk(out)
    assert len(written) == PROMPTS * NUM_SAMPLES
    prompts, _ = _on_disk(tmp_path / "prompts")
    assert {(s.record["provenance"]["prompt_id"], s.record["provenance"]["sample_index"]) for s in written} == {
        (p.record["id"], k) for p in prompts for k in range(NUM_SAMPLES)}
    assert not list(out.glob("*.partial"))  # the last run cleared what the killed ones left
    summary = json.loads((out / "summary.json").read_text())
    assert summary["samples"] == PROMPTS * NUM_SAMPLES and summary["prompts"] == PROMPTS
    # Two runs finished (the partial one and the last); the killed runs' trajectories are counted from disk.
    assert len(summary["runs"]) == 2 and summary["runs"][0]["samples_written"] == 2 * NUM_SAMPLES



def test_a_mistyped_checkpoint_is_an_error_not_a_training_run(tmp_path):
    """Only the stage graph's own outputs are built when missing; nothing is trained or replaced for a typo."""
    args = ["feedback", "rollout", "-c", str(ROOT / "configs/rollout.yaml"),
            "--checkpoint", str(tmp_path / "runs/sft/checkpoints/lsat.ckpt"), "--out", str(tmp_path / "nlf")]
    with pytest.raises(FileNotFoundError, match="lsat.ckpt.*does not exist, and no stage of the default graph"):
        main(args)
    assert not (tmp_path / "runs").exists() and not (ROOT / "runs/sft/checkpoints/lsat.ckpt").exists()
