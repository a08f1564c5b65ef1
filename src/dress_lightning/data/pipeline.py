"""Streaming WebDataset shards into model batches: a flat list of named pipeline stages.

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

import random
import tarfile
import zlib
from collections import Counter
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import webdataset as wds
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from dress_lightning.conversation import ConversationFormatError
from dress_lightning.data.encoders import SampleEncoder
from dress_lightning.data.schema import SampleValidationError, decode_sample
from dress_lightning.data.skips import SkipRecord

SHARD_READ_ERRORS = (OSError, EOFError, ValueError, tarfile.TarError, zlib.error)
"""What opening and reading a missing, truncated or damaged shard raises; other errors are bugs and propagate."""

SKIPPED_KEY = "skipped"
"""Batch entry: samples skipped since the previous batch of the same worker, by reason."""


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
        """The counts since the last call, by reason; the counter starts again from zero."""
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
        """This DataLoader worker's index and the number of workers ((0, 1) in the main process)."""
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
        """Pass the shard draws through; raise once every shard has been drawn and read without a sample."""
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
        """Pass the samples read through; each one shows that the shards are not all unreadable."""
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
    pack_length: int | None = None,
) -> wds.DataPipeline:
    """The WebDataset pipeline of one rank: encoded sample streams (mixed by weight if several) -> batches.

    With ``pack_length`` each batch is laid out padding-free in rows of about that many tokens
    (``SampleEncoder.pack``); None pads one sample per row.
    """
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

    def make_batch(examples: list[dict]) -> dict:
        if pack_length is not None:
            return encoder.pack(examples, pack_length, pad_to_multiple_of)
        return encoder.collate(examples, pad_to_multiple_of)

    pipeline = wds.DataPipeline(
        samples,
        lambda src: batch_examples(src, batch_size, make_batch, skips, position, group_by_length),
    )
    if batches_per_worker is not None:
        pipeline = pipeline.with_epoch(nbatches=batches_per_worker)
    return pipeline
