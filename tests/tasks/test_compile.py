"""``model.init_args.compile_language_model``: torch.compile of the LM gives the uncompiled loss and gradients,
keeps parameter names (checkpoints), and falls back with a warning where no C++ compiler is found."""

import logging
from itertools import islice

import torch

from dress_lightning.cli import main
from dress_lightning.data.datamodule import ShardDataModule
from dress_lightning.tasks import SFTTask


def _task(compile_language_model: bool) -> SFTTask:
    torch.manual_seed(0)
    task = SFTTask(compile_language_model=compile_language_model)
    task.configure_model()
    return task


def test_compiled_language_model_gives_the_same_loss_and_gradients(tmp_path):
    assert main(["data", "shapeworld", "--out", str(tmp_path), "--split", "train", "--samples", "8",
                 "--shard-size", "8"]) == 0
    batch = next(islice(ShardDataModule(train_shards=str(tmp_path), batch_size=8, num_workers=0).train_dataloader(), 1))
    plain, compiled = _task(False), _task(True)
    assert compiled.model.language_model._compiled_call_impl is not None
    assert list(compiled.state_dict()) == list(plain.state_dict())  # checkpoints keep their keys
    grads = []
    for task in (plain, compiled):
        loss = task.compute_loss(batch)
        loss.backward()
        grads.append((loss.detach(), torch.cat([p.grad.flatten() for p in task.parameters() if p.grad is not None])))
    torch.testing.assert_close(grads[1][0], grads[0][0], rtol=1e-5, atol=1e-6)
    assert (grads[1][1] - grads[0][1]).norm() < 1e-4 * grads[0][1].norm()


def test_without_a_cpp_compiler_training_runs_uncompiled_and_says_so(monkeypatch, caplog):
    import torch._inductor.config

    monkeypatch.setattr(torch._inductor.config.cpp, "cxx", ("/nonexistent/c++",))
    with caplog.at_level(logging.WARNING):
        task = _task(True)
    assert task.model.language_model._compiled_call_impl is None
    assert "no C++ compiler" in caplog.text and "apt install g++" in caplog.text
