"""BackPACK's interface on curvext: ``backpack``, ``extend``, ``disable`` and
``backpack.extensions`` with BackPACK 1.7's classes, attribute names and numbers.

Use it by import path::

    from curvext.compat.backpack import backpack, extend
    from curvext.compat.backpack.extensions import DiagGGNExact, KFLR

or make unchanged BackPACK code run on curvext: call :func:`install` first
thing (before anything imports ``backpack``); from then on ``import
backpack`` and ``import backpack.extensions`` give these modules.

Differences from BackPACK:

- ``extend(module, use_converter=True)`` needs no converter (curvext handles
  residual connections and functional code) and returns ``module`` itself.
- ``backpack(..., extension_hook=f)`` calls ``f(module)`` once per module
  with parameters, after every extension stored its results (BackPACK calls
  it on every extended module, parameter-free ones included).
- ``retain_graph`` is accepted and not needed: curvext keeps no inputs or
  outputs on the modules, and ``memory_cleanup`` has nothing to remove.

Example:
    >>> import torch
    >>> from curvext.compat.backpack import backpack, extend
    >>> from curvext.compat.backpack.extensions import BatchGrad, SqrtGGNExact
    >>> model = extend(torch.nn.Linear(3, 5))
    >>> loss_fn = extend(torch.nn.CrossEntropyLoss())
    >>> loss = loss_fn(model(torch.randn(4, 3)), torch.tensor([0, 1, 4, 2]))
    >>> with backpack(BatchGrad(), SqrtGGNExact()):
    ...     loss.backward()
    >>> model.weight.grad_batch.shape
    torch.Size([4, 5, 3])
    >>> model.weight.sqrt_ggn_exact.shape  # [C, N, *p.shape], C = 5 classes
    torch.Size([5, 4, 5, 3])
"""

from __future__ import annotations

import importlib.abc
import sys
import warnings
from typing import Callable, Optional

from torch import nn

import curvext.context as _context
from curvext.compat.backpack import context, core, custom_module, extensions, hessianfree, utils
from curvext.extend import extend as _extend
from curvext.extensions.base import Extension
from curvext.extensions.module_hook import ModuleHook

__all__ = [
    "backpack",
    "extend",
    "convert_module_to_backpack",
    "disable",
    "memory_cleanup",
    "extensions",
    "context",
    "install",
    "uninstall",
    "installed",
]


class backpack(_context.backpack):  # noqa: N801 - BackPACK's name
    """BackPACK's context: compute ``exts`` during ``loss.backward()``.

    Args:
        *exts: Extension instances (from :mod:`curvext.compat.backpack.extensions`,
            or curvext's own).
        extension_hook: Called as ``extension_hook(module)`` once per module
            with parameters after all extensions stored their results.
        debug: Unused (kept for BackPACK compatibility).
        retain_graph: Unused: curvext keeps nothing on the modules that a
            second backward pass would need.
        max_columns: curvext's option, see :class:`curvext.backpack`.
    """

    def __init__(
        self,
        *exts: Extension,
        extension_hook: Optional[Callable[[nn.Module], None]] = None,
        debug: bool = False,
        retain_graph: bool = False,
        max_columns: Optional[int] = None,
    ):
        for ext in exts:
            module = type(ext).__module__ if not isinstance(ext, type) else ext.__module__
            if module.split(".")[0] == "backpack":
                name = ext.__name__ if isinstance(ext, type) else type(ext).__name__
                raise TypeError(
                    f"backpack() got {name} of the real BackPACK ({module}), which "
                    f"curvext cannot run. Use curvext.compat.backpack.extensions.{name}, "
                    "or call curvext.compat.backpack.install() before anything imports "
                    "backpack so that backpack.extensions is curvext's."
                )
            module_extensions = getattr(ext, "__dict__", {}).get("_module_extensions")
            if module_extensions:
                warnings.warn(
                    f"{type(ext).__name__} has BackPACK module extensions for "
                    f"{', '.join(sorted(m.__name__ for m in module_extensions))}, which "
                    "curvext does not call: it computes the extension for these modules "
                    "with its own rules (the generic rule, exact, where it has none). "
                    "Give curvext a rule with curvext.rules.register_rule to make one faster.",
                    stacklevel=2,
                )
        if extension_hook is not None:
            exts = exts + (ModuleHook(extension_hook),)
        super().__init__(*exts, max_columns=max_columns, debug=debug)
        self.retain_graph = retain_graph


