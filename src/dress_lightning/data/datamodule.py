"""Streaming WebDataset shards into model batches: a flat list of named pipeline stages and a DataModule.

Stages (``build_pipeline``), in order:
  shard list  -> this rank's and this worker's shards (disjoint, reshuffled each epoch), or shards
                 drawn with replacement in resampled mode
  tar reading -> raw samples; unreadable shards and truncated members are skipped and counted
  shuffle     -> a sample buffer seeded by (seed, epoch, rank, worker)
  encode      -> decode + validate the record, render the conversation, mask labels, preprocess the
                 image with the vision tower's own transform; refused samples are skipped and counted
  batch       -> dynamic padding, optionally grouping samples of similar length
"""

from __future__ import annotations

import hashlib
import logging
import math
import random
import tarfile
import zlib
from collections import Counter
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import lightning as L
import torch
import webdataset as wds
from PIL import Image
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from dress_lightning.conversation import (
    IGNORE_INDEX,
    ConditionPlacement,
    ConversationFormatError,
    ConversationFormatter,
    TemplateName,
)
from dress_lightning.data.images import decode_image
from dress_lightning.data.schema import Sample, SampleValidationError, decode_sample
from dress_lightning.data.shards import expand_shard_urls, holds_samples, missing_local_shards, write_shapeworld
from dress_lightning.data.skips import SkipRecord
from dress_lightning.models.factory import VisionLanguageConfig, build_tokenizer
from dress_lightning.models.vision import describe_vision_tower
from dress_lightning.special_tokens import IMAGE_TOKEN

log = logging.getLogger(__name__)

SHARD_READ_ERRORS = (OSError, EOFError, ValueError, tarfile.TarError, zlib.error)
"""What opening and reading a missing, truncated or damaged shard raises; other errors are bugs and propagate."""

SKIPPED_KEY = "skipped"
"""Batch entry: samples skipped since the previous batch of the same worker, by reason."""


def image_id(image: bytes) -> str:
    """Content digest of an encoded image: the key under which its vision features may be cached."""
    return hashlib.blake2b(image, digest_size=16).hexdigest()


class SampleEncoder:
    """Decoded shard sample -> one training example (input_ids, labels, pixel_values)."""

    def __init__(self, formatter: ConversationFormatter, image_transform: Callable[[Image.Image], torch.Tensor]):
        self.formatter = formatter
        self.image_transform = image_transform

    def select(self, sample: Sample) -> tuple[list[dict], list[str | None] | None, list[bool] | None]:
        """What to train on: the conversation, a condition per assistant turn, which turns carry loss.

        Plain SFT: the whole conversation, no conditions, every response (conditional RL overrides this).
        """
        return sample.record["conversation"], None, None

    def collate(self, examples: Sequence[dict[str, Any]], pad_to_multiple_of: int = 1) -> dict[str, Any]:
        """Batch encoded examples (right padding for training)."""
        return collate(examples, self.formatter.tokenizer.pad_token_id, pad_to_multiple_of)

    def __call__(self, sample: Sample) -> dict[str, Any]:
        encoded = self.formatter.encode(*self.select(sample))
        with decode_image(sample.image, sample.record["id"]) as image:
            pixel_values = self.image_transform(image.convert("RGB"))
        return {
            "id": sample.record["id"],
            "input_ids": torch.tensor(encoded.input_ids),
            "labels": torch.tensor(encoded.labels),
            "pixel_values": pixel_values,
            "image_id": image_id(sample.image),
            "num_truncated": encoded.num_truncated,
        }


class CaptionEncoder(SampleEncoder):
    """Caption data for projector pretraining: ``<image>`` + a brief-description request -> one caption."""

    INSTRUCTIONS = (
        "Describe the image briefly.",
        "Give a short caption for this image.",
        "Summarize the visual content of the image.",
    )

    def select(self, sample: Sample) -> tuple[list[dict], None, None]:
        captions = sample.record["annotations"]["captions"]
        if not captions:
            raise ConversationFormatError(f"sample {sample.record['id']!r} has no caption to pretrain on")
        # crc32, not hash(): the choice must not change with PYTHONHASHSEED across workers and runs.
        pick = zlib.crc32(sample.record["id"].encode())
        conversation = [
            {"role": "user", "content": f"{IMAGE_TOKEN}\n{self.INSTRUCTIONS[pick % len(self.INSTRUCTIONS)]}"},
            {"role": "assistant", "content": captions[pick % len(captions)]},
        ]
        return conversation, None, None


