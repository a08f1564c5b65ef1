"""Writing and reading WebDataset shards of schema samples, counting what had to be skipped.

``write_samples`` is the one loop every writing command shares: input items -> record-to-sample
function -> validation -> duplicate-key check -> ``webdataset.ShardWriter``; any input that fails
is skipped and counted by reason, never silently and never crashing midway. Shards are written
under ``.partial`` names and renamed only when all of them are complete. ``write_dataset`` adds what
a dataset directory needs around it (no accidental overwrite, the manifest), and
``write_shapeworld`` is the ShapeWorld generator as a library call.
"""

from __future__ import annotations

import functools
import json
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import webdataset as wds
from braceexpand import braceexpand
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, SpinnerColumn, TextColumn, TimeElapsedColumn

from dress_lightning.atomic import PARTIAL_SUFFIX, atomic_write_text, commit
from dress_lightning.data.schema import (
    SCHEMA_VERSION,
    Sample,
    SampleValidationError,
    decode_sample,
    encode_sample,
    validate_sample,
)
from dress_lightning.data.shapeworld import MIN_IMAGE_SIZE, first_turn_weights, generate_sample
from dress_lightning.data.skips import SkipLog, SkipRecord
from dress_lightning.version import __version__

SHARD_SUFFIX = ".tar"
SHARD_MTIME = 0
"""Fixed member mtime so the same samples always give byte-identical shards."""


@dataclass
class WriteReport:
    """What ``write_samples`` wrote and skipped."""

    written: int
    shards: list[Path]
    skips: SkipLog
    manifest: Path | None = None
    """The dataset manifest ``write_dataset`` wrote next to the shards."""


def shard_pattern(out_dir: Path, prefix: str) -> str:
    """The ``ShardWriter`` file pattern for a prefix: ``{out_dir}/{prefix}-000000.tar``..."""
    return str(out_dir / f"{prefix}-%06d{SHARD_SUFFIX}")


def existing_shards(out_dir: Path, prefix: str) -> list[Path]:
    """Shards a previous run wrote with this prefix."""
    return sorted(out_dir.glob(f"{prefix}-[0-9]*{SHARD_SUFFIX}"))


