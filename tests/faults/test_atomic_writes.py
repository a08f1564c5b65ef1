"""Writers leave whole files or none: ``--overwrite`` keeps the old shards until new ones exist, partials are invisible."""

from __future__ import annotations

import json
from pathlib import Path

from dress_lightning.atomic import PARTIAL_SUFFIX
from dress_lightning.commands.data import main as data_main
from dress_lightning.data.shards import expand_shard_urls, iter_samples
from dress_lightning.data.skips import SkipLog


def _shapeworld(out: Path, samples: int, *extra: str) -> int:
    return data_main(["shapeworld", "--out", str(out), "--split", "train", "--samples", str(samples),
                      "--shard-size", "2", "--prefix", "sw", *extra])


def test_overwrite_that_writes_nothing_keeps_the_old_shards(tmp_path):
    assert _shapeworld(tmp_path, 4) == 0
    before = {p.name: p.read_bytes() for p in tmp_path.glob("sw-*.tar")}
    (tmp_path / "llava.json").write_text(json.dumps([{"id": "x", "image": "missing.png", "conversations": []}]))
    (tmp_path / "images").mkdir()
    code = data_main(["convert-llava", "--json", str(tmp_path / "llava.json"), "--images", str(tmp_path / "images"),
                      "--out", str(tmp_path), "--prefix", "sw", "--overwrite"])
    assert code == 1  # every input skipped
    assert {p.name: p.read_bytes() for p in tmp_path.glob("sw-*.tar")} == before


def test_a_crashed_writer_leaves_only_invisible_partials(tmp_path):
    assert _shapeworld(tmp_path, 4) == 0
    (tmp_path / f"sw-000002.tar{PARTIAL_SUFFIX}").write_bytes(b"half a shard")  # what a kill -9 leaves
    assert len(list(iter_samples(expand_shard_urls([str(tmp_path)]), SkipLog()))) == 4
    assert _shapeworld(tmp_path, 2, "--overwrite") == 0  # the next run clears it and replaces the old shards
    assert sorted(p.name for p in tmp_path.iterdir() if "sw-0" in p.name) == ["sw-000000.tar"]
    manifest = json.loads((tmp_path / "sw-manifest.json").read_text())
    assert manifest["written"] == 2 and manifest["shards"] == ["sw-000000.tar"]
