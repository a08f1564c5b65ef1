"""Reading checkpoints without executing anything they contain.

A ``.ckpt`` is a pickle, and unpickling runs whatever callable the file names. Every checkpoint
this project reads goes through ``load_checkpoint``: ``torch.load(weights_only=True)`` admits only
tensors and plain containers of numbers and strings (the LightningCLI stores hyperparameters as
plain data, so our own checkpoints need nothing more), and anything else is refused before it runs.
The task class a checkpoint names is looked up in ``task_classes()``, never imported from its path.
Imports torch lazily: the CLI imports this module to report refusals.
"""

from __future__ import annotations

import pickle
from pathlib import Path
from typing import Any


class UnsafeCheckpointError(ValueError):
    """A checkpoint that holds something other than tensors and plain data, or names an unknown task."""


def load_checkpoint(path: str | Path, *, role: str = "checkpoint") -> dict[str, Any]:
    """The checkpoint at ``path`` as a dict, loaded with ``weights_only=True`` on the CPU.

    ``role`` names the setting the path came from (``model.init_args.init_checkpoint``), so that an
    error says where to fix it.
    """
    import torch

    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{role} {str(path)!r} does not exist.")
    try:
        checkpoint = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as error:
        raise UnsafeCheckpointError(
            f"Refused to load {role} {str(path)!r}: it holds objects other than tensors and plain data "
            f"({_refused_part(error)}). Loading it would run code it names; only checkpoints written by this "
            "project (LightningCLI fit) or other tensor-only files are accepted."
        ) from None
    if not isinstance(checkpoint, dict):
        raise UnsafeCheckpointError(
            f"{role} {str(path)!r} holds a {type(checkpoint).__name__}, not a checkpoint dict with a state_dict."
        )
    return checkpoint


def _refused_part(error: pickle.UnpicklingError) -> str:
    """The line of torch's message that names what was refused (the rest advises weights_only=False)."""
    lines = [line.strip() for line in str(error).splitlines() if line.strip()]
    return next((line.rstrip(".") for line in lines if "GLOBAL" in line or "Unsupported" in line),
                lines[-1] if lines else type(error).__name__)


def task_classes() -> dict[str, type]:
    """The task classes a checkpoint may name, by every class path LightningCLI may have recorded."""
    from dress_lightning import tasks

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
