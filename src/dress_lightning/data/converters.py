"""Converters from released data formats (docs/design.md s.3) to shard samples.

Each converter is an input reader plus one record-to-sample function; ``shards.write_samples``
runs the shared loop (validate, write, count skips). Record-to-sample functions read fields
directly: a record without the expected layout raises ``KeyError``/``TypeError``/``ValueError``,
which the loop counts as an invalid record.
"""

from __future__ import annotations

import json
import random
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from dress_lightning.aspects import ASPECTS
from dress_lightning.atomic import atomic_write_text
from dress_lightning.data.images import decode_image
from dress_lightning.data.schema import (
    Feedback,
    MAX_IMAGE_MB,
    ImageExt,
    JudgeInfo,
    ObjectAnnotation,
    Role,
    Sample,
    SampleRecord,
    Turn,
    alternating_turns,
    build_record,
    ensure_image_token,
)
from dress_lightning.data.skips import SkipRecord

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png")
_PIL_FORMAT_EXT: dict[str, ImageExt] = {"JPEG": "jpg", "PNG": "png"}

LLAVA_ROLES: dict[str, Role] = {"human": "user", "gpt": "assistant"}

NLF_ASPECT_BY_FILE_WORD = {
    "helpfulness": "helpfulness",
    "hallucination": "honesty",
    "honesty": "honesty",
    "harmlessness": "harmlessness",
}
"""Aspect of an LVLM_NLF file, from a word in its name (``hallucination_nlf.jsonl`` -> honesty)."""

NLF_CRITIQUE_KEYS = ("critique NLF", "critique_NLF")
"""The critique key is spelled both ways in the release."""

NLF_JUDGE = JudgeInfo(name="gpt-4", version="DRESS LVLM_NLF release")

VLSAFE_RESPONSE_KEYS = ("response", "answer", "safe_response", "reference", "output")
"""Keys under which a VLSafe alignment record may hold a reference safe response."""

COCO_DESCRIBE_PROMPT = "Describe this image briefly."

LLAVA_BENCH_CATEGORIES = {"conv": "conversation", "detail": "description", "complex": "reasoning"}
"""LLaVA-Bench / LLaVA-Eval question categories -> the three helpfulness categories of DRESS and LLaVA."""

CHAIR_INSTRUCTIONS = ("Describe this image in detail.", "Generate a short caption of the image.")
"""The two captioning instructions CHAIR is reported with (DRESS: "instruction 1" and "instruction 2")."""

CHAIR_DECODING = {"do_sample": False, "max_new_tokens": 512}
"""Recommended decoding for CHAIR: greedy, as the CHAIR literature does, so scores are reproducible."""


POPE_SPLITS = ("random", "popular", "adversarial")
"""POPE's three ways of choosing absent objects; each published file holds one (``coco_pope_random.json``)."""

POPE_CATEGORY = "pope"
"""Category of POPE prompts: scored against their yes/no label by the ``POPE`` metric, not by the judge."""


class InputError(Exception):
    """An input file cannot be used at all (missing, not JSON); the command stops with this message."""


@dataclass(frozen=True)
class JsonLine:
    """One parsed line of a JSONL file, with where it came from (ids are built from it)."""

    path: Path
    lineno: int
    value: Any


@dataclass(frozen=True)
class ImageDir:
    """Images found by COCO image id (zero-padded or not) or by a file name relative to ``root``.

    A reference is only ever resolved inside ``root``: an absolute path or one with ``..`` is
    refused (input files are data, not permission to read the rest of the disk), and files over
    ``max_bytes`` are skipped without being read.
    """

    root: Path
    max_bytes: int = int(MAX_IMAGE_MB * 2**20)

    def candidates(self, ref: str) -> list[Path]:
        """Files that may hold the image ``ref``, in the order they are tried."""
        ref = ref.strip()
        if Path(ref).is_absolute() or ".." in Path(ref).parts:
            raise SkipRecord("image path outside --images", f"{ref!r} is absolute or climbs out of {self.root}")
        if Path(ref).suffix.lower() in IMAGE_SUFFIXES:
            return [self.root / ref, self.root / Path(ref).name]
        stems = [ref, f"{int(ref):012d}", str(int(ref))] if ref.isdigit() else [ref]
        return [self.root / f"{stem}{suffix}" for stem in dict.fromkeys(stems) for suffix in IMAGE_SUFFIXES]

    def load(self, ref: str) -> tuple[bytes, ImageExt]:
        """Read an image's bytes; its shard extension comes from the content, not the file name."""
        path = next((p for p in self.candidates(ref) if p.is_file()), None)
        if path is None:
            raise SkipRecord("missing image", f"no file for {ref!r} under {self.root}")
        size = path.stat().st_size
        if size > self.max_bytes:
            raise SkipRecord(
                "image file too large", f"{path} is {size / 2**20:.1f} MiB, over --max-image-mb {self.max_bytes / 2**20:g}"
            )
        data = path.read_bytes()
        with decode_image(data, str(path)) as image:
            image_format = image.format
        if image_format not in _PIL_FORMAT_EXT:
            raise SkipRecord("unsupported image format", f"{path} is {image_format}; shards hold JPEG or PNG")
        return data, _PIL_FORMAT_EXT[image_format]

    def attach(self, record: SampleRecord, ref: str) -> Sample:
        """Pair a record with its image; a missing or unusable image skips the record."""
        image, ext = self.load(ref)
        return Sample(record=record, image=image, image_ext=ext)


