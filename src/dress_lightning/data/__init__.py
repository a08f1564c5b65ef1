"""Data layer: the shard schema, the ShapeWorld generator, converters, the ``data`` commands and the streaming DataModule.

Import the submodules directly (``dress_lightning.data.schema``...); this package imports nothing
so that the light modules (schema, skips, images, converters, phrases, shapeworld) stay free of
torch and webdataset, as the ``light-modules`` import contract in ``pyproject.toml`` checks.
"""