def extend(module: nn.Module, debug: bool = False, use_converter: bool = False) -> nn.Module:
    """BackPACK's ``extend``: :func:`curvext.extend` (``debug`` and
    ``use_converter`` are accepted; curvext needs no converter and returns
    ``module`` itself)."""
    return _extend(module)


def convert_module_to_backpack(module: nn.Module, debug: bool = False) -> nn.Module:
    """BackPACK's converter (``torch.fx`` rewrites of residual connections,
    in-place ops, ...): curvext needs none, so ``module`` itself."""
    return module


class disable:  # noqa: N801 - BackPACK's name
    """Do not record forward passes of extended modules (:func:`curvext.disable`)."""

    def __enter__(self):
        self._context = _context.disable()
        self._context.__enter__()
        return self

    def __exit__(self, exc_type, exc, tb):
        return self._context.__exit__(exc_type, exc, tb)

    @staticmethod
    def should_store_io() -> bool:
        """Whether forward passes of extended modules are recorded now."""
        return _context.recording_enabled()


def memory_cleanup(module: nn.Module) -> None:
    """BackPACK's ``memory_cleanup``: nothing to do, curvext stores no inputs
    or outputs on modules (the recorded calls go with the autograd graph)."""


# ---------------------------------------------------------------------------
# install(): `import backpack` gives this package
# ---------------------------------------------------------------------------
#: The module names ``install`` points at this package's modules.
_ALIASES = {
    "backpack": __name__,
    "backpack.context": context.__name__,
    **{
        f"backpack.{name}": extensions.__name__
        for name in (
            "extensions",
            "extensions.backprop_extension",
            "extensions.module_extension",
            "extensions.curvature",
            "extensions.firstorder",
            "extensions.firstorder.base",
            "extensions.secondorder",
            "extensions.secondorder.hbp",
        )
    },
    **{
        f"backpack.utils{name}": utils.__name__
        for name in (
            "",
            ".convert_parameters",
            ".kroneckers",
            ".subsampling",
            ".conv",
            ".conv_transpose",
            ".examples",
            ".module_classification",
        )
    },
    **{
        f"backpack.hessianfree{name}": hessianfree.__name__
        for name in ("", ".hvp", ".rop", ".lop", ".ggnvp")
    },
    **{
        f"backpack.custom_module{name}": custom_module.__name__
        for name in (
            "",
            ".branching",
            ".pad",
            ".permute",
            ".reduce_tuple",
            ".scale_module",
            ".slicing",
        )
    },
    "backpack.core": core.__name__,
    "backpack.core.derivatives": core.__name__,
    **{f"backpack.core.derivatives.{name}": core.__name__ for name in core.DERIVATIVE_MODULES},
}


def _provided() -> str:
    """The provided modules, one entry per package: ``backpack.utils.*``."""
    packages = sorted({".".join(alias.split(".")[:2]) for alias in _ALIASES})
    nested = {p for p in packages if any(a.startswith(p + ".") for a in _ALIASES)}
    return ", ".join(f"{p}[.*]" if p in nested and p != "backpack" else p for p in packages)


class _MissingSubmodules(importlib.abc.MetaPathFinder):
    """After :func:`install`: a clear error for ``backpack.*`` modules that the
    compatibility layer does not provide (``backpack.utils``, ...)."""

    def find_spec(self, fullname, path=None, target=None):
        if fullname.split(".")[0] != "backpack" or fullname in _ALIASES:
            return None
        raise ModuleNotFoundError(
            f"No module named {fullname!r}: curvext.compat.backpack.install() made "
            "`backpack` curvext's BackPACK compatibility layer, which provides "
            f"BackPACK's public modules ({_provided()}), not its internals. Import "
            "what curvext offers instead (curvext, curvext.extensions, curvext.operators).",
            name=fullname,
        )


