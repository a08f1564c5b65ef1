"""What a checkpoint keeps: trainable tensors, plus embeddings that grew for added tokens."""

from transformers import LlamaConfig, LlamaForCausalLM

from dress_lightning.models import VisionLanguageConfig
from dress_lightning.tasks import LoraSettings, SFTTask

from models.test_language import _plain_tokenizer  # a tokenizer without <image> and pad


def _saved_llama(tmp_path):
    tokenizer = _plain_tokenizer()
    config = LlamaConfig(vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                         num_attention_heads=2, num_key_value_heads=1, tie_word_embeddings=False)
    LlamaForCausalLM(config).save_pretrained(tmp_path)
    tokenizer.save_pretrained(tmp_path)
    return str(tmp_path)


def _kept(task):
    checkpoint = {"state_dict": task.state_dict()}
    task.on_save_checkpoint(checkpoint)
    return set(checkpoint["state_dict"])


def test_resized_embeddings_are_kept_with_lora_adapters(tmp_path):
    task = SFTTask(model=VisionLanguageConfig(language_model=_saved_llama(tmp_path)), lora=LoraSettings(r=2))
    task.configure_model()
    assert task.model.resized_embeddings
    kept = _kept(task)
    embeddings = {k for k in kept if "embed_tokens" in k or "lm_head" in k}
    assert len(embeddings) == 2  # input and (untied) output embeddings, whose new rows no pretrained file has
    rest = kept - embeddings
    assert rest and all("lora_" in k or k.startswith("model.projector.") for k in rest)
    assert not any(k.startswith("model.vision.") for k in kept)


def test_unresized_frozen_embeddings_are_not_kept():
    task = SFTTask(lora=LoraSettings(r=2))  # the tiny preset's tokenizer already has every token
    task.configure_model()
    assert not task.model.resized_embeddings
    assert not any("embed_tokens" in k for k in _kept(task))
