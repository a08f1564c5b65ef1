"""Data layer: the shard schema, the ShapeWorld generator, converters and the ``data`` commands.

Import the submodules directly (``dress_lightning.data.schema``...); this package imports nothing
so that the light modules (schema, shapeworld) stay free of torch and webdataset.
"""
