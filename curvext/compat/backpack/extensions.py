"""BackPACK 1.7's extension classes (``backpack.extensions``) on curvext's engine.

Each class computes with the curvext extension of the same quantity and
stores BackPACK's attribute with BackPACK's numbers:

=====================  ===================================  =========================
class                  curvext extension                    attribute on each ``p``
=====================  ===================================  =========================
``DiagGGNExact()``     ``GGNDiag()``                        ``diag_ggn_exact``
``DiagGGNMC(M)``       ``GGNDiag(mc_samples=M)``            ``diag_ggn_mc``
``BatchDiagGGNExact``  ``BatchGGNDiag()``                   ``diag_ggn_exact_batch``
``BatchDiagGGNMC(M)``  ``BatchGGNDiag(mc_samples=M)``       ``diag_ggn_mc_batch``
``KFAC(M)``            ``KFAC("mc", M)``, BackPACK layout   ``kfac``
``KFLR()``             ``KFAC("type-2")``, BackPACK layout  ``kflr``
``SqrtGGNExact()``     ``SqrtGGN()``, ``C`` columns (CE)    ``sqrt_ggn_exact``
``SqrtGGNMC(M)``       ``SqrtGGN(mc_samples=M)``            ``sqrt_ggn_mc``
``BatchGrad()``        ``BatchGrad()``                      ``grad_batch``
``BatchL2Grad()``      ``BatchL2Grad()``                    ``batch_l2``
``SumGradSquared()``   ``SumGradSquared()``                 ``sum_grad_squared``
``Variance()``         ``Variance()``                       ``variance``
``GGNMP()``            ``GGNMP()``                          ``ggnmp`` (a function)
``DiagHessian()``      ``DiagHessian()``                    ``diag_h``
``BatchDiagHessian()`` ``BatchDiagHessian()``               ``diag_h_batch``
``HMP()``              ``HMP()``                            ``hmp`` (a function)
``PCHMP(modify=)``     ``PCHMP(modify=)``                   ``pchmp`` (a function)
``KFRA()``             ``KFRA()``                           ``kfra``
=====================  ===================================  =========================

``HBP(curv_type, loss_hessian_strategy, backprop_strategy, ea_strategy)``,
BackPACK's configurable base of KFAC, KFLR and KFRA, gives those three for
their configurations (``Curvature.GGN``) and refuses the others, naming what
to use instead. ``set_module_extension`` is accepted on every class; curvext
computes every extension for every module with its own rules and warns that
it does not call BackPACK module extensions.

Example:
    >>> import torch
    >>> from curvext.compat.backpack import backpack, extend
    >>> from curvext.compat.backpack.extensions import DiagGGNExact, KFLR
    >>> model = extend(torch.nn.Linear(3, 2))
    >>> loss_fn = extend(torch.nn.CrossEntropyLoss())
    >>> loss = loss_fn(model(torch.randn(4, 3)), torch.tensor([0, 1, 1, 0]))
    >>> with backpack(DiagGGNExact(), KFLR()):
    ...     loss.backward()
    >>> model.weight.diag_ggn_exact.shape, [tuple(f.shape) for f in model.weight.kflr]
    (torch.Size([2, 3]), [(2, 2), (3, 3)])
"""

from __future__ import annotations

import abc
import warnings
from typing import List, Optional, Type

from torch import nn

from curvext.compat.backpack._conventions import (
    backpack_exact_columns,
    check_subsampling,
    kfac_layout,
    subsample,
    transposed_input_factor,
)
from curvext.extensions import HMP as _HMP
from curvext.extensions import KFAC as _CurvextKFAC
from curvext.extensions import KFRA as _KFRA
from curvext.extensions import PCHMP as _PCHMP
from curvext.extensions import BatchDiagHessian as _BatchDiagHessian
from curvext.extensions import BatchGGNDiag as _BatchGGNDiag
from curvext.extensions import BatchGrad as _BatchGrad
from curvext.extensions import BatchL2Grad as _BatchL2Grad
from curvext.extensions import DiagHessian as _DiagHessian
from curvext.extensions import GGNDiag as _GGNDiag
from curvext.extensions import SqrtGGN as _SqrtGGN
from curvext.extensions import SumGradSquared as _SumGradSquared
from curvext.extensions import Variance as _Variance
from curvext.extensions.base import Extension, check_mc_samples
from curvext.extensions.ggn_mp import GGNMP as _GGNMP
from curvext.rules import GENERIC_RULES, RULES

