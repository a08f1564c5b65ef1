"""dress_lightning: align vision-language models with natural-language feedback (DRESS)."""

__version__ = "0.1.0"
