"""A pseudo-extension that calls a function on every module with parameters
once the extensions before it in the context stored their results (BackPACK's
``extension_hook``, used by :mod:`curvext.compat.backpack`)."""

from __future__ import annotations

from typing import Callable

from torch import nn

from curvext.extensions.base import Extension


class ModuleHook(Extension):
    """Calls ``hook(module)`` once per module with parameters of the pass,
    after every extension before it in the context stored its results.

    Reads no columns and stores nothing.
    """

    savefield = "_curvext_module_hook"  # never stored
    user_facing = False

    def __init__(self, hook: Callable[[nn.Module], None]):
        self.hook = hook

    def column_sets(self):
        return ()

    def finalize(self, rule, name, partial, info):
        return rule.module

    def finalize_all(self, results, info):
        modules = {id(module): module for _, module in results}
        for module in modules.values():
            self.hook(module)
