"""Rejection-sampling fine-tuning (ReST / RAFT / best-of-n SFT) on judged NLF: a baseline to conditional RL."""

from __future__ import annotations

from dress_lightning.tasks.sft import SFTTask


class RFTTask(SFTTask):
    """SFT's backbone and loss, trained on the best-judged responses of each prompt (``RFTDataModule``), unconditioned.

    The selection lives in the data; the class names the objective in checkpoints, exports and reports.
    """
