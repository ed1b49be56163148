"""Bridges from curvext's engine to other libraries.

- :mod:`curvext.integrations.laplace`: laplace-torch curvature backends
  (:class:`~curvext.integrations.laplace.CurvextGGN`,
  :class:`~curvext.integrations.laplace.CurvextEF`); needs
  laplace-torch (``pip install laplace-torch``, or curvext's ``laplace`` extra).

Each integration imports its library when it is imported itself, so
``import curvext`` never needs the optional extras.
"""
