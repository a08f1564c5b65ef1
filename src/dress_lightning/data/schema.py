"""The shard sample: member keys, the JSON record layout, validation, encode/decode.

A shard sample is a WebDataset sample: ``__key__``, the image bytes under one of
``IMAGE_KEYS`` and the JSON record under ``JSON_KEY``. This is the one module that names these
keys and fields; everything else imports them from here. It imports nothing heavy (no torch, no
webdataset) so judges, metrics and converters can use it cheaply. ``data/README.md`` documents
the same layout for users.
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Literal, NotRequired, TypedDict

from dress_lightning.aspects import ASPECTS
from dress_lightning.special_tokens import IMAGE_TOKEN

SCHEMA_VERSION = 1
"""Version of the record layout; bump it (and teach ``validate_sample`` the old one) on breaking changes."""

JSON_KEY = "json"
"""Shard member holding the JSON record."""

ImageExt = Literal["jpg", "png", "jpeg"]
IMAGE_KEYS: tuple[ImageExt, ...] = ("jpg", "png", "jpeg")
"""Shard members that may hold the image bytes (exactly one per sample)."""

Role = Literal["user", "assistant"]
ROLES: tuple[Role, Role] = ("user", "assistant")

MAX_IMAGE_MB = 32.0
"""Default cap on an image file's size in the converters (``--max-image-mb``); larger files are skipped unread."""

DEFAULT_SCORE_MAX = 10.0
"""Top of the score scale when a source does not say otherwise (DRESS NLF ratings)."""

_KEY_UNSAFE = re.compile(r"[^A-Za-z0-9_-]")


class Turn(TypedDict):
    """One conversation turn."""

    role: Role
    content: str


class JudgeInfo(TypedDict):
    """Which judge, at which version, wrote a feedback entry; recorded because judge drift makes scores unreproducible.

    The record of a judge, not the judge itself (``feedback.judges.Judge``).
    """

    name: str
    version: str


class Feedback(TypedDict):
    """Natural-language feedback on one assistant turn."""

    scores: dict[str, float]
    score_max: float
    critique: str
    refinement: str | None
    judge: JudgeInfo


class ObjectAnnotation(TypedDict):
    """One annotated object; ShapeWorld also fills shape, color, size and position."""

    category: str
    box: list[float]
    shape: NotRequired[str]
    color: NotRequired[str]
    size: NotRequired[str]
    position: NotRequired[str]


class Safety(TypedDict):
    """Safety label of the sample's request."""

    harmful_intent: bool


class Annotations(TypedDict):
    """Dense image and request annotations a judge or metric grades against."""

    captions: list[str]
    objects: list[ObjectAnnotation]
    safety: Safety
    queries: NotRequired[list[dict[str, Any] | None]]


class SampleRecord(TypedDict):
    """The JSON record of a shard sample (unknown extra keys are allowed)."""

    id: str
    source: str
    image_id: str
    annotations: Annotations
    conversation: list[Turn]
    schema_version: int
    category: NotRequired[str]
    feedback: NotRequired[list[Feedback | None]]
    provenance: NotRequired[dict[str, Any]]


class SampleValidationError(ValueError):
    """A record breaks the shard schema; the message names the sample key and the field path."""

    def __init__(self, key: str, path: str, problem: str) -> None:
        super().__init__(f"sample {key!r}: {path}: {problem}")
        self.key = key
        self.path = path
        self.problem = problem


@dataclass(frozen=True)
class Sample:
    """One shard sample: the JSON record plus the encoded image."""

    record: SampleRecord
    image: bytes
    image_ext: ImageExt

    @property
    def key(self) -> str:
        """The WebDataset ``__key__``, derived from the record id."""
        return sample_key(self.record["id"])


def sample_key(sample_id: str) -> str:
    """Sanitize a sample id into a ``__key__``: webdataset splits member names at the first dot."""
    return _KEY_UNSAFE.sub("_", sample_id)


def ensure_image_token(text: str) -> str:
    """Prepend the image placeholder to a first user turn that lacks it (as LLaVA writes it)."""
    return text if IMAGE_TOKEN in text else f"{IMAGE_TOKEN}\n{text}"


def alternating_turns(contents: Iterable[str]) -> list[Turn]:
    """Build a conversation from turn texts, starting with the user and alternating roles."""
    return [Turn(role=ROLES[i % 2], content=text) for i, text in enumerate(contents)]