def normalize_image_id(value: Any) -> str:
    """COCO-style image id from an id or file name: numeric ids zero-padded to 12 digits."""
    if isinstance(value, bool) or not isinstance(value, (str, int)):
        raise TypeError(f"image id must be a string or an integer, got {value!r}")
    text = str(value).strip()
    if Path(text).suffix.lower() in IMAGE_SUFFIXES:
        text = Path(text).stem
    if not text:
        raise ValueError("empty image id")
    return f"{int(text):012d}" if text.isdigit() else text


def as_captions(value: Any) -> list[str]:
    """Captions given as one string, a list of strings, or nothing."""
    if value is None:
        return []
    if isinstance(value, str):
        return [value]
    if isinstance(value, list) and all(isinstance(c, str) for c in value):
        return list(value)
    raise TypeError(f"caption must be a string or a list of strings, got {type(value).__name__}")


def load_json(path: Path) -> Any:
    """Read a whole JSON file, turning a missing or malformed file into an ``InputError``."""
    if not path.is_file():
        raise InputError(f"input file not found: {path}")
    try:
        with path.open(encoding="utf-8") as file:
            return json.load(file)
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise InputError(f"{path} is not valid JSON: {error}") from None
    except RecursionError:
        raise InputError(f"{path} is nested too deeply to parse as JSON") from None


def iter_jsonl(paths: Sequence[Path]) -> Iterator[tuple[str, JsonLine | SkipRecord]]:
    """Yield ``(where, line)`` for each non-empty line; a malformed line yields a ``SkipRecord``."""
    for path in paths:
        with path.open("rb") as file:  # decoded line by line: one bad line must not end the file
            for lineno, raw in enumerate(file, start=1):
                where = f"{path.name}:{lineno}"
                try:
                    text = raw.decode("utf-8")
                except UnicodeDecodeError as error:
                    yield where, SkipRecord("not UTF-8", str(error))
                    continue
                if not text.strip():
                    continue
                try:
                    yield where, JsonLine(path, lineno, json.loads(text))
                except json.JSONDecodeError as error:
                    yield where, SkipRecord("malformed json", str(error))
                except RecursionError:
                    yield where, SkipRecord("malformed json", "nested too deeply to parse")


def load_jsonl_index(path: Path, key: str, value: str, *, unique: bool = False) -> dict[str, list[Any]]:
    """Map ``str(line[key])`` to the ``line[value]`` of every line with that key, for lookup tables.

    A lookup table (reference answers, image descriptions) is used whole, so a malformed line is
    an ``InputError`` rather than a skipped record: a silently missing entry would change samples.
    With ``unique``, a key on two lines is an ``InputError`` too.
    """
    if not path.is_file():
        raise InputError(f"input file not found: {path}")
    index: dict[str, list[Any]] = {}
    for where, line in iter_jsonl([path]):
        if isinstance(line, SkipRecord):
            raise InputError(f"{where}: {line}")
        if not isinstance(line.value, dict) or key not in line.value or value not in line.value:
            raise InputError(f"{where}: expected a JSON object with {key!r} and {value!r}")
        entries = index.setdefault(str(line.value[key]), [])
        if unique and entries:
            raise InputError(f"{where}: {key} {line.value[key]!r} appears on an earlier line too")
        entries.append(line.value[value])
    return index


