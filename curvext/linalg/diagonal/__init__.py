r"""Diagonal estimators: Hutchinson and XDiag.

>>> from curvext.linalg.diagonal import hutchinson_diag, xdiag
"""

from curvext.linalg.diagonal.epperly2024xdiag import xdiag
from curvext.linalg.diagonal.hutchinson import hutchinson_diag

__all__ = ["hutchinson_diag", "xdiag"]
