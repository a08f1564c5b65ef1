"""The LightningModule every objective shares: backbone, optimisation, logging and lean checkpoints."""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from typing import Any

import lightning as L
import torch
from lightning.pytorch.cli import LRSchedulerCallable, OptimizerCallable
from lightning.pytorch.strategies import DeepSpeedStrategy, FSDPStrategy, ModelParallelStrategy

from dress_lightning.atomic import crash_point
from dress_lightning.checkpoints import load_checkpoint
from dress_lightning.decoding import GenerationSettings
from dress_lightning.models import VisionLanguageConfig, build_tokenizer, build_vision_language_model, count_parameters
from dress_lightning.models.feature_cache import VisionFeatureCache
from dress_lightning.tasks.losses import masked_lm_loss, predicting_positions, selected_lm_loss

log = logging.getLogger(__name__)

MODEL_INPUTS = ("input_ids", "attention_mask", "pixel_values")

_RANDOM_TOWERS_ANNOUNCED: set[str] = set()
"""Vision towers whose random weights this process has told the user about (once each, not per build)."""


FROZEN_FROM_INIT_KEY = "dress_lightning_frozen_from_init_checkpoint"
"""Checkpoint entry: the frozen tensors this task took from its ``init_checkpoint`` (not in the checkpoint)."""


def samples_in(batch: dict[str, Any]) -> int:
    """Samples in a batch: its rows, or more when packed rows hold several (``images_per_row``)."""
    if "images_per_row" in batch:
        return int(batch["images_per_row"].sum())
    return batch["input_ids"].shape[0]


@dataclass
class LoraSettings:
    """LoRA adapters on the language model (via peft); the LM's own weights stay frozen."""

    r: int = 16
    """Adapter rank."""
    alpha: int = 32
    """Scaling numerator (effective scale alpha / r)."""
    dropout: float = 0.05
    """Dropout on the adapter input."""
    target_modules: list[str] = field(
        default_factory=lambda: ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
    )
    """Names of the LM's linear layers that get adapters (Llama / Qwen2 naming)."""


def _default_optimizer(params) -> torch.optim.Optimizer:
    return torch.optim.AdamW(params, lr=2e-4, weight_decay=0.0)


