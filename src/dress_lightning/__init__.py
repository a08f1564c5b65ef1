"""dress_lightning: align vision-language models with natural-language feedback (DRESS)."""

__version__ = "0.1.0"


def from_pretrained(path):
    """Load a folder written by ``dress-lightning export`` without Lightning (see ``dress_lightning.pretrained``)."""
    from dress_lightning.pretrained import from_pretrained as load

    return load(path)
