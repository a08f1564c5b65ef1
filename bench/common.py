"""Shared pieces of the benchmarks: machine record, JSON output, tables, the models under test.

The reference is Hugging Face's ``LlavaForConditionalGeneration`` built offline with the same
dimensions as our model and, where outputs are compared, the same weights (copied tensor by tensor).
"""

from __future__ import annotations

import datetime
import json
import os
import platform
import resource
import statistics
import subprocess
import tempfile
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import psutil
import torch

from dress_lightning.models import VisionLanguageConfig, build_tokenizer, build_vision_language_model
from dress_lightning.special_tokens import IMAGE_TOKEN

REPO = Path(__file__).resolve().parent.parent
MIB = 2**20


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def machine_info() -> dict[str, Any]:
    """What the numbers were measured on."""
    import lightning
    import open_clip
    import transformers

    return {
        "cpu_model": cpu_model(),
        "cpu_cores": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "cuda_available": torch.cuda.is_available(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "lightning": lightning.__version__,
        "open_clip": open_clip.__version__,
        "date": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        "git_commit": _git_commit(),
    }


def _git_commit() -> str | None:
    import subprocess

    try:
        commit = subprocess.run(["git", "rev-parse", "HEAD"], cwd=REPO, capture_output=True, text=True, check=True)
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=REPO,
                               capture_output=True, text=True, check=True)
    except (OSError, subprocess.CalledProcessError):
        return None
    return commit.stdout.strip() + ("+dirty" if dirty.stdout.strip() else "")


def write_json(path: str | None, result: dict[str, Any]) -> None:
    """Write ``result`` (which must hold ``speedup``) with the machine record, if a path was given."""
    assert "speedup" in result, "every benchmark reports a speedup (ours / reference)"
    result = {"machine": machine_info(), **result}
    if path:
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        Path(path).write_text(json.dumps(result, indent=2) + "\n")
        print(f"wrote {path}")


def median(values: Sequence[float]) -> float:
    return statistics.median(values)


def print_table(headers: Sequence[str], rows: Sequence[Sequence[Any]]) -> None:
    """A plain fixed-width table on stdout."""
    cells = [[f"{c:.4g}" if isinstance(c, float) else str(c) for c in row] for row in rows]
    widths = [max(len(str(h)), *(len(r[i]) for r in cells)) for i, h in enumerate(headers)]
    print("  ".join(str(h).ljust(w) for h, w in zip(headers, widths)))
    print("  ".join("-" * w for w in widths))
    for row in cells:
        print("  ".join(c.ljust(w) for c, w in zip(row, widths)))


def timed(fn: Callable[[], Any]) -> tuple[float, Any]:
    start = time.perf_counter()
    out = fn()
    return time.perf_counter() - start, out


# -- models ------------------------------------------------------------------------------------


def build_ours(projector: str = "mlp2x_gelu", **overrides):
    """Our tiny preset; ``mlp2x_gelu`` by default because that is the projector LLaVA-1.5 (and HF's class) has."""
    config = VisionLanguageConfig(projector=projector, **overrides)
    tokenizer = build_tokenizer(config)
    torch.manual_seed(0)
    return config, tokenizer, build_vision_language_model(config, tokenizer)


def build_llava_reference(ours, tokenizer, copy_weights: bool = True):
    """HF ``LlavaForConditionalGeneration`` with our model's dimensions (and weights, when asked).

    Vision: CLIP (exact GELU, LayerNorm eps 1e-5, layer -2, CLS dropped) = our open_clip tower;
    projector: HF's Linear-GELU-Linear = our ``mlp2x_gelu``; text: the same Llama config.
    """
    from transformers import CLIPVisionConfig, LlamaConfig, LlavaConfig, LlavaForConditionalGeneration

    visual = ours.vision.visual
    width = visual.conv1.out_channels
    blocks = visual.transformer.resblocks
    vision_config = CLIPVisionConfig(
        hidden_size=width,
        intermediate_size=blocks[0].mlp.c_fc.out_features,
        num_hidden_layers=len(blocks),
        num_attention_heads=blocks[0].attn.num_heads,
        image_size=ours.vision.image_size[0],
        patch_size=visual.conv1.kernel_size[0],
        hidden_act="gelu",
        layer_norm_eps=visual.ln_pre.eps,
        projection_dim=width,
    )
    lm_config = ours.language_model.config.to_dict()
    for key in ("architectures", "transformers_version", "dtype", "torch_dtype", "_name_or_path"):
        lm_config.pop(key, None)
    text_config = LlamaConfig(**lm_config)
    config = LlavaConfig(
        vision_config=vision_config,
        text_config=text_config,
        image_token_index=tokenizer.convert_tokens_to_ids(IMAGE_TOKEN),
        projector_hidden_act="gelu",
        vision_feature_select_strategy="default",
        vision_feature_layer=ours.vision.layer,
        image_seq_length=ours.num_image_tokens,
        tie_word_embeddings=lm_config.get("tie_word_embeddings", False),
    )
    torch.manual_seed(0)
    reference = LlavaForConditionalGeneration(config)
    reference.config.text_config._attn_implementation = ours.language_model.config._attn_implementation
    if copy_weights:
        reference.load_state_dict(_llava_state_dict(ours, reference), strict=True)
    reference.generation_config.pad_token_id = tokenizer.pad_token_id
    reference.generation_config.eos_token_id = tokenizer.eos_token_id
    return reference


