"""Converters from released data formats (DESIGN.md s.3) to shard samples.

Each converter is an input reader plus one record-to-sample function; ``shards.write_samples``
runs the shared loop (validate, write, count skips). Record-to-sample functions read fields
directly: a record without the expected layout raises ``KeyError``/``TypeError``/``ValueError``,
which the loop counts as an invalid record.
"""

from __future__ import annotations

import io
import json
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from PIL import Image, UnidentifiedImageError

from dress_lightning.data.schema import (
    ASPECTS,
    Feedback,
    ImageExt,
    Judge,
    ObjectAnnotation,
    Role,
    Sample,
    SampleRecord,
    Turn,
    alternating_turns,
    build_record,
    ensure_image_token,
)
from dress_lightning.data.shards import SkipRecord

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

NLF_JUDGE = Judge(name="gpt-4", version="DRESS LVLM_NLF release")

VLSAFE_RESPONSE_KEYS = ("response", "answer", "safe_response", "reference", "output")
"""Keys under which a VLSafe alignment record may hold a reference safe response."""

COCO_DESCRIBE_PROMPT = "Describe this image briefly."


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
    """Images found by COCO image id (zero-padded or not) or by a file name relative to ``root``."""

    root: Path

    def candidates(self, ref: str) -> list[Path]:
        """Files that may hold the image ``ref``, in the order they are tried."""
        ref = ref.strip()
        if Path(ref).suffix.lower() in IMAGE_SUFFIXES:
            return [self.root / ref, self.root / Path(ref).name]
        stems = [ref, f"{int(ref):012d}", str(int(ref))] if ref.isdigit() else [ref]
        return [self.root / f"{stem}{suffix}" for stem in dict.fromkeys(stems) for suffix in IMAGE_SUFFIXES]

    def load(self, ref: str) -> tuple[bytes, ImageExt]:
        """Read an image's bytes; its shard extension comes from the content, not the file name."""
        path = next((p for p in self.candidates(ref) if p.is_file()), None)
        if path is None:
            raise SkipRecord("missing image", f"no file for {ref!r} under {self.root}")
        data = path.read_bytes()
        try:
            with Image.open(io.BytesIO(data)) as image:
                image_format = image.format
        except (UnidentifiedImageError, OSError) as error:
            raise SkipRecord("unreadable image", f"{path}: {error}") from None
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


def iter_jsonl(paths: Sequence[Path]) -> Iterator[tuple[str, JsonLine | SkipRecord]]:
    """Yield ``(where, line)`` for each non-empty line; a malformed line yields a ``SkipRecord``."""
    for path in paths:
        with path.open(encoding="utf-8") as file:
            for lineno, text in enumerate(file, start=1):
                if not text.strip():
                    continue
                where = f"{path.name}:{lineno}"
                try:
                    yield where, JsonLine(path, lineno, json.loads(text))
                except json.JSONDecodeError as error:
                    yield where, SkipRecord("malformed json", str(error))


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


def coco_to_sample(image: CocoImage, images: ImageDir, categories: Mapping[int, str]) -> Sample:
    """COCO image with captions and/or boxes -> describe sample answered by its first caption."""
    captions = [a["caption"].strip() for a in image.annotations if "caption" in a]
    objects = []
    for annotation in image.annotations:
        if "bbox" in annotation:
            x, y, w, h = annotation["bbox"]  # COCO boxes are [x, y, width, height]
            objects.append(ObjectAnnotation(category=categories[annotation["category_id"]], box=[x, y, x + w, y + h]))
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