#: BackPACK's ``fail_mode`` values (``backpack.extensions.backprop_extension``):
#: curvext has no unsupported modules to fail on, and raises where it refuses.
FAIL_ERROR, FAIL_WARN, FAIL_SILENT = "ERROR", "WARNING", "SILENT"

#: BackPACK's base class of every extension (``backpack.extensions.backprop_extension``):
#: curvext's, so ``isinstance(ext, BackpropExtension)`` holds for every extension here.
BackpropExtension = Extension


# ---------------------------------------------------------------------------
# BackPACK's per-module extensions (set_module_extension)
# ---------------------------------------------------------------------------
class ModuleExtension:
    """BackPACK's base class of the per-module part of an extension
    (``backpack.extensions.module_extension``).

    curvext does not call module extensions: its rules compute every
    extension for a module type (:func:`curvext.rules.register_rule`), and its
    generic rule computes them exactly for any module without one. The class
    exists so that BackPACK code defining one imports and constructs.

    Args:
        params: The parameter names the extension has a method for.

    Raises:
        NotImplementedError: If a method for one of ``params`` is missing.
    """

    def __init__(self, params: Optional[List[str]] = None):
        self._params = list(params or [])
        for name in self._params:
            if not hasattr(self, name):
                raise NotImplementedError(
                    f"{type(self).__name__} declares parameter {name!r} but has no method "
                    f"{name}(ext, module, g_inp, g_out, backproped)."
                )


class FirstOrderModuleExtension(ModuleExtension):
    """BackPACK's base class of first-order module extensions
    (``backpack.extensions.firstorder.base``); see :class:`ModuleExtension`."""


class _ModuleExtensions:
    """BackPACK's ``set_module_extension`` on every extension class here."""

    def set_module_extension(
        self, module: Type[nn.Module], extension: ModuleExtension, overwrite: bool = False
    ) -> None:
        """Register BackPACK's module extension ``extension`` for ``module`` (a type).

        curvext computes this extension for every module type already (its
        own rule, or the generic one, exact, for types it has no rule for)
        and does not call ``extension``: :func:`backpack` warns when an
        extension with module extensions runs. For a faster rule of your own
        use :func:`curvext.rules.register_rule`.

        Raises:
            ValueError: If ``module`` has a module extension (or a curvext rule)
                already and ``overwrite`` is false.
        """
        registered = vars(self).setdefault("_module_extensions", {})
        rule = RULES.get(module) or GENERIC_RULES.get(module)
        if not overwrite and (module in registered or rule is not None):
            current = registered.get(module) or f"curvext's {rule.__name__}"
            raise ValueError(
                f"{type(self).__name__}.set_module_extension: {module.__name__} maps to "
                f"{current} already; pass overwrite=True to replace it."
            )
        registered[module] = extension


# ---------------------------------------------------------------------------
# First order: the same numbers and names as curvext's
# ---------------------------------------------------------------------------
class BatchGrad(_ModuleExtensions, _BatchGrad):
    """Individual gradients ``p.grad_batch``, ``[N, *p.shape]`` (they sum to ``p.grad``).

    Args:
        subsampling: Indices of the samples to keep (``None``: all). The
            loss's normalisation stays that of the whole batch, as in BackPACK.
    """

    savefield = "grad_batch"
    batch_statistics = "warn"  # BackPACK: BatchNorm in train mode warns

    def __init__(self, subsampling: Optional[List[int]] = None):
        self.subsampling = check_subsampling(type(self).__name__, subsampling)

    def finalize(self, rule, name, partial, info):
        return subsample(partial, 0, self.subsampling)


class BatchL2Grad(_ModuleExtensions, _BatchL2Grad):
    """Squared L2 norms of the individual gradients, ``p.batch_l2`` ``[N]``."""

    savefield = "batch_l2"


