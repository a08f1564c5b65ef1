"""What a newcomer reads: progress in steps of the total, an expected warning said once, a summary at the end."""

from __future__ import annotations

from dress_lightning.progress import describe_rollout


def test_fit_shows_steps_says_the_random_tower_once_and_ends_with_what_next(lora_crl_run):
    output = lora_crl_run.stdout + lora_crl_run.stderr
    assert "No pretrained weights loaded" not in output  # open_clip's, once per build: 9 times in the main job
    assert output.count("seeded random weights (vision_pretrained is null)") == 1
    assert "Epoch 0/-2" not in output and "v_num" not in output
    assert "Tip:" not in output and "LeafSpec" not in output  # Lightning's advert and an internal deprecation
    assert "Training" in output and "2/2" in output  # steps done of max_steps
    summary = lora_crl_run.stdout[lora_crl_run.stdout.index("Trained CRLTask for 2 steps"):]
    checkpoint, metrics = lora_crl_run.checkpoint, lora_crl_run.root / "version_0" / "metrics.csv"
    assert f"checkpoint: {checkpoint}" in summary
    assert f"metrics:    {metrics}" in summary
    assert "last train/loss" in summary
    assert f"python -m dress_lightning chat --checkpoint {checkpoint}" in summary
    assert checkpoint.is_file() and metrics.is_file()


def test_rollout_summary_is_a_few_lines_not_a_json_dump():
    summary = {
        "samples": 400, "prompts": 200, "judged_responses_per_turn": {"turn0": 400, "turn1": 310},
        "judge_failures": 0,
        "mean_score_fraction": {"turn0": {"helpfulness": 0.62, "honesty": 0.81, "harmlessness": 0.97},
                                "turn1": {"helpfulness": 0.66, "honesty": 0.83, "harmlessness": 0.98}},
        "shards_dir": "data/shards/nlf/shapeworld",
        "runs": [{"samples_written": 400, "trajectories": 400, "judge_failures": 0, "skipped_prompts": {},
                  "judge": {"name": "annotation", "version": "v3", "calls": 1020, "cache_hits": 0}}],
    }
    text = describe_rollout(summary)
    assert text.splitlines()[0] == (
        "Rolled out 400 trajectories in this run; 400 NLF samples for 200 prompts in data/shards/nlf/shapeworld "
        "(judge annotation: 1020 calls, 0 cached; 0 failures in all)."
    )
    assert "  turn1: helpfulness 66.0%, honesty 83.0%, harmlessness 98.0% (310 responses)" in text
    assert text.splitlines()[-1] == "Next: python -m dress_lightning fit -c configs/crl.yaml"
    assert "{" not in text
