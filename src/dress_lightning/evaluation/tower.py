"""Does a vision tower see ShapeWorld? Caption retrieval, linear probes of colour/shape/position, feature spread.

``probe-tower`` (``commands/evaluate.py``) measures a tower the way the later stages use it: the patch tokens of
``vision_layer`` (what the projector reads), on images rendered by the ShapeWorld generator.

- retrieval: each val image ranks ``pool`` captions (its own among them) with the CLIP's text tower;
  top-1 accuracy (chance: 1 / pool). Needs a full open_clip checkpoint (the ``clip`` stage's export).
- probes: one linear classifier over the flattened patch tokens predicts, for each of the 3x3 grid
  cells, the colour and the shape of the object there or "empty"; trained on train images, scored on
  val images. Colour and shape accuracy are over occupied cells; position is occupancy accuracy
  over all cells (chance levels are reported beside them).
- cell from token (towers with one token per grid cell): a linear probe names an occupied cell's position from
  that cell's token alone; low means the tokens do not say where they are, and the LM has only their order
  (``model.image_position_embedding`` adds it).
- spread: mean cosine similarity between the mean patch features of different images (near 1: the
  tower hands every image nearly the same features).
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch.nn import functional as F

from dress_lightning.tasks.clip import retrieval_accuracy

log = logging.getLogger(__name__)

ATTRIBUTES = ("color", "shape")


@dataclass
class ProbeReport:
    """Tower diagnostics (fractions; ``*_chance`` is the majority-class rate on the same test cells)."""

    color: float
    shape: float
    position: float
    color_chance: float
    shape_chance: float
    position_chance: float
    mean_cosine_between_images: float
    cell_from_token: float | None
    """Accuracy of naming an occupied cell (1 of 9) from its token alone; None unless the tower has 9 tokens."""
    own_cell_from_token: dict[str, float] | None
    """Per attribute, accuracy of one read-out shared by all 9 slots that names the colour / shape of a token's
    own cell from that token alone (occupied cells): does each token hold its cell? None unless 9 tokens."""
    retrieval: float | None
    retrieval_pool: int
    train_images: int
    test_images: int


def cell_labels(objects: Sequence[dict]) -> dict[str, list[int]]:
    """Per grid cell (row-major), the class of each attribute: 0 = empty, else 1 + index in the vocabulary."""
    from dress_lightning.data.shapeworld import COLORS, POSITIONS, SHAPES

    vocab = {"color": list(COLORS), "shape": list(SHAPES)}
    labels = {a: [0] * len(POSITIONS) for a in ATTRIBUTES}
    for obj in objects:
        cell = POSITIONS.index(obj["position"])
        for attribute in ATTRIBUTES:
            labels[attribute][cell] = 1 + vocab[attribute].index(obj[attribute])
    return labels


def attribute_classes() -> dict[str, int]:
    """How many classes ``cell_labels`` gives each attribute: an empty cell, then the vocabulary."""
    from dress_lightning.data.shapeworld import COLORS, SHAPES

    return {"color": 1 + len(COLORS), "shape": 1 + len(SHAPES)}


def shapeworld_images(split: str, count: int, seed: int = 0) -> tuple[list, list[list[dict]], list[list[str]]]:
    """``count`` ShapeWorld scenes of ``split``: PIL images, their objects and their captions."""
    from dress_lightning.data.shapeworld import generate_record, render_scene

    images, objects, captions = [], [], []
    for index in range(count):
        record, scene = generate_record(split, seed, index)
        images.append(render_scene(scene))
        objects.append(scene)
        captions.append(record["annotations"]["captions"])
    return images, objects, captions


@torch.no_grad()
def patch_features(tower, images: Sequence, batch_size: int = 128) -> torch.Tensor:
    """The tower's patch tokens (N, P, D) for PIL images, through its own transform."""
    chunks = []
    for start in range(0, len(images), batch_size):
        pixels = torch.stack([tower.image_transform(image) for image in images[start : start + batch_size]])
        chunks.append(tower(pixels).float())
    return torch.cat(chunks)