class SumGradSquared(_ModuleExtensions, _SumGradSquared):
    """Sum of the squared individual gradients, ``p.sum_grad_squared``."""

    savefield = "sum_grad_squared"


class Variance(_ModuleExtensions, _Variance):
    """Variance of the individual gradients, ``p.variance``."""

    savefield = "variance"


# With BatchNorm in train mode (samples coupled), BatchGrad computes BackPACK's
# values with BackPACK's warning: from the gradient arriving at each module
# output, rows that sum to the gradient but are not per-sample gradients. The
# other three refuse, as BackPACK's do.


# ---------------------------------------------------------------------------
# GGN diagonals: the same numbers, BackPACK's names
# ---------------------------------------------------------------------------
class DiagGGNExact(_ModuleExtensions, _GGNDiag):
    """Diagonal of the GGN, ``p.diag_ggn_exact`` (shape of ``p``)."""

    savefield = "diag_ggn_exact"

    def __init__(self):
        super().__init__(mc_samples=0)


class DiagGGNMC(_ModuleExtensions, _GGNDiag):
    """Monte-Carlo estimate of the GGN diagonal, ``p.diag_ggn_mc``.

    Args:
        mc_samples: Number of labels sampled from the model's predictive
            distribution (default 1).
    """

    savefield = "diag_ggn_mc"

    def __init__(self, mc_samples: int = 1):
        super().__init__(check_mc_samples(type(self).__name__, mc_samples, 1))


class BatchDiagGGNExact(_ModuleExtensions, _BatchGGNDiag):
    """Per-sample GGN diagonals, ``p.diag_ggn_exact_batch`` ``[N, *p.shape]``."""

    savefield = "diag_ggn_exact_batch"

    def __init__(self):
        super().__init__(mc_samples=0)


class BatchDiagGGNMC(_ModuleExtensions, _BatchGGNDiag):
    """Per-sample MC GGN diagonals, ``p.diag_ggn_mc_batch`` ``[N, *p.shape]``."""

    savefield = "diag_ggn_mc_batch"

    def __init__(self, mc_samples: int = 1):
        super().__init__(check_mc_samples(type(self).__name__, mc_samples, 1))


# ---------------------------------------------------------------------------
# Kronecker factors: BackPACK's convention for shared weights
# ---------------------------------------------------------------------------
def _checked_layout(extension, rule) -> str:
    """:func:`kfac_layout`, refusing the layers BackPACK has no factors for."""
    layout = kfac_layout(rule)
    if layout == "refuse":
        raise NotImplementedError(
            f"{type(extension).__name__} of curvext.compat.backpack does not support "
            f"{rule.module} (groups > 1, output_padding or output_size): BackPACK "
            "has no Kronecker factors for it, and its factors of transposed "
            "convolutions (of weight.transpose(0, 1), the unfolded input without "
            "output_padding) do not describe this layer's output. Use "
            "curvext.extensions.KFAC, whose p.kfac satisfies torch.kron(*p.kfac) "
            "~ GGN block of p.flatten()."
        )
    return layout


def _transposed_factors(extension, rule, name, grad_factor):
    """BackPACK's factors of a transposed convolution: ``[G]`` for the bias,
    ``[G, A]`` of ``weight.transpose(0, 1)`` for the weight (with its warning)."""
    if name == "bias":
        return [grad_factor]
    warnings.warn(
        f"{type(extension).__name__} of {rule.module}: as in BackPACK, the factors "
        "[G, A] of a transposed convolution approximate the GGN block of "
        "weight.transpose(0, 1) (shape [C_out, C_in, *kernel]), not of weight.",
        stacklevel=3,
    )
    return [grad_factor, transposed_input_factor(rule)]


