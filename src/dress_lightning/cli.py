"""Entry point of ``python -m dress_lightning`` and the ``dress-lightning`` script.

Project subcommands (``data ...``) are dispatched here; each imports its heavy
dependencies lazily so that ``--help`` and data tools start fast.
"""

from __future__ import annotations

import importlib
import logging
import sys
import warnings
from collections.abc import Callable, Sequence

USAGE = """usage: dress-lightning COMMAND [ARGS...]

commands:
  fit, validate, test, predict
            Lightning CLI: `fit -c configs/sft.yaml` (several -c compose; --print_config shows the result)
  data      build, convert and inspect WebDataset shards (shapeworld, convert-*, inspect)
  feedback  NLF data engine: `feedback rollout -c configs/rollout.yaml` (rollouts, judges, refinement)
  evaluate  3H + interaction metrics and a report: `evaluate -c configs/eval.yaml [--checkpoint PATH] [--out DIR]`
  experiment
            the ShapeWorld experiment, every arm x seed, resumable: `experiment --seeds 0 1 2 --split val`
  probe-tower
            does a vision tower see ShapeWorld? caption retrieval and linear probes of colour, shape, position
  export    a self-contained folder (safetensors, LoRA merged, HF language model, model card): `export --checkpoint PATH --out DIR`
  chat      talk to a model about an image, give feedback, switch the condition: `chat --checkpoint PATH --image IMG`
  demo      the same in the browser (Gradio; `pip install -e ".[demo]"`): `demo --checkpoint PATH`

Run `dress-lightning COMMAND --help` for the options of a command."""


def _lazy_command(module: str, function: str = "main") -> Callable[[Sequence[str]], int]:
    """A subcommand whose module loads only when the command runs (and imports torch only past ``--help``)."""

    def run(argv: Sequence[str]) -> int:
        return getattr(importlib.import_module(module), function)(argv)

    return run


def _lightning_main(subcommand: str) -> Callable[[Sequence[str]], int]:
    def run(argv: Sequence[str]) -> int:
        from dress_lightning.lightning_cli import main

        return main([subcommand, *argv])

    return run


COMMANDS: dict[str, Callable[[Sequence[str]], int]] = {
    **{name: _lightning_main(name) for name in ("fit", "validate", "test", "predict")},
    "data": _lazy_command("dress_lightning.commands.data"),
    "feedback": _lazy_command("dress_lightning.commands.rollout"),
    "evaluate": _lazy_command("dress_lightning.commands.evaluate"),
    "experiment": _lazy_command("dress_lightning.experiment"),
    "probe-tower": _lazy_command("dress_lightning.commands.evaluate", "probe_tower_main"),
    "export": _lazy_command("dress_lightning.export"),
    "chat": _lazy_command("dress_lightning.chat"),
    "demo": _lazy_command("dress_lightning.demo"),
}


class _LibraryAdvertFilter(logging.Filter):
    """Drops Lightning's "Tip: ... try installing litlogger" advert, printed by every Trainer of a run."""

    def filter(self, record: logging.LogRecord) -> bool:
        return not record.getMessage().startswith("💡 Tip:")


def quiet_library_notices() -> None:
    """Keep the terminal for what concerns our users: library adverts and internal deprecations go."""
    logging.getLogger("lightning.pytorch.utilities.rank_zero").addFilter(_LibraryAdvertFilter())
    # Raised inside Lightning's own pytree helper on this torch version; nothing a user can change.
    warnings.filterwarnings("ignore", message=r"`isinstance\(treespec, LeafSpec\)` is deprecated")
    # The main job trains what it starts from (SFT) through LightningCLI from inside a LightningCLI run.
    warnings.filterwarnings("ignore", message="LightningCLI's args parameter is intended to run from within Python")


def main(argv: Sequence[str] | None = None) -> int:
    """Dispatch to a project subcommand; returns the process exit code."""
    quiet_library_notices()
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help"):
        print(USAGE)
        return 0
    command, rest = argv[0], argv[1:]
    if command not in COMMANDS:
        print(f"error: unknown command {command!r}; valid commands: {', '.join(COMMANDS)}\n", file=sys.stderr)
        print(USAGE, file=sys.stderr)
        return 2
    from dress_lightning.checkpoints import UnsafeCheckpointError

    try:
        return COMMANDS[command](rest)
    except UnsafeCheckpointError as error:
        # A refused checkpoint is an input problem, not a bug: say what and where, without a traceback.
        print(f"error: {error}", file=sys.stderr)
        return 2
