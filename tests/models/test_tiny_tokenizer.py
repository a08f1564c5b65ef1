import json
import runpy
from pathlib import Path

from dress_lightning.models.language import BUILTIN_TOKENIZER
from dress_lightning.special_tokens import IMAGE_TOKEN, PAD_TOKEN

SCRIPT = Path(__file__).resolve().parents[2] / "scripts" / "build_tiny_tokenizer.py"


def test_shipped_tokenizer_is_reproduced_by_its_script(tmp_path):
    build = runpy.run_path(str(SCRIPT))
    build["train_tokenizer"](build["corpus"]()).save_pretrained(tmp_path)
    rebuilt = json.loads((tmp_path / "tokenizer.json").read_text())
    shipped = json.loads((BUILTIN_TOKENIZER / "tokenizer.json").read_text())
    assert rebuilt["model"]["vocab"] == shipped["model"]["vocab"]
    assert rebuilt["model"]["merges"] == shipped["model"]["merges"]


def test_tiny_tokenizer_has_the_project_tokens_and_a_chat_template(tiny_tokenizer):
    for token in (IMAGE_TOKEN, PAD_TOKEN, "<|im_start|>", "<|im_end|>"):
        assert len(tiny_tokenizer(token, add_special_tokens=False).input_ids) == 1, token
    assert tiny_tokenizer.chat_template
    # Byte-level: any text round-trips, including words the corpus never had.
    text = "Zebra crossing ünïcode 123!"
    assert tiny_tokenizer.decode(tiny_tokenizer(text).input_ids) == text
