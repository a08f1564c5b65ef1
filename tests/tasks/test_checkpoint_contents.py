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


def _fit_from(init, out, *overrides):
    from conftest import ROOT

    from dress_lightning.cli import main

    assert main(["fit", "-c", str(ROOT / "configs/sft.yaml"), "-c", str(ROOT / "configs/overlays/ci_tiny.yaml"),
                 "--trainer.max_steps", "1", "--trainer.limit_val_batches", "0", "--trainer.logger", "false",
                 "--trainer.default_root_dir", str(out), "--trainer.callbacks.init_args.dirpath", str(out),
                 "--data.init_args.train_shards", str(out.parent / "train"),
                 "--data.init_args.val_shards", str(out.parent / "val"),
                 "--model.init_args.init_checkpoint", str(init), *overrides]) == 0
    return out / "last.ckpt"


def test_a_checkpoint_loads_without_its_init_checkpoint_unless_frozen_weights_came_from_it(policy_checkpoint,
                                                                                             tmp_path):
    """Moved to another machine, a checkpoint needs its init checkpoint only for the frozen tensors it took from it."""
    import shutil

    import pytest
    import torch

    from dress_lightning.inference import load_task

    init = tmp_path / "init.ckpt"
    shutil.copy(policy_checkpoint, init)
    trained = _fit_from(init, tmp_path / "all-trained")  # everything the init checkpoint set trains on
    frozen = _fit_from(init, tmp_path / "projector-frozen", "--model.init_args.model.freeze_projector", "true")
    before = load_task(str(trained)).state_dict()

    init.rename(tmp_path / "moved.ckpt")
    after = load_task(str(trained)).state_dict()
    assert before.keys() == after.keys() and all(torch.equal(before[k], after[k]) for k in before)
    with pytest.raises(FileNotFoundError, match=r"init\.ckpt.*3 frozen tensor\(s\) of the model come from it"):
        load_task(str(frozen))  # the frozen projector (position embedding, weight, bias) was the init checkpoint's
