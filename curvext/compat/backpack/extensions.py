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

``HBP`` (the configurable base class of BackPACK's KFAC, KFLR and KFRA)
exists so that imports work, and raises ``NotImplementedError`` when
constructed, naming what to use instead.

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

from typing import List, Optional

from curvext.compat.backpack._conventions import (
    backpack_exact_columns,
    check_subsampling,
    kfac_layout,
    subsample,
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

#: BackPACK's ``fail_mode`` values (``backpack.extensions.backprop_extension``):
#: curvext has no unsupported modules to fail on, and raises where it refuses.
FAIL_ERROR, FAIL_WARN, FAIL_SILENT = "ERROR", "WARNING", "SILENT"

#: BackPACK's base class of every extension (``backpack.extensions.backprop_extension``):
#: curvext's, so ``isinstance(ext, BackpropExtension)`` holds for every extension here.
BackpropExtension = Extension


# ---------------------------------------------------------------------------
# First order: the same numbers and names as curvext's
# ---------------------------------------------------------------------------
class BatchGrad(_BatchGrad):
    """Individual gradients ``p.grad_batch``, ``[N, *p.shape]`` (they sum to ``p.grad``).

    Args:
        subsampling: Indices of the samples to keep (``None``: all). The
            loss's normalisation stays that of the whole batch, as in BackPACK.
    """

    savefield = "grad_batch"

    def __init__(self, subsampling: Optional[List[int]] = None):
        self.subsampling = check_subsampling(type(self).__name__, subsampling)

    def finalize(self, rule, name, partial, info):
        return subsample(partial, 0, self.subsampling)


class BatchL2Grad(_BatchL2Grad):
    """Squared L2 norms of the individual gradients, ``p.batch_l2`` ``[N]``."""

    savefield = "batch_l2"


class SumGradSquared(_SumGradSquared):
    """Sum of the squared individual gradients, ``p.sum_grad_squared``."""

    savefield = "sum_grad_squared"


class Variance(_Variance):
    """Variance of the individual gradients, ``p.variance``."""

    savefield = "variance"


# ---------------------------------------------------------------------------
# GGN diagonals: the same numbers, BackPACK's names
# ---------------------------------------------------------------------------
class DiagGGNExact(_GGNDiag):
    """Diagonal of the GGN, ``p.diag_ggn_exact`` (shape of ``p``)."""

    savefield = "diag_ggn_exact"

    def __init__(self):
        super().__init__(mc_samples=0)


class DiagGGNMC(_GGNDiag):
    """Monte-Carlo estimate of the GGN diagonal, ``p.diag_ggn_mc``.

    Args:
        mc_samples: Number of labels sampled from the model's predictive
            distribution (default 1).
    """

    savefield = "diag_ggn_mc"

    def __init__(self, mc_samples: int = 1):
        super().__init__(check_mc_samples(type(self).__name__, mc_samples, 1))


class BatchDiagGGNExact(_BatchGGNDiag):
    """Per-sample GGN diagonals, ``p.diag_ggn_exact_batch`` ``[N, *p.shape]``."""

    savefield = "diag_ggn_exact_batch"

    def __init__(self):
        super().__init__(mc_samples=0)


class BatchDiagGGNMC(_BatchGGNDiag):
    """Per-sample MC GGN diagonals, ``p.diag_ggn_mc_batch`` ``[N, *p.shape]``."""

    savefield = "diag_ggn_mc_batch"

    def __init__(self, mc_samples: int = 1):
        super().__init__(check_mc_samples(type(self).__name__, mc_samples, 1))


# ---------------------------------------------------------------------------
# Kronecker factors: BackPACK's convention for shared weights
# ---------------------------------------------------------------------------
class _BackpackKronecker(_CurvextKFAC):
    r"""curvext's KFAC with BackPACK's factors for Linear and Conv layers.

    ``[G, A]`` for weights and ``[G]`` for biases, with
    :math:`G = \sum_{n,k} \bar g \bar g^\top` (:math:`\bar g` the column
    summed over output positions) and :math:`A = \frac{1}{N}\sum_{n,t} a
    a^\top` (:math:`a` the input patches). For a Linear layer on ``[N, in]``
    (one position) this is curvext's KFAC exactly. Other layers with
    parameters (BackPACK has no KFAC for them) get curvext's factors;
    transposed convolutions are refused.
    """

    def reduce(self, rule, name, grads):
        layout = kfac_layout(rule)
        if layout == "refuse":
            raise NotImplementedError(
                f"{type(self).__name__} of curvext.compat.backpack does not support "
                f"{type(rule.module).__name__} yet: BackPACK factorises its kernel "
                "(as weight.transpose(0, 1)) with the kernel on the input side, curvext "
                "on the output side, and the two are different approximations. Use "
                "curvext.extensions.KFAC, whose p.kfac satisfies torch.kron(*p.kfac) "
                "~ GGN block of p.flatten()."
            )
        approx = "reduce" if layout == "backpack" else self.kfac_approx
        return rule.kfac_grad_factor(name, grads, approx)

    def finalize(self, rule, name, partial, info):
        grad_factor = self.output_factor(rule, name, partial, info)
        if kfac_layout(rule) != "backpack":
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
class SqrtGGNExact(_SqrtGGN):
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


class SqrtGGNMC(_SqrtGGN):
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
# Not in curvext yet
# ---------------------------------------------------------------------------
class _NotInCurvext:
    """A BackPACK extension curvext does not compute: refused at construction."""

    #: What the extension computes.
    computes = ""
    #: What to use instead.
    instead = ""

    def __init__(self, *args, **kwargs):
        name = type(self).__name__
        raise NotImplementedError(
            f"backpack.extensions.{name} ({self.computes}) is not yet in curvext: "
            f"curvext.compat.backpack maps BackPACK's extensions onto what curvext "
            f"computes, and curvext has no {name}. Instead: {self.instead}"
        )


# ---------------------------------------------------------------------------
# The Hessian: the same numbers, BackPACK's names
# ---------------------------------------------------------------------------
class DiagHessian(_DiagHessian):
    """Diagonal of the loss Hessian, ``p.diag_h`` (shape of ``p``)."""

    savefield = "diag_h"


class BatchDiagHessian(_BatchDiagHessian):
    """Per-sample Hessian diagonals, ``p.diag_h_batch`` ``[N, *p.shape]``."""

    savefield = "diag_h_batch"


class KFRA(_KFRA):
    """Kronecker factors from batch-averaged Hessian backpropagation, ``p.kfra``
    (curvext's ``KFRA``, in BackPACK's scaling)."""


class HBP(_NotInCurvext):
    """Not in curvext (BackPACK: the configurable base class of KFAC, KFLR and KFRA)."""

    computes = "Hessian backpropagation with configurable strategies"
    instead = "KFLR(), KFAC(mc_samples=...) or KFRA(), or curvext.extensions.KFAC(fisher_type=...)."


class HMP(_HMP):
    """Block-diagonal Hessian-matrix products: ``p.hmp(M)`` for ``M`` ``[V, *p.shape]``.

    Args:
        savefield: The attribute the product function is stored in.
    """

    def __init__(self, savefield: str = "hmp"):
        self.savefield = savefield


class GGNMP(_GGNMP):
    """Block-diagonal GGN-matrix products: ``p.ggnmp(M)`` for ``M`` ``[V, *p.shape]``.

    Args:
        savefield: The attribute the product function is stored in.
    """

    def __init__(self, savefield: str = "ggnmp"):
        super().__init__()
        self.savefield = savefield


class PCHMP(_PCHMP):
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
