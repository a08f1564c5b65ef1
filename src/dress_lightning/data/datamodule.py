"""The DataModule that streams image + conversation shards (``ShardDataModule``) and the report of skipped samples.

It turns settings (shard URLs, batch size, workers, template, resampling) into the encoder of
``data.encoders`` and the stream of ``data.pipeline``, checks that every reader gets shards, and
generates the embedded ShapeWorld shards on first use.
"""

from __future__ import annotations

import logging
import math
import os
from collections import Counter
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, Literal

import lightning as L

from dress_lightning.atomic import claim
from dress_lightning.conditions import ConditionPlacement
from dress_lightning.conversation import ConversationFormatter, TemplateName
from dress_lightning.data.encoders import ENCODERS, PromptEncoder, SampleEncoder
from dress_lightning.data.pipeline import EpochDataLoader, Source, StreamPosition, build_pipeline
from dress_lightning.data.shapeworld import ShapeWorldShards
from dress_lightning.data.shards import expand_shard_urls, holds_samples, missing_local_shards, write_shapeworld
from dress_lightning.models.factory import VisionLanguageConfig, build_tokenizer
from dress_lightning.models.vision import describe_vision_tower

log = logging.getLogger(__name__)


def ensure_shapeworld_shards(out: Path, spec: ShapeWorldShards, poll_seconds: float = 1.0) -> None:
    """Generate ``spec`` into ``out`` unless it holds samples; safe when several processes start at once.

    Two jobs on a fresh clone (two evaluations, one experiment seed per core) would otherwise write the
    same ``.tar.partial`` files and crash each other: one process claims ``{out}.generating`` and writes,
    the others wait until it lets go of the claim (the set is whole then), then find the shards there.
    """
    claim_path = Path(f"{out}.generating")
    if holds_samples(out) and not claim_path.exists():
        return
    with claim(claim_path, lambda: False, f"ShapeWorld {spec.split} shards in {out}", poll_seconds):
        if holds_samples(out):
            return
        log.info("Generating %d ShapeWorld %s samples into %s (first use).", spec.samples, spec.split, out)
        write_shapeworld(out, spec.split, spec.samples, seed=spec.seed, shard_size=spec.shard_size,
                         question_types=spec.question_types, harmful_share=spec.harmful_share)


