"""Fixtures for the judge tests: ShapeWorld objects, a tiny saved LM and `transformers serve` (the fault-injecting
server is in tests/conftest.py)."""

from __future__ import annotations

import os
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from dress_lightning.data.schema import ObjectAnnotation


def shape(shape: str, color: str, size: str, position: str) -> ObjectAnnotation:
    """A ShapeWorld object (the box does not matter to the judges)."""
    return ObjectAnnotation(category=shape, box=[0, 0, 10, 10], shape=shape, color=color, size=size, position=position)


@pytest.fixture
def scene() -> list[ObjectAnnotation]:
    """Two red circles, a small blue triangle and a large yellow square."""
    return [
        shape("circle", "red", "large", "top left"),
        shape("circle", "red", "small", "center"),
        shape("triangle", "blue", "small", "bottom left"),
        shape("square", "yellow", "large", "right"),
    ]


@pytest.fixture(scope="session")
def tiny_judge_model(tmp_path_factory) -> Path:
    """A randomly initialised 1-layer Llama with the project's tokenizer (and chat template), saved to disk."""
    import torch
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    from dress_lightning.models.language import BUILTIN_TOKENIZER

    path = tmp_path_factory.mktemp("tiny-judge")
    tokenizer = AutoTokenizer.from_pretrained(str(BUILTIN_TOKENIZER))
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=1,
        num_attention_heads=2,
        num_key_value_heads=2,
        max_position_embeddings=8192,  # judge prompts are long and this tokenizer splits English finely
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    torch.manual_seed(0)
    LlamaForCausalLM(config).save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


@pytest.fixture(scope="session")
def transformers_server(tiny_judge_model, tmp_path_factory, serving, free_port) -> Iterator[str]:
    """``transformers serve`` of the tiny model on a loopback port; yields the API base URL."""
    for module in ("fastapi", "uvicorn", "openai"):
        pytest.importorskip(module, reason="transformers serve needs the dev extra (transformers[serving])")
    port = free_port()
    log_path = tmp_path_factory.mktemp("serve") / "serve.log"
    command = [
        str(Path(sys.executable).parent / "transformers"),
        "serve",
        str(tiny_judge_model),
        "--host",
        "127.0.0.1",
        "--port",
        str(port),
        "--device",
        "cpu",
        "--log-level",
        "info",
    ]
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
    with serving(command, f"http://127.0.0.1:{port}/health", log_path, env):
        yield f"http://127.0.0.1:{port}/v1"