class VisionLanguageTask(L.LightningModule):
    """Builds the backbone from a plain config in ``configure_model`` and trains it with a masked LM loss.

    Subclasses choose what trains (``configure_trainable``) and may override ``compute_loss``.
    Checkpoints hold only what trains plus resized embeddings; loading is non-strict by design,
    the rest is rebuilt from the config (pretrained weights or seeded random init).
    """

    def __init__(
        self,
        model: VisionLanguageConfig | None = None,
        lora: LoraSettings | None = None,
        init_checkpoint: str | None = None,
        generation: GenerationSettings | None = None,
        optimizer: OptimizerCallable = _default_optimizer,
        scheduler: LRSchedulerCallable | None = None,
        cache_image_features: bool = False,
        feature_cache_max_images: int | None = 10_000,
        compile_language_model: bool = False,
        share_prompt_prefix: bool = True,
    ) -> None:
        """
        Args:
            model: What to build (vision tower, projector, language model, freeze flags).
            lora: LoRA adapters on the language model; None trains the LM as its freeze flag says.
            init_checkpoint: A checkpoint of an earlier stage (e.g. pretraining) to start from; loaded non-strictly.
            generation: Decoding settings of ``predict`` (and rollouts).
            optimizer: Optimizer over the trainable parameters (YAML: ``class_path: torch.optim.AdamW``).
            scheduler: Learning-rate scheduler, stepped every optimizer step.
            cache_image_features: Keep the frozen vision tower's features of every image in memory and reuse
                them in later epochs instead of running the tower again (needs ``freeze_vision``; batches must
                carry ``image_ids``, as ``ShardDataModule``'s do).
            feature_cache_max_images: Images whose features the cache keeps (in CPU memory; later ones are
                computed every time). One image costs patches x width x 4 bytes: 32 KiB on the tiny preset,
                2.4 MB with ViT-L-14-336. None: no bound.
            compile_language_model: ``torch.compile`` the language model's forward (in place: parameter names and
                checkpoints stay as they are), with dynamic shapes for variable batch lengths. The first steps pay
                the compilation (about a minute for the tiny preset on 2 CPU cores); on CPU it needs a C++
                compiler, and without one training runs uncompiled with a warning.
            share_prompt_prefix: Run the text that every sample of a batch starts with (the chat template's system
                prompt) once per batch, every row attending to its keys and values, instead of once per sample
                (``VisionLanguageModel.forward``'s ``share_prefix``): the same loss up to float rounding, for
                less compute. Packed rows (``data.pack_sequences``) run as they are, and so does a model whose
                layers are sharded (FSDP, DeepSpeed ZeRO-3): a sharded layer cannot run twice in one step.
        """
        super().__init__()
        self.save_hyperparameters(ignore=["optimizer", "scheduler"])
        self.model_config = model or VisionLanguageConfig()
        self.lora = lora
        self.init_checkpoint = init_checkpoint
        self.generation = generation or GenerationSettings()
        self.optimizer_factory = optimizer
        self.scheduler_factory = scheduler
        self.strict_loading = False
        self.cache_image_features = cache_image_features
        self.feature_cache_max_images = feature_cache_max_images
        self.compile_language_model = compile_language_model
        self.share_prompt_prefix = share_prompt_prefix
        self.model = None
        self.tokenizer = None
        self.feature_cache: VisionFeatureCache | None = None
        self._last_step_time: float | None = None
        self._frozen_from_init: list[str] = []

    # -- building -----------------------------------------------------------------------------

    def configure_trainable(self, config: VisionLanguageConfig) -> VisionLanguageConfig:
        """The freeze flags this objective trains with (default: the config's own)."""
        return config

    def configure_model(self) -> None:
        if self.model is not None:  # called again by trainer.test() after fit
            return
        config = self.configure_trainable(self.model_config)
        if config.vision_pretrained is None and config.vision_model not in _RANDOM_TOWERS_ANNOUNCED:
            _RANDOM_TOWERS_ANNOUNCED.add(config.vision_model)
            log.warning("The vision tower %s has seeded random weights (vision_pretrained is null): expected for the "
                        "tiny preset; a real model sets model.vision_pretrained (an open_clip tag or a file).",
                        config.vision_model)
        self.tokenizer = build_tokenizer(config)
        self.model = build_vision_language_model(config, self.tokenizer)
        if self.lora is not None:
            self._add_lora()
        if self.init_checkpoint is not None:
            self._load_init_checkpoint(self.init_checkpoint)
        if self.device_mesh is not None:
            self._shard(self.device_mesh)
        if self.cache_image_features:
            self.feature_cache = VisionFeatureCache(self.model.vision, max_images=self.feature_cache_max_images)
        if self.compile_language_model:
            self._compile_language_model()
        log.info("%s: %s", type(self).__name__, count_parameters(self.model))

    def _compile_language_model(self) -> None:
        on_cpu = self._trainer is None or self.trainer.strategy.root_device.type == "cpu"
        if on_cpu:
            from torch._inductor.cpp_builder import get_cpp_compiler

            try:
                get_cpp_compiler()
            except Exception as error:  # inductor's own search: $CXX, then g++ (InvalidCxxCompiler and kin)
                log.warning("model.init_args.compile_language_model: torch.compile's CPU backend found no C++ compiler "
                            "(%s); training runs uncompiled. Install one (apt install g++) or set CXX.",
                            str(error).splitlines()[0] if str(error) else type(error).__name__)
                return
        self.model.language_model.compile(dynamic=True)

    def _add_lora(self) -> None:
        from peft import LoraConfig, get_peft_model

        settings = self.lora
        peft_config = LoraConfig(
            r=settings.r,
            lora_alpha=settings.alpha,
            lora_dropout=settings.dropout,
            target_modules=list(settings.target_modules),
            task_type="CAUSAL_LM",
        )
        self.model.language_model = get_peft_model(self.model.language_model, peft_config)

    def _load_init_checkpoint(self, path: str) -> None:
        role = "model.init_args.init_checkpoint"
        state = load_checkpoint(path, role=role).get("state_dict")
        if not isinstance(state, dict):
            raise ValueError(f"{role} {path!r} has no state_dict: is it a LightningCLI checkpoint?")
        missing_trainable = [
            name for name, p in self.named_parameters() if p.requires_grad and name not in state
        ]
        result = self.load_state_dict(self._with_grown_vocabulary(state), strict=False)
        if result.unexpected_keys:
            raise RuntimeError(
                f"init_checkpoint {path!r} holds {len(result.unexpected_keys)} tensor(s) this model does not have "
                f"(e.g. {result.unexpected_keys[:3]}): was it trained with another model config?"
            )
        # The weights our checkpoints will not hold (they keep what trains): while this list is empty,
        # a checkpoint of this task loads without its init checkpoint (inference.load_task).
        self._frozen_from_init = sorted(name for name, p in self.named_parameters() if not p.requires_grad
                                        and name in state)
        log.info("Initialised from %s (%d tensors; %d trainable tensors start fresh).",
                 path, len(state), len(missing_trainable))

    def _with_grown_vocabulary(self, state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """``state`` with its (V, D) token matrices padded to this model's larger vocabulary.

        A stage may add tokens to the tokenizer (CRL's reserved condition tokens): the checkpoint's rows
        are kept, the new rows keep the mean-resized initialisation they were built with.
        """
        own = self.state_dict()
        grown = dict(state)
        for name, tensor in state.items():
            mine = own.get(name)
            if (mine is not None and tensor.ndim == 2 and mine.ndim == 2 and tensor.shape[1] == mine.shape[1]
                    and tensor.shape[0] < mine.shape[0]):
                padded = mine.detach().clone()
                padded[: tensor.shape[0]] = tensor
                grown[name] = padded
        return grown

    def _shard(self, mesh) -> None:
        # FSDP2 through Lightning's ModelParallelStrategy: shard each decoder layer, then the rest.
        from torch.distributed.fsdp import fully_shard

        data_parallel = mesh["data_parallel"]
        for layer in self.model.language_model.modules():
            if type(layer).__name__.endswith("DecoderLayer"):
                fully_shard(layer, mesh=data_parallel)
        fully_shard(self.model, mesh=data_parallel)

    # -- optimisation -------------------------------------------------------------------------

    def configure_optimizers(self) -> Any:
        params = [p for p in self.parameters() if p.requires_grad]
        if not params:
            raise ValueError(f"{type(self).__name__} has no trainable parameters: check the freeze flags / lora.")
        optimizer = self.optimizer_factory(params)
        if self.scheduler_factory is None:
            return optimizer
        scheduler = self.scheduler_factory(optimizer)
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}

    # -- steps --------------------------------------------------------------------------------

    def model_inputs(self, batch: dict[str, Any]) -> dict[str, Any]:
        """The model's inputs from a batch; with the feature cache, cached vision features replace the pixels."""
        inputs = {k: batch[k] for k in MODEL_INPUTS}
        inputs["share_prefix"] = self.share_prompt_prefix and not self._layers_sharded
        if "position_ids" in batch:  # packed rows (data.pack_sequences): several samples per row
            # Without an attention mask or a cache, transformers builds a block-diagonal causal mask from
            # position_ids that restart at every sample, so no token attends across samples.
            inputs.update(attention_mask=None, position_ids=batch["position_ids"],
                          images_per_row=batch["images_per_row"], use_cache=False)
        if self.feature_cache is not None:
            if "image_ids" not in batch:
                raise ValueError(
                    "model.init_args.cache_image_features needs batches that carry image_ids (ShardDataModule's "
                    "do); turn the cache off or add image ids to the batches."
                )
            inputs["image_features"] = self.feature_cache(inputs.pop("pixel_values"), batch["image_ids"])
        return inputs

    @property
    def _layers_sharded(self) -> bool:
        """Whether the strategy shards parameters across ranks, gathering a layer's for one forward at a time."""
        if self._trainer is None:
            return False
        strategy = self.trainer.strategy
        return isinstance(strategy, (FSDPStrategy, ModelParallelStrategy)) or (
            isinstance(strategy, DeepSpeedStrategy) and strategy.zero_stage_3)

    def compute_loss(self, batch: dict[str, Any]) -> torch.Tensor:
        """Mean next-token loss over the labelled (assistant) tokens of the batch."""
        labels = batch["labels"]
        positions = predicting_positions(labels)  # (B, T)
        # Logits only where the loss reads them: the LM head and softmax skip image, prompt and padding.
        logits = self.model(**self.model_inputs(batch), logits_to_keep=positions).logits  # (M, V)
        if logits.ndim == 3:  # an LM whose forward ignores a position mask returns all (B, T, V)
            return masked_lm_loss(logits, labels)
        return selected_lm_loss(logits, labels, positions)

    def training_loss(self, batch: dict[str, Any]) -> torch.Tensor:
        """The loss a training step minimises: ``compute_loss`` (objectives that train on other batches override it)."""
        return self.compute_loss(batch)

    def training_step(self, batch: dict[str, Any], batch_idx: int) -> torch.Tensor:
        loss = self.training_loss(batch)
        batch_size = samples_in(batch)
        self.log("train/loss", loss, prog_bar=True, batch_size=batch_size)
        self._log_throughput(batch)
        self.log("train/lr", self.trainer.optimizers[0].param_groups[0]["lr"], prog_bar=False, batch_size=batch_size)
        return loss

    def on_train_batch_end(self, outputs: Any, batch: Any, batch_idx: int) -> None:
        # After the callbacks' hooks, so a checkpoint due at this step is on disk (the fault suite kills here).
        crash_point("fit.train_batch_end")

    def _log_throughput(self, batch: dict[str, Any]) -> None:
        now = time.perf_counter()
        if self._last_step_time is not None:
            elapsed = now - self._last_step_time
            # A tensor, not .item(): no device sync in the training step; Lightning reads it when it logs.
            tokens = batch["attention_mask"].sum() * self.trainer.world_size
            self.log("train/tokens_per_sec", tokens / elapsed, prog_bar=True, batch_size=1)
        self._last_step_time = now

    def validation_step(self, batch: dict[str, Any], batch_idx: int) -> torch.Tensor:
        loss = self.compute_loss(batch)
        self.log("val/loss", loss, prog_bar=True, sync_dist=True, batch_size=samples_in(batch))
        return loss

    def test_step(self, batch: dict[str, Any], batch_idx: int) -> torch.Tensor:
        loss = self.compute_loss(batch)
        self.log("test/loss", loss, sync_dist=True, batch_size=samples_in(batch))
        return loss

    def generation_condition(self) -> str | None:
        """The condition prompts get at inference (None: unconditioned; conditional RL: the target)."""
        return None

    def generate(self, batch: dict[str, Any], settings: GenerationSettings | None = None) -> list[list[str]]:
        """Responses for a left-padded prompt batch: ``settings.num_samples`` strings per prompt.

        With ``settings.guidance_scale`` other than 1 the batch must carry ``negative_input_ids`` and
        ``negative_attention_mask``: the same prompts under the negative condition (``RolloutModule`` adds them).
        """
        settings = settings or self.generation
        n = settings.num_samples
        guidance = {}
        if settings.guidance_scale != 1.0:
            if "negative_input_ids" not in batch:
                raise ValueError(
                    f"generation.guidance_scale={settings.guidance_scale} needs the prompts under the negative "
                    "condition (batch['negative_input_ids']); generate through RolloutModule, or set guidance_scale: 1"
                )
            guidance = {"negative_input_ids": batch["negative_input_ids"],
                        "negative_attention_mask": batch["negative_attention_mask"],
                        "guidance_scale": settings.guidance_scale}
        tokens = self.model.generate(
            batch["input_ids"],
            batch["attention_mask"],
            batch["pixel_values"],
            num_return_sequences=n,  # each prompt encoded once for its n answers
            max_new_tokens=settings.max_new_tokens,
            do_sample=settings.do_sample,
            temperature=settings.temperature,
            top_p=settings.top_p,
            eos_token_id=batch["stop_token_ids"],
            **guidance,
        )  # (B * n, T_new)
        texts = [t.strip() for t in self.tokenizer.batch_decode(tokens, skip_special_tokens=True)]
        return [texts[i * n : (i + 1) * n] for i in range(len(batch["ids"]))]

    def predict_step(self, batch: dict[str, Any], batch_idx: int) -> list[dict[str, Any]]:
        return [
            {"id": sample_id, "responses": responses}
            for sample_id, responses in zip(batch["ids"], self.generate(batch))
        ]

    # -- checkpoints --------------------------------------------------------------------------

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        # Keep what trains, plus embeddings that grew for added tokens (their new rows are not in
        # any pretrained file); frozen weights come back from the config.
        keep = {name for name, p in self.named_parameters() if p.requires_grad}
        if self.model.resized_embeddings:
            lm = self.model.language_model
            embeddings = {id(m.weight) for m in (lm.get_input_embeddings(), lm.get_output_embeddings()) if m is not None}
            keep |= {name for name, p in self.named_parameters() if id(p) in embeddings}
        checkpoint["state_dict"] = {k: v for k, v in checkpoint["state_dict"].items() if k in keep}
        checkpoint[FROZEN_FROM_INIT_KEY] = list(self._frozen_from_init)
