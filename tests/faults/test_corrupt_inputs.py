"""A corrupt-input matrix through every ``data`` command, ``data inspect``, the training DataModule and ``fit``.

Each case is a record, line, file or shard damaged in one way. Expected: no traceback, no hang
(every command runs under a time bound), the good inputs come through and every bad one is a
counted skip with its reason (or, for a whole unusable input file, a one-line ``error:``).
"""

from __future__ import annotations

import csv
import io
import json
import signal
import struct
import subprocess
import sys
import tarfile
import zlib
from collections import Counter
from contextlib import contextmanager
from pathlib import Path

import pytest
from PIL import Image

from dress_lightning.commands.data import main as data_main
from dress_lightning.data.datamodule import ShardDataModule
from dress_lightning.data.schema import Sample, alternating_turns, build_record, encode_sample, ensure_image_token

ROOT = Path(__file__).resolve().parents[2]
TIME_BOUND_S = 60
DEEP = "[" * 100_000 + "]" * 100_000


@contextmanager
def time_bound(seconds: int = TIME_BOUND_S):
    """Fail the case (instead of hanging the suite) if it runs longer than ``seconds``."""
    def expire(signum, frame):
        raise TimeoutError(f"the case ran longer than {seconds} s (a hang)")

    previous = signal.signal(signal.SIGALRM, expire)
    signal.alarm(seconds)
    try:
        yield
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, previous)


def _png(size: tuple[int, int] = (32, 32), noise: bool = False) -> bytes:
    image = Image.effect_noise(size, 64).convert("RGB") if noise else Image.new("RGB", size, "white")
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


