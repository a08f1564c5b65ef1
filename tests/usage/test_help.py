"""Every command answers --help fast: without loading a model, and without importing torch."""

from __future__ import annotations

import subprocess
import sys

import pytest

from dress_lightning.cli import COMMANDS, USAGE, main

LIGHTNING_COMMANDS = ("fit", "validate", "test", "predict")
"""Their --help is LightningCLI's, generated from the Trainer and the task classes: it needs torch."""

PROJECT_COMMANDS = [name for name in COMMANDS if name not in LIGHTNING_COMMANDS]


@pytest.mark.parametrize("command", ["export", "chat", "demo"])
def test_help(command, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main([command, "--help"])
    assert exit_info.value.code == 0
    assert f"usage: dress-lightning {command}" in capsys.readouterr().out
    assert f"  {command} " in USAGE


@pytest.mark.parametrize("argv", [[], *([c] for c in PROJECT_COMMANDS), ["feedback", "rollout"]],
                         ids=lambda argv: " ".join(argv) or "top-level")
def test_help_does_not_import_torch(argv):
    """In a fresh interpreter, `dress-lightning ... --help` prints usage and leaves torch unimported."""
    probe = (
        "import sys\n"
        "from dress_lightning.cli import main\n"
        f"try:\n    code = main({[*argv, '--help']!r})\n"
        "except SystemExit as exit_:\n    code = exit_.code or 0\n"
        "heavy = sorted(m for m in ('torch', 'lightning', 'open_clip', 'webdataset') if m in sys.modules)\n"
        "print('HEAVY', heavy, 'CODE', code)\n"
    )
    result = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, timeout=120)
    assert "usage" in result.stdout.lower(), result.stderr
    assert "HEAVY [] CODE 0" in result.stdout, result.stdout[-500:]
