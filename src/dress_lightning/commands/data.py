"""``dress-lightning data ...``: generate ShapeWorld shards, convert released data, inspect shards."""

from __future__ import annotations

import argparse
import functools
import json
import math
import sys
from collections import Counter
from collections.abc import Callable, Iterable, Iterator, Sequence
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.table import Table

from dress_lightning.aspects import ASPECTS
from dress_lightning.data.schema import DEFAULT_SCORE_MAX, MAX_IMAGE_MB, Sample
from dress_lightning.data.shapeworld import MIN_IMAGE_SIZE, QUESTION_TYPES, SPLITS

PROG = "dress-lightning data"

CHAIR_NUM_IMAGES = 500
"""Default size of the CHAIR image subset (the usual CHAIR evaluation on COCO val2014)."""


class _CommandError(Exception):
    """A problem with the command's inputs; reported as ``error: ...`` with exit code 2."""


def _positive_int(text: str) -> int:
    value = int(text)
    if value <= 0:
        raise argparse.ArgumentTypeError(f"must be a positive integer, got {value}")
    return value


def _positive_float(text: str) -> float:
    value = float(text)
    if not (math.isfinite(value) and value > 0):
        raise argparse.ArgumentTypeError(f"must be a positive number, got {text}")
    return value


def _add_max_image_mb(sub: argparse.ArgumentParser) -> None:
    sub.add_argument(
        "--max-image-mb", type=_positive_float, default=MAX_IMAGE_MB,
        help="skip image files larger than this many MiB unread (default: %(default)s)",
    )


def _image_dir(args: argparse.Namespace):
    from dress_lightning.data.converters import ImageDir

    return ImageDir(args.images, max_bytes=int(args.max_image_mb * 2**20))