def mean_cosine_between_images(features: torch.Tensor) -> float:
    """Mean cosine similarity of the mean patch features of distinct images; features (N, P, D)."""
    pooled = F.normalize(features.mean(dim=1), dim=-1)  # (N, D)
    similarity = pooled @ pooled.T  # (N, N)
    n = len(pooled)
    return float((similarity.sum() - similarity.diagonal().sum()) / (n * (n - 1)))


def linear_probe(
    train_x: torch.Tensor, train_y: torch.Tensor, test_x: torch.Tensor, classes: int, steps: int = 300,
    weight_decay: float = 1e-3, seed: int = 0,
) -> torch.Tensor:
    """Fit one softmax-linear classifier per output column on standardised features; predict the test set.

    ``train_x`` (N, F), ``train_y`` (N, K) class ids in [0, classes); returns test predictions (M, K).
    """
    mean, std = train_x.mean(0), train_x.std(0) + 1e-6
    train_x, test_x = (train_x - mean) / std, (test_x - mean) / std
    outputs = train_y.shape[1]
    generator = torch.Generator().manual_seed(seed)
    head = torch.nn.Linear(train_x.shape[1], outputs * classes)
    torch.nn.init.normal_(head.weight, std=0.01, generator=generator)
    torch.nn.init.zeros_(head.bias)
    optimizer = torch.optim.Adam(head.parameters(), lr=1e-2, weight_decay=weight_decay)
    with torch.enable_grad():
        for _ in range(steps):
            optimizer.zero_grad()
            logits = head(train_x).reshape(-1, outputs, classes)  # (N, K, C)
            F.cross_entropy(logits.transpose(1, 2), train_y).backward()
            optimizer.step()
    return head(test_x).reshape(-1, outputs, classes).argmax(-1)


def cell_from_token(train_features: torch.Tensor, train_objects: Sequence[Sequence[dict]],
                    test_features: torch.Tensor, test_objects: Sequence[Sequence[dict]], seed: int = 0) -> float:
    """Accuracy of a linear probe that names an occupied cell's index from that cell's token; features (N, 9, D)."""

    def occupied(features: torch.Tensor, objects: Sequence[Sequence[dict]]) -> tuple[torch.Tensor, torch.Tensor]:
        tokens, cells = [], []
        for image_tokens, scene in zip(features, objects):
            for cell, color in enumerate(cell_labels(scene)["color"]):
                if color:
                    tokens.append(image_tokens[cell])
                    cells.append(cell)
        return torch.stack(tokens), torch.tensor(cells)[:, None]  # (M, D), (M, 1)

    (train_x, train_y), (test_x, test_y) = occupied(train_features, train_objects), occupied(test_features, test_objects)
    predicted = linear_probe(train_x, train_y, test_x, classes=train_features.shape[1], seed=seed)
    return float((predicted == test_y).float().mean())


def own_cell_from_token(train_features: torch.Tensor, train_objects: Sequence[Sequence[dict]],
                        test_features: torch.Tensor, test_objects: Sequence[Sequence[dict]],
                        seed: int = 0) -> dict[str, float]:
    """Per attribute, accuracy on occupied cells of one linear read-out, shared by every slot, that names what
    is in a token's own cell from that token; features (N, 9, D). A language model reads every image token
    with the same weights, so this is what it can read off one token without knowing which slot it is."""
    tokens_train, tokens_test = train_features.flatten(0, 1), test_features.flatten(0, 1)  # (N * 9, D)
    accuracy = {}
    for attribute, classes in attribute_classes().items():
        train_y = torch.tensor([cell_labels(o)[attribute] for o in train_objects]).flatten()[:, None]  # (N * 9, 1)
        test_y = torch.tensor([cell_labels(o)[attribute] for o in test_objects]).flatten()[:, None]
        predicted = linear_probe(tokens_train, train_y, tokens_test, classes, seed=seed)
        occupied = test_y > 0
        accuracy[attribute] = float((predicted[occupied] == test_y[occupied]).float().mean())
    return accuracy


