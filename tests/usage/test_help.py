"""Every new command answers --help without loading a model."""

from __future__ import annotations

import pytest

from dress_lightning.cli import USAGE, main


@pytest.mark.parametrize("command", ["export", "chat", "demo"])
def test_help(command, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main([command, "--help"])
    assert exit_info.value.code == 0
    assert f"usage: dress-lightning {command}" in capsys.readouterr().out
    assert f"  {command} " in USAGE
