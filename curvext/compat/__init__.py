"""Compatibility layers: code written for another library, run on curvext.

- :mod:`curvext.compat.backpack`: BackPACK's import paths, extension classes,
  attribute names and numeric conventions.

Importing this package changes nothing else: ``import backpack`` still finds
the real BackPACK (if installed) until :func:`curvext.compat.backpack.install`
is called.
"""