def build_parser() -> argparse.ArgumentParser:
    """The ``data`` argument parser with one subparser per command."""
    parser = argparse.ArgumentParser(prog=PROG, description=__doc__)
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    def writer(name: str, help_text: str, default_prefix: str | None) -> argparse.ArgumentParser:
        sub = commands.add_parser(name, help=help_text, description=help_text)
        sub.add_argument(
            "--out", type=Path, required=True, help="directory to write the .tar shards and the manifest into"
        )
        sub.add_argument(
            "--shard-size", type=_positive_int, default=1000, help="samples per shard (default: %(default)s)"
        )
        sub.add_argument(
            "--prefix", default=default_prefix, help="shard file name prefix: PREFIX-000000.tar (default: %(default)s)"
        )
        sub.add_argument(
            "--overwrite", action="store_true", help="replace shards a previous run wrote with this prefix"
        )
        return sub

    sub = writer("shapeworld", "generate deterministic synthetic ShapeWorld shards", None)
    sub.add_argument("--split", choices=SPLITS, required=True, help="splits draw disjoint seed streams")
    sub.add_argument("--samples", type=_positive_int, required=True, help="number of samples to generate")
    sub.add_argument("--seed", type=int, default=0, help="generator seed (default: %(default)s)")
    sub.add_argument(
        "--image-size", type=_positive_int, default=128, help="image side in pixels (default: %(default)s)"
    )
    sub.add_argument("--question-types", nargs="+", choices=QUESTION_TYPES, default=None,
                     help="first question types to draw (default: all, in the default mix)")
    sub.add_argument("--harmful-share", type=float, default=None,
                     help="share of harmful-intent prompts, answered by a refusal (default: the mix's 15%%)")
    sub.set_defaults(run=_run_shapeworld)

    sub = writer("convert-llava", "convert LLaVA instruction JSON", "llava")
    sub.add_argument("--json", type=Path, required=True, help="LLaVA instruction JSON file (a list of records)")
    sub.add_argument("--images", type=Path, required=True, help="image directory (COCO train2017)")
    _add_max_image_mb(sub)
    sub.set_defaults(run=_run_convert_llava)

    sub = writer("convert-nlf", "convert DRESS LVLM_NLF jsonl files", "dress_nlf")
    sub.add_argument(
        "--jsonl", type=Path, nargs="+", required=True, help="{helpfulness,hallucination,harmlessness}_nlf.jsonl"
    )
    sub.add_argument("--images", type=Path, required=True, help="image directory (COCO train2017)")
    _add_max_image_mb(sub)
    sub.add_argument("--aspect", choices=ASPECTS, help="aspect of every file (default: from each file name)")
    sub.add_argument(
        "--score-max",
        type=_positive_float,
        default=DEFAULT_SCORE_MAX,
        help="top of the rating scale (default: %(default)s)",
    )
    sub.set_defaults(run=_run_convert_nlf)

    sub = writer("convert-vlsafe", "convert a VLSafe jsonl file (examine or alignment split)", None)
    sub.add_argument(
        "--jsonl", type=Path, required=True, help="harmlessness_examine.jsonl or harmlessnss_alignment.jsonl"
    )
    sub.add_argument("--images", type=Path, required=True, help="image directory (COCO train2017)")
    _add_max_image_mb(sub)
    sub.set_defaults(run=_run_convert_vlsafe)

    sub = writer("convert-coco", "convert COCO captions_*.json and/or instances_*.json", "coco")
    sub.add_argument("--annotations", type=Path, nargs="+", required=True, help="COCO annotation files")
    sub.add_argument("--images", type=Path, required=True, help="image directory (e.g. train2017)")
    _add_max_image_mb(sub)
    sub.set_defaults(run=_run_convert_coco)

    sub = writer(
        "convert-llava-bench",
        "convert LLaVA-Bench / LLaVA-Eval questions (+ optional reference answers and image context) to a QA eval set",
        "llava-bench",
    )
    sub.add_argument(
        "--questions",
        type=Path,
        required=True,
        help="questions.jsonl: {question_id, image, text, category: conv|detail|complex} per line",
    )
    sub.add_argument("--images", type=Path, required=True, help="image directory (images by file name)")
    _add_max_image_mb(sub)
    sub.add_argument(
        "--answers",
        type=Path,
        help="answers_gpt4.jsonl: {question_id, text} reference answers, the assistant turn (default: prompt-only)",
    )
    sub.add_argument(
        "--context",
        type=Path,
        help="context.jsonl: {image, caption} image descriptions for the judge, stored as annotations.captions",
    )
    sub.set_defaults(run=_run_convert_llava_bench)

    sub = writer("convert-pope", "convert POPE question files (random / popular / adversarial, COCO val2014)", None)
    sub.add_argument(
        "--questions", type=Path, nargs="+", required=True,
        help="coco_pope_{random,popular,adversarial}.json: {question_id, image, text, label} per line",
    )
    sub.add_argument("--images", type=Path, required=True, help="image directory (COCO val2014)")
    sub.add_argument("--split", help="random, popular or adversarial: the split of every file (default: from each name)")
    sub.set_defaults(run=_run_convert_pope)

    sub = writer(
        "convert-chair",
        "make a CHAIR captioning eval set from COCO annotations: a fixed image subset, one prompt per instruction",
        "chair",
    )
    sub.add_argument(
        "--annotations", type=Path, nargs="+", required=True, help="instances_*.json and captions_*.json (e.g. val2014)"
    )
    sub.add_argument("--images", type=Path, required=True, help="image directory (e.g. val2014)")
    _add_max_image_mb(sub)
    choose = sub.add_mutually_exclusive_group()
    choose.add_argument(
        "--image-ids",
        type=Path,
        help="file of COCO image ids, one a line (e.g. PREFIX_image_ids.txt of an earlier run)",
    )
    choose.add_argument(
        "--num-images",
        type=_positive_int,
        help=f"draw this many images with instance annotations (default: {CHAIR_NUM_IMAGES})",
    )
    sub.add_argument("--seed", type=int, help="seed of the draw with --num-images (default: 0)")
    sub.add_argument(
        "--instructions",
        nargs="+",
        help="captioning instructions, one sample each per image "
        "(default: the two DRESS reports, dress_lightning.data.converters.CHAIR_INSTRUCTIONS)",
    )
    sub.set_defaults(run=_run_convert_chair)

    sub = commands.add_parser("inspect", help="count samples, skips, sources, turns and feedback in shards")
    sub.add_argument(
        "sources", nargs="+", metavar="DIR_OR_URLS", help="shard directories, files, brace patterns or URLs"
    )
    sub.add_argument("--json", action="store_true", help="print one JSON object instead of tables")
    sub.set_defaults(run=_run_inspect)
    return parser


