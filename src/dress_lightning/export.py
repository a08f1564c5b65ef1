"""``python -m dress_lightning export --checkpoint CKPT --out DIR [--report REPORT_JSON]``: a self-contained folder.

The folder (layout in ``pretrained.py``) holds safetensors weights with LoRA merged, the tokenizer,
the tower's open_clip config and a model card; ``dress_lightning.from_pretrained(DIR)`` loads it
without Lightning, and its ``language_model/`` is a plain Hugging Face folder. Every command that
takes a checkpoint also takes such a folder (``inference.load_task``).
"""

from __future__ import annotations

import argparse
import json
from collections.abc import Sequence
from dataclasses import asdict
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from dress_lightning.pretrained import (
    CONFIG_FILE,
    EXPORT_FORMAT,
    LANGUAGE_MODEL_DIR,
    MODEL_CARD_FILE,
    OPEN_CLIP_DIR,
    WEIGHTS_FILE,
    conversation_settings,
    is_export,
)


def export_checkpoint(checkpoint: str | Path, out: str | Path, report: str | Path | None = None) -> Path:
    """Write the model of a Lightning checkpoint to ``out`` as a self-contained folder; returns ``out``."""
    import open_clip
    from safetensors.torch import save_file

    from dress_lightning.conditions import CONDITION_FORMAT_VERSION, target_condition
    from dress_lightning.conversation import FORMAT_VERSION
    from dress_lightning.inference import load_task
    from dress_lightning.version import __version__

    out = Path(out)
    if out.exists() and any(out.iterdir()) and not is_export(out):
        raise FileExistsError(f"--out {out} exists and is not an exported model folder; choose an empty or new folder.")
    if is_export(checkpoint):
        raise ValueError(f"{checkpoint} is already an exported model folder; nothing to export.")
    report_data = json.loads(Path(report).read_text()) if report is not None else None
    task = load_task(str(checkpoint))
    model = task.model
    _check_preprocessing(task.model_config)
    language_model = model.language_model
    lora_merged = hasattr(language_model, "merge_and_unload")
    if lora_merged:  # a peft model: fold the adapters into the base weights, so the folder is a plain HF model
        language_model = language_model.merge_and_unload()
    out.mkdir(parents=True, exist_ok=True)
    language_model.save_pretrained(out / LANGUAGE_MODEL_DIR)
    task.tokenizer.save_pretrained(out / LANGUAGE_MODEL_DIR)
    weights = {f"{name}.{key}": tensor.detach().contiguous()
               for name in ("vision", "projector") for key, tensor in getattr(model, name).state_dict().items()}
    save_file(weights, out / WEIGHTS_FILE, metadata={"format": EXPORT_FORMAT})
    (out / OPEN_CLIP_DIR).mkdir(exist_ok=True)
    tower = task.model_config.vision_model
    (out / OPEN_CLIP_DIR / f"{tower}.json").write_text(json.dumps(open_clip.get_model_config(tower), indent=2))
    condition = getattr(task, "condition", None)
    config = {
        "format": EXPORT_FORMAT,
        "task": f"{type(task).__module__}.{type(task).__qualname__}",
        "model": asdict(task.model_config),
        "condition": None if condition is None else asdict(condition),
        "condition_format": CONDITION_FORMAT_VERSION,
        "target_condition": None if condition is None else target_condition(condition),
        "conversation": conversation_settings(condition),
        "conversation_format": FORMAT_VERSION,
        "generation": asdict(task.generation),
        "source": {
            "checkpoint": str(checkpoint),
            "init_checkpoint": task.init_checkpoint,
            "lora": None if task.lora is None else asdict(task.lora),
            "lora_merged": lora_merged,
            "exported": datetime.now(UTC).isoformat(timespec="seconds"),
            "dress_lightning_version": __version__,
        },
    }
    (out / CONFIG_FILE).write_text(json.dumps(config, indent=2) + "\n")
    (out / MODEL_CARD_FILE).write_text(model_card(config, out, _training_config(Path(checkpoint)), report_data))
    return out


def _check_preprocessing(model_config) -> None:
    """Refuse a tower whose pretrained tag changes open_clip's preprocessing: the export rebuilds it untagged."""
    from dress_lightning.models import describe_vision_tower

    if model_config.vision_pretrained is None:
        return
    tagged = describe_vision_tower(model_config.vision_model, model_config.vision_pretrained, model_config.vision_layer)
    plain = describe_vision_tower(model_config.vision_model, None, model_config.vision_layer)
    if repr(tagged.image_transform) != repr(plain.image_transform):
        raise NotImplementedError(
            f"vision_pretrained={model_config.vision_pretrained!r} gives {model_config.vision_model} its own image "
            "preprocessing, which an export does not record yet; evaluate or chat with the checkpoint itself."
        )