def _line_id(line: JsonLine) -> str:
    return f"{line.path.stem}-{line.lineno}"


def _require_dict(value: Any) -> Mapping[str, Any]:
    if not isinstance(value, dict):
        raise TypeError(f"expected a JSON object, got {type(value).__name__}")
    return value


def llava_to_sample(record: Any, images: ImageDir) -> Sample:
    """LLaVA instruction record ``{id, image, conversations: [{from, value}]}`` -> sample."""
    record = _require_dict(record)
    if "image" not in record:
        raise SkipRecord("text-only record", f"id {record.get('id')!r} has no image")
    turns = record["conversations"]
    conversation = [Turn(role=LLAVA_ROLES[turn["from"]], content=turn["value"]) for turn in turns]
    if conversation:
        conversation[0]["content"] = ensure_image_token(conversation[0]["content"])
    return images.attach(
        build_record(
            sample_id=str(record["id"]),
            source="llava",
            image_id=normalize_image_id(record["image"]),
            conversation=conversation,
        ),
        record["image"],
    )


def llava_bench_to_sample(
    line: JsonLine,
    images: ImageDir,
    answers: Mapping[str, list[str]] | None,
    captions: Mapping[str, list[str]],
) -> Sample:
    """LLaVA-Bench question ``{question_id, image, text, category}`` -> QA eval sample.

    ``answers`` (question id -> reference answer) gives the assistant turn; without it the sample is
    prompt-only. ``captions`` (image file name -> descriptions, from ``context.jsonl``) are what the
    judge sees of the image.
    """
    record = _require_dict(line.value)
    question_id = str(record["question_id"])
    if record["category"] not in LLAVA_BENCH_CATEGORIES:
        raise SkipRecord(
            "unknown category", f"{record['category']!r}; expected one of {', '.join(LLAVA_BENCH_CATEGORIES)}"
        )
    contents = [ensure_image_token(record["text"])]
    if answers is not None:
        if question_id not in answers:
            raise SkipRecord("missing reference answer", f"question_id {question_id} is not in the answers file")
        contents.append(answers[question_id][0])
    image = record["image"]
    return images.attach(
        build_record(
            sample_id=f"llava-bench-{question_id}",
            source="llava-bench",
            # Not normalize_image_id: in-the-wild images (001.jpg) are no COCO images and must not join with one.
            image_id=Path(image).stem,
            conversation=alternating_turns(contents),
            captions=[c for value in captions.get(Path(image).name, []) for c in as_captions(value)],
            category=LLAVA_BENCH_CATEGORIES[record["category"]],
        ),
        image,
    )


def nlf_aspect(path: Path) -> str:
    """Aspect of an LVLM_NLF file from its name; raise ``InputError`` if the name says none."""
    found = {aspect for word, aspect in NLF_ASPECT_BY_FILE_WORD.items() if word in path.name.lower()}
    if len(found) != 1:
        raise InputError(
            f"cannot tell the aspect of {path.name} from its name (expected one of "
            f"{', '.join(NLF_ASPECT_BY_FILE_WORD)} in it); pass --aspect {{{','.join(ASPECTS)}}}"
        )
    return found.pop()


def _nlf_critique(turn: Mapping[str, Any]) -> str:
    for key in NLF_CRITIQUE_KEYS:
        if key in turn:
            return turn[key]
    raise KeyError(" or ".join(NLF_CRITIQUE_KEYS))


def nlf_to_sample(line: JsonLine, images: ImageDir, aspects: Mapping[Path, str], score_max: float) -> Sample:
    """DRESS LVLM_NLF line ``{image_id, caption, interaction: [{user, model, rating, critique}]}`` -> sample.

    Turn 1's ``user`` is the question; each later ``user`` is the refinement NLF on the previous
    response, so it is both a user turn and the ``refinement`` of that response's feedback.
    """
    record = _require_dict(line.value)
    aspect = aspects[line.path]
    turns = record["interaction"]
    if not isinstance(turns, list) or not turns:
        raise TypeError("interaction must be a non-empty list of turns")
    contents: list[str] = []
    feedback: list[Feedback | None] = []
    for i, turn in enumerate(turns):
        contents += [ensure_image_token(turn["user"]) if i == 0 else turn["user"], turn["model"]]
        feedback.append(
            Feedback(
                scores={aspect: float(turn["rating"])},  # released as a string ("4"), sometimes a number
                score_max=score_max,
                critique=_nlf_critique(turn),
                refinement=turns[i + 1]["user"] if i + 1 < len(turns) else None,
                judge=NLF_JUDGE,
            )
        )
    image_id = normalize_image_id(record["image_id"])
    return images.attach(
        build_record(
            sample_id=_line_id(line),
            source="dress_nlf",
            image_id=image_id,
            conversation=alternating_turns(contents),
            captions=as_captions(record.get("caption")),
            # The harmlessness NLF was collected on harmful-intent (VLSafe-style) requests.
            harmful_intent=aspect == "harmlessness",
            category=aspect,
            feedback=feedback,
        ),
        image_id,
    )


