"""DPO's reference under a real Trainer: the initial (SFT) model, never trained, never in the checkpoint's weights."""

import lightning as L
import pytest
import torch
from lightning.pytorch.callbacks import Callback, ModelCheckpoint

from dress_lightning.data.dpo import DPODataModule
from dress_lightning.models import VisionLanguageConfig
from dress_lightning.tasks import DPOTask, LoraSettings, SFTTask
from dress_lightning.tasks.dpo import REFERENCE_CHECKPOINT_KEY

LORA = LoraSettings(r=2, alpha=4)


def _datamodule(nlf_shards, tmp_path):
    return DPODataModule(nlf_shards=str(nlf_shards), derived_dir=str(tmp_path / "pairs"), batch_size=4,
                         num_workers=0, epoch_length=64, shuffle_buffer=8)


def _fit(task, datamodule, tmp_path, steps, callbacks=(), ckpt_path=None):
    trainer = L.Trainer(accelerator="cpu", max_steps=steps, logger=False, enable_progress_bar=False,
                        enable_model_summary=False, limit_val_batches=0, default_root_dir=tmp_path,
                        callbacks=[ModelCheckpoint(dirpath=tmp_path / "checkpoints", save_last=True), *callbacks])
    trainer.fit(task, datamodule=datamodule, ckpt_path=ckpt_path)
    return tmp_path / "checkpoints" / "last.ckpt"


class WeightsAtStart(Callback):
    """The reference's and the policy's trainable weights when training starts."""

    def on_train_start(self, trainer, task):
        self.reference = {n: p.detach().clone() for n, p in task.reference.named_parameters()}
        self.policy = {n: p.detach().clone() for n, p in task.model.named_parameters() if p.requires_grad}


@pytest.fixture(scope="module")
def lora_sft_checkpoint(tmp_path_factory):
    """A LoRA SFT checkpoint whose adapters are not zero (as after SFT), in the layout a fit writes."""
    torch.manual_seed(1)
    task = SFTTask(lora=LORA)
    task.configure_model()
    for name, p in task.named_parameters():
        if "lora_B" in name:
            p.data.normal_(std=0.5)
    path = tmp_path_factory.mktemp("lora-sft") / "last.ckpt"
    torch.save({"state_dict": {n: p.detach() for n, p in task.named_parameters() if p.requires_grad}}, path)
    return path


@pytest.mark.parametrize("lora", [None, LORA], ids=["full", "lora"])
def test_on_the_fly_reference_never_changes_and_is_not_checkpointed(lora, judged_nlf_shards, lora_sft_checkpoint,
                                                                     tmp_path):
    init = str(lora_sft_checkpoint) if lora else None
    model = VisionLanguageConfig(freeze_language_model=lora is not None)
    task = DPOTask(model=model, lora=lora, init_checkpoint=init, reference_logps="on_the_fly", beta=0.5)
    start, datamodule = WeightsAtStart(), _datamodule(judged_nlf_shards, tmp_path)
    checkpoint = _fit(task, datamodule, tmp_path, steps=3, callbacks=[start])

    for name, p in task.reference.named_parameters():
        assert not p.requires_grad
        torch.testing.assert_close(p, start.reference[name], rtol=0, atol=0)
    assert any(not torch.equal(p, start.policy[n]) for n, p in task.model.named_parameters() if p.requires_grad)
    # Frozen weights exist once; what trains is copied.
    reference = {p.data_ptr() for p in task.reference.parameters()}
    assert {p.data_ptr() for p in task.model.parameters() if not p.requires_grad} <= reference
    assert not {p.data_ptr() for p in task.model.parameters() if p.requires_grad} & reference
    if lora:  # the SFT model's adapters, not the base model with adapters disabled
        saved = torch.load(lora_sft_checkpoint, weights_only=True)["state_dict"]
        for name, p in task.reference.named_parameters():
            if "lora_B" in name:
                torch.testing.assert_close(p, saved[f"model.{name}"])
                assert p.abs().sum() > 0
        # No dropout in the reference pass (LoRA's would make two passes differ), also while the policy trains.
        task.train()
        batch = next(datamodule.pair_batches())
        inputs = task.model_inputs(batch)
        torch.testing.assert_close(task.reference_log_probs(batch, inputs), task.reference_log_probs(batch, inputs),
                                   rtol=0, atol=0)
        assert task.reference.training

    # Hyperparameters hold the dataclasses this test passed (the CLI stores plain data): not a weights-only file.
    state = torch.load(checkpoint, weights_only=False)
    assert state["state_dict"] and not any(k.startswith("reference.") for k in state["state_dict"])
    assert REFERENCE_CHECKPOINT_KEY not in state


def test_precomputed_reference_is_the_initial_model_and_survives_a_resume(judged_nlf_shards, tmp_path, monkeypatch):
    task = DPOTask(reference_logps="precomputed")
    task.configure_model()  # built before the fit (which keeps it), to remember its initial weights
    initial_weights = {name: tensor.clone() for name, tensor in task.state_dict().items()}
    datamodule = _datamodule(judged_nlf_shards, tmp_path)
    checkpoint = _fit(task, datamodule, tmp_path, steps=2)
    assert task.reference is None
    table = task.reference_table
    assert len(table.ids) == 18

    initial = DPOTask()
    initial.configure_model()
    initial.load_state_dict(initial_weights)
    initial.eval()
    with torch.no_grad():
        for batch in datamodule.pair_batches():
            logps = initial.answer_log_probs(initial.model, initial.model_inputs(batch), batch["labels"])  # (2B,)
            torch.testing.assert_close(table.lookup(batch["ids"][: len(logps) // 2]),
                                       torch.stack(logps.chunk(2), dim=1), rtol=1e-5, atol=1e-5)

    saved = torch.load(checkpoint, weights_only=True)
    assert saved[REFERENCE_CHECKPOINT_KEY]["ids"] == table.ids
    assert not any(k.startswith("reference") for k in saved["state_dict"])

    # A resumed fit reuses the saved log-probabilities (its weights are no longer the initial ones).
    monkeypatch.setattr(DPOTask, "precompute_reference", lambda *a: pytest.fail("recomputed on resume"))
    resumed = DPOTask(reference_logps="precomputed")
    _fit(resumed, _datamodule(judged_nlf_shards, tmp_path), tmp_path, steps=3, ckpt_path=checkpoint)
    torch.testing.assert_close(resumed.reference_table.logps, table.logps)

    del saved[REFERENCE_CHECKPOINT_KEY]
    torch.save(saved, tmp_path / "without.ckpt")
    with pytest.raises(RuntimeError, match="reference_logps: on_the_fly"):
        _fit(DPOTask(), _datamodule(judged_nlf_shards, tmp_path), tmp_path, steps=4,
             ckpt_path=tmp_path / "without.ckpt")


def test_options_are_checked():
    with pytest.raises(ValueError, match="beta must be positive"):
        DPOTask(beta=0.0)
    with pytest.raises(ValueError, match="reference_logps must be precomputed or on_the_fly"):
        DPOTask(reference_logps="frozen")