class PromptEncoder(SampleEncoder):
    """Generation prompts: the conversation up to its first user turn, left-padded in batches.

    The sample itself travels with the prompt so that judges and writers downstream see the
    annotations and the image.
    """

    def __init__(
        self,
        formatter: ConversationFormatter,
        image_transform: Callable,
        condition: str | None = None,
        exclude_ids: frozenset[str] = frozenset(),
    ) -> None:
        super().__init__(formatter, image_transform)
        self.condition = condition
        self.exclude_ids = exclude_ids

    def __call__(self, sample: Sample) -> dict[str, Any]:
        if sample.record["id"] in self.exclude_ids:
            raise SkipRecord("already done")
        prompt = self.formatter.encode_prompt(sample.record["conversation"][:1], self.condition)
        with decode_image(sample.image, sample.record["id"]) as image:
            pixel_values = self.image_transform(image.convert("RGB"))
        return {"id": sample.record["id"], "input_ids": torch.tensor(prompt), "pixel_values": pixel_values,
                "sample": sample}

    def collate(self, examples: Sequence[dict[str, Any]], pad_to_multiple_of: int = 1) -> dict[str, Any]:
        input_ids, attention_mask = left_pad([e["input_ids"] for e in examples], self.formatter.tokenizer.pad_token_id)
        return {
            "input_ids": input_ids,  # (B, T)
            "attention_mask": attention_mask,  # (B, T)
            "pixel_values": torch.stack([e["pixel_values"] for e in examples]),  # (B, 3, H, W)
            "ids": [e["id"] for e in examples],
            # Plain dicts: Lightning's device transfer cannot walk frozen dataclasses. Sample(**d) rebuilds one.
            "samples": [{"record": e["sample"].record, "image": e["sample"].image, "image_ext": e["sample"].image_ext}
                        for e in examples],
            "stop_token_ids": self.formatter.stop_token_ids,
        }


ENCODERS: dict[str, type[SampleEncoder]] = {"conversation": SampleEncoder, "caption": CaptionEncoder}


@dataclass
class ShapeWorldShards:
    """ShapeWorld shards to generate into an empty shard directory on first use."""

    split: Literal["train", "val", "test"] = "train"
    samples: int = 2000
    seed: int = 0
    shard_size: int = 250


