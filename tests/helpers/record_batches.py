"""A callback for subprocess runs: writes the sample ids each rank trained on to a JSON file."""

import json
from pathlib import Path

import lightning as L


class RecordBatchIds(L.Callback):
    """Appends every training batch's sample ids to ``{default_root_dir}/batches-rank{R}.json``."""

    def __init__(self) -> None:
        self.ids: list[list[str]] = []

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        self.ids.append(list(batch["ids"]))

    def on_train_end(self, trainer, pl_module) -> None:
        path = Path(trainer.default_root_dir) / f"batches-rank{trainer.global_rank}.json"
        path.write_text(json.dumps(self.ids))