def vlsafe_to_sample(line: JsonLine, images: ImageDir) -> Sample:
    """VLSafe line ``{image_id, query, caption?, <reference response>?, ...}`` -> harmful-intent sample.

    The examine (test) split has no response, so its samples are prompt-only.
    """
    record = _require_dict(line.value)
    reference = next(
        (record[k] for k in VLSAFE_RESPONSE_KEYS if isinstance(record.get(k), str) and record[k].strip()), None
    )
    contents = [ensure_image_token(record["query"])] + ([reference] if reference else [])
    image_id = normalize_image_id(record["image_id"])
    return images.attach(
        build_record(
            sample_id=_line_id(line),
            source="vlsafe",
            image_id=image_id,
            conversation=alternating_turns(contents),
            captions=as_captions(record.get("caption")),
            harmful_intent=True,
            category="harmful",
        ),
        image_id,
    )


def pope_split(path: Path, given: str | None = None) -> str:
    """POPE split of a question file: ``given``, else from its name (``coco_pope_adversarial.json`` -> adversarial)."""
    if given is not None:
        if given not in POPE_SPLITS:
            raise InputError(f"--split {given!r} is not a POPE split; valid splits: {', '.join(POPE_SPLITS)}")
        return given
    found = [split for split in POPE_SPLITS if split in path.stem.lower()]
    if len(found) != 1:
        raise InputError(f"cannot tell the POPE split of {path.name} from its name; pass --split {'|'.join(POPE_SPLITS)}")
    return found[0]


def pope_to_sample(line: JsonLine, images: ImageDir, splits: Mapping[Path, str]) -> Sample:
    """POPE line ``{question_id, image, text, label: yes|no}`` -> prompt + reference answer, label in the query."""
    record = _require_dict(line.value)
    label = record["label"].strip().lower()
    if label not in ("yes", "no"):
        raise ValueError(f"label must be yes or no, got {record['label']!r}")
    split = splits[line.path]
    return images.attach(
        build_record(
            sample_id=f"pope-{split}-{record['question_id']}",
            source="pope",
            image_id=normalize_image_id(record["image"]),
            conversation=alternating_turns([ensure_image_token(record["text"]), label.capitalize()]),
            queries=[{"type": POPE_CATEGORY, "label": label, "split": split}],
            category=POPE_CATEGORY,
        ),
        record["image"],
    )


@dataclass(frozen=True)
class CocoImage:
    """One COCO image with all its caption and instance annotations, across the given files."""

    image_id: int
    file_name: str | None
    annotations: list[dict[str, Any]]


def load_coco(paths: Sequence[Path]) -> tuple[list[CocoImage], dict[int, str]]:
    """Group COCO ``captions_*``/``instances_*`` files by image id; also return the category names."""
    file_names: dict[int, str | None] = {}
    annotations: dict[int, list[dict[str, Any]]] = {}
    categories: dict[int, str] = {}
    for path in paths:
        data = load_json(path)
        try:
            categories.update({c["id"]: c["name"] for c in data.get("categories", [])})
            for image in data.get("images", []):
                file_names[image["id"]] = image.get("file_name")
            for annotation in data.get("annotations", []):
                annotations.setdefault(annotation["image_id"], []).append(annotation)
        except (AttributeError, KeyError, TypeError) as error:
            # Without an image id an annotation cannot be grouped, so the file is not usable as COCO.
            raise InputError(f"{path} is not a COCO annotation file ({type(error).__name__}: {error})") from None
    image_ids = sorted(file_names.keys() | annotations.keys())
    return [CocoImage(i, file_names.get(i), annotations.get(i, [])) for i in image_ids], categories


