"""Deterministic initialisation of weights that no checkpoint provides."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import torch

RANDOM_INIT_SEED = 0


@contextmanager
def deterministic_init(seed: int = RANDOM_INIT_SEED) -> Iterator[None]:
    """Seed torch's CPU RNG inside the block only, leaving the caller's RNG state untouched.

    Randomly initialised towers (the tiny preset, ``vision_pretrained: null``) are then identical on
    every machine, every rank and every reload, so a checkpoint need not store frozen random weights.
    """
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        yield
