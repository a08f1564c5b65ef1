"""POPE: the converter on hand-written records in the published format, the metric, and evaluate's POPE section."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import yaml
from PIL import Image

from dress_lightning.cli import main
from dress_lightning.data.shards import iter_samples
from dress_lightning.data.skips import SkipLog
from dress_lightning.evaluation.metrics import POPE, pope_says_yes

ROOT = Path(__file__).resolve().parents[2]

# Lines as in POPE's output/coco/coco_pope_adversarial.json (one JSON object per line).
PUBLISHED_LINES = [
    {"question_id": 1, "image": "COCO_val2014_000000310196.jpg", "text": "Is there a snowboard in the image?",
     "label": "yes"},
    {"question_id": 2, "image": "COCO_val2014_000000310196.jpg", "text": "Is there a dining table in the image?",
     "label": "no"},
    {"question_id": 3, "image": "COCO_val2014_000000210789.jpg", "text": "Is there a person in the image?",
     "label": "yes"},
    {"question_id": 4, "image": "COCO_val2014_000000210789.jpg", "text": "Is there a car in the image?",
     "label": "no"},
    {"question_id": 5, "image": "COCO_val2014_000000210789.jpg", "text": "Is there a dog in the image?",
     "label": "maybe"},
    {"question_id": 6, "image": "COCO_val2014_000000999999.jpg", "text": "Is there a cat in the image?",
     "label": "no"},
]


@pytest.fixture
def pope_files(tmp_path) -> tuple[Path, Path]:
    images = tmp_path / "val2014"
    images.mkdir()
    for name, color in (("COCO_val2014_000000310196.jpg", "white"), ("COCO_val2014_000000210789.jpg", "gray")):
        Image.new("RGB", (48, 40), color).save(images / name, format="JPEG")
    questions = tmp_path / "coco_pope_adversarial.json"
    questions.write_text("".join(json.dumps(line) + "\n" for line in PUBLISHED_LINES))
    return questions, images


def test_answers_are_read_as_popes_evaluation_reads_them():
    assert pope_says_yes("Yes, there is a snowboard.")
    assert pope_says_yes("There is a snowboard. No doubt.")  # only the first sentence counts
    assert not pope_says_yes("No, there is none.")
    assert not pope_says_yes("There is not a car in the image")
    assert pope_says_yes("Nothing like that")  # a whole word only, as POPE's rule


def test_metric_matches_a_hand_count():
    metric = POPE()
    metric.update(["Yes", "Yes.", "No", "No, none."], torch.tensor([True, False, True, False]))
    metric.update(["yes"], torch.tensor([True]))
    result = {k: float(v) for k, v in metric.compute().items()}
    # tp 2, fp 1, fn 1, tn 1
    assert result == pytest.approx({"accuracy": 3 / 5, "precision": 2 / 3, "recall": 2 / 3, "f1": 2 / 3,
                                    "yes_ratio": 3 / 5})
    with pytest.raises(ValueError, match="bool tensor"):
        metric.update(["Yes"], torch.tensor([1]))


def test_convert_pope_writes_prompts_with_labels_and_skips_bad_records(pope_files, tmp_path):
    questions, images = pope_files
    out = tmp_path / "shards"
    assert main(["data", "convert-pope", "--questions", str(questions), "--images", str(images),
                 "--out", str(out)]) == 0
    samples = {s.record["id"]: s.record for s in iter_samples(sorted(str(p) for p in out.glob("*.tar")), SkipLog())}
    assert sorted(samples) == [f"pope-adversarial-{i}" for i in (1, 2, 3, 4)]
    record = samples["pope-adversarial-2"]
    assert record["conversation"] == [{"role": "user", "content": "<image>\nIs there a dining table in the image?"},
                                      {"role": "assistant", "content": "No"}]
    assert record["annotations"]["queries"] == [{"type": "pope", "label": "no", "split": "adversarial"}]
    assert record["category"] == "pope"
    manifest = json.loads((out / "pope-adversarial-manifest.json").read_text())
    assert manifest["skipped"] == {"invalid record": 1, "missing image": 1}


def test_convert_pope_needs_a_split_it_can_tell(pope_files, tmp_path, capsys):
    questions, images = pope_files
    renamed = questions.rename(tmp_path / "questions.json")
    assert main(["data", "convert-pope", "--questions", str(renamed), "--images", str(images),
                 "--out", str(tmp_path / "s")]) == 2
    assert "--split random|popular|adversarial" in capsys.readouterr().err


def test_evaluate_reports_pope_from_the_labels_without_the_judge(pope_files, exported, tmp_path, capsys):
    questions, images = pope_files
    shards = tmp_path / "pope-shards"
    assert main(["data", "convert-pope", "--questions", str(questions), "--images", str(images),
                 "--out", str(shards)]) == 0
    overlay = {"checkpoint": str(exported), "out": str(tmp_path / "report"),
               "sets": [{"name": "pope_adversarial", "shards": str(shards), "shapeworld": None, "categories": [],
                         "generation": {"max_new_tokens": 6}}],
               "batch_size": 4, "num_workers": 0}
    config = tmp_path / "eval.yaml"
    config.write_text(yaml.safe_dump(overlay))
    capsys.readouterr()
    assert main(["evaluate", "-c", str(ROOT / "configs/eval.yaml"), "-c", str(config)]) == 0
    printed = capsys.readouterr().out
    report = json.loads((tmp_path / "report/report.json").read_text())
    assert f"Report: {tmp_path / 'report' / 'report.md'}" in printed
    assert f"pope_accuracy              {100 * report['summary']['pope_accuracy']['value']:5.1f}  (pope_adversarial)" \
        in printed
    assert f"Next: python -m dress_lightning export --checkpoint {exported}" in printed
    result = report["sets"]["pope_adversarial"]
    assert result["prompts"] == 4
    assert result["judge_calls"].get("calls", 0) == 0  # scored by the labels alone
    responses = [json.loads(line) for line in (tmp_path / "report/pope_adversarial/responses.jsonl").open()]
    expected = POPE()
    expected.update([r["conversation"][1]["content"] for r in responses],
                    torch.tensor([r["id"] in ("pope-adversarial-1", "pope-adversarial-3") for r in responses]))
    assert result["metrics"]["pope"] == pytest.approx(
        {k: None if v != v else float(v) for k, v in expected.compute().items()}, nan_ok=True)
    assert result["metrics"]["pope"]["accuracy"] is not None
    assert report["summary"]["pope_accuracy"]["set"] == "pope_adversarial"
    assert "| POPE | accuracy | precision | recall | f1 | yes_ratio |" in (tmp_path / "report/report.md").read_text()


def test_eval_real_has_a_pope_set_per_split():
    sets = {s["name"]: s for s in yaml.safe_load((ROOT / "configs/eval_real.yaml").read_text())["sets"]}
    for split in ("random", "popular", "adversarial"):
        assert sets[f"pope_{split}"]["shards"] == f"data/shards/eval/pope-{split}"
        assert sets[f"pope_{split}"]["categories"] == []