class ShardDataModule(L.LightningDataModule):
    """Streams image + conversation shards (any WebDataset URL: paths, brace patterns, ``pipe:``)."""

    def __init__(
        self,
        train_shards: str | list[str] | None = None,
        val_shards: str | list[str] | None = None,
        predict_shards: str | list[str] | None = None,
        predict_condition: str | None = None,
        model: VisionLanguageConfig | None = None,
        batch_size: int = 8,
        num_workers: int = 2,
        max_length: int = 512,
        sample_format: Literal["conversation", "caption"] = "conversation",
        template: TemplateName = "vicuna_v1",
        system_prompt: str | None = None,
        condition_placement: ConditionPlacement | None = None,
        shuffle_buffer: int = 1000,
        resampled: bool = False,
        epoch_length: int | None = None,
        group_by_length: int = 0,
        pad_to_multiple_of: int = 8,
        pack_sequences: bool = False,
        pack_length: int | None = None,
        seed: int | None = None,
        train_shapeworld: ShapeWorldShards | None = None,
        val_shapeworld: ShapeWorldShards | None = None,
        predict_shapeworld: ShapeWorldShards | None = None,
    ) -> None:
        """
        Args:
            train_shards: Training shards: a directory of ``.tar`` files, a brace pattern
                (``data/shards/train-{000000..000009}.tar``), a URL (``pipe:aws s3 cp ... -``) or a list of these.
            val_shards: Validation shards, same forms; read in order, every sample once.
            predict_shards: Prompt shards for ``predict`` / rollouts: the first user turn of each sample.
            predict_condition: Feedback condition text prepended to every generated response (None: no condition).
            model: The model config; its tokenizer and vision transform shape the batches (linked from the model).
            batch_size: Samples per batch on each rank.
            num_workers: DataLoader worker processes per rank.
            max_length: Token budget per sample; longer conversations lose trailing text, never image tokens.
            sample_format: ``conversation`` trains on the dialogue; ``caption`` on one caption (pretraining).
            template: Conversation template: ``vicuna_v1`` or the tokenizer's own ``chat_template``.
            system_prompt: System prompt override (None: the template's default).
            condition_placement: Where a feedback condition goes: before the response (``assistant_prefix``, the
                default), after the user turn (``user_suffix``) or before it (``user_prefix``). Conditional RL takes it
                from its condition settings (``condition.placement``), which the checkpoint records.
            shuffle_buffer: Samples held in the shuffle buffer (training only).
            resampled: Draw shards with replacement (infinite stream); needs ``epoch_length``.
            epoch_length: Samples per epoch over all ranks in resampled mode.
            group_by_length: Sort this many batches' worth of samples by length before batching (0: off).
            pad_to_multiple_of: Round padded lengths up to a multiple of this (tensor-core friendly).
            pack_sequences: Padding-free batches: lay each batch's samples end to end in rows of about
                ``pack_length`` tokens, attention within each sample only (``encoders.pack``). The samples and the
                loss are the ones unpacked batches give; the padding positions are (nearly all) gone. Needs an LM
                whose attention follows ``position_ids`` when no attention mask is given (transformers' Llama,
                Qwen2, Mistral, ...).
            pack_length: Tokens per packed row to aim for (None: ``max_length``). Attention runs over whole rows
                (masked, not skipped, on CPU), so rows about twice a typical sample keep its cost while packing.
            seed: Base seed of shard order, sample shuffle and resampling; None: the run's ``seed_everything``
                (so ``fit --seed_everything 1`` also draws another data order; 0 when no run seed is set).
            train_shapeworld: Generate ShapeWorld shards into ``train_shards`` (a directory) if it has none.
            val_shapeworld: Generate ShapeWorld shards into ``val_shards`` (a directory) if it has none.
            predict_shapeworld: Generate ShapeWorld shards into ``predict_shards`` (a directory) if it has none.
        """
        super().__init__()
        if resampled and not epoch_length:
            raise ValueError("resampled=True streams forever: set data.epoch_length (samples per epoch, all ranks).")
        self.train_shards = train_shards
        self.val_shards = val_shards
        self.predict_shards = predict_shards
        self.predict_condition = predict_condition
        self.model_config = model or VisionLanguageConfig()
        self.batch_size = batch_size
        self.num_workers = num_workers
        self.max_length = max_length
        self.sample_format = sample_format
        self.template = template
        self.system_prompt = system_prompt
        self.condition_placement: ConditionPlacement = condition_placement or "assistant_prefix"
        self.shuffle_buffer = shuffle_buffer
        self.resampled = resampled
        self.epoch_length = epoch_length
        self.group_by_length = group_by_length
        self.pad_to_multiple_of = pad_to_multiple_of
        self.pack_sequences = pack_sequences
        self.pack_length = pack_length
        self.seed = seed
        self.train_shapeworld = train_shapeworld
        self.val_shapeworld = val_shapeworld
        self.predict_shapeworld = predict_shapeworld
        self.skipped: Counter = Counter()
        """Samples skipped so far, by reason, summed over workers (updated as batches arrive)."""
        self.num_truncated = 0
        self.encoder: SampleEncoder | None = None
        self._train_loader: EpochDataLoader | None = None
        self.exclude_prompt_ids: set[str] = set()
        """Prompt ids ``predict`` skips (set by resumable jobs such as rollouts)."""
        self._resume_state: dict[str, int] | None = None

    def prepare_data(self) -> None:
        # Runs once per node before setup: the embedded default works from a fresh clone.
        for shards, spec in (
            (self.train_shards, self.train_shapeworld),
            (self.val_shards, self.val_shapeworld),
            (self.predict_shards, self.predict_shapeworld),
        ):
            if spec is None:
                continue
            if not isinstance(shards, str) or "{" in shards or ":" in shards:
                raise ValueError(f"ShapeWorld shards are generated into a directory; got shards={shards!r}.")
            ensure_shapeworld_shards(Path(shards), spec)

    def setup(self, stage: str | None = None) -> None:
        if self.encoder is not None:
            return
        tokenizer = build_tokenizer(self.model_config)
        spec = describe_vision_tower(
            self.model_config.vision_model, self.model_config.vision_pretrained, self.model_config.vision_layer
        )
        formatter = ConversationFormatter(
            tokenizer,
            num_image_tokens=spec.num_patches,
            template=self.template,
            max_length=self.max_length,
            system_prompt=self.system_prompt,
            condition_placement=self.condition_placement,
        )
        self.encoder = self.make_encoder(formatter, spec.image_transform)

    @property
    def data_seed(self) -> int:
        """``seed``, or the run's global seed (``seed_everything`` sets ``PL_GLOBAL_SEED``) when it is None."""
        return self.seed if self.seed is not None else int(os.environ.get("PL_GLOBAL_SEED", 0))

    def make_encoder(self, formatter: ConversationFormatter, image_transform: Callable) -> SampleEncoder:
        """The per-sample encoder; tasks that condition on feedback override this."""
        return ENCODERS[self.sample_format](formatter, image_transform)

    def _rank(self) -> tuple[int, int]:
        trainer = self.trainer
        return (trainer.global_rank, trainer.world_size) if trainer is not None else (0, 1)

    def _source(self, shards: str | list[str], setting: str, encoder: SampleEncoder, weight: float = 1.0) -> Source:
        """The shard set ``shards`` (configured as ``data.init_args.{setting}``); missing local files are an error."""
        urls = expand_shard_urls([shards] if isinstance(shards, str) else shards)
        if not urls:
            raise FileNotFoundError(f"No .tar shards found for data.init_args.{setting}={shards!r}.")
        missing = missing_local_shards(urls)
        if missing:
            raise FileNotFoundError(
                f"data.init_args.{setting}={shards!r}: {len(missing)} shard(s) do not exist (e.g. {missing[0]}). "
                "Point it at a directory of .tar shards, a brace pattern of existing files or a URL."
            )
        return Source(urls, encoder, weight)

    def _loader(self, shards: str | list[str], setting: str, encoder: SampleEncoder | None = None) -> EpochDataLoader:
        if self.encoder is None:
            self.setup()
        return self._mixed_loader([self._source(shards, setting, encoder or self.encoder)], train=False)

    def _mixed_loader(self, sources: Sequence[Source], train: bool) -> EpochDataLoader:
        rank, world_size = self._rank()
        resampled = self.resampled and train
        readers = max(self.num_workers, 1) * world_size
        urls = sources[0].urls
        if not resampled and len(urls) < readers:
            raise ValueError(
                f"{len(urls)} shard(s) for {readers} readers ({max(self.num_workers, 1)} worker(s) x {world_size} "
                "rank(s)): some readers would get no data (and DDP would hang). Write more, smaller shards "
                "(--shard-size), lower data.num_workers, or set data.resampled=true with data.epoch_length."
            )
        batches_per_worker = None
        if resampled:
            batches_per_worker = math.ceil(self.epoch_length / (readers * self.batch_size))
        if self.pack_sequences and not all(source.encoder.packable for source in sources):
            raise ValueError(
                f"data.init_args.pack_sequences: {type(self).__name__}'s batches cannot be packed (their rows are "
                "paired or fixed-length); set pack_sequences: false"
            )
        position = StreamPosition(rank=rank, world_size=world_size, seed=self.data_seed)
        pipeline = build_pipeline(
            sources,
            position,
            batch_size=self.batch_size,
            shuffle=train,
            shuffle_buffer=self.shuffle_buffer,
            resampled=resampled,
            batches_per_worker=batches_per_worker,
            group_by_length=self.group_by_length if train else 0,
            pad_to_multiple_of=self.pad_to_multiple_of,
            pack_length=(self.pack_length or self.max_length) if self.pack_sequences else None,
        )
        return EpochDataLoader(pipeline, position, self.skipped, require_batches=train, num_workers=self.num_workers)

    def train_sources(self) -> list[Source]:
        """The shard sets the training stream draws from (one here; conditional RL mixes several)."""
        if self.train_shards is None:
            raise ValueError("data.train_shards is not set.")
        return [self._source(self.train_shards, "train_shards", self.encoder)]

    def train_dataloader(self) -> EpochDataLoader:
        if self.encoder is None:
            self.setup()
        self._train_loader = self._mixed_loader(self.train_sources(), train=True)
        if self._resume_state:
            self._train_loader.resume(self._resume_state["epoch"], self._resume_state["batches_done"])
            self._resume_state = None
        return self._train_loader

    def state_dict(self) -> dict[str, int]:
        # Saved in checkpoints. Lightning's own progress counts the batches trained on; the loader
        # cannot, because the fit loop fetches one batch ahead.
        if self._train_loader is None or self.trainer is None:
            return {}
        progress = self.trainer.fit_loop.epoch_loop.batch_progress
        epoch, done = self._train_loader.position.epoch, progress.current.processed
        if progress.is_last_batch:
            epoch, done = epoch + 1, 0
        return {"epoch": epoch, "batches_done": done}

    def load_state_dict(self, state: dict[str, int]) -> None:
        self._resume_state = dict(state) or None

    def val_dataloader(self) -> EpochDataLoader | list:
        return [] if self.val_shards is None else self._loader(self.val_shards, "val_shards")

    def predict_dataloader(self) -> EpochDataLoader:
        """Generation prompts (first user turn of each sample), every sample once, split over ranks."""
        if self.predict_shards is None:
            raise ValueError("data.predict_shards is not set.")
        encoder = PromptEncoder(self.encoder.formatter, self.encoder.image_transform, self.predict_condition,
                                frozenset(self.exclude_prompt_ids))
        return self._loader(self.predict_shards, "predict_shards", encoder=encoder)

    def on_after_batch_transfer(self, batch: dict[str, Any], dataloader_idx: int) -> dict[str, Any]:
        self.num_truncated += batch.get("num_truncated", 0)
        return batch