def _llava_state_dict(ours, reference) -> dict[str, torch.Tensor]:
    """Our weights under HF LLaVA's names (open_clip packs q/k/v in one in_proj; HF keeps them apart)."""
    visual = ours.vision.visual
    state: dict[str, torch.Tensor] = {}
    v = "model.vision_tower."
    state[v + "embeddings.class_embedding"] = visual.class_embedding
    state[v + "embeddings.patch_embedding.weight"] = visual.conv1.weight
    state[v + "embeddings.position_embedding.weight"] = visual.positional_embedding
    for ours_name, hf_name in (("ln_pre", "pre_layrnorm"), ("ln_post", "post_layernorm")):
        state[f"{v}{hf_name}.weight"] = getattr(visual, ours_name).weight
        state[f"{v}{hf_name}.bias"] = getattr(visual, ours_name).bias
    for i, block in enumerate(visual.transformer.resblocks):
        p = f"{v}encoder.layers.{i}."
        q, k, vv = block.attn.in_proj_weight.chunk(3)
        qb, kb, vb = block.attn.in_proj_bias.chunk(3)
        for name, w, b in (("q_proj", q, qb), ("k_proj", k, kb), ("v_proj", vv, vb)):
            state[p + f"self_attn.{name}.weight"], state[p + f"self_attn.{name}.bias"] = w, b
        state[p + "self_attn.out_proj.weight"] = block.attn.out_proj.weight
        state[p + "self_attn.out_proj.bias"] = block.attn.out_proj.bias
        for ours_name, hf_name in (("ln_1", "layer_norm1"), ("ln_2", "layer_norm2")):
            state[p + f"{hf_name}.weight"] = getattr(block, ours_name).weight
            state[p + f"{hf_name}.bias"] = getattr(block, ours_name).bias
        for ours_name, hf_name in (("c_fc", "fc1"), ("c_proj", "fc2")):
            state[p + f"mlp.{hf_name}.weight"] = getattr(block.mlp, ours_name).weight
            state[p + f"mlp.{hf_name}.bias"] = getattr(block.mlp, ours_name).bias
    first, _, second = ours.projector
    for name, layer in (("linear_1", first), ("linear_2", second)):
        state[f"model.multi_modal_projector.{name}.weight"] = layer.weight
        state[f"model.multi_modal_projector.{name}.bias"] = layer.bias
    for name, tensor in ours.language_model.state_dict().items():
        if name.startswith("model."):
            state["model.language_model." + name[len("model."):]] = tensor
        elif name == "lm_head.weight":
            state[name] = tensor
    expected = set(reference.state_dict())
    state = {k: t.detach().clone() for k, t in state.items() if k in expected}
    missing = expected - set(state)
    if missing:
        raise RuntimeError(f"no source for reference weights {sorted(missing)[:5]}")
    return state


def freeze_like_ours(reference, ours) -> None:
    """Train the same parts in the reference as in ours (vision frozen; projector and LM train)."""
    reference.requires_grad_(False)
    reference.model.multi_modal_projector.requires_grad_(any(p.requires_grad for p in ours.projector.parameters()))
    train_lm = any(p.requires_grad for p in ours.language_model.parameters())
    reference.model.language_model.requires_grad_(train_lm)
    reference.lm_head.requires_grad_(train_lm)


# -- batches -----------------------------------------------------------------------------------


def fixed_length_batches(
    tokenizer, num_image_tokens: int, image_size: tuple[int, int], *, count: int, batch_size: int, length: int,
    seed: int = 0,
) -> list[dict[str, torch.Tensor]]:
    """Batches of one fixed length: bos, the image placeholders, random text tokens; loss on the text."""
    generator = torch.Generator().manual_seed(seed)
    image_id = tokenizer.convert_tokens_to_ids(IMAGE_TOKEN)
    special = set(tokenizer.all_special_ids) | {image_id}
    vocab = torch.tensor([i for i in range(len(tokenizer)) if i not in special])
    text = length - 1 - num_image_tokens
    batches = []
    for _ in range(count):
        words = vocab[torch.randint(len(vocab), (batch_size, text), generator=generator)]
        input_ids = torch.cat(
            [
                torch.full((batch_size, 1), tokenizer.bos_token_id),
                torch.full((batch_size, num_image_tokens), image_id),
                words,
            ],
            dim=1,
        )
        labels = input_ids.clone()
        labels[:, : 1 + num_image_tokens] = -100
        batches.append(
            {
                "input_ids": input_ids,  # (B, T)
                "attention_mask": torch.ones_like(input_ids),  # (B, T)
                "labels": labels,  # (B, T)
                "pixel_values": torch.randn(batch_size, 3, *image_size, generator=generator),  # (B, 3, H, W)
            }
        )
    return batches


