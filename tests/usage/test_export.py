"""export: a self-contained safetensors folder (LoRA merged) that loads without Lightning or pickle and answers
exactly as the checkpoint does; every checkpoint-taking command takes it."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml
from safetensors import safe_open

from dress_lightning.cli import main
from dress_lightning.export import export_checkpoint
from dress_lightning.inference import load_task
from dress_lightning.pretrained import NotAnExportError, read_export_config
from dress_lightning.session import ChatSession, Decoding, load_model, shapeworld_example

ROOT = Path(__file__).resolve().parents[2]


def test_folder_holds_safetensors_config_tokenizer_tower_and_card(exported):
    files = {str(p.relative_to(exported)) for p in exported.rglob("*") if p.is_file()}
    assert {"config.json", "vision_projector.safetensors", "open_clip/dress-tiny-vit.json", "README.md",
            "language_model/config.json", "language_model/model.safetensors", "language_model/tokenizer.json"} <= files
    assert not [f for f in files if f.endswith((".bin", ".pt", ".ckpt", ".pkl"))]
    config = read_export_config(exported)
    assert config["task"] == "dress_lightning.tasks.crl.CRLTask"
    assert config["source"]["lora_merged"] is True
    with safe_open(exported / "language_model/model.safetensors", "pt") as weights:
        assert not [k for k in weights.keys() if "lora" in k]
    card = (exported / "README.md").read_text()
    for section in ("## Model", "## Training", "## Prompt and condition format", "## Evaluation", "## Use"):
        assert section in card
    assert "LoRA r=4 alpha=8 merged" in card
    assert config["target_condition"] in card


def test_lora_is_merged_into_the_language_model_weights(exported):
    from transformers import AutoModelForCausalLM

    from dress_lightning.models import VisionLanguageConfig, build_vision_language_model

    merged = AutoModelForCausalLM.from_pretrained(exported / "language_model")
    base = build_vision_language_model(VisionLanguageConfig()).language_model  # the seeded init LoRA trained on
    name = "model.layers.0.self_attn.q_proj.weight"
    delta = merged.state_dict()[name] - base.state_dict()[name]
    assert delta.abs().max() > 0, "the adapters' update is missing from the exported weights"


def test_from_pretrained_needs_neither_lightning_nor_unpickling(exported):
    # A fresh interpreter where unpickling fails: the export must load from JSON and safetensors alone.
    code = f"""
import pickle, sys, torch
def refuse(*args, **kwargs):
    raise AssertionError("unpickling while loading an export")
pickle.load = pickle.loads = torch.load = refuse
import dress_lightning
vlm = dress_lightning.from_pretrained({str(exported)!r})
assert not [m for m in sys.modules if m == "lightning" or m.startswith(("lightning.", "pytorch_lightning"))], "Lightning imported"
print(type(vlm.model).__name__, vlm.generation_condition())
"""
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    assert "VisionLanguageModel Feedback: helpfulness 10/10" in result.stdout


def test_language_model_is_a_standard_hugging_face_folder(exported, lora_crl_checkpoint):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    language_model = AutoModelForCausalLM.from_pretrained(exported / "language_model").eval()
    tokenizer = AutoTokenizer.from_pretrained(exported / "language_model")
    assert type(language_model).__name__ == "LlamaForCausalLM"
    assert "<image>" in tokenizer.get_vocab()
    task = load_task(str(lora_crl_checkpoint))  # the peft-wrapped LM of the checkpoint
    input_ids = torch.tensor([tokenizer("USER: How many circles? ASSISTANT:")["input_ids"]])
    with torch.no_grad():
        expected = task.model.language_model(input_ids=input_ids).logits
        actual = language_model(input_ids=input_ids).logits
    torch.testing.assert_close(actual, expected, atol=1e-4, rtol=1e-4)


def test_greedy_answers_of_the_export_equal_the_checkpoints(exported, lora_crl_checkpoint):
    checkpoint, export = load_model(lora_crl_checkpoint), load_model(exported)
    assert export.generation_condition() == checkpoint.generation_condition() is not None
    for index in range(3):
        image, annotations, question = shapeworld_example(index)
        answers = []
        for vlm in (checkpoint, export):
            session = ChatSession(vlm, decoding=Decoding(max_new_tokens=16))
            session.set_image(image, annotations, question)
            answers.append([session.ask(question), session.ask("Look again at the colours.")])
        assert answers[0] == answers[1]
        assert answers[0][0], "an empty first answer would make the comparison vacuous"


def test_evaluate_takes_an_exported_folder(exported, tmp_path):
    overlay = {
        "checkpoint": str(exported),
        "out": str(tmp_path / "report"),
        "sets": [{"name": "shapeworld", "shards": str(tmp_path / "shapeworld"),
                  "shapeworld": {"split": "test", "samples": 4, "seed": 0, "shard_size": 4},
                  "categories": ["describe", "count", "color", "shape", "exists", "position",
                                 "conversation"],
                  "vocabulary": "shapeworld", "refinement_turns": 1}],
        "generation": {"max_new_tokens": 8},
        "batch_size": 4,
        "num_workers": 0,
    }
    config = tmp_path / "eval.yaml"
    config.write_text(yaml.safe_dump(overlay))
    assert main(["evaluate", "-c", str(ROOT / "configs/eval.yaml"), "-c", str(config)]) == 0
    report = json.loads((tmp_path / "report" / "report.json").read_text())
    assert report["provenance"]["checkpoint"] == str(exported)
    assert report["provenance"]["task"] == "dress_lightning.tasks.crl.CRLTask"
    assert report["provenance"]["generation_condition"].startswith("Feedback: helpfulness 10/10")
    assert report["sets"]["shapeworld"]["prompts"] == 4


def test_export_refuses_a_folder_that_is_not_an_export(lora_crl_checkpoint, tmp_path):
    (tmp_path / "notes.txt").write_text("mine")
    with pytest.raises(FileExistsError, match="not an exported model folder"):
        export_checkpoint(lora_crl_checkpoint, tmp_path)
    with pytest.raises(NotAnExportError, match="export --checkpoint"):
        load_model(tmp_path)


def test_export_command_prints_where_and_what_next(lora_crl_checkpoint, tmp_path, capsys):
    assert main(["export", "--checkpoint", str(lora_crl_checkpoint), "--out", str(tmp_path / "model")]) == 0
    out = capsys.readouterr().out
    assert f"to {tmp_path / 'model'}/" in out
    assert f"chat --checkpoint {tmp_path / 'model'}" in out
