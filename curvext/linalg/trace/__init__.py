r"""Trace estimators: Girard–Hutchinson, Hutch++ and XTrace.

>>> from curvext.linalg.trace import hutchinson_trace, hutchpp_trace, xtrace
"""

from curvext.linalg.trace.epperly2024xtrace import xtrace
from curvext.linalg.trace.hutchinson import hutchinson_trace
from curvext.linalg.trace.meyer2021hutchpp import hutchpp_trace

__all__ = ["hutchinson_trace", "hutchpp_trace", "xtrace"]
