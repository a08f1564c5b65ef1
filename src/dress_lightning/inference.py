"""Loading trained tasks for generation (rollouts, evaluation, notebooks): from a checkpoint or an exported folder.

A checkpoint names the task class it was trained with; only the project's own task classes
(``task_classes``) are accepted, so a crafted checkpoint cannot choose which code is imported.
"""

from __future__ import annotations

import importlib
import warnings
from pathlib import Path
from typing import Any

from dress_lightning import tasks
from dress_lightning.checkpoints import UnsafeCheckpointError, load_checkpoint
from dress_lightning.conditions import ConditionSettings
from dress_lightning.pretrained import CONFIG_FILE, exported_model_config, load_exported_model, read_export_config
from dress_lightning.tasks import GenerationSettings, VisionLanguageTask
from dress_lightning.tasks.base import FROZEN_FROM_INIT_KEY


def load_task(checkpoint: str, map_location: str = "cpu") -> VisionLanguageTask:
    """Rebuild the task a LightningCLI checkpoint came from (its class, config and trained weights), in eval mode.

    Checkpoints hold only what trained; the rest is rebuilt from the saved config (and the task's
    ``init_checkpoint``, needed only where frozen weights came from it), so missing frozen keys are expected. A folder
    written by ``dress-lightning export`` is loaded from its safetensors instead. A checkpoint file is read
    with ``weights_only=True`` and its task class must be one of the project's (``task_classes``): a crafted
    checkpoint is refused before anything in it runs.
    """
    if Path(checkpoint).is_dir():
        return load_exported_task(checkpoint).to(map_location)
    contents = load_checkpoint(checkpoint)
    task_class = task_class_of(contents, checkpoint)
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="Found keys that are in the model state dict but not in the checkpoint")
        task = task_class.load_from_checkpoint(checkpoint, map_location=map_location, weights_only=True,
                                               **_without_a_gone_init_checkpoint(contents, checkpoint))
    return task.eval()


def _without_a_gone_init_checkpoint(contents: dict[str, Any], path: str | Path) -> dict[str, Any]:
    """``init_checkpoint=None`` when the checkpoint's init checkpoint is gone and nothing frozen came from it.

    A checkpoint holds what trained; its frozen weights come from the config, and from its init checkpoint
    only where that provided frozen tensors (``FROZEN_FROM_INIT_KEY`` lists them). Then the init checkpoint
    must still be there; otherwise a checkpoint moved to another directory or machine loads on its own.
    """
    init = contents.get("hyper_parameters", {}).get("init_checkpoint")
    if init is None or Path(init).exists():
        return {}
    frozen = contents.get(FROZEN_FROM_INIT_KEY)
    if frozen == []:
        return {"init_checkpoint": None}
    which = "an unrecorded number of" if frozen is None else f"{len(frozen)}"
    raise FileNotFoundError(
        f"{str(path)!r} was trained from init_checkpoint {init!r}, which does not exist (relative paths are read "
        f"from the current directory), and {which} frozen tensor(s) of the model come from it, not from this "
        "checkpoint. Run from the directory it was trained in, put the init checkpoint back at that path, or "
        "`export` the model where both exist (an export holds every weight)."
    )


def load_exported_task(path: str | Path):
    """An exported folder as the Lightning task it came from (for ``evaluate`` and ``feedback rollout``)."""
    config = read_export_config(path)
    module_name, _, class_name = config["task"].rpartition(".")
    task_class = getattr(importlib.import_module(module_name), class_name, None)
    if not (isinstance(task_class, type) and issubclass(task_class, VisionLanguageTask)):
        raise ValueError(f"{Path(path) / CONFIG_FILE}: task {config['task']!r} is not a dress_lightning task class.")
    kwargs: dict[str, Any] = {"model": exported_model_config(path, config),
                              "generation": GenerationSettings(**config["generation"])}
    if config["condition"] is not None:
        kwargs["condition"] = ConditionSettings(**config["condition"])
    task = task_class(**kwargs)
    task.model, task.tokenizer = load_exported_model(path, config)  # configure_model() keeps a built model
    return task.eval()


def task_classes() -> dict[str, type]:
    """The task classes a checkpoint may name, by every class path LightningCLI may have recorded."""
    classes = [getattr(tasks, name) for name in tasks.__all__ if name.endswith("Task")]
    return {
        **{f"{cls.__module__}.{cls.__qualname__}": cls for cls in classes},
        **{f"{tasks.__name__}.{cls.__name__}": cls for cls in classes},
    }


def task_class_of(checkpoint: dict[str, Any], path: str | Path) -> type:
    """The task class ``checkpoint`` (read from ``path``) was trained with; refuse one outside ``task_classes``."""
    known = task_classes()
    class_path = checkpoint.get("hyper_parameters", {}).get("_class_path", "dress_lightning.tasks.VisionLanguageTask")
    if class_path not in known:
        raise UnsafeCheckpointError(
            f"Refused to load {str(path)!r}: it names the task class {class_path!r}, which is not one of this "
            f"project's tasks ({', '.join(sorted({c.__name__ for c in known.values()}))}); a checkpoint does not "
            "choose which code is imported."
        )
    return known[class_path]
