"""What a newcomer reads: progress in steps of the total, an expected warning said once, a summary at the end."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

from dress_lightning.progress import describe_rollout

ROOT = Path(__file__).resolve().parents[2]


def test_fit_shows_steps_says_the_random_tower_once_and_ends_with_what_next(tmp_path):
    command = [sys.executable, "-m", "dress_lightning", "fit", "-c", str(ROOT / "configs/sft.yaml"),
               "-c", str(ROOT / "configs/overlays/ci_tiny.yaml"), "--trainer.max_steps", "3",
               "--trainer.limit_val_batches", "0", "--trainer.default_root_dir", str(tmp_path),
               "--trainer.logger.init_args.save_dir", str(tmp_path),
               "--trainer.callbacks.init_args.dirpath", str(tmp_path / "checkpoints"),
               "--data.init_args.train_shards", str(tmp_path / "train"),
               "--data.init_args.val_shards", str(tmp_path / "val")]
    result = subprocess.run(command, capture_output=True, text=True, timeout=600,
                            env={**os.environ, "COLUMNS": "160"})
    assert result.returncode == 0, result.stderr
    output = result.stdout + result.stderr
    assert "No pretrained weights loaded" not in output  # open_clip's, once per build: 9 times in the main job
    assert output.count("seeded random weights (vision_pretrained is null)") == 1
    assert "Epoch 0/-2" not in output and "v_num" not in output
    assert "Training" in output and "3/3" in output  # steps done of max_steps
    summary = result.stdout[result.stdout.index("Trained SFTTask for 3 steps"):]
    assert f"checkpoint: {tmp_path / 'checkpoints' / 'last.ckpt'}" in summary
    assert f"metrics:    {tmp_path / 'version_0' / 'metrics.csv'}" in summary
    assert "last train/loss" in summary
    assert f"python -m dress_lightning chat --checkpoint {tmp_path / 'checkpoints' / 'last.ckpt'}" in summary
    assert (tmp_path / "checkpoints" / "last.ckpt").is_file() and (tmp_path / "version_0" / "metrics.csv").is_file()


def test_rollout_summary_is_a_few_lines_not_a_json_dump():
    summary = {
        "samples": 400, "trajectories": 400, "judged_responses_per_turn": {"turn0": 400, "turn1": 310},
        "judge": {"name": "annotation", "version": "v3", "calls": 1020, "cache_hits": 0},
        "judge_failures": 0,
        "mean_score_fraction": {"turn0": {"helpfulness": 0.62, "honesty": 0.81, "harmlessness": 0.97},
                                "turn1": {"helpfulness": 0.66, "honesty": 0.83, "harmlessness": 0.98}},
        "shards_dir": "data/shards/nlf/shapeworld", "skipped_prompts": {},
    }
    text = describe_rollout(summary)
    assert text.splitlines()[0] == ("Rolled out 400 trajectories: 400 NLF samples in data/shards/nlf/shapeworld "
                                    "(judge annotation: 1020 calls, 0 cached, 0 failures).")
    assert "  turn1: helpfulness 66.0%, honesty 83.0%, harmlessness 98.0% (310 responses)" in text
    assert text.splitlines()[-1] == "Next: python -m dress_lightning fit -c configs/crl.yaml"
    assert "{" not in text
