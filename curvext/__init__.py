"""curvext: curvature from the backward pass you already run.

>>> from curvext import backpack, extend
>>> from curvext.extensions import GGNDiag, KFAC
"""

from curvext.context import backpack, disable
from curvext.extend import extend

__version__ = "0.1.0"
__all__ = ["backpack", "extend", "disable", "__version__"]