# -- data and training helpers -----------------------------------------------------------------

MODEL_KEYS = ("input_ids", "attention_mask", "labels", "pixel_values")


def ensure_shapeworld(directory: str | Path, samples: int, shard_size: int = 250, split: str = "train") -> Path:
    """ShapeWorld shards in ``directory``, generated (deterministically, seed 0) if it has none."""
    from dress_lightning.data.shards import write_shapeworld

    directory = Path(directory)
    if not any(directory.glob("*.tar")):
        write_shapeworld(directory, split, samples, seed=0, shard_size=shard_size)
    return directory


def crl_batches(nlf_shards: str, sft_shards: str, condition, model: VisionLanguageConfig, count: int,
                group_by_length: int = 4, **layout: Any) -> list[dict[str, Any]]:
    """The first ``count`` CRL batches of ``configs/crl.yaml``'s data (batch 16, 30% SFT data, epoch of 4800,
    rows of at most 512 tokens), in the layout given (``group_by_length``, ``pack_sequences``, ``pack_length``)."""
    from itertools import islice

    from dress_lightning.data.crl import CRLDataModule

    datamodule = CRLDataModule(nlf_shards=nlf_shards, train_shards=sft_shards, sft_weight=0.3, condition=condition,
                               epoch_length=4800, max_length=512, shuffle_buffer=500, model=model, batch_size=16,
                               num_workers=0, group_by_length=group_by_length, seed=0, **layout)
    datamodule.setup()
    return list(islice(datamodule.train_dataloader(), count))


def model_batch(batch: dict[str, Any]) -> dict[str, torch.Tensor]:
    return {k: batch[k] for k in MODEL_KEYS}


def in_memory_loader(batches: Sequence[dict[str, torch.Tensor]]):
    """A DataLoader that yields the given batches as they are (no collation, no workers)."""
    from torch.utils.data import DataLoader

    return DataLoader(list(batches), batch_size=None, shuffle=False)


class StepTimes:
    """Lightning callback: wall time between consecutive ``on_train_batch_end`` (a whole loop iteration)."""

    def __new__(cls):
        import lightning as L

        class _StepTimes(L.Callback):
            def __init__(self) -> None:
                self.ends: list[float] = []

            def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
                self.ends.append(time.perf_counter())

            def on_train_start(self, trainer, pl_module) -> None:
                self.ends.append(time.perf_counter())

            @property
            def intervals(self) -> list[float]:
                return [b - a for a, b in zip(self.ends, self.ends[1:])]

        return _StepTimes()


def lightning_fit_times(task, batches: Sequence[dict[str, torch.Tensor]], **trainer_kwargs) -> list[float]:
    """Fit ``task`` on ``batches`` (one epoch) through a real ``lightning.Trainer``; per-step wall times."""
    import lightning as L

    timer = StepTimes()
    trainer = L.Trainer(
        accelerator="cpu",
        devices=1,
        precision="32-true",
        max_steps=len(batches),
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        callbacks=[timer],
        **trainer_kwargs,
    )
    trainer.fit(task, train_dataloaders=in_memory_loader(batches))
    return timer.intervals


def plain_loop_times(model, optimizer, batches: Sequence[dict[str, torch.Tensor]]) -> list[float]:
    """A plain PyTorch training loop over a HF model that computes its own loss; per-step wall times."""
    model.train()
    times = []
    for batch in batches:
        start = time.perf_counter()
        loss = model(**batch).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        times.append(time.perf_counter() - start)
    return times


# -- runs of the command line ---------------------------------------------------------------------


def run_sampled(cmd: list[str], cwd: str, env: dict[str, str]) -> dict[str, Any]:
    """Run ``cmd``; peak RSS of its whole process tree (sampled) and of its largest process (ru_maxrss), its output.

    The output goes to a file, not a pipe: a long run (the main job) would fill a pipe nobody reads and stall.
    """
    with tempfile.TemporaryFile(mode="w+") as sink:
        proc = subprocess.Popen(cmd, cwd=cwd, env=env, stdout=sink, stderr=subprocess.STDOUT, text=True)
        root, peak = psutil.Process(proc.pid), 0
        start = time.perf_counter()
        while proc.poll() is None:
            try:
                tree = [root, *root.children(recursive=True)]
                peak = max(peak, sum(p.memory_info().rss for p in tree if p.is_running()))
            except psutil.Error:
                pass
            time.sleep(0.05)
        wall = time.perf_counter() - start
        sink.seek(0)
        output = sink.read()
    if proc.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} failed:\n{output[-3000:]}")
    largest = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss * 1024  # KiB on Linux
    return {"tree_peak_rss_mib": peak / MIB, "largest_process_peak_rss_mib": largest / MIB,
            "wall_s": wall, "output": output}