_FINDER = _MissingSubmodules()
#: This package's modules that install() gave a ``__path__`` (uninstall() takes it back).
_MADE_PACKAGES: set = set()
#: ``(module name, attribute)`` that install() set for dotted access (uninstall() removes them).
_SET_ATTRIBUTES: list = []


def _is_ours(name: str) -> bool:
    return sys.modules.get(name) is sys.modules.get(_ALIASES.get(name, ""), False)


def install() -> None:
    """Make ``import backpack`` resolve to this package.

    After it, ``import backpack``, ``import backpack.extensions``,
    ``backpack.context`` (``CTX``), ``backpack.extensions.backprop_extension``
    (``BackpropExtension``), ``backpack.utils.convert_parameters``,
    ``backpack.hessianfree.hvp`` and
    ``backpack.core.derivatives.convnd.weight_jac_t_save_memory`` (accepted,
    no effect), ``from backpack import backpack, extend``
    and ``from backpack.extensions import DiagGGNExact`` give curvext's
    compatibility layer, so code written for
    BackPACK runs on curvext unchanged. Other ``backpack.*`` modules raise
    ``ModuleNotFoundError`` naming what is provided. Calling it again does
    nothing; :func:`uninstall` undoes it.

    Raises:
        RuntimeError: If the real BackPACK was imported in this process
            already (its objects could not be redirected any more).
    """
    imported = sorted(
        name
        for name in sys.modules
        if name.split(".")[0] == "backpack" and not (name in _ALIASES and _is_ours(name))
    )
    if imported:
        where = getattr(sys.modules[imported[0]], "__file__", None) or imported[0]
        raise RuntimeError(
            "curvext.compat.backpack.install(): the real BackPACK is imported in this "
            f"process already ({imported[0]} from {where}), so `import backpack` can "
            "no longer be redirected to curvext. Call install() before anything "
            "imports backpack (first thing in your script), or import from "
            "curvext.compat.backpack directly: `from curvext.compat.backpack import "
            "backpack, extend`."
        )
    for alias, name in _ALIASES.items():
        sys.modules[alias] = sys.modules[name]
    for alias in _ALIASES:  # `backpack.utils.convert_parameters` as an attribute too
        parent, _, child = alias.rpartition(".")
        if parent and not hasattr(sys.modules[parent], child):
            setattr(sys.modules[parent], child, sys.modules[alias])
            _SET_ATTRIBUTES.append((sys.modules[parent].__name__, child))
        module = sys.modules[alias]
        if not hasattr(module, "__path__"):
            # a package to the import system, so that `backpack.utils.examples`
            # reaches _FINDER's message instead of "'backpack.utils' is not a package"
            module.__path__ = []
            _MADE_PACKAGES.add(module.__name__)
    if _FINDER not in sys.meta_path:
        sys.meta_path.insert(0, _FINDER)


def uninstall() -> None:
    """Undo :func:`install`: ``import backpack`` finds the real BackPACK again."""
    for alias in _ALIASES:
        if alias in sys.modules and _is_ours(alias):
            del sys.modules[alias]
    for name in _MADE_PACKAGES:
        module = sys.modules.get(name)
        if module is not None:
            vars(module).pop("__path__", None)
    _MADE_PACKAGES.clear()
    for name, attribute in _SET_ATTRIBUTES:
        module = sys.modules.get(name)
        if module is not None:
            vars(module).pop(attribute, None)
    _SET_ATTRIBUTES.clear()
    if _FINDER in sys.meta_path:
        sys.meta_path.remove(_FINDER)


def installed() -> bool:
    """Whether :func:`install` is in effect."""
    return all(alias in sys.modules and _is_ours(alias) for alias in _ALIASES)
