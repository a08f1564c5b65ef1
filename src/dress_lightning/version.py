"""The package version, recorded in the provenance of generated data, checkpoints' stages and exports.

A leaf module, so that any layer can record the version without importing the package itself,
whose ``from_pretrained`` reaches up to the model loader.
"""

__version__ = "0.1.0"
