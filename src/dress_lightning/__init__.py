"""dress_lightning: align vision-language models with natural-language feedback (DRESS)."""

from dress_lightning.version import __version__

__all__ = ["__version__", "from_pretrained"]


def from_pretrained(path):
    """Load a folder written by ``dress-lightning export`` without Lightning (see ``dress_lightning.pretrained``)."""
    from dress_lightning.pretrained import from_pretrained as load

    return load(path)
