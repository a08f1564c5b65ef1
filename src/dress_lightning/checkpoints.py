"""Reading checkpoints without executing anything they contain.

A ``.ckpt`` is a pickle, and unpickling runs whatever callable the file names. Every checkpoint
this project reads goes through ``load_checkpoint``: ``torch.load(weights_only=True)`` admits only
tensors and plain containers of numbers and strings (the LightningCLI stores hyperparameters as
plain data, so our own checkpoints need nothing more), and anything else is refused before it runs.
The task class a checkpoint names is looked up among the project's own (``inference.task_classes``),
never imported from its path. Imports torch lazily: the CLI imports this module to report refusals.
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
