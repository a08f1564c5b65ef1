"""Object vocabularies with synonyms: which annotated categories a text mentions (CHAIR-style).

``COCO`` holds the 80 COCO categories with the synonym lists of the CHAIR metric (Rohrbach et al.,
"Object Hallucination in Image Captioning", EMNLP 2018; ``data/synonyms.txt`` of
github.com/LisaAnne/Hallucination), including its deliberate misspellings, plus its compound rules
("baby bird" is a bird, not a person; "hot dog" is no dog; "toilet seat" is no chair).
``SHAPEWORLD`` holds the shapes of the synthetic world. Matching is on lower-cased words, longest
phrase first, and every synonym also matches in its plural forms. The annotation judge and the
CHAIR metric share this module so that they count the same mentions.
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from dress_lightning.data.phrases import plural
from dress_lightning.data.shapeworld import SHAPES

COCO_SYNONYMS: dict[str, tuple[str, ...]] = {
    "person": (
        "girl", "boy", "man", "woman", "kid", "child", "chef", "baker", "people", "adult", "rider",
        "children", "baby", "worker", "passenger", "sister", "biker", "policeman", "cop", "officer",
        "lady", "cowboy", "bride", "groom", "male", "female", "guy", "traveler", "mother", "father",
        "gentleman", "pitcher", "player", "skier", "snowboarder", "skater", "skateboarder", "foreigner",
        "caller", "offender", "coworker", "trespasser", "patient", "politician", "soldier", "grandchild",
        "serviceman", "walker", "drinker", "doctor", "bicyclist", "thief", "buyer", "teenager", "student",
        "camper", "driver", "solider", "hunter", "shopper", "villager",
    ),
    "bicycle": ("bike", "unicycle", "minibike", "trike"),
    "car": (
        "automobile", "van", "minivan", "sedan", "suv", "hatchback", "cab", "jeep", "coupe", "taxicab",
        "limo", "taxi",
    ),
    "motorcycle": ("scooter", "motor bike", "motor cycle", "motorbike", "moped"),
    "airplane": (
        "jetliner", "plane", "air plane", "monoplane", "aircraft", "jet", "airbus", "biplane", "seaplane",
    ),
    "bus": ("minibus", "trolley"),
    "train": ("locomotive", "tramway", "caboose"),
    "truck": ("pickup", "lorry", "hauler", "firetruck"),
    "boat": (
        "ship", "liner", "sailboat", "motorboat", "dinghy", "powerboat", "speedboat", "canoe", "skiff",
        "yacht", "kayak", "catamaran", "pontoon", "houseboat", "vessel", "rowboat", "trawler", "ferryboat",
        "watercraft", "tugboat", "schooner", "barge", "ferry", "sailboard", "paddleboat", "lifeboat",
        "freighter", "steamboat", "riverboat", "battleship", "steamship",
    ),
    "traffic light": ("street light", "traffic signal", "stop light", "streetlight", "stoplight"),
    "fire hydrant": ("hydrant",),
    "stop sign": (),
    "parking meter": (),
    "bench": ("pew",),
    "bird": (
        "ostrich", "owl", "seagull", "goose", "duck", "parakeet", "falcon", "robin", "pelican", "waterfowl",
        "heron", "hummingbird", "mallard", "finch", "pigeon", "sparrow", "seabird", "osprey", "blackbird",
        "fowl", "shorebird", "woodpecker", "egret", "chickadee", "quail", "bluebird", "kingfisher",
        "buzzard", "willet", "gull", "swan", "bluejay", "flamingo", "cormorant", "parrot", "loon",
        "gosling", "waterbird", "pheasant", "rooster", "sandpiper", "crow", "raven", "turkey", "oriole",
        "cowbird", "warbler", "magpie", "peacock", "cockatiel", "lorikeet", "puffin", "vulture", "condor",
        "macaw", "peafowl", "cockatoo", "songbird",
    ),
    "cat": ("kitten", "feline", "tabby"),
    "dog": (
        "puppy", "beagle", "pup", "chihuahua", "schnauzer", "dachshund", "rottweiler", "canine", "pitbull",
        "collie", "pug", "terrier", "poodle", "labrador", "doggie", "doberman", "mutt", "doggy", "spaniel",
        "bulldog", "sheepdog", "weimaraner", "corgi", "cocker", "greyhound", "retriever", "brindle",
        "hound", "whippet", "husky",
    ),
    "horse": (
        "colt", "pony", "racehorse", "stallion", "equine", "mare", "foal", "palomino", "mustang",
        "clydesdale", "bronc", "bronco",
    ),
    "sheep": ("lamb", "ram", "goat", "ewe"),
    "cow": ("cattle", "oxen", "ox", "calf", "holstein", "heifer", "buffalo", "bull", "zebu", "bison"),
    "elephant": (),
    "bear": ("panda",),
    "zebra": (),
    "giraffe": (),
    "backpack": ("knapsack",),
    "umbrella": (),
    "handbag": ("wallet", "purse", "briefcase"),
    "tie": ("bow", "bow tie"),
    "suitcase": ("suit case", "luggage"),
    "frisbee": (),
    "skis": ("ski",),
    "snowboard": (),
    "sports ball": ("ball",),
    "kite": (),
    "baseball bat": (),
    "baseball glove": (),
    "skateboard": (),
    "surfboard": ("longboard", "skimboard", "shortboard", "wakeboard"),
    "tennis racket": ("racket",),
    "bottle": (),
    "wine glass": (),
    "cup": (),
    "fork": (),
    "knife": ("pocketknife", "knive"),
    "spoon": (),
    "bowl": ("container",),
    "banana": (),
    "apple": (),
    "sandwich": ("burger", "sub", "cheeseburger", "hamburger"),
    "orange": (),
    "broccoli": (),
    "carrot": (),
    "hot dog": (),
    "pizza": (),
    "donut": ("doughnut", "bagel"),
    "cake": ("cheesecake", "cupcake", "shortcake", "coffeecake", "pancake"),
    "chair": ("seat", "stool"),
    "couch": ("sofa", "recliner", "futon", "loveseat", "settee", "chesterfield"),
    "potted plant": ("houseplant",),
    "bed": (),
    "dining table": ("table", "desk"),
    "toilet": ("urinal", "commode", "lavatory", "potty"),
    "tv": ("monitor", "televison", "television"),
    "laptop": ("computer", "notebook", "netbook", "lenovo", "macbook", "laptop computer"),
    "mouse": (),
    "remote": (),
    "keyboard": (),
    "cell phone": ("mobile phone", "phone", "cellphone", "telephone", "phon", "smartphone", "iphone"),
    "microwave": (),
    "oven": ("stovetop", "stove", "stove top oven"),
    "toaster": (),
    "sink": (),
    "refrigerator": ("fridge", "freezer"),
    "book": (),
    "clock": (),
    "vase": (),
    "scissors": (),
    "teddy bear": ("teddybear",),
    "hair drier": ("hairdryer",),
    "toothbrush": (),
}  # fmt: skip
"""The 80 COCO categories (canonical names as in ``instances_*.json``) and their CHAIR synonyms."""

_CHAIR_ANIMALS = (
    "bird", "cat", "dog", "horse", "sheep", "cow", "elephant", "bear", "zebra", "giraffe", "animal", "cub",
)  # fmt: skip

COCO_COMPOUNDS: dict[str, str | None] = {
    # A young or adult animal is that animal, not a person ("baby", "adult" are person synonyms).
    **{f"{age} {animal}": animal if animal in COCO_SYNONYMS else None
       for age in ("baby", "adult") for animal in _CHAIR_ANIMALS},
    "passenger jet": "airplane",
    "passenger train": "train",
    "toilet seat": "toilet",
    "home plate": None,
    "train track": None,
}  # fmt: skip
"""Phrases that override their words (CHAIR's hard-coded double words); None: mentions no object."""

_SHAPE_WORDS: dict[str, tuple[str, ...]] = {"circle": ("disc", "disk"), "diamond": ("rhombus",)}

SHAPEWORLD_SYNONYMS: dict[str, tuple[str, ...]] = {shape: _SHAPE_WORDS.get(shape, ()) for shape in SHAPES}
"""ShapeWorld's shapes and other words a model may use for them."""

_WORD = re.compile(r"[a-z]+")


@dataclass(frozen=True)
class Vocabulary:
    """Surface phrases (singular and plural, as word tuples) mapped to canonical category names."""

    phrases: Mapping[tuple[str, ...], str | None]
    max_words: int

    @classmethod
    def from_synonyms(
        cls, synonyms: Mapping[str, Sequence[str]], compounds: Mapping[str, str | None] | None = None
    ) -> Vocabulary:
        """Build from canonical name -> synonyms (the name matches itself) and overriding compounds."""
        phrases: dict[tuple[str, ...], str | None] = {}
        for canonical, words in synonyms.items():
            for word in (canonical, *words):
                for form in (word, plural(word)):
                    phrases[tuple(form.split(" "))] = canonical
        for compound, canonical in (compounds or {}).items():
            for form in (compound, plural(compound)):
                phrases[tuple(form.split(" "))] = canonical
        return cls(phrases=phrases, max_words=max(len(p) for p in phrases))

    def canonical(self, name: str) -> str | None:
        """Canonical category of a phrase ("bike" -> "bicycle", "Dining Table" -> "dining table")."""
        return self.phrases.get(tuple(_WORD.findall(name.lower())))


COCO = Vocabulary.from_synonyms(COCO_SYNONYMS, COCO_COMPOUNDS)
"""COCO's 80 categories with CHAIR synonyms."""

SHAPEWORLD = Vocabulary.from_synonyms(SHAPEWORLD_SYNONYMS)
"""ShapeWorld's shapes."""


def object_mentions(text: str, vocabulary: Vocabulary = COCO) -> list[str]:
    """Canonical categories a text mentions, in order and with repeats (CHAIR_i counts each mention)."""
    words = _WORD.findall(text.lower())
    mentions: list[str] = []
    i = 0
    while i < len(words):
        # Longest phrase first, so "hot dog" is not a dog and "teddy bear" not a bear.
        for n in range(min(vocabulary.max_words, len(words) - i), 0, -1):
            phrase = tuple(words[i : i + n])
            if phrase in vocabulary.phrases:
                if (canonical := vocabulary.phrases[phrase]) is not None:
                    mentions.append(canonical)
                i += n
                break
        else:
            i += 1
    return mentions


def mentioned_objects(text: str, vocabulary: Vocabulary = COCO) -> set[str]:
    """The set of canonical categories a text mentions: "a man riding a bike" -> {"person", "bicycle"}."""
    return set(object_mentions(text, vocabulary))


def annotated_objects(annotations: Mapping[str, Any], vocabulary: Vocabulary = COCO) -> set[str]:
    """CHAIR's ground truth for a sample: its annotated object categories plus the objects its captions mention.

    Category names are made canonical ("bike" -> "bicycle"); one outside the vocabulary is kept as is.
    Rohrbach et al. add the caption mentions because the object annotations miss objects that are there.
    """
    present = {vocabulary.canonical(o["category"]) or o["category"] for o in annotations.get("objects", [])}
    return present | mentioned_objects(" ".join(annotations.get("captions", [])), vocabulary)