class SkippedSamplesReport(L.Callback):
    """Shows the samples the data pipeline skipped, by reason: in the progress bar, the logged metrics and a summary.

    Reads ``ShardDataModule.skipped`` (summed over workers as batches arrive); ``data/skipped`` is
    the total (progress bar), ``data/skipped/<reason>`` one metric per reason.
    """

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, outputs, batch, batch_idx) -> None:
        skipped = self._skipped(trainer)
        if skipped is None:
            return
        pl_module.log("data/skipped", float(sum(skipped.values())), prog_bar=True, on_step=True, on_epoch=False,
                      batch_size=1)
        for reason, count in skipped.items():
            pl_module.log(f"data/skipped/{metric_name(reason)}", float(count), on_step=True, on_epoch=False,
                          batch_size=1)

    def on_fit_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        skipped = self._skipped(trainer)
        if skipped is None or not trainer.is_global_zero:
            return
        if skipped:
            reasons = ", ".join(f"{reason}: {count}" for reason, count in skipped.most_common())
            log.warning("The data pipeline skipped %d sample(s) on rank 0: %s.", sum(skipped.values()), reasons)
        else:
            log.info("The data pipeline skipped no samples.")

    @staticmethod
    def _skipped(trainer: L.Trainer) -> Counter | None:
        return getattr(trainer.datamodule, "skipped", None)


def metric_name(reason: str) -> str:
    """A skip reason as a metric name part: ``unreadable (ReadError)`` -> ``unreadable_ReadError``."""
    return "_".join("".join(c if c.isalnum() else " " for c in reason).split())