def _training_config(checkpoint: Path) -> Path | None:
    """The config LightningCLI saved for the run that wrote ``checkpoint`` (``RUN/version_N/config.yaml``), if any."""
    run_dir = checkpoint.resolve().parent.parent
    candidates = sorted(run_dir.glob("version_*/config.yaml"), key=lambda p: p.stat().st_mtime)
    return candidates[-1] if candidates else None


def model_card(config: dict[str, Any], out: Path, training_config: Path | None, report: dict | None) -> str:
    """The folder's README.md: what the model is, how it was trained, its condition format, judge and scores."""
    model, source = config["model"], config["source"]
    stage = config["task"].rsplit(".", 1)[-1]
    lines = [
        f"# {out.resolve().name}",
        "",
        "A vision-language model trained the DRESS way with dress_lightning "
        f"(exported by dress_lightning {source['dress_lightning_version']}, {source['exported']}).",
        "",
        "## Model",
        "",
        f"- vision tower: open_clip `{model['vision_model']}` (weights initialised from "
        f"`{model['vision_pretrained'] or 'a seeded random init'}`), patch tokens of block {model['vision_layer']}",
        f"- projector: `{model['projector']}`",
        f"- language model: `{model['language_model']}`"
        + (f", LoRA r={source['lora']['r']} alpha={source['lora']['alpha']} merged into the weights"
           if source["lora_merged"] else ""),
        "",
        "## Training",
        "",
        f"- last stage: `{stage}` (`{config['task']}`), checkpoint `{source['checkpoint']}`",
        f"- started from: `{source['init_checkpoint'] or 'the model config (no earlier checkpoint)'}`",
    ]
    if training_config is not None:
        lines += ["", f"Training config (`{training_config}`), its data section:", "", "```yaml",
                  _data_section(training_config), "```"]
    else:
        lines += ["- training config: not found next to the checkpoint (LightningCLI writes `version_N/config.yaml`)"]
    lines += ["", "## Prompt and condition format", "",
              f"- conversation: `{config['conversation']['template']}` template ({config['conversation_format']})"]
    if config["condition"] is None:
        lines.append("- condition: none (the model was not trained on feedback conditions)")
    else:
        lines += [
            f"- condition ({config['condition_format']}): mode `{config['condition']['mode']}`, scores out of "
            f"{config['condition']['score_scale']}, placed before the response",
            f"- target condition used at inference: `{config['target_condition']}`",
        ]
    lines += ["", "## Evaluation", ""]
    if report is None:
        lines.append("No evaluation report was given (`export --report runs/eval/crl/report.json` adds one).")
    else:
        judge = report["provenance"]["judge"]
        lines += [f"Judge: `{judge['name']}` version `{judge['version']}`; values are % of the maximum.", "",
                  "| metric | value | set |", "|---|---|---|"]
        for key, entry in report.get("summary", {}).items():
            if entry["value"] is not None:
                lines.append(f"| {key} | {100 * entry['value']:.1f} | {entry['set']} |")
    lines += [
        "",
        "## Use",
        "",
        "```bash",
        f"python -m dress_lightning chat --checkpoint {out} --image IMAGE.png",
        f"python -m dress_lightning demo --checkpoint {out}",
        f"python -m dress_lightning evaluate -c configs/eval.yaml --checkpoint {out}",
        "```",
        "",
        "```python",
        "import dress_lightning",
        f'vlm = dress_lightning.from_pretrained("{out}")   # no Lightning, no pickle',
        "# the language model alone is a Hugging Face folder:",
        f'# AutoModelForCausalLM.from_pretrained("{out / LANGUAGE_MODEL_DIR}")',
        "```",
        "",
    ]
    return "\n".join(lines)


def _data_section(training_config: Path) -> str:
    import yaml

    data = yaml.safe_load(training_config.read_text()).get("data", {})
    return yaml.safe_dump({"data": data}, sort_keys=False).rstrip()


def main(argv: Sequence[str]) -> int:
    """``export --checkpoint CKPT --out DIR [--report REPORT_JSON]``."""
    parser = argparse.ArgumentParser(prog="dress-lightning export", description=__doc__.splitlines()[0].split(": ", 1)[1])
    parser.add_argument("--checkpoint", required=True, help="Lightning checkpoint to export (any task).")
    parser.add_argument("--out", required=True, help="Folder to write (new, empty, or an earlier export to replace).")
    parser.add_argument("--report", default=None, help="An evaluation report.json whose headline numbers go into the card.")
    args = parser.parse_args(list(argv))
    out = export_checkpoint(args.checkpoint, args.out, args.report)
    files = sorted(p.relative_to(out) for p in out.rglob("*") if p.is_file())
    size = sum((out / f).stat().st_size for f in files)
    print(f"Exported {args.checkpoint} to {out}/ ({len(files)} files, {size / 1e6:.1f} MB; model card: "
          f"{out / MODEL_CARD_FILE}).")
    print(f"Next: python -m dress_lightning chat --checkpoint {out} --image IMAGE.png")
    return 0