def main(argv: Sequence[str]) -> int:
    """Run a ``data`` command; returns the exit code (0 even with skips, non-zero if nothing was written)."""
    parser = build_parser()
    try:
        args = parser.parse_args(list(argv))
    except SystemExit as exit_:  # --help or a usage error; the caller wants a code, not an exit
        return int(exit_.code or 0)
    try:
        return args.run(args)
    except _CommandError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2


def _check_inputs(files: Iterable[Path] = (), directories: Iterable[Path] = ()) -> None:
    for path in files:
        if not path.is_file():
            raise _CommandError(f"input file not found: {path}")
    for path in directories:
        if not path.is_dir():
            raise _CommandError(f"image directory not found: {path}")


def _write(
    args: argparse.Namespace,
    items: Iterable[tuple[str, Any]],
    to_sample: Callable[[Any], Sample],
    *,
    total: int | None = None,
    manifest_extra: dict[str, Any] | None = None,
) -> int:
    """Shared tail of every writing command: write the dataset, print the summary."""
    # Imported here (as in each command) because webdataset imports torch: --help stays fast.
    from dress_lightning.data.shards import write_dataset

    try:
        report = write_dataset(
            items, to_sample, args.out, args.prefix, shard_size=args.shard_size, tool=f"{PROG} {args.command}",
            settings={k: v for k, v in vars(args).items() if k != "run"}, total=total, overwrite=args.overwrite,
            manifest_extra=manifest_extra,
        )
    except FileExistsError as error:
        raise _CommandError(str(error)) from None
    _print_report(args.command, args.out, report)
    if report.written == 0:
        print(f"error: nothing was written; every input was skipped (details in {report.manifest})", file=sys.stderr)
        return 1
    return 0


def _print_report(command: str, out: Path, report) -> None:
    console = Console()
    console.print(f"{PROG} {command}: wrote {report.written} samples in {len(report.shards)} shard(s) to {out}")
    table = Table()
    table.add_column("outcome")
    table.add_column("count", justify="right")
    table.add_column("first example")
    table.add_row("written", str(report.written), "")
    for reason, count in report.skips.counts().items():
        example = report.skips.first_example(reason)
        table.add_row(f"skipped: {reason}", str(count), f"{example.where}: {example.detail}")
    console.print(table)


def _run_shapeworld(args: argparse.Namespace) -> int:
    from dress_lightning.data.shards import write_shapeworld

    if args.image_size < MIN_IMAGE_SIZE:
        raise _CommandError(f"--image-size must be at least {MIN_IMAGE_SIZE}, got {args.image_size}")
    try:
        report = write_shapeworld(
            args.out, args.split, args.samples, seed=args.seed, image_size=args.image_size,
            shard_size=args.shard_size, prefix=args.prefix, overwrite=args.overwrite,
            question_types=args.question_types, harmful_share=args.harmful_share,
        )
    except (FileExistsError, ValueError) as error:
        raise _CommandError(str(error)) from None
    _print_report(args.command, args.out, report)
    return 0


def _run_convert_llava(args: argparse.Namespace) -> int:
    from dress_lightning.data.converters import InputError, llava_to_sample, load_json

    _check_inputs([args.json], [args.images])
    try:
        records = load_json(args.json)
    except InputError as error:
        raise _CommandError(str(error)) from None
    if not isinstance(records, list):
        raise _CommandError(f"{args.json} must hold a JSON list of LLaVA records, got {type(records).__name__}")
    items = ((f"{args.json.name}[{i}]", record) for i, record in enumerate(records))
    return _write(args, items, functools.partial(llava_to_sample, images=_image_dir(args)), total=len(records))


def _run_convert_nlf(args: argparse.Namespace) -> int:
    from dress_lightning.data.converters import InputError, iter_jsonl, nlf_aspect, nlf_to_sample

    _check_inputs(args.jsonl, [args.images])
    try:
        aspects = {path: args.aspect or nlf_aspect(path) for path in args.jsonl}
    except InputError as error:
        raise _CommandError(str(error)) from None
    to_sample = functools.partial(
        nlf_to_sample, images=_image_dir(args), aspects=aspects, score_max=args.score_max
    )
    return _write(args, iter_jsonl(args.jsonl), to_sample)