class _BackpackKronecker(_ModuleExtensions, _CurvextKFAC):
    r"""curvext's KFAC with BackPACK's factors for Linear and Conv layers.

    ``[G, A]`` for weights and ``[G]`` for biases, with
    :math:`G = \sum_{n,k} \bar g \bar g^\top` (:math:`\bar g` the column
    summed over output positions) and :math:`A = \frac{1}{N}\sum_{n,t} a
    a^\top` (:math:`a` the input patches). For a Linear layer on ``[N, in]``
    (one position) this is curvext's KFAC exactly. Transposed convolutions
    get BackPACK's factors of ``weight.transpose(0, 1)`` (with a warning, as
    in BackPACK). Other layers with parameters (BackPACK has no KFAC for
    them) get curvext's factors.
    """

    def reduce(self, rule, name, grads):
        layout = _checked_layout(self, rule)
        if layout == "transposed":  # G: the bias's factor, columns summed over positions
            return rule.kfac_grad_factor("bias", grads, "reduce")
        approx = "reduce" if layout == "backpack" else self.kfac_approx
        return rule.kfac_grad_factor(name, grads, approx)

    def finalize(self, rule, name, partial, info):
        grad_factor = self.output_factor(rule, name, partial, info)
        layout = kfac_layout(rule)
        if layout == "transposed":
            return _transposed_factors(self, rule, name, grad_factor)
        if layout != "backpack":
            return rule.kfac_factors(name, grad_factor, self.kfac_approx)
        factors = rule.kfac_factors(name, grad_factor, "expand")
        if len(factors) == 2:  # [G, A]: A averaged over N, not over N * positions
            factors = [factors[0], factors[1] * rule.inputs().shape[-1]]
        return factors


class KFAC(_BackpackKronecker):
    """Kronecker factors of the MC Fisher, ``p.kfac`` (BackPACK's layout).

    Args:
        mc_samples: Number of sampled labels (default 1).
    """

    savefield = "kfac"

    def __init__(self, mc_samples: int = 1):
        super().__init__("mc", mc_samples=mc_samples)


class KFLR(_BackpackKronecker):
    """Kronecker factors from the exact loss Hessian, ``p.kflr`` (BackPACK's layout)."""

    savefield = "kflr"

    def __init__(self):
        super().__init__("type-2")


# ---------------------------------------------------------------------------
# Square roots of the GGN
# ---------------------------------------------------------------------------
class SqrtGGNExact(_ModuleExtensions, _SqrtGGN):
    """Exact GGN square root, ``p.sqrt_ggn_exact`` ``[C, N, *p.shape]``.

    ``V = p.sqrt_ggn_exact.flatten(0, 1).flatten(1)`` has ``V.T @ V`` = GGN
    block. ``C`` is BackPACK's column count: the number of classes for
    ``CrossEntropyLoss`` (BackPACK's symmetric root of the softmax Hessian;
    curvext's own ``SqrtGGN`` has ``C - 1`` columns), one per output for
    ``MSELoss`` and ``BCEWithLogitsLoss``.

    Args:
        subsampling: Indices of the samples to keep (``None``: all).
    """

    savefield = "sqrt_ggn_exact"

    def __init__(self, subsampling: Optional[List[int]] = None):
        super().__init__(mc_samples=0)
        self.subsampling = check_subsampling(type(self).__name__, subsampling)
        self._mixing: dict = {}  # the pass's mixing matrices, per loss

    def finalize(self, rule, name, partial, info):
        values = backpack_exact_columns(partial, info.loss, self._mixing)
        return subsample(values, 1, self.subsampling)

    def finalize_all(self, results, info):
        super().finalize_all(results, info)
        self._mixing.clear()  # nothing of this pass's loss is kept


class SqrtGGNMC(_ModuleExtensions, _SqrtGGN):
    """MC GGN square root, ``p.sqrt_ggn_mc`` ``[M, N, *p.shape]``.

    Args:
        mc_samples: Number of sampled labels ``M`` (default 1).
        subsampling: Indices of the samples to keep (``None``: all).
    """

    savefield = "sqrt_ggn_mc"

    def __init__(self, mc_samples: int = 1, subsampling: Optional[List[int]] = None):
        super().__init__(check_mc_samples(type(self).__name__, mc_samples, 1))
        self.subsampling = check_subsampling(type(self).__name__, subsampling)

    def finalize(self, rule, name, partial, info):
        return subsample(partial, 1, self.subsampling)