def progress_bar() -> Progress:
    """A Rich progress bar on stderr, so that stdout stays free for results (``inspect --json``)."""
    return Progress(
        SpinnerColumn(),
        TextColumn("[progress.description]{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
        console=Console(stderr=True),
    )


def write_samples(
    items: Iterable[tuple[str, Any]],
    to_sample: Callable[[Any], Sample],
    out_dir: Path,
    prefix: str,
    *,
    shard_size: int,
    tool: str,
    total: int | None = None,
) -> WriteReport:
    """Turn ``(where, input)`` items into validated samples and write them to ``.tar`` shards.

    ``where`` locates the input for messages (``file.jsonl:12``). An input that is already a
    ``SkipRecord`` (e.g. a malformed JSON line) is counted as such; ``to_sample`` raises
    ``SkipRecord`` for expected problems (missing image), and a ``KeyError``/``TypeError``/
    ``ValueError`` from it means the input record does not have the expected layout. A sample
    without provenance gets one naming ``tool`` and its input, to trace it back to its source.
    """
    out_dir.mkdir(parents=True, exist_ok=True)
    skips = SkipLog()
    seen_keys: set[str] = set()
    writer: wds.ShardWriter | None = None
    partials: list[Path] = []
    written = 0
    with progress_bar() as progress:
        task = progress.add_task(tool, total=total)
        try:
            for where, item in items:
                progress.advance(task)
                try:
                    if isinstance(item, SkipRecord):
                        raise item
                    sample = to_sample(item)
                    sample.record.setdefault("provenance", {"tool": tool, "version": __version__, "input": where})
                    validate_sample(sample.record, key=sample.key)
                    # Keys are sanitized ids; two ids may collide, and webdataset would merge them.
                    if sample.key in seen_keys:
                        raise SkipRecord("duplicate id", f"key {sample.key!r} was already written")
                except SkipRecord as skip:
                    skips.add(where, skip.reason, skip.detail)
                    continue
                except SampleValidationError as error:
                    skips.add(where, "invalid sample", str(error))
                    continue
                except (KeyError, TypeError, ValueError, AttributeError, IndexError) as error:
                    skips.add(where, "invalid record", f"{type(error).__name__}: {error}")
                    continue
                if writer is None:
                    # Opened lazily: a run that writes nothing must not leave an empty shard behind.
                    for unfinished in out_dir.glob(f"{prefix}-[0-9]*{SHARD_SUFFIX}{PARTIAL_SUFFIX}"):
                        unfinished.unlink()  # left by a crashed run
                    writer = wds.ShardWriter(
                        shard_pattern(out_dir, prefix) + PARTIAL_SUFFIX,
                        maxcount=shard_size,
                        verbose=0,
                        post=lambda name: partials.append(Path(name)),
                        encoder=False,
                        mtime=SHARD_MTIME,
                    )
                writer.write(encode_sample(sample))
                seen_keys.add(sample.key)
                written += 1
        finally:
            if writer is not None:
                writer.close()
    # Only now, with every new shard complete, do they take their names (replacing an earlier run's).
    shards = []
    for partial in partials:
        shard = partial.with_name(partial.name.removesuffix(PARTIAL_SUFFIX))
        commit(partial, shard)
        shards.append(shard)
    return WriteReport(written=written, shards=shards, skips=skips)


def write_dataset(
    items: Iterable[tuple[str, Any]],
    to_sample: Callable[[Any], Sample],
    out_dir: Path,
    prefix: str,
    *,
    shard_size: int,
    tool: str,
    settings: Mapping[str, Any],
    total: int | None = None,
    overwrite: bool = False,
    manifest_extra: Mapping[str, Any] | None = None,
) -> WriteReport:
    """``write_samples`` into a dataset directory, then its manifest ``{prefix}-manifest.json``.

    Refuses (``FileExistsError``) to replace shards an earlier run wrote with this prefix unless
    ``overwrite``; the old shards are replaced only once the new ones exist. The manifest records
    ``settings`` (what produced the data), the counts, and ``manifest_extra`` (e.g. how an eval set
    was chosen).
    """
    old = existing_shards(out_dir, prefix) if out_dir.is_dir() else []
    if old and not overwrite:
        raise FileExistsError(
            f"{out_dir} already holds {len(old)} shard(s) named {prefix}-*.tar; "
            "pass --overwrite to replace them or --prefix to write next to them"
        )
    report = write_samples(items, to_sample, out_dir, prefix, shard_size=shard_size, tool=tool, total=total)
    if report.written:
        for path in set(old) - set(report.shards):  # an earlier, longer run's extra shards
            path.unlink()
    manifest = {
        "command": tool,
        "args": {key: _jsonable(value) for key, value in settings.items()},
        "written": report.written,
        "skipped": report.skips.counts(),
        "shards": [p.name for p in report.shards],
        "schema_version": SCHEMA_VERSION,
        "dress_lightning_version": __version__,
        "created": datetime.now(UTC).isoformat(timespec="seconds"),
        **(manifest_extra or {}),
        "skipped_records": [vars(r) for r in report.skips.records],
    }
    report.manifest = out_dir / f"{prefix}-manifest.json"
    atomic_write_text(report.manifest, json.dumps(manifest, indent=2, ensure_ascii=False) + "\n")
    return report


def _jsonable(value: Any) -> Any:
    """Setting values as JSON: paths (also in lists) become strings."""
    if isinstance(value, list):
        return [_jsonable(v) for v in value]
    return str(value) if isinstance(value, Path) else value


def write_shapeworld(
    out_dir: Path,
    split: str,
    samples: int,
    *,
    seed: int = 0,
    image_size: int = 128,
    shard_size: int = 1000,
    prefix: str | None = None,
    overwrite: bool = False,
    question_types: Sequence[str] | None = None,
    harmful_share: float | None = None,
) -> WriteReport:
    """Generate ``samples`` deterministic ShapeWorld samples of ``split`` into shards (the ``data shapeworld`` command).

    ``question_types`` / ``harmful_share`` change the mix of first questions (``shapeworld.first_turn_weights``).
    """
    if image_size < MIN_IMAGE_SIZE:
        raise ValueError(f"image_size must be at least {MIN_IMAGE_SIZE}, got {image_size}")
    first_turn_weights(question_types, harmful_share)  # refuse a bad mix before writing anything
    settings = {"out": out_dir, "split": split, "samples": samples, "seed": seed, "image_size": image_size,
                "shard_size": shard_size, "prefix": prefix or f"shapeworld-{split}", "overwrite": overwrite,
                "question_types": None if question_types is None else list(question_types),
                "harmful_share": harmful_share}
    return write_dataset(
        ((f"{split}[{i}]", i) for i in range(samples)),
        functools.partial(generate_sample, split, seed, image_size=image_size, question_types=question_types,
                          harmful_share=harmful_share),
        Path(out_dir),
        settings["prefix"],
        shard_size=shard_size,
        tool="dress-lightning data shapeworld",
        settings=settings,
        total=samples,
        overwrite=overwrite,
    )


def expand_shard_urls(sources: Sequence[str]) -> list[str]:
    """Expand directories (their ``*.tar``) and brace patterns into a flat list of shard URLs."""
    urls: list[str] = []
    for source in sources:
        path = Path(source)
        if path.is_dir():
            urls += [str(p) for p in sorted(path.glob(f"*{SHARD_SUFFIX}"))]
        else:
            urls += list(braceexpand(source))
    return urls


def missing_local_shards(urls: Sequence[str]) -> list[str]:
    """The URLs that name local files which do not exist (``pipe:`` and remote URLs are not checked)."""
    return [url for url in urls if "://" not in url and not url.startswith("pipe:") and not Path(url).is_file()]


def holds_samples(directory: Path) -> bool:
    """Whether ``directory`` has a shard with at least one readable sample (an empty or damaged ``.tar`` is no data)."""
    urls = expand_shard_urls([str(directory)]) if Path(directory).is_dir() else []
    return next(iter_samples(urls, SkipLog()), None) is not None


def iter_samples(urls: Sequence[str], skips: SkipLog) -> Iterator[Sample]:
    """Read shards in order and yield decoded, validated samples; bad ones are counted in ``skips``."""
    for url in urls:
        yield from _iter_shard(url, skips)


def _iter_shard(url: str, skips: SkipLog) -> Iterator[Sample]:
    errors: list[Exception] = []

    def keep_going(error: Exception) -> bool:
        errors.append(error)
        return True

    # One dataset per shard: webdataset may report one truncation at several levels, and a
    # damaged shard should count once, after the samples before the damage have been read.
    # nodesplitter=None: this reads the shards it is given, also inside a distributed job.
    members = 0
    for raw in wds.WebDataset(url, shardshuffle=False, handler=keep_going, empty_check=False, nodesplitter=None):
        members += 1
        try:
            yield decode_sample(raw)
        except SampleValidationError as error:
            skips.add(f"{url}:{raw.get('__key__', '?')}", "invalid sample", str(error))
    if errors:
        first = errors[0]
        skips.add(url, "unreadable shard", f"{type(first).__name__}: {first.args[0] if first.args else ''}")
    elif members == 0:
        skips.add(url, "empty shard", "no samples in it")
