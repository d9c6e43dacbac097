"""The package version, in a module of its own so that any layer can record it without importing
the package's public namespace (``finetune/__init__.py`` sits at the top of the import order).

>>> from finetune.version import __version__
>>> __version__.count(".") >= 1
True
"""

__version__ = "0.1.0"