# ---------------------------------------------------------------------------
# The Hessian: the same numbers, BackPACK's names
# ---------------------------------------------------------------------------
class DiagHessian(_ModuleExtensions, _DiagHessian):
    """Diagonal of the loss Hessian, ``p.diag_h`` (shape of ``p``)."""

    savefield = "diag_h"


class BatchDiagHessian(_ModuleExtensions, _BatchDiagHessian):
    """Per-sample Hessian diagonals, ``p.diag_h_batch`` ``[N, *p.shape]``."""

    savefield = "diag_h_batch"


class KFRA(_ModuleExtensions, _KFRA):
    """Kronecker factors from batch-averaged Hessian backpropagation, ``p.kfra``
    (curvext's ``KFRA``, in BackPACK's scaling; transposed convolutions in
    BackPACK's layout, as for ``KFLR``)."""

    def reduce_averaged(self, rule, name, matrices):
        if rule.outer_product_vectors("weight") and _checked_layout(self, rule) == "transposed":
            if len(rule.calls) != 1:
                raise NotImplementedError(
                    f"KFRA needs each layer called once; {type(rule.module).__name__} is "
                    f"called {len(rule.calls)} times. Use KFLR() (or curvext's "
                    "KFAC(fisher_type='type-2')) instead."
                )
            return rule.dense_grad_factor("bias", matrices[id(rule.calls[0])])  # G: the bias's
        return super().reduce_averaged(rule, name, matrices)

    def finalize(self, rule, name, partial, info):
        if rule.outer_product_vectors("weight") and kfac_layout(rule) == "transposed":
            return _transposed_factors(self, rule, name, partial)
        return super().finalize(rule, name, partial, info)


# ---------------------------------------------------------------------------
# HBP: BackPACK's configurable Kronecker extension
# ---------------------------------------------------------------------------
class Curvature:
    """BackPACK's curvature types of ``HBP`` (``backpack.extensions.curvature``)."""

    HESSIAN = "hessian"
    GGN = "ggn"
    PCH_ABS = "pch-abs"
    PCH_CLIP = "pch-clip"
    CHOICES = [HESSIAN, GGN, PCH_CLIP, PCH_ABS]


class LossHessianStrategy:
    """How ``HBP`` represents the loss Hessian: exactly, sampled, summed."""

    EXACT = "exact"
    SAMPLING = "sampling"
    SUM = "sum"
    CHOICES = [EXACT, SAMPLING, SUM]


class BackpropStrategy:
    """How ``HBP`` backpropagates it: square-root columns or a batch average."""

    SQRT = "sqrt"
    BATCH_AVERAGE = "average"
    CHOICES = [BATCH_AVERAGE, SQRT]


class ExpectationApproximation:
    """``HBP``'s expectation approximation: curvext has BackPACK's default,
    ``BOTEV_MARTENS``; ``CHEN`` is refused."""

    BOTEV_MARTENS = "E[J^T E(H) J]"
    CHEN = "E(J^T) E(H) E(J)"
    CHOICES = [BOTEV_MARTENS, CHEN]


