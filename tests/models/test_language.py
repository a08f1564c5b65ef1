"""The real loading path: tiny HF models saved with save_pretrained, loaded back by path."""

import pytest
import torch
from tokenizers import Tokenizer, models, pre_tokenizers, trainers
from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast, Qwen2Config, Qwen2ForCausalLM

from dress_lightning.models import VisionLanguageConfig, build_tokenizer, build_vision_language_model
from dress_lightning.special_tokens import IMAGE_TOKEN, PAD_TOKEN

TEXT = ["How many red circles are there?", "There are two red circles.", "Describe the image in detail."] * 20


def _plain_tokenizer() -> PreTrainedTokenizerFast:
    """A Llama-like tokenizer: bos/eos only, no pad and no <image> (what real checkpoints ship)."""
    backend = Tokenizer(models.BPE())
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.train_from_iterator(
        TEXT,
        trainers.BpeTrainer(vocab_size=300, special_tokens=["<s>", "</s>"],
                            initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False),
    )
    return PreTrainedTokenizerFast(tokenizer_object=backend, bos_token="<s>", eos_token="</s>")


def _tiny(config_cls, vocab_size):
    return config_cls(vocab_size=vocab_size, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                      num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=256)


@pytest.mark.parametrize("config_cls, model_cls", [(LlamaConfig, LlamaForCausalLM), (Qwen2Config, Qwen2ForCausalLM)])
def test_saved_hf_model_loads_by_path_with_special_tokens(tmp_path, config_cls, model_cls):
    tokenizer = _plain_tokenizer()
    torch.manual_seed(0)
    source = model_cls(_tiny(config_cls, len(tokenizer)))
    source.save_pretrained(tmp_path)
    tokenizer.save_pretrained(tmp_path)

    config = VisionLanguageConfig(language_model=str(tmp_path))
    loaded_tokenizer = build_tokenizer(config)
    model = build_vision_language_model(config, loaded_tokenizer)

    assert type(model.language_model) is model_cls
    # Llama gets the project's <pad>; Qwen2's tokenizer class brings its own (<|endoftext|>).
    assert loaded_tokenizer.pad_token == (PAD_TOKEN if config_cls is LlamaConfig else "<|endoftext|>")
    assert model.image_token_id == loaded_tokenizer.convert_tokens_to_ids(IMAGE_TOKEN) >= len(tokenizer)
    assert model.pad_token_id == loaded_tokenizer.pad_token_id
    embeddings = model.language_model.get_input_embeddings().weight
    assert embeddings.shape == (len(loaded_tokenizer), 32) == (len(tokenizer) + 2, 32)
    # Pretrained rows survive the resize untouched.
    torch.testing.assert_close(embeddings[: len(tokenizer)], source.get_input_embeddings().weight)
    assert model.projector.out_features == 32


def test_tokenizer_with_pad_and_large_embedding_is_not_resized(tmp_path):
    # Qwen2 checkpoints pad the embedding matrix beyond len(tokenizer): adding <image> must not shrink it.
    tokenizer = _plain_tokenizer()
    tokenizer.add_special_tokens({"pad_token": "<|endoftext|>"})
    Qwen2ForCausalLM(_tiny(Qwen2Config, len(tokenizer) + 64)).save_pretrained(tmp_path)
    tokenizer.save_pretrained(tmp_path)

    config = VisionLanguageConfig(language_model=str(tmp_path))
    loaded_tokenizer = build_tokenizer(config)
    model = build_vision_language_model(config, loaded_tokenizer)

    assert loaded_tokenizer.pad_token == "<|endoftext|>"
    assert model.language_model.get_input_embeddings().num_embeddings == len(tokenizer) + 64


def test_builtin_tiny_llama_is_deterministic(tiny_config, tiny_tokenizer):
    first = build_vision_language_model(tiny_config, tiny_tokenizer).language_model.state_dict()
    torch.manual_seed(123)  # the global RNG must not matter
    second = build_vision_language_model(tiny_config, tiny_tokenizer).language_model.state_dict()
    for name, tensor in first.items():
        torch.testing.assert_close(second[name], tensor)


def test_missing_language_model_path_fails(tmp_path):
    with pytest.raises(OSError):
        build_tokenizer(VisionLanguageConfig(language_model=str(tmp_path / "nope")))