def _run_convert_vlsafe(args: argparse.Namespace) -> int:
    from dress_lightning.data.converters import iter_jsonl, vlsafe_to_sample

    _check_inputs([args.jsonl], [args.images])
    # Default prefix from the file, so the examine and alignment splits can share a directory.
    args.prefix = args.prefix or f"vlsafe-{args.jsonl.stem}"
    return _write(args, iter_jsonl([args.jsonl]), functools.partial(vlsafe_to_sample, images=_image_dir(args)))


def _run_convert_coco(args: argparse.Namespace) -> int:
    from dress_lightning.data.converters import InputError, coco_to_sample, load_coco

    _check_inputs(args.annotations, [args.images])
    try:
        coco_images, categories = load_coco(args.annotations)
    except InputError as error:
        raise _CommandError(str(error)) from None
    items = ((f"image {image.image_id}", image) for image in coco_images)
    to_sample = functools.partial(coco_to_sample, images=_image_dir(args), categories=categories)
    return _write(args, items, to_sample, total=len(coco_images))


def _run_convert_llava_bench(args: argparse.Namespace) -> int:
    from dress_lightning.data.converters import (
        InputError,
        iter_jsonl,
        llava_bench_to_sample,
        load_jsonl_index,
    )

    _check_inputs([p for p in (args.questions, args.answers, args.context) if p is not None], [args.images])
    try:
        answers = load_jsonl_index(args.answers, "question_id", "text", unique=True) if args.answers else None
        captions = load_jsonl_index(args.context, "image", "caption") if args.context else {}
    except InputError as error:
        raise _CommandError(str(error)) from None
    to_sample = functools.partial(
        llava_bench_to_sample, images=_image_dir(args), answers=answers, captions=captions
    )
    return _write(args, iter_jsonl([args.questions]), to_sample)


def _run_convert_pope(args: argparse.Namespace) -> int:
    from dress_lightning.data.converters import ImageDir, InputError, iter_jsonl, pope_split, pope_to_sample

    _check_inputs(args.questions, [args.images])
    try:
        splits = {path: pope_split(path, args.split) for path in args.questions}
    except InputError as error:
        raise _CommandError(str(error)) from None
    args.prefix = args.prefix or "pope-" + "-".join(dict.fromkeys(splits.values()))
    to_sample = functools.partial(pope_to_sample, images=ImageDir(args.images), splits=splits)
    return _write(args, iter_jsonl(args.questions), to_sample)


def _run_convert_chair(args: argparse.Namespace) -> int:
    from dress_lightning.data.converters import (
        CHAIR_DECODING,
        CHAIR_INSTRUCTIONS,
        InputError,
        chair_to_sample,
        load_coco,
        read_image_ids,
        sample_chair_image_ids,
        select_coco_images,
        write_image_ids,
    )

    if args.image_ids is not None and args.seed is not None:
        raise _CommandError("--seed only applies to --num-images; --image-ids fixes the images already")
    _check_inputs(args.annotations, [args.images])
    instructions = tuple(args.instructions or CHAIR_INSTRUCTIONS)
    try:
        coco_images, categories = load_coco(args.annotations)
        if args.image_ids is not None:
            image_ids = read_image_ids(args.image_ids)
            chosen_from: dict[str, Any] = {"image_ids_file": str(args.image_ids)}
        else:
            args.num_images = args.num_images or CHAIR_NUM_IMAGES
            args.seed = 0 if args.seed is None else args.seed
            image_ids = sample_chair_image_ids(coco_images, args.num_images, args.seed)
            chosen_from = {"num_images": args.num_images, "seed": args.seed}
        chosen = select_coco_images(coco_images, image_ids, str(args.image_ids or "the draw"))
    except InputError as error:
        raise _CommandError(str(error)) from None

    ids_path = args.out / f"{args.prefix}_image_ids.txt"
    manifest_extra = {
        "eval_set": {
            "name": "chair",
            "annotations": [p.name for p in args.annotations],
            "images": {**chosen_from, "count": len(image_ids), "list": ids_path.name},
            "instructions": list(instructions),
            "decoding": CHAIR_DECODING,
        }
    }
    items = (
        (f"image {image.image_id} instruction {k}", (image, k))
        for image in chosen
        for k in range(1, len(instructions) + 1)
    )
    to_sample = functools.partial(
        chair_to_sample, images=_image_dir(args), categories=categories, instructions=instructions
    )
    code = _write(args, items, to_sample, total=len(chosen) * len(instructions), manifest_extra=manifest_extra)
    # Written after the shards: a refused run (existing shards) must not replace the list of an earlier one.
    write_image_ids(ids_path, image_ids)
    return code


