"""Loading trained tasks for generation (rollouts, evaluation, notebooks)."""

from __future__ import annotations

import warnings
from pathlib import Path

from dress_lightning.checkpoints import load_checkpoint, task_class_of
from dress_lightning.tasks.base import VisionLanguageTask


def load_task(checkpoint: str, map_location: str = "cpu") -> VisionLanguageTask:
    """Rebuild the task a LightningCLI checkpoint came from (its class, config and trained weights), in eval mode.

    Checkpoints hold only what trained; the rest is rebuilt from the saved config (and the
    task's ``init_checkpoint``, which must still exist), so missing frozen keys are expected. A folder
    written by ``dress-lightning export`` is loaded from its safetensors instead. A checkpoint file is read
    with ``weights_only=True`` and its task class must be one of the project's
    (``dress_lightning.checkpoints``): a crafted checkpoint is refused before anything in it runs.
    """
    if Path(checkpoint).is_dir():
        from dress_lightning.export import load_exported_task

        return load_exported_task(checkpoint).to(map_location)
    task_class = task_class_of(load_checkpoint(checkpoint), checkpoint)
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="Found keys that are in the model state dict but not in the checkpoint")
        task = task_class.load_from_checkpoint(checkpoint, map_location=map_location, weights_only=True)
    return task.eval()
