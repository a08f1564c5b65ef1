"""Special token strings shared by the data pipeline and the model (no heavy imports here)."""

IMAGE_TOKEN = "<image>"
"""Placeholder for the image in a conversation; the model replaces it with projected patch embeddings."""

PAD_TOKEN = "<pad>"
"""Added to tokenizers that have no pad token (Llama) so batches can be left- or right-padded."""