def _shard_stats(samples: Iterable[Sample]) -> dict[str, Any]:
    """Counts over samples: sources, categories, turns, feedback and mean score per aspect."""
    by_source: Counter[str] = Counter()
    by_category: Counter[str] = Counter()
    conversation_turns: Counter[int] = Counter()
    scores: dict[str, list[float]] = {aspect: [] for aspect in ASPECTS}
    samples_count = prompt_only = harmful = feedback_turns = 0
    for sample in samples:
        record = sample.record
        samples_count += 1
        by_source[record["source"]] += 1
        by_category[record.get("category", "(none)")] += 1
        conversation_turns[len(record["conversation"])] += 1
        prompt_only += record["conversation"][-1]["role"] == "user"
        harmful += record["annotations"]["safety"]["harmful_intent"]
        for entry in record.get("feedback", []):
            if entry is not None:
                feedback_turns += 1
                for aspect, score in entry["scores"].items():
                    scores[aspect].append(score / entry["score_max"])
    return {
        "samples": samples_count,
        "by_source": dict(by_source.most_common()),
        "by_category": dict(by_category.most_common()),
        "conversation_turns": dict(sorted(conversation_turns.items())),
        "prompt_only": prompt_only,
        "harmful_intent": harmful,
        "feedback_turns": feedback_turns,
        # Normalised by each entry's score_max, so sources with different scales can be compared.
        "mean_score": {aspect: sum(v) / len(v) for aspect, v in scores.items() if v},
    }


def with_decodable_images(samples: Iterable[Sample], skips) -> Iterator[Sample]:
    """The samples whose image decodes (as training will decode it); the others are counted in ``skips``."""
    from dress_lightning.data.images import decode_image
    from dress_lightning.data.skips import SkipRecord

    for sample in samples:
        try:
            decode_image(sample.image, sample.record["id"]).close()
        except SkipRecord as skip:
            skips.add(sample.record["id"], skip.reason, skip.detail)
            continue
        yield sample


def _run_inspect(args: argparse.Namespace) -> int:
    from dress_lightning.data.shards import expand_shard_urls, iter_samples, missing_local_shards, progress_bar
    from dress_lightning.data.skips import SkipLog

    urls = expand_shard_urls(args.sources)
    if not urls:
        raise _CommandError(f"no .tar shards found in {' '.join(args.sources)}")
    missing = missing_local_shards(urls)
    if missing:
        raise _CommandError(
            f"shard not found: {missing[0]}" + (f" (and {len(missing) - 1} more)" if len(missing) > 1 else "")
        )
    skips = SkipLog()
    with progress_bar() as progress:
        task = progress.add_task("reading", total=None)

        def counted(samples: Iterable[Sample]) -> Iterable[Sample]:
            for sample in samples:
                progress.advance(task)
                yield sample

        samples = with_decodable_images(counted(iter_samples(urls, skips)), skips)
        stats = {"shards": len(urls), **_shard_stats(samples), "skipped": skips.counts()}
    if args.json:
        print(json.dumps(stats))
        return 0
    console = Console()
    summary = Table(title=f"{stats['samples']} samples in {stats['shards']} shard(s)")
    summary.add_column("what")
    summary.add_column("value", justify="right")
    for name in ("samples", "prompt_only", "harmful_intent", "feedback_turns"):
        summary.add_row(name, str(stats[name]))
    for group in ("by_source", "by_category", "conversation_turns", "skipped"):
        for value, count in stats[group].items():
            summary.add_row(f"{group}: {value}", str(count))
    for aspect, mean in stats["mean_score"].items():
        summary.add_row(f"mean score (fraction of max): {aspect}", f"{mean:.3f}")
    console.print(summary)
    for reason in stats["skipped"]:
        example = skips.first_example(reason)
        console.print(f"first skipped for {reason}: {example.where}: {example.detail}")
    return 0