def coco_captions(image: CocoImage) -> list[str]:
    """The image's COCO captions, stripped."""
    return [a["caption"].strip() for a in image.annotations if "caption" in a]


def coco_objects(image: CocoImage, categories: Mapping[int, str]) -> list[ObjectAnnotation]:
    """The image's COCO instances as objects with ``[x0, y0, x1, y1]`` boxes."""
    objects = []
    for annotation in image.annotations:
        if "bbox" in annotation:
            x, y, w, h = annotation["bbox"]  # COCO boxes are [x, y, width, height]
            objects.append(ObjectAnnotation(category=categories[annotation["category_id"]], box=[x, y, x + w, y + h]))
    return objects


def coco_to_sample(image: CocoImage, images: ImageDir, categories: Mapping[int, str]) -> Sample:
    """COCO image with captions and/or boxes -> describe sample answered by its first caption."""
    captions = coco_captions(image)
    objects = coco_objects(image, categories)
    image_id = normalize_image_id(image.image_id)
    return images.attach(
        build_record(
            sample_id=f"coco-{image_id}",
            source="coco",
            image_id=image_id,
            conversation=alternating_turns([ensure_image_token(COCO_DESCRIBE_PROMPT), *captions[:1]]),
            captions=captions,
            objects=objects,
            category="description",
        ),
        image.file_name or image_id,
    )


def sample_chair_image_ids(coco_images: Sequence[CocoImage], num_images: int, seed: int) -> list[int]:
    """A fixed random subset of the images with instance annotations: same inputs and seed, same ids (sorted)."""
    candidates = sorted(image.image_id for image in coco_images if any("bbox" in a for a in image.annotations))
    if num_images > len(candidates):
        raise InputError(
            f"--num-images {num_images} is more than the {len(candidates)} images with instance annotations; "
            "pass instances_*.json in --annotations or lower --num-images"
        )
    return sorted(random.Random(seed).sample(candidates, num_images))


def read_image_ids(path: Path) -> list[int]:
    """COCO image ids from a file, one a line (zero-padded or not); blank lines are ignored."""
    if not path.is_file():
        raise InputError(f"image id list not found: {path}")
    ids: dict[int, None] = {}  # ordered set
    for lineno, text in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1):
        if not text.strip():
            continue
        try:
            image_id = int(text)
        except ValueError:
            raise InputError(f"{path.name}:{lineno}: expected a numeric COCO image id, got {text.strip()!r}") from None
        if image_id in ids:
            raise InputError(f"{path.name}:{lineno}: image id {image_id} is listed twice")
        ids[image_id] = None
    if not ids:
        raise InputError(f"{path} lists no image ids")
    return list(ids)


def write_image_ids(path: Path, image_ids: Sequence[int]) -> None:
    """Write image ids one a line, the format ``read_image_ids`` reads."""
    atomic_write_text(path, "".join(f"{i}\n" for i in image_ids))


def select_coco_images(coco_images: Sequence[CocoImage], image_ids: Sequence[int], where: str) -> list[CocoImage]:
    """The images with these ids, in this order; an id the annotations lack is an ``InputError``."""
    by_id = {image.image_id: image for image in coco_images}
    missing = [i for i in image_ids if i not in by_id]
    if missing:
        shown = ", ".join(map(str, missing[:5])) + (f" (and {len(missing) - 5} more)" if len(missing) > 5 else "")
        raise InputError(
            f"{len(missing)} image id(s) from {where} are not in the COCO annotations: {shown}; "
            "check that --annotations names the split the list was made from (e.g. val2014)"
        )
    return [by_id[i] for i in image_ids]


def chair_to_sample(
    prompt: tuple[CocoImage, int], images: ImageDir, categories: Mapping[int, str], instructions: Sequence[str]
) -> Sample:
    """``(COCO image, instruction number k)`` -> prompt-only captioning sample ``chair-{image_id}-i{k}``.

    The annotations (COCO objects and captions) are CHAIR's ground truth; ``k`` counts from 1, as
    the papers number their instructions.
    """
    image, k = prompt
    image_id = normalize_image_id(image.image_id)
    return images.attach(
        build_record(
            sample_id=f"chair-{image_id}-i{k}",
            source="coco-chair",
            image_id=image_id,
            conversation=alternating_turns([ensure_image_token(instructions[k - 1])]),
            captions=coco_captions(image),
            objects=coco_objects(image, categories),
            category="description",
        ),
        image.file_name or image_id,
    )