class HBP(metaclass=abc.ABCMeta):
    """BackPACK's configurable Kronecker extension: the configurations that are
    KFAC, KFLR and KFRA give those extensions, storing in ``savefield``.

    - ``LossHessianStrategy.SAMPLING``, ``BackpropStrategy.SQRT``: ``KFAC()``
    - ``LossHessianStrategy.EXACT``, ``BackpropStrategy.SQRT``: ``KFLR()``
    - ``LossHessianStrategy.SUM``, ``BackpropStrategy.BATCH_AVERAGE``:
      ``KFRA(curvature=curv_type)``, for every curvature (the GGN, the
      Hessian and its positive-curvature variants)

    the first two with ``curv_type=Curvature.GGN`` and the (only) expectation
    approximation ``BOTEV_MARTENS``.

    Raises:
        NotImplementedError: For the other strategy pairs, and the curvatures
            with second-order terms of the network (Hessian, PCH) outside the
            batch-averaged recursion.
    """

    def __new__(
        cls,
        curv_type: str,
        loss_hessian_strategy: str,
        backprop_strategy: str,
        ea_strategy: str,
        savefield: str = "hbp",
    ):
        for value, options in (
            (curv_type, Curvature),
            (loss_hessian_strategy, LossHessianStrategy),
            (backprop_strategy, BackpropStrategy),
            (ea_strategy, ExpectationApproximation),
        ):
            if value not in options.CHOICES:
                raise ValueError(
                    f"HBP: unknown {options.__name__} {value!r}; expected one of {options.CHOICES}."
                )
        if ea_strategy != ExpectationApproximation.BOTEV_MARTENS:
            raise NotImplementedError(
                f"HBP(ea_strategy={ea_strategy!r}): curvext has BackPACK's default "
                f"expectation approximation only, ExpectationApproximation.BOTEV_MARTENS "
                f"({ExpectationApproximation.BOTEV_MARTENS!r})."
            )
        average = (loss_hessian_strategy, backprop_strategy) == (
            LossHessianStrategy.SUM,
            BackpropStrategy.BATCH_AVERAGE,
        )
        if curv_type != Curvature.GGN and not average:
            raise NotImplementedError(
                f"HBP(curv_type={curv_type!r}, loss_hessian_strategy="
                f"{loss_hessian_strategy!r}, backprop_strategy={backprop_strategy!r}): the "
                "second-order terms of the network are added in the batch-averaged "
                "recursion only (loss_hessian_strategy='sum', backprop_strategy="
                "'average', KFRA's). The exact Hessian is there block by block: HMP() and "
                "PCHMP() for products with each parameter's block, DiagHessian() for its "
                "diagonal."
            )
        if average:
            extension = KFRA(curvature=curv_type)
            extension.savefield = savefield
            return extension
        chosen = {
            (LossHessianStrategy.SAMPLING, BackpropStrategy.SQRT): KFAC,
            (LossHessianStrategy.EXACT, BackpropStrategy.SQRT): KFLR,
        }.get((loss_hessian_strategy, backprop_strategy))
        if chosen is None:
            raise NotImplementedError(
                f"HBP(loss_hessian_strategy={loss_hessian_strategy!r}, "
                f"backprop_strategy={backprop_strategy!r}) is not in curvext: the "
                "configurations of KFAC (sampling, sqrt), KFLR (exact, sqrt) and KFRA "
                "(sum, average) are."
            )
        extension = chosen()
        extension.savefield = savefield
        return extension


for _configured in (KFAC, KFLR, KFRA):  # BackPACK's KFAC, KFLR, KFRA are HBPs
    HBP.register(_configured)


class HMP(_ModuleExtensions, _HMP):
    """Block-diagonal Hessian-matrix products: ``p.hmp(M)`` for ``M`` ``[V, *p.shape]``.

    Args:
        savefield: The attribute the product function is stored in.
    """

    def __init__(self, savefield: str = "hmp"):
        self.savefield = savefield


class GGNMP(_ModuleExtensions, _GGNMP):
    """Block-diagonal GGN-matrix products: ``p.ggnmp(M)`` for ``M`` ``[V, *p.shape]``.

    Args:
        savefield: The attribute the product function is stored in.
    """

    def __init__(self, savefield: str = "ggnmp"):
        super().__init__()
        self.savefield = savefield


class PCHMP(_ModuleExtensions, _PCHMP):
    """Positive-curvature Hessian products: ``p.pchmp(M)`` for ``M`` ``[V, *p.shape]``.

    Args:
        savefield: The attribute the product function is stored in.
        modify: ``"clip"`` (default) or ``"abs"``: what happens to the negative
            second-order terms of the curved activations.
    """

    def __init__(self, savefield: str = "pchmp", modify: str = "clip"):
        super().__init__(modify=modify)
        self.savefield = savefield


__all__ = [
    "PCHMP",
    "GGNMP",
    "HMP",
    "BatchL2Grad",
    "BatchGrad",
    "SumGradSquared",
    "Variance",
    "KFAC",
    "KFLR",
    "KFRA",
    "HBP",
    "DiagGGNExact",
    "BatchDiagGGNExact",
    "DiagGGNMC",
    "BatchDiagGGNMC",
    "DiagHessian",
    "BatchDiagHessian",
    "SqrtGGNExact",
    "SqrtGGNMC",
]