def build_record(
    *,
    sample_id: str,
    source: str,
    image_id: str,
    conversation: list[Turn],
    captions: Sequence[str] = (),
    objects: Sequence[ObjectAnnotation] = (),
    harmful_intent: bool = False,
    queries: Sequence[dict[str, Any] | None] | None = None,
    category: str | None = None,
    feedback: list[Feedback | None] | None = None,
    provenance: dict[str, Any] | None = None,
) -> SampleRecord:
    """Assemble a record with the current schema version; optional fields left as None are omitted."""
    annotations = Annotations(
        captions=list(captions), objects=list(objects), safety=Safety(harmful_intent=harmful_intent)
    )
    if queries is not None:
        annotations["queries"] = list(queries)
    record = SampleRecord(
        id=sample_id,
        source=source,
        image_id=image_id,
        annotations=annotations,
        conversation=conversation,
        schema_version=SCHEMA_VERSION,
    )
    if category is not None:
        record["category"] = category
    if feedback is not None:
        record["feedback"] = feedback
    if provenance is not None:
        record["provenance"] = provenance
    return record


def validate_sample(record: Any, key: str | None = None) -> SampleRecord:
    """Check a record against the schema; raise ``SampleValidationError`` naming key and field path."""
    if key is None:
        key = record.get("id") if isinstance(record, dict) and isinstance(record.get("id"), str) else "<unknown>"
    _Validator(key).record(record)
    return record


class _Validator:
    """Walks a record; each check raises with the path of the offending field."""

    def __init__(self, key: str) -> None:
        self.key = key

    def fail(self, path: str, problem: str) -> SampleValidationError:
        return SampleValidationError(self.key, path, problem)

    def field(self, parent: Mapping[str, Any], name: str, path: str, kind: type | tuple[type, ...]) -> Any:
        if name not in parent:
            raise self.fail(path, "missing")
        value = parent[name]
        if not isinstance(value, kind) or (isinstance(value, bool) and bool not in _as_tuple(kind)):
            raise self.fail(path, f"expected {_kind_name(kind)}, got {type(value).__name__} {_short(value)}")
        return value

    def number(self, value: Any, path: str) -> float:
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
            raise self.fail(path, f"expected a finite number, got {_short(value)}")
        return float(value)

    def record(self, record: Any) -> None:
        if not isinstance(record, dict):
            raise self.fail("<record>", f"expected an object, got {type(record).__name__}")
        version = self.field(record, "schema_version", "schema_version", int)
        if version != SCHEMA_VERSION:
            raise self.fail("schema_version", f"this dress_lightning reads version {SCHEMA_VERSION}, got {version}")
        for name in ("id", "source", "image_id"):
            if not self.field(record, name, name, str):
                raise self.fail(name, "must not be empty")
        if "category" in record:
            self.field(record, "category", "category", str)
        if "provenance" in record:
            self.field(record, "provenance", "provenance", dict)
        conversation = self.conversation(record)
        self.annotations(self.field(record, "annotations", "annotations", dict), conversation)
        if "feedback" in record:
            self.feedback(record["feedback"], conversation)

    def conversation(self, record: Mapping[str, Any]) -> list[Turn]:
        turns = self.field(record, "conversation", "conversation", list)
        if not turns:
            raise self.fail("conversation", "must hold at least one user turn")
        for i, turn in enumerate(turns):
            path = f"conversation[{i}]"
            if not isinstance(turn, dict):
                raise self.fail(path, f"expected an object, got {type(turn).__name__}")
            expected_role = ROLES[i % 2]
            role = self.field(turn, "role", f"{path}.role", str)
            if role != expected_role:
                raise self.fail(
                    f"{path}.role",
                    f"expected {expected_role!r} (turns start with the user and alternate), got {role!r}",
                )
            content = self.field(turn, "content", f"{path}.content", str)
            image_tokens = content.count(IMAGE_TOKEN)
            if i == 0 and image_tokens != 1:
                raise self.fail(
                    f"{path}.content", f"the first user turn must hold exactly one {IMAGE_TOKEN}, found {image_tokens}"
                )
            if i > 0 and image_tokens:
                raise self.fail(f"{path}.content", f"only the first user turn may hold {IMAGE_TOKEN}")
        return turns

    def annotations(self, annotations: Mapping[str, Any], conversation: list[Turn]) -> None:
        captions = self.field(annotations, "captions", "annotations.captions", list)
        for i, caption in enumerate(captions):
            if not isinstance(caption, str):
                raise self.fail(f"annotations.captions[{i}]", f"expected str, got {type(caption).__name__}")
        for i, obj in enumerate(self.field(annotations, "objects", "annotations.objects", list)):
            path = f"annotations.objects[{i}]"
            if not isinstance(obj, dict):
                raise self.fail(path, f"expected an object, got {type(obj).__name__}")
            self.field(obj, "category", f"{path}.category", str)
            box = self.field(obj, "box", f"{path}.box", list)
            if len(box) != 4:
                raise self.fail(f"{path}.box", f"expected [x0, y0, x1, y1], got {len(box)} values")
            x0, y0, x1, y1 = (self.number(v, f"{path}.box[{j}]") for j, v in enumerate(box))
            if x1 < x0 or y1 < y0:
                raise self.fail(f"{path}.box", f"expected x0 <= x1 and y0 <= y1, got {box}")
        safety = self.field(annotations, "safety", "annotations.safety", dict)
        self.field(safety, "harmful_intent", "annotations.safety.harmful_intent", bool)
        if "queries" in annotations:
            queries = self.field(annotations, "queries", "annotations.queries", list)
            # Entry i describes user turn i; later user turns (e.g. refinement NLF) may have none.
            user_turns = sum(turn["role"] == "user" for turn in conversation)
            if len(queries) > user_turns:
                raise self.fail("annotations.queries", f"{len(queries)} queries for {user_turns} user turns")
            for i, query in enumerate(queries):
                if query is not None:
                    if not isinstance(query, dict):
                        raise self.fail(
                            f"annotations.queries[{i}]", f"expected an object or null, got {type(query).__name__}"
                        )
                    self.field(query, "type", f"annotations.queries[{i}].type", str)

    def feedback(self, feedback: Any, conversation: list[Turn]) -> None:
        if not isinstance(feedback, list):
            raise self.fail("feedback", f"expected a list, got {type(feedback).__name__}")
        assistant_turns = sum(turn["role"] == "assistant" for turn in conversation)
        if len(feedback) != assistant_turns:
            raise self.fail(
                "feedback", f"expected one entry per assistant turn ({assistant_turns}), got {len(feedback)}"
            )
        for i, entry in enumerate(feedback):
            if entry is None:
                continue
            path = f"feedback[{i}]"
            if not isinstance(entry, dict):
                raise self.fail(path, f"expected an object or null, got {type(entry).__name__}")
            score_max = self.number(
                self.field(entry, "score_max", f"{path}.score_max", (int, float)), f"{path}.score_max"
            )
            if score_max <= 0:
                raise self.fail(f"{path}.score_max", f"must be positive, got {score_max}")
            for aspect, score in self.field(entry, "scores", f"{path}.scores", dict).items():
                if aspect not in ASPECTS:
                    raise self.fail(f"{path}.scores.{aspect}", f"unknown aspect; valid aspects: {', '.join(ASPECTS)}")
                if not 0 <= self.number(score, f"{path}.scores.{aspect}") <= score_max:
                    raise self.fail(f"{path}.scores.{aspect}", f"{score} is outside [0, score_max={score_max:g}]")
            self.field(entry, "critique", f"{path}.critique", str)
            self.field(entry, "refinement", f"{path}.refinement", (str, type(None)))
            judge = self.field(entry, "judge", f"{path}.judge", dict)
            self.field(judge, "name", f"{path}.judge.name", str)
            self.field(judge, "version", f"{path}.judge.version", str)


