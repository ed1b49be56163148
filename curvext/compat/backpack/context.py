"""BackPACK's ``backpack.context``: the ``CTX`` its clients call (laplace-torch,
Cockpit), answered from curvext's context.

BackPACK keeps its forward hooks in ``CTX.hook_handles`` and clients call
``CTX.remove_hooks()`` to un-extend a model after use. curvext's recording
hooks change no number and cost little outside a ``backpack`` context, so
``remove_hooks`` removes nothing: the model stays extended (calling
``extend`` on it again is harmless).
"""

from __future__ import annotations

from typing import List, Tuple, Type

import curvext.context as _context
from curvext.extensions.base import Extension


class CTX:
    """The state of the active ``backpack`` context, BackPACK's names."""

    #: BackPACK's forward-hook handles; curvext keeps none here.
    hook_handles: List = []

    @staticmethod
    def remove_hooks() -> None:
        """Nothing to remove: curvext's hooks stay (see the module docstring)."""

    @staticmethod
    def get_active_exts() -> Tuple[Extension, ...]:
        """The extensions of the active ``backpack`` context (``()`` outside one)."""
        return tuple(_context.active_extensions())

    @staticmethod
    def is_extension_active(*extension_classes: Type[Extension]) -> bool:
        """Whether an extension of one of these classes is active."""
        return any(isinstance(ext, extension_classes) for ext in CTX.get_active_exts())

    @staticmethod
    def get_debug() -> bool:
        """curvext has no debug mode; BackPACK's ``debug=`` is accepted and ignored."""
        return False


__all__ = ["CTX"]