def probe_tower(
    vision_model: str,
    vision_pretrained: str | None,
    vision_layer: int = -2,
    train_images: int = 3000,
    test_images: int = 500,
    retrieval_pool: int = 100,
    seed: int = 0,
) -> ProbeReport:
    """Measure a tower on ShapeWorld: linear probes on train -> val scenes, retrieval and feature spread."""
    from dress_lightning.models.vision import build_vision_tower

    tower = build_vision_tower(vision_model, vision_pretrained, vision_layer).eval()
    train_pil, train_objects, _ = shapeworld_images("train", train_images, seed)
    test_pil, test_objects, test_captions = shapeworld_images("val", test_images, seed)
    train_features, test_features = patch_features(tower, train_pil), patch_features(tower, test_pil)

    accuracy, chance = {}, {}
    train_x, test_x = train_features.flatten(1), test_features.flatten(1)
    for attribute, classes in attribute_classes().items():
        train_y = torch.tensor([cell_labels(o)[attribute] for o in train_objects])  # (N, 9)
        test_y = torch.tensor([cell_labels(o)[attribute] for o in test_objects])  # (M, 9)
        predicted = linear_probe(train_x, train_y, test_x, classes, seed=seed)
        occupied = test_y > 0
        accuracy[attribute] = float((predicted[occupied] == test_y[occupied]).float().mean())
        chance[attribute] = float(test_y[occupied].bincount().max() / occupied.sum())
        if attribute == "color":
            # Position: whether each cell holds an object, read off the same classifier.
            accuracy["position"] = float(((predicted > 0) == occupied).float().mean())
            rate = float(occupied.float().mean())
            chance["position"] = max(rate, 1 - rate)

    from dress_lightning.data.shapeworld import POSITIONS

    one_token_per_cell = train_features.shape[1] == len(POSITIONS)
    token_cells = (cell_from_token(train_features, train_objects, test_features, test_objects, seed)
                   if one_token_per_cell else None)
    own_cell = (own_cell_from_token(train_features, train_objects, test_features, test_objects, seed)
                if one_token_per_cell else None)
    retrieval = None
    if vision_pretrained is not None and len(test_pil) >= retrieval_pool:
        retrieval = float(caption_retrieval(vision_model, vision_pretrained, test_pil, test_captions, retrieval_pool))
    return ProbeReport(
        color=accuracy["color"], shape=accuracy["shape"], position=accuracy["position"],
        color_chance=chance["color"], shape_chance=chance["shape"], position_chance=chance["position"],
        mean_cosine_between_images=mean_cosine_between_images(test_features), cell_from_token=token_cells,
        own_cell_from_token=own_cell,
        retrieval=retrieval, retrieval_pool=retrieval_pool, train_images=train_images, test_images=test_images,
    )


@torch.no_grad()
def caption_retrieval(vision_model: str, checkpoint: str, images: Sequence, captions: Sequence[Sequence[str]],
                      pool: int) -> torch.Tensor:
    """Zero-shot image-to-caption top-1 among ``pool`` captions with a full open_clip checkpoint.

    Image i's caption is its ``i % len(captions)``-th reference caption, so all caption styles appear.
    """
    import open_clip

    model, _, transform = open_clip.create_model_and_transforms(vision_model, pretrained=checkpoint)
    model.eval()
    tokenizer = open_clip.get_tokenizer(vision_model)
    pixels = torch.stack([transform(image) for image in images])
    texts = tokenizer([c[i % len(c)] for i, c in enumerate(captions)])
    return retrieval_accuracy(model.encode_image(pixels, normalize=True), model.encode_text(texts, normalize=True),
                              pool)