def _as_tuple(kind: type | tuple[type, ...]) -> tuple[type, ...]:
    return kind if isinstance(kind, tuple) else (kind,)


def _kind_name(kind: type | tuple[type, ...]) -> str:
    return " or ".join("null" if k is type(None) else k.__name__ for k in _as_tuple(kind))


def _short(value: Any, limit: int = 60) -> str:
    text = repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."


def encode_sample(sample: Sample) -> dict[str, str | bytes]:
    """Encode a sample as the member dict a WebDataset writer takes (all values already bytes)."""
    return {
        "__key__": sample.key,
        sample.image_ext: sample.image,
        JSON_KEY: json.dumps(sample.record, ensure_ascii=False).encode("utf-8"),
    }


def decode_sample(wds_sample: Mapping[str, Any], *, validate: bool = True) -> Sample:
    """Decode an undecoded WebDataset sample (member name -> bytes) into a validated ``Sample``."""
    key = wds_sample.get("__key__", "<unknown>")
    if JSON_KEY not in wds_sample:
        raise SampleValidationError(key, JSON_KEY, "shard member missing")
    raw = wds_sample[JSON_KEY]
    try:
        record = raw if isinstance(raw, dict) else json.loads(raw)
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise SampleValidationError(key, JSON_KEY, f"not valid JSON ({error})") from None
    except RecursionError:
        raise SampleValidationError(key, JSON_KEY, "JSON nested too deeply to parse") from None
    image_exts = [ext for ext in IMAGE_KEYS if ext in wds_sample]
    if len(image_exts) != 1:
        raise SampleValidationError(
            key, "image", f"expected exactly one of the members {IMAGE_KEYS}, found {image_exts}"
        )
    image = wds_sample[image_exts[0]]
    if not isinstance(image, bytes):
        raise SampleValidationError(key, image_exts[0], f"expected undecoded bytes, got {type(image).__name__}")
    if validate:
        validate_sample(record, key=key)
    return Sample(record=record, image=image, image_ext=image_exts[0])
