import subprocess
import sys
from pathlib import Path

from dress_lightning.cli import main


def _run(*cmd: str) -> subprocess.CompletedProcess:
    return subprocess.run(cmd, capture_output=True, text=True, timeout=120)


def test_console_script_behaves_like_python_m():
    script = Path(sys.executable).parent / "dress-lightning"
    for args in (["--help"], ["no-such-command"]):
        via_module = _run(sys.executable, "-m", "dress_lightning", *args)
        via_script = _run(str(script), *args)
        assert (via_script.returncode, via_script.stdout, via_script.stderr) == (
            via_module.returncode, via_module.stdout, via_module.stderr)
    assert via_module.returncode == 2 and "unknown command 'no-such-command'" in via_module.stderr


def test_help_lists_commands(capsys):
    assert main(["--help"]) == 0
    assert "data" in capsys.readouterr().out
