"""English phrases about annotated objects, written once for the ShapeWorld generator and the judges.

Reference answers and captions (``data.shapeworld``), the annotation judge's critiques and
refinements, and the LLM judge's prompts say the same things the same way: "a large red circle at
the top left", "there are two red circles", "one at the top left and one at the bottom". A change
here changes generated data and feedback text: bump the versions that record them
(``ANNOTATION_JUDGE_VERSION``, ``PROMPT_VERSION``) with it.
"""

from __future__ import annotations

from collections.abc import Sequence

from dress_lightning.data.schema import ObjectAnnotation

NUMBER_WORDS: tuple[str, ...] = ("no", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine")
"""Count words indexed by count; a zero count is said as "no" ("There are no green circles")."""

POSITION_PHRASES: dict[str, str] = {
    "top left": "at the top left",
    "top": "at the top",
    "top right": "at the top right",
    "left": "on the left",
    "center": "in the center",
    "right": "on the right",
    "bottom left": "at the bottom left",
    "bottom": "at the bottom",
    "bottom right": "at the bottom right",
}
"""How answers and captions say where an object is, by grid position."""

_IRREGULAR_PLURALS = {
    "man": "men", "woman": "women", "child": "children", "person": "people", "mouse": "mice",
    "goose": "geese", "ox": "oxen", "knife": "knives", "calf": "calves", "sheep": "sheep",
    "fish": "fish", "bison": "bison", "scissors": "scissors", "skis": "skis", "cattle": "cattle",
    "people": "people", "children": "children", "oxen": "oxen", "broccoli": "broccoli",
}  # fmt: skip


def plural(noun: str) -> str:
    """English plural of a noun phrase (its last word): "red circle" -> "red circles", "bus" -> "buses"."""
    *head, last = noun.split(" ")
    if last in _IRREGULAR_PLURALS:
        last = _IRREGULAR_PLURALS[last]
    elif last.endswith("man"):
        last = last[:-3] + "men"
    elif last.endswith(("s", "x", "z", "ch", "sh")):
        last += "es"
    elif last.endswith("y") and last[-2:-1] not in ("a", "e", "i", "o", "u"):
        last = last[:-1] + "ies"
    else:
        last += "s"
    return " ".join((*head, last))


def with_article(phrase: str) -> str:
    """The phrase after "a" or "an": "a red circle", "an orange square"."""
    return f"{'an' if phrase[0] in 'aeiou' else 'a'} {phrase}"


def join_and(items: Sequence[str]) -> str:
    """A listing: "a", "a and b", "a, b and c"."""
    return items[0] if len(items) == 1 else f"{', '.join(items[:-1])} and {items[-1]}"


def sentence(text: str) -> str:
    """Text as a sentence: first letter upper case, a full stop at the end."""
    return f"{text[0].upper()}{text[1:]}."


def number_word(count: int) -> str:
    """A count as the answers say it: "no", "one", ... "nine", then digits."""
    return NUMBER_WORDS[count] if count < len(NUMBER_WORDS) else str(count)


def count_phrase(count: int, noun: str, where: str = "") -> str:
    """A counted noun, then where: "no circles", "one red circle", "two shapes at the top"."""
    return f"{number_word(count)} {noun if count == 1 else plural(noun)}{f' {where}' if where else ''}"


def there_are(count: int, noun: str, where: str = "") -> str:
    """ "there is one red circle", "there are no green squares", "there are two circles at the top"."""
    return f"there {'is' if count == 1 else 'are'} {count_phrase(count, noun, where)}"


def object_name(
    color: str | None = None, shape: str | None = None, size: str | None = None, position: str | None = None
) -> str:
    """An object named by the attributes given: "red circle", "circle", "red shape", "small red circle at the top left"."""
    name = " ".join(word for word in (size, color, shape or "shape") if word)
    return f"{name} {POSITION_PHRASES[position]}" if position else name


def annotated_name(obj: ObjectAnnotation) -> str:
    """A ShapeWorld object by all its attributes: "large red circle at the top left"."""
    return object_name(obj["color"], obj["shape"], obj["size"], obj["position"])


def describe_object(obj: ObjectAnnotation) -> str:
    """A ShapeWorld object as descriptions introduce it: "a large red circle at the top left"."""
    return with_article(annotated_name(obj))


def one_per_place(objects: Sequence[ObjectAnnotation]) -> str:
    """Where each of several objects is: "one at the top left and one at the bottom"."""
    return join_and([f"one {POSITION_PHRASES[obj['position']]}" for obj in objects])
