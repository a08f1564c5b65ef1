"""What long commands show: training progress in steps of the total, and the short summary each prints at the end
(what it built and where, the headline numbers, the command to run next)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from lightning.pytorch.callbacks import ModelCheckpoint, RichProgressBar
from lightning.pytorch.loggers import CSVLogger


class StepProgressBar(RichProgressBar):
    """Rich progress of a run that ``trainer.max_steps`` ends: "Training" with steps done of max_steps.

    Lightning's bar counts the batches of the current epoch under ``Epoch E/max_epochs-1``, which reads
    ``Epoch 0/-2`` when max_steps ends the run, and shows the logger's version as ``v_num``.
    """

    def _counts_steps(self) -> bool:
        return self.trainer.max_steps is not None and self.trainer.max_steps > 0

    @property
    def total_train_batches(self) -> int | float:
        return self.trainer.max_steps if self._counts_steps() else super().total_train_batches

    def _get_train_description(self, current_epoch: int) -> str:
        if not self._counts_steps():
            return super()._get_train_description(current_epoch)
        # Padded like Lightning's, so the bar does not jump when the validation bar appears.
        return f"{'Training':{len(self.validation_description)}}"

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx: int) -> None:
        super().on_train_batch_end(trainer, pl_module, outputs, batch, batch_idx)
        if self._counts_steps():
            self._update(self.train_progress_bar_id, trainer.global_step)

    def get_metrics(self, trainer, pl_module) -> dict[str, Any]:
        metrics = super().get_metrics(trainer, pl_module)
        metrics.pop("v_num", None)  # the run's directory says the version; the summary prints it
        return metrics


def describe_fit(trainer, pl_module, seconds: float) -> str:
    """A few lines: the task, steps and time, checkpoint and metrics paths, last losses, next commands."""
    checkpoint = next((c for c in trainer.callbacks if isinstance(c, ModelCheckpoint)), None)
    saved = checkpoint and (checkpoint.last_model_path or checkpoint.best_model_path)
    minutes, secs = divmod(int(seconds), 60)
    lines = [f"Trained {type(pl_module).__name__} for {trainer.global_step} steps in {minutes}m{secs:02d}s."]
    if saved:
        lines.append(f"  checkpoint: {saved}")
    if isinstance(trainer.logger, CSVLogger):
        lines.append(f"  metrics:    {Path(trainer.logger.log_dir) / 'metrics.csv'}")
    losses = {k: float(v) for k, v in trainer.callback_metrics.items() if k.endswith("/loss")}
    if losses:
        lines.append("  last " + ", ".join(f"{k} {v:.3f}" for k, v in sorted(losses.items())))
    next_commands = getattr(pl_module, "next_commands", model_next_commands)
    commands = next_commands(saved) if saved else []
    if commands:
        lines += ["Next:", *(f"  {command}" for command in commands)]
    return "\n".join(lines)


def model_next_commands(checkpoint: str) -> list[str]:
    """What to do with a vision-language checkpoint: evaluate it, talk to it, serve it, export it."""
    run = Path(checkpoint).parent.parent
    return [
        f"python -m dress_lightning evaluate -c configs/eval.yaml --checkpoint {checkpoint} --out runs/eval/{run.name}",
        f"python -m dress_lightning chat --checkpoint {checkpoint} --shapeworld 0 --judge",
        f"python -m dress_lightning demo --checkpoint {checkpoint}",
        f"python -m dress_lightning export --checkpoint {checkpoint} --out {run / 'export'}",
    ]


def describe_rollout(summary: dict[str, Any]) -> str:
    """The end of ``feedback rollout``: samples written, the judge's work, mean scores per turn, what next.

    ``summary`` counts every trajectory on disk (all runs, resumed ones included); ``runs[-1]`` is this run's.
    """
    this_run = summary["runs"][-1]
    judge = this_run["judge"]
    lines = [
        f"Rolled out {this_run['trajectories']} trajectories in this run; {summary['samples']} NLF samples for "
        f"{summary['prompts']} prompts in {summary['shards_dir']} (judge {judge['name']}: {judge.get('calls', 0)} "
        f"calls, {judge.get('cache_hits', 0)} cached; {summary['judge_failures']} failures in all).",
    ]
    for turn, scores in summary["mean_score_fraction"].items():
        judged = summary["judged_responses_per_turn"][turn]
        lines.append(f"  {turn}: " + ", ".join(f"{aspect} {100 * v:.1f}%" for aspect, v in scores.items())
                     + f" ({judged} responses)")
    skipped = this_run.get("skipped_prompts", {})
    if sum(skipped.values()):
        lines.append(f"  skipped prompts: {skipped}")
    lines += ["  details: summary.json next to the shards", "Next: python -m dress_lightning fit -c configs/crl.yaml"]
    return "\n".join(lines)


def describe_evaluation(report: dict[str, Any], out: Path) -> str:
    """The end of ``evaluate``: the headline numbers with their sets, where the report is, what next."""
    checkpoint = report["provenance"]["checkpoint"]
    lines = [f"Evaluated {checkpoint} ({', '.join(report['sets'])}); % of the maximum (CHAIR: lower is better):"]
    lines += [f"  {key:<26} {100 * entry['value']:5.1f}  ({entry['set']})"
              for key, entry in report["summary"].items() if entry["value"] is not None]
    lines += [f"Report: {out / 'report.md'} (report.json, plots, responses.jsonl per set)",
              f"Next: python -m dress_lightning export --checkpoint {checkpoint} --out EXPORT_DIR --report "
              f"{out / 'report.json'}"]
    return "\n".join(lines)