def _bomb_png(side: int = 20_000) -> bytes:
    """A tiny file whose header claims side x side pixels (400 megapixels): a decompression bomb."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    header = struct.pack(">IIBBBBB", side, side, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(b"\0" * 64)) + chunk(b"IEND", b"")


IMAGE_CASES = {
    # file name -> (bytes, the skip reason it must get, or None if it is good)
    "good.png": (_png(), None),
    "truncated.png": (_png(noise=True)[:300], "unreadable image"),
    "not-an-image.png": (b"this is text, not a PNG", "unreadable image"),
    "empty.png": (b"", "unreadable image"),
    "bomb.png": (_bomb_png(), "image too large"),
    "oversized.png": (_png((200, 200), noise=True), "image file too large"),
}
MAX_IMAGE_MB = "0.05"  # oversized.png (~120 KB of noise) is over it, the others are not


@pytest.fixture(scope="module")
def images(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("inputs")
    (root / "images").mkdir()
    for name, (data, _) in IMAGE_CASES.items():
        (root / "images" / name).write_bytes(data)
    (root / "secret").mkdir()
    (root / "secret" / "private.png").write_bytes(_png())  # outside --images: must never be packed
    return root / "images"


def _run(*args: str) -> tuple[int, dict]:
    """Run a data command under the time bound; return its exit code and manifest (if it wrote one)."""
    out = Path(args[args.index("--out") + 1])
    with time_bound():
        code = data_main(list(args))
    manifests = list(out.glob("*-manifest.json"))
    return code, json.loads(manifests[0].read_text()) if manifests else {}


def _image_refs(images: Path) -> dict[str, str | None]:
    """Image references -> the skip reason each must get (None: written)."""
    return {
        **{name: reason for name, (_, reason) in IMAGE_CASES.items()},
        "missing.png": "missing image",
        "../secret/private.png": "image path outside --images",
        str(images.parent / "secret" / "private.png"): "image path outside --images",
    }


def test_convert_llava_matrix(images, tmp_path):
    def record(i, image, conversations=None, **extra):
        turns = [{"from": "human", "value": "<image>\nWhat is it?"}, {"from": "gpt", "value": "A square."}]
        return {"id": f"r{i}", "image": image, "conversations": turns if conversations is None else conversations,
                **extra}

    refs = _image_refs(images)
    records = [record(i, ref) for i, ref in enumerate(refs)]
    records += [record(100, "good.png", whatever={"unknown": "field"}),   # unknown fields: ignored, written
                record(101, "good.png", conversations=[]),                # empty conversation
                record(102, "good.png", conversations=[{"from": "robot", "value": "?"}]),  # unknown role
                42]                                                       # not a record
    (tmp_path / "llava.json").write_text(json.dumps(records))
    code, manifest = _run("convert-llava", "--json", str(tmp_path / "llava.json"), "--images", str(images),
                          "--out", str(tmp_path / "out"), "--max-image-mb", MAX_IMAGE_MB)
    assert code == 0
    expected = Counter(reason for reason in refs.values() if reason) + Counter({"invalid sample": 1,
                                                                                "invalid record": 2})
    assert manifest["written"] == 2 and Counter(manifest["skipped"]) == expected
    _assert_nothing_from_outside(tmp_path / "out")


@pytest.mark.parametrize("content, message", [
    (b"{not json", "is not valid JSON"),
    (b"\xff\xfe\x00 not utf-8", "is not valid JSON"),
    (DEEP.encode(), "nested too deeply"),
    (b"", "is not valid JSON"),
])
def test_an_unusable_json_file_is_a_one_line_error(images, tmp_path, capsys, content, message):
    (tmp_path / "bad.json").write_bytes(content)
    for command in (["convert-llava", "--json"], ["convert-coco", "--annotations"]):
        code, _ = _run(*command, str(tmp_path / "bad.json"), "--images", str(images), "--out", str(tmp_path / "o"))
        assert code == 2 and message in capsys.readouterr().err


def _jsonl(path: Path, lines: list[bytes]) -> Path:
    path.write_bytes(b"\n".join(lines) + b"\n")
    return path


BAD_LINES = {
    b"{not json": "malformed json",
    b'{"text": "caf\xe9"}': "not UTF-8",     # Latin-1, not UTF-8
    DEEP.encode(): "malformed json",
    b"[1, 2, 3]": "invalid record",
}


def test_convert_llava_bench_matrix(images, tmp_path):
    refs = _image_refs(images)
    lines = [json.dumps({"question_id": i, "image": ref, "text": "What is it?", "category": "conv"}).encode()
             for i, ref in enumerate(refs)]
    lines += [json.dumps({"question_id": 99, "image": "good.png", "text": "Q", "category": "conv", "x": 1}).encode()]
    lines += list(BAD_LINES) + [b""]
    code, manifest = _run("convert-llava-bench", "--questions", str(_jsonl(tmp_path / "q.jsonl", lines)),
                          "--images", str(images), "--out", str(tmp_path / "out"), "--max-image-mb", MAX_IMAGE_MB)
    assert code == 0
    expected = Counter(r for r in refs.values() if r) + Counter(BAD_LINES.values())
    assert manifest["written"] == 2 and Counter(manifest["skipped"]) == expected
    _assert_nothing_from_outside(tmp_path / "out")


@pytest.mark.parametrize("command", ["convert-nlf", "convert-vlsafe"])
def test_convert_nlf_and_vlsafe_matrix(images, tmp_path, command):
    def line(image_id, **extra):
        if command == "convert-nlf":
            turn = {"user": "What is it?", "model": "A square.", "rating": "4", "critique NLF": "Wrong."}
            return json.dumps({"image_id": image_id, "interaction": [turn], **extra}).encode()
        return json.dumps({"image_id": image_id, "query": "How do I break it?", **extra}).encode()

    (images / "000000000001.png").write_bytes(_png())
    lines = [line(1), line(1, unknown={"field": True}), line(2)]  # image 2 is missing
    lines += [line(1, interaction=[])] if command == "convert-nlf" else [line(1, query=7)]
    lines += list(BAD_LINES)
    name = "helpfulness_nlf.jsonl" if command == "convert-nlf" else "harmlessness_examine.jsonl"
    code, manifest = _run(command, "--jsonl", str(_jsonl(tmp_path / name, lines)), "--images", str(images),
                          "--out", str(tmp_path / "out"), "--prefix", "p")
    assert code == 0
    expected = Counter(BAD_LINES.values()) + Counter({"missing image": 1, "invalid record": 1})
    assert manifest["written"] == 2 and Counter(manifest["skipped"]) == expected
    (images / "000000000001.png").unlink()


def test_convert_coco_and_chair_matrix(images, tmp_path):
    refs = _image_refs(images)
    coco = {"images": [{"id": i + 1, "file_name": ref} for i, ref in enumerate(refs)],
            "annotations": [{"image_id": i + 1, "caption": "A white square.", "bbox": [0, 0, 4, 4], "category_id": 1}
                            for i in range(len(refs))],
            "categories": [{"id": 1, "name": "square"}], "info": {"unknown": "field"}}
    (tmp_path / "instances.json").write_text(json.dumps(coco))
    expected = Counter(r for r in refs.values() if r)
    code, manifest = _run("convert-coco", "--annotations", str(tmp_path / "instances.json"), "--images", str(images),
                          "--out", str(tmp_path / "coco"), "--max-image-mb", MAX_IMAGE_MB)
    assert code == 0 and manifest["written"] == 1 and Counter(manifest["skipped"]) == expected
    code, manifest = _run("convert-chair", "--annotations", str(tmp_path / "instances.json"), "--images", str(images),
                          "--out", str(tmp_path / "chair"), "--num-images", str(len(refs)),
                          "--instructions", "Describe it.", "--max-image-mb", MAX_IMAGE_MB)
    assert code == 0 and manifest["written"] == 1 and Counter(manifest["skipped"]) == expected
    _assert_nothing_from_outside(tmp_path / "coco")


def _assert_nothing_from_outside(out: Path) -> None:
    """No shard holds a sample that names the file outside --images."""
    packed = b"".join(p.read_bytes() for p in out.glob("*.tar"))
    assert packed and b"private" not in packed


# -- shards: data inspect, the DataModule and fit ---------------------------------------------------------------

def _sample(i: int, image: bytes = b"", **record_changes) -> dict[str, bytes]:
    record = build_record(sample_id=f"s{i}", source="test", image_id=str(i),
                          conversation=alternating_turns([ensure_image_token("What is it?"), "A white square."]),
                          captions=["A white square."])
    record.update(record_changes)
    return encode_sample(Sample(record=record, image=image or _png(), image_ext="png"))


def _tar(path: Path, samples: list[dict[str, bytes]]) -> Path:
    with tarfile.open(path, "w") as tar:
        for sample in samples:
            for ext, payload in sample.items():
                if ext != "__key__":
                    info = tarfile.TarInfo(f"{sample['__key__']}.{ext}")
                    info.size = len(payload)
                    tar.addfile(info, io.BytesIO(payload))
    return path


GOOD_SHARD_SAMPLES = 8


@pytest.fixture(scope="module")
def corrupt_shards(tmp_path_factory) -> tuple[Path, Counter]:
    """A shard directory holding good samples and one of each kind of damage, with the skips they must cause."""
    root = tmp_path_factory.mktemp("shards")
    good = [_sample(i) for i in range(GOOD_SHARD_SAMPLES)]
    _tar(root / "good-0.tar", good[:4])
    _tar(root / "good-1.tar", good[4:])
    damaged = [
        {**_sample(100), "json": b"{not json"},
        {**_sample(101), "json": b'{"id": "caf\xe9"}'},
        {**_sample(102), "json": DEEP.encode()},
        _sample(103, conversation=[]),
        _sample(104, unknown_field={"x": 1}),  # unknown top-level fields are allowed: trained on
        {k: v for k, v in _sample(105).items() if k != "png"},  # no image member
        _sample(106, image=IMAGE_CASES["truncated.png"][0]),
        _sample(107, image=b"not an image"),
        _sample(108, image=_bomb_png()),
    ]
    _tar(root / "damaged.tar", damaged)
    whole = _tar(root / "tmp.tar", good[:4]).read_bytes()
    (root / "tmp.tar").unlink()
    (root / "truncated.tar").write_bytes(whole[: len(whole) // 2 + 100])
    (root / "empty.tar").write_bytes(b"")
    _tar(root / "no-members.tar", [])
    expected = Counter({"invalid sample": 5, "unreadable image": 2, "image too large": 1})
    return root, expected


def test_data_inspect_counts_every_damage(corrupt_shards, capsys):
    root, expected = corrupt_shards
    with time_bound():
        assert data_main(["inspect", str(root), "--json"]) == 0
    stats = json.loads(capsys.readouterr().out)
    skipped = Counter(stats["skipped"])
    # A 0-byte .tar cannot be opened; a valid tar without members holds no data: both are reported.
    assert skipped.pop("unreadable shard") == 1 and skipped.pop("empty shard") == 1
    # The truncated shard: the samples before the cut are read, the one cut in half lacks a member (invalid).
    truncated_whole = stats["samples"] - GOOD_SHARD_SAMPLES - 1  # sample 104 (unknown field) is fine
    assert 0 <= truncated_whole < 4
    assert expected["invalid sample"] <= skipped["invalid sample"] <= expected["invalid sample"] + 1
    assert skipped - Counter({"invalid sample": skipped["invalid sample"]}) == expected - Counter(
        {"invalid sample": expected["invalid sample"]})


@pytest.mark.parametrize("num_workers", [0, 2])
def test_the_datamodule_skips_and_counts_every_damage(corrupt_shards, num_workers):
    root, expected = corrupt_shards
    dm = ShardDataModule(train_shards=str(root), batch_size=4, num_workers=num_workers, shuffle_buffer=1)
    with time_bound():
        ids = [i for batch in dm.train_dataloader() for i in batch["ids"]]
    assert {f"s{i}" for i in range(GOOD_SHARD_SAMPLES)} | {"s104"} <= set(ids)
    skipped = Counter({r: n for r, n in dm.skipped.items() if not r.startswith("unreadable (")})
    unreadable_shards = sum(n for r, n in dm.skipped.items() if r.startswith("unreadable ("))
    assert unreadable_shards >= 1  # the 0-byte .tar
    assert skipped["image too large"] == 1 and skipped["unreadable image"] == 2
    assert skipped["invalid sample"] >= expected["invalid sample"]


def test_missing_train_shards_is_an_error_not_a_hang(tmp_path):
    dm = ShardDataModule(train_shards=str(tmp_path / "does-not-exist"), batch_size=4, num_workers=0)
    with time_bound(), pytest.raises(FileNotFoundError, match="data.init_args.train_shards"):
        dm.train_dataloader()


def test_an_all_unreadable_resampled_stream_is_an_error_not_a_hang(corrupt_shards, tmp_path):
    root, _ = corrupt_shards
    (tmp_path / "bad").mkdir()
    for name in ("truncated.tar", "empty.tar"):
        (tmp_path / "bad" / name).write_bytes((root / name).read_bytes()[:40])
    dm = ShardDataModule(train_shards=str(tmp_path / "bad"), batch_size=4, num_workers=0, resampled=True,
                         epoch_length=64)
    with time_bound(), pytest.raises(RuntimeError, match="None of the 2 shard"):
        next(iter(dm.train_dataloader()))


def test_a_worker_without_a_batch_keeps_its_counts(corrupt_shards, tmp_path):
    """Two workers, one shard each: the one over the damaged shard forms no batch, its skips still arrive."""
    root, _ = corrupt_shards
    (tmp_path / "two").mkdir()
    for name in ("good-0.tar", "damaged.tar"):
        (tmp_path / "two" / name).write_bytes((root / name).read_bytes())
    dm = ShardDataModule(train_shards=str(tmp_path / "two"), batch_size=8, num_workers=2, shuffle_buffer=1)
    with time_bound():
        ids = [i for batch in dm.train_dataloader() for i in batch["ids"]]
    assert len(ids) == 4 + 1  # good-0 and sample 104 form batches...
    assert dm.skipped["image too large"] == 1  # ...and the damaged shard's worker still reports its skips


def test_fit_reports_skips_in_progress_output_summary_and_metrics(corrupt_shards, tmp_path):
    root, _ = corrupt_shards
    args = ["fit", "-c", str(ROOT / "configs/sft.yaml"), "-c", str(ROOT / "configs/overlays/ci_tiny.yaml"),
            "--trainer.max_steps", "3", "--trainer.limit_val_batches", "0", "--trainer.default_root_dir",
            str(tmp_path), "--trainer.logger", "lightning.pytorch.loggers.CSVLogger", "--trainer.logger.save_dir",
            str(tmp_path), "--trainer.logger.name", "", "--trainer.logger.version", "0",
            "--trainer.callbacks.init_args.dirpath", str(tmp_path / "ck"), "--data.init_args.train_shards", str(root),
            "--data.init_args.train_shapeworld", "null", "--data.init_args.val_shapeworld", "null",
            "--data.init_args.val_shards", "null", "--data.init_args.shuffle_buffer", "1"]
    result = subprocess.run([sys.executable, "-m", "dress_lightning", *args], capture_output=True, text=True,
                            timeout=300, cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "Traceback" not in result.stderr
    assert "data/skipped" in result.stdout  # the progress bar
    assert "The data pipeline skipped" in result.stderr and "image too large: 1" in result.stderr  # the summary
    with (tmp_path / "version_0" / "metrics.csv").open() as f:
        rows = list(csv.DictReader(f))
    last = [r for r in rows if r.get("data/skipped")][-1]
    assert float(last["data/skipped"]) >= 8 and float(last["data/skipped/image_too_large"]) == 1