def left_pad(prompts: Sequence[Sequence[int] | torch.Tensor], pad_token_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Left-pad prompts (generation appends on the right): input_ids and attention_mask, both (B, T)."""
    longest = max(len(p) for p in prompts)
    input_ids = torch.full((len(prompts), longest), pad_token_id, dtype=torch.long)
    attention_mask = torch.zeros((len(prompts), longest), dtype=torch.long)
    for row, prompt in enumerate(prompts):
        input_ids[row, longest - len(prompt) :] = torch.as_tensor(prompt)
        attention_mask[row, longest - len(prompt) :] = 1
    return input_ids, attention_mask


def collate(examples: Sequence[dict[str, Any]], pad_token_id: int, pad_to_multiple_of: int = 1) -> dict[str, Any]:
    """Right-pad to the longest example (rounded up to ``pad_to_multiple_of``) and stack."""
    longest = max(len(e["input_ids"]) for e in examples)
    length = math.ceil(longest / pad_to_multiple_of) * pad_to_multiple_of
    input_ids = torch.full((len(examples), length), pad_token_id, dtype=torch.long)
    labels = torch.full((len(examples), length), IGNORE_INDEX, dtype=torch.long)
    attention_mask = torch.zeros((len(examples), length), dtype=torch.long)
    for row, example in enumerate(examples):
        n = len(example["input_ids"])
        input_ids[row, :n] = example["input_ids"]
        labels[row, :n] = example["labels"]
        attention_mask[row, :n] = 1
    return {
        "input_ids": input_ids,  # (B, T)
        "attention_mask": attention_mask,  # (B, T)
        "labels": labels,  # (B, T)
        "pixel_values": torch.stack([e["pixel_values"] for e in examples]),  # (B, 3, H, W)
        "ids": [e["id"] for e in examples],
        "image_ids": [e["image_id"] for e in examples],
        "num_truncated": sum(e["num_truncated"] for e in examples),
    }


@dataclass
class SkipCounter:
    """Counts samples skipped inside one worker; each batch carries (and resets) the count."""

    counts: Counter = field(default_factory=Counter)

    def handler(self, error: Exception) -> bool:
        """webdataset exception handler: count a shard that cannot be read and continue; re-raise anything else."""
        if not isinstance(error, SHARD_READ_ERRORS):
            raise error
        self.counts[f"unreadable ({type(error).__name__})"] += 1
        return True

    def take(self) -> dict[str, int]:
        taken, self.counts = dict(self.counts), Counter()
        return taken


@dataclass
class StreamPosition:
    """Where this stream is: the rank/worker split and the epoch (drives every seed)."""

    rank: int
    world_size: int
    seed: int
    epoch: int = 0

    def rng(self, purpose: str) -> random.Random:
        """An RNG unique to (seed, epoch, rank, worker, purpose): no two streams shuffle alike."""
        info = get_worker_info()
        worker = info.id if info is not None else 0
        return random.Random(f"{self.seed}/{self.epoch}/{self.rank}/{worker}/{purpose}")

    def workers(self) -> tuple[int, int]:
        info = get_worker_info()
        return (info.id, info.num_workers) if info is not None else (0, 1)


def split_shards(urls: Sequence[str], position: StreamPosition, shuffle: bool) -> Iterator[dict[str, str]]:
    """This rank's and worker's share of the shards; the order is shuffled identically on every rank."""
    urls = list(urls)
    if shuffle:
        # Same permutation everywhere (no rank/worker in the seed), so the split below stays disjoint.
        random.Random(f"{position.seed}/{position.epoch}/shards").shuffle(urls)
    worker, num_workers = position.workers()
    mine = urls[position.rank :: position.world_size][worker::num_workers]
    for url in mine:
        yield {"url": url}


def resample_shards(urls: Sequence[str], position: StreamPosition, tag: str = "") -> Iterator[dict[str, str]]:
    """Shards drawn with replacement, forever; the epoch length is set on the pipeline."""
    rng = position.rng(f"resample/{tag}")
    while True:
        yield {"url": rng.choice(urls)}


class UnreadableShardWatch:
    """Stops a resampled stream that has drawn every one of its shards without reading a single sample.

    Resampling never ends by itself, so a shard set that is entirely unreadable would otherwise be
    drawn forever. The bound is exact, not a guess: it trips only once every distinct shard has
    failed since the last sample was read.
    """

    def __init__(self, urls: Sequence[str]) -> None:
        self.urls = set(urls)
        self.failed_since_last_sample: set[str] = set()

    def draws(self, shards: Iterable[dict[str, str]]) -> Iterator[dict[str, str]]:
        for shard in shards:
            self.failed_since_last_sample.add(shard["url"])
            yield shard
            # Back here once the shard was read to its end; a sample read from it would have cleared the set.
            if self.failed_since_last_sample >= self.urls:
                raise RuntimeError(
                    f"None of the {len(self.urls)} shard(s) of a resampled stream gave a readable sample "
                    f"(e.g. {sorted(self.urls)[:3]}): they are missing, empty or damaged. Check them with "
                    "`python -m dress_lightning data inspect`, or rebuild them."
                )

    def reads(self, samples: Iterable[dict[str, Any]]) -> Iterator[dict[str, Any]]:
        for sample in samples:
            self.failed_since_last_sample.clear()
            yield sample


def shuffle_samples(src: Iterable, position: StreamPosition, buffer: int, tag: str = "") -> Iterator:
    """Buffered shuffle with a seeded RNG (``wds.shuffle`` would seed from time and pid)."""
    rng, pool = position.rng(f"samples/{tag}"), []
    for item in src:
        pool.append(item)
        if len(pool) >= buffer:
            yield pool.pop(rng.randrange(len(pool)))
    rng.shuffle(pool)
    yield from pool


def encode_samples(src: Iterable[dict], encoder: SampleEncoder, skips: SkipCounter) -> Iterator[dict[str, Any]]:
    """Decode, validate and encode raw samples; refused ones are counted by reason, never trained on."""
    for raw in src:
        try:
            yield encoder(decode_sample(raw))
        except SampleValidationError:
            skips.counts["invalid sample"] += 1
        except ConversationFormatError:
            skips.counts["conversation refused"] += 1
        except SkipRecord as skip:
            skips.counts[skip.reason] += 1


def batch_examples(
    src: Iterable[dict],
    batch_size: int,
    make_batch: Callable[[list[dict]], dict],
    skips: SkipCounter,
    position: StreamPosition,
    group_by_length: int,
) -> Iterator[dict[str, Any]]:
    """Form batches; with ``group_by_length`` > 1, sort that many batches' worth by length first.

    Length grouping cuts padding waste; the batch order is shuffled again so lengths do not trend.
    Each batch is held back until the next one is formed, so the last batch also carries the skips
    that happened after it was filled.
    """
    pool_size = batch_size * max(group_by_length, 1)
    rng = position.rng("length-groups")

    def groups() -> Iterator[list[dict]]:
        pool: list[dict] = []
        for example in src:
            pool.append(example)
            if len(pool) == pool_size:
                yield pool
                pool = []
        if pool:
            yield pool

    def batches() -> Iterator[list[dict]]:
        for pool in groups():
            if group_by_length > 1:
                pool.sort(key=lambda e: len(e["input_ids"]))
            chunks = [pool[i : i + batch_size] for i in range(0, len(pool), batch_size)]
            if group_by_length > 1:
                rng.shuffle(chunks)
            yield from chunks

    pending = None
    for examples in batches():
        if pending is not None:
            yield {**make_batch(pending), SKIPPED_KEY: skips.take()}
        pending = examples
    if pending is not None:
        yield {**make_batch(pending), SKIPPED_KEY: skips.take()}
    elif skips.counts:
        # A worker whose every sample was skipped forms no batch: its counts travel alone (the loader drops the item).
        yield {SKIPPED_KEY: skips.take()}


class EpochDataLoader(DataLoader):
    """A DataLoader over an iterable pipeline that advances the stream's epoch on every pass.

    Workers are re-created each epoch (no persistent workers), so they start from the main
    process's ``position`` and reshuffle with the new epoch's seed. ``resume`` makes the next pass
    regenerate a given epoch's stream and skip the batches already trained on (mid-epoch resume).
    The skip counts every worker sends with its batches are summed into ``skipped``; a training
    stream that ends an epoch without a single batch raises instead of starting the next empty epoch.
    """

    def __init__(self, dataset: IterableDataset, position: StreamPosition, skipped: Counter | None = None,
                 require_batches: bool = False, **kwargs) -> None:
        super().__init__(dataset, batch_size=None, persistent_workers=False, **kwargs)
        self.position = position
        self.skipped = Counter() if skipped is None else skipped
        """Samples skipped so far, by reason, over all workers and epochs."""
        self.require_batches = require_batches
        self._started = False
        self._skip = 0

    def resume(self, epoch: int, batches_done: int) -> None:
        """Make the next pass replay ``epoch`` from batch ``batches_done`` on."""
        self.position.epoch, self._skip, self._started = epoch, batches_done, False

    def __iter__(self) -> Iterator[dict[str, Any]]:
        if self._started:
            self.position.epoch += 1
        self._started = True
        skip, self._skip = self._skip, 0
        index = 0
        for batch in super().__iter__():
            self.skipped.update(batch.pop(SKIPPED_KEY, {}))
            if not batch:  # only a skip report
                continue
            if index >= skip:
                yield batch
            index += 1
        if index == 0 and self.require_batches:
            skipped = dict(self.skipped) or "none"
            raise RuntimeError(
                f"Epoch {self.position.epoch} of the training stream gave no batch (samples skipped so far: "
                f"{skipped}): every shard is unreadable or every sample was refused. Check the shards with "
                "`python -m dress_lightning data inspect DIR`."
            )


@dataclass(frozen=True)
class Source:
    """One shard set of a stream, with the encoder its samples need and its share of a mix."""

    urls: Sequence[str]
    encoder: SampleEncoder
    weight: float = 1.0


def encoded_stream(
    source: Source, tag: str, position: StreamPosition, skips: SkipCounter, shuffle: bool, shuffle_buffer: int,
    resampled: bool,
) -> Iterator[dict[str, Any]]:
    """Shard list -> tar reading -> shuffle buffer -> encoding, for one source (see the module docstring)."""
    if resampled:
        watch = UnreadableShardWatch(source.urls)
        shards = watch.draws(resample_shards(source.urls, position, tag))
        samples = watch.reads(wds.tarfile_to_samples(handler=skips.handler)(shards))
    else:
        samples = wds.tarfile_to_samples(handler=skips.handler)(split_shards(source.urls, position, shuffle))
    if shuffle and shuffle_buffer > 1:
        samples = shuffle_samples(samples, position, shuffle_buffer, tag)
    return encode_samples(samples, source.encoder, skips)


def mix_streams(streams: Sequence[Iterator], weights: Sequence[float], rng: random.Random) -> Iterator:
    """Draw each sample from a stream chosen by weight; ends when the chosen stream ends."""
    while True:
        try:
            yield next(rng.choices(streams, weights)[0])
        except StopIteration:
            return


def build_pipeline(
    sources: Sequence[Source],
    position: StreamPosition,
    *,
    batch_size: int,
    shuffle: bool,
    shuffle_buffer: int = 1000,
    resampled: bool = False,
    batches_per_worker: int | None = None,
    group_by_length: int = 0,
    pad_to_multiple_of: int = 1,
) -> wds.DataPipeline:
    """The WebDataset pipeline of one rank: encoded sample streams (mixed by weight if several) -> batches."""
    if len(sources) > 1 and not resampled:
        raise ValueError("Mixing several shard sets needs resampled=true (with an epoch_length).")
    skips = SkipCounter()

    def samples() -> Iterator[dict[str, Any]]:
        streams = [
            encoded_stream(source, f"source{i}", position, skips, shuffle, shuffle_buffer, resampled)
            for i, source in enumerate(sources)
        ]
        if len(streams) == 1:
            return streams[0]
        return mix_streams(streams, [source.weight for source in sources], position.rng("mix"))

    encoder = sources[0].encoder  # all encoders of a stream share the formatter, hence the collation
    pipeline = wds.DataPipeline(
        samples,
        lambda src: batch_examples(
            src, batch_size, lambda examples: encoder.collate(examples, pad_to_multiple_of), skips, position,
            group_by_length,
        ),
    )
    if batches_per_worker is not None:
        pipeline = pipeline.with_epoch(nbatches=batches_per_worker)
    return pipeline


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
        condition_placement: ConditionPlacement = "assistant_prefix",
        shuffle_buffer: int = 1000,
        resampled: bool = False,
        epoch_length: int | None = None,
        group_by_length: int = 0,
        pad_to_multiple_of: int = 8,
        seed: int = 0,
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
            condition_placement: Where a feedback condition goes: before the response or after the user turn.
            shuffle_buffer: Samples held in the shuffle buffer (training only).
            resampled: Draw shards with replacement (infinite stream); needs ``epoch_length``.
            epoch_length: Samples per epoch over all ranks in resampled mode.
            group_by_length: Sort this many batches' worth of samples by length before batching (0: off).
            pad_to_multiple_of: Round padded lengths up to a multiple of this (tensor-core friendly).
            seed: Base seed of shard order, sample shuffle and resampling.
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
        self.condition_placement = condition_placement
        self.shuffle_buffer = shuffle_buffer
        self.resampled = resampled
        self.epoch_length = epoch_length
        self.group_by_length = group_by_length
        self.pad_to_multiple_of = pad_to_multiple_of
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
            out = Path(shards)
            if holds_samples(out):
                continue
            log.info("Generating %d ShapeWorld %s samples into %s (first use).", spec.samples, spec.split, out)
            write_shapeworld(out, spec.split, spec.samples, seed=spec.seed, shard_size=spec.shard_size)

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
        position = StreamPosition(rank=rank, world_size=world_size, seed=self.seed)
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
