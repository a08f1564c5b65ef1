"""notebooks/explore.ipynb runs top to bottom on a real report and checkpoint (so it cannot rot)."""

from __future__ import annotations

from pathlib import Path

import nbformat
from nbclient import NotebookClient

ROOT = Path(__file__).resolve().parents[2]


def test_explore_notebook_executes(evaluated, policy_checkpoint, monkeypatch):
    monkeypatch.setenv("DRESS_REPORT_DIR", str(evaluated.out))
    monkeypatch.setenv("DRESS_CHECKPOINT", str(policy_checkpoint))
    monkeypatch.setenv("DRESS_EXAMPLES", "2")
    notebook = nbformat.read(ROOT / "notebooks/explore.ipynb", as_version=4)
    NotebookClient(notebook, timeout=300, kernel_name="python3", resources={"metadata": {"path": str(ROOT)}}).execute()

    outputs = [o for cell in notebook.cells if cell.cell_type == "code" for o in cell.outputs]
    text = "".join(o.get("text", "") for o in outputs if o.output_type == "stream")
    images = [o for o in outputs if "image/png" in o.get("data", {})]
    assert "judge annotation annotation-v1" in text
    assert text.count("Question:") == 2 and "Refinement feedback:" in text and "critique:" in text
    assert len(images) >= 2 + 2  # the two report plots and one image per example
    assert "\nA: " in text  # the checkpoint answered a question of our own
