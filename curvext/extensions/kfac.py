r"""Kronecker-factored curvature (KFAC, KFLR, empirical and forward-only).

For a weight with per-sample vectors :math:`v_{nk} = \sum_t g_{nkt} \otimes
a_{nt}` the GGN block is approximated by :math:`G \otimes A` with

- ``kfac_approx="expand"``: :math:`A = \frac{1}{NT}\sum_{n,t} a a^\top`,
  :math:`G = \sum_{n,k,t} g g^\top`;
- ``kfac_approx="reduce"``: :math:`A = \frac{1}{N}\sum_n \bar a \bar a^\top`
  (:math:`\bar a` the mean over positions), :math:`G = \sum_{n,k} \bar g
  \bar g^\top` (:math:`\bar g` the sum over positions)

(Eschenhagen et al., 2023). The columns :math:`g` come from the exact
loss-Hessian square root (``"type-2"``, BackPACK's KFLR), ``mc_samples``
Monte-Carlo samples (``"mc"``), the loss gradient scaled by
:math:`1/\sqrt{c}` (``"empirical"``: the empirical Fisher
:math:`c\sum_n \nabla\ell_n \nabla\ell_n^\top`) or are skipped
(``"forward-only"``: :math:`G = I`).

``p.kfac`` is a list of factors with ``torch.kron(*p.kfac)`` approximating
the GGN block of ``p`` w.r.t. ``p.flatten()``: ``[G, A]`` for weights of
Linear and Conv layers, ``[A, G]`` for weights ``[in, out, ...]`` of
transposed convolutions and ``[V, D]`` of embeddings, ``[G]`` for biases.
Parameters without Kronecker structure (normalisation layers, the generic
rule) get one factor: their whole GGN block (``"forward-only"``: the
identity, as a 1-D factor of ones).
A 1-D factor is the diagonal of a diagonal factor: an embedding's input
factor ``A`` (``"expand"``), the covariance of one-hot rows, is stored as the
token frequencies ``[V]``; ``torch.kron(torch.diag(A), G)`` is the block, and
every operator of :mod:`curvext.operators` takes the 1-D factor as it is.
"""

from __future__ import annotations

from typing import List, Optional

import torch
from torch import Tensor

from curvext.extensions.base import (
    AVERAGED,
    EXACT,
    GRADIENT,
    Extension,
    RunInfo,
    check_mc_samples,
    monte_carlo,
)
from curvext.rules.factored import KFAC_APPROXIMATIONS
from curvext.rules.families import Grads, KroneckerRule

FISHER_TYPES = ("mc", "type-2", "empirical", "forward-only")


def fisher_scaled(fisher_type: str, squared_columns, info):
    r"""Sums of squared columns, rescaled for the empirical Fisher.

    The gradient column carries :math:`c`, not :math:`\sqrt{c}`, so its
    squares carry :math:`c^2`; dividing by :math:`c` gives
    :math:`c\sum_n \nabla\ell_n \nabla\ell_n^\top`. Other fisher types are
    returned as they are.
    """
    if fisher_type == "empirical" and info.normalization > 0:
        return squared_columns / info.normalization
    return squared_columns


class KFAC(Extension):
    """Kronecker factors ``p.kfac``.

    Args:
        fisher_type: ``"mc"`` (default), ``"type-2"``, ``"empirical"`` or
            ``"forward-only"`` (see the module docstring).
        mc_samples: Number of MC samples for ``fisher_type="mc"``.
        kfac_approx: ``"expand"`` (default) or ``"reduce"``, for layers that
            share weights over positions (sequences, convolutions).

    Example:
        >>> import torch
        >>> from curvext import backpack, extend
        >>> model = extend(torch.nn.Linear(3, 2))
        >>> loss_fn = extend(torch.nn.MSELoss())
        >>> loss = loss_fn(model(torch.randn(4, 3)), torch.randn(4, 2))
        >>> with backpack(KFAC(fisher_type="type-2")):
        ...     loss.backward()
        >>> [tuple(f.shape) for f in model.weight.kfac], [tuple(f.shape) for f in model.bias.kfac]
        ([(2, 2), (3, 3)], [(2, 2)])
        >>> torch.kron(*model.weight.kfac).shape  # approximates the GGN block
        torch.Size([6, 6])
    """

    savefield = "kfac"

    def __init__(self, fisher_type: str = "mc", mc_samples: int = 1, kfac_approx: str = "expand"):
        if fisher_type not in FISHER_TYPES:
            raise ValueError(
                f"KFAC(fisher_type={fisher_type!r}) is unknown; use one of {FISHER_TYPES}."
            )
        if kfac_approx not in KFAC_APPROXIMATIONS:
            raise ValueError(
                f"KFAC(kfac_approx={kfac_approx!r}) is unknown; use one of {KFAC_APPROXIMATIONS}."
            )
        minimum = 1 if fisher_type == "mc" else 0
        self.fisher_type = fisher_type
        self.mc_samples = check_mc_samples("KFAC", mc_samples, minimum)
        self.kfac_approx = kfac_approx

    def column_set(self):
        return {
            "mc": monte_carlo(self.mc_samples),
            "type-2": EXACT,
            "empirical": GRADIENT,
            "forward-only": None,
        }[self.fisher_type]

    def reduce(self, rule: KroneckerRule, name: str, grads: Grads) -> Tensor:
        return rule.kfac_grad_factor(name, grads, self.kfac_approx)

    def output_factor(
        self, rule: KroneckerRule, name: str, partial: Optional[Tensor], info: RunInfo
    ) -> Tensor:
        """The output-side factor ``G`` from the summed column outer products."""
        if self.fisher_type == "forward-only":
            # the identity as a diagonal (1-D) factor: no size² matrix
            param = rule.param(name)
            return torch.ones(rule.kfac_grad_dim(name), dtype=param.dtype, device=param.device)
        return fisher_scaled(self.fisher_type, partial, info)

    def finalize(
        self, rule: KroneckerRule, name: str, partial: Optional[Tensor], info: RunInfo
    ) -> List[Tensor]:
        output_factor = self.output_factor(rule, name, partial, info)
        return rule.kfac_factors(name, output_factor, self.kfac_approx)


class KFRA(Extension):
    r"""Kronecker factors from batch-averaged curvature backpropagation, ``p.kfra``.

    BackPACK's KFRA (Botev et al., 2017): the summed loss Hessian is
    backpropagated as one dense matrix, averaged over the batch after every
    operation (:mod:`curvext.recursion`), and a layer's output-side factor
    is that matrix at its output; the input-side factor is
    :math:`\frac1N \sum_{n,t} a a^\top`. ``p.kfra`` is ``[G, A]`` for weights
    and ``[G]`` for biases, in BackPACK's scaling (for convolutions, ``G`` is
    summed over output positions and ``A`` over input patches, both without
    a division by the number of positions). Linear and Conv layers
    (``groups=1``) along a single path of operations, as BackPACK's
    ``nn.Sequential``; elsewhere refused, naming what to use instead.

    Args:
        curvature: ``"ggn"`` (default), or BackPACK's Hessian variants of the
            recursion: ``"hessian"`` adds at every elementwise curved
            operation ``y = phi(x)`` on the path its second-order term
            :math:`\operatorname{diag}(\sum_n g_n \odot \phi''(x_n))`
            (``g`` the loss gradient at ``y``), ``"pch-abs"``/``"pch-clip"``
            its absolute value / positive part. With one sample and Linear
            layers, ``"hessian"`` gives the exact Hessian blocks.

    Example:
        >>> import torch
        >>> from curvext import backpack, extend
        >>> model = extend(torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.Tanh(),
        ...                                    torch.nn.Linear(4, 2)))
        >>> loss_fn = extend(torch.nn.CrossEntropyLoss())
        >>> loss = loss_fn(model(torch.randn(5, 3)), torch.tensor([0, 1, 1, 0, 1]))
        >>> with backpack(KFRA()):
        ...     loss.backward()
        >>> [tuple(f.shape) for f in model[0].weight.kfra]
        [(4, 4), (3, 3)]
    """

    savefield = "kfra"

    #: The curvatures the recursion can backpropagate.
    CURVATURES = ("ggn", "hessian", "pch-abs", "pch-clip")

    def __init__(self, curvature: str = "ggn"):
        if curvature not in self.CURVATURES:
            raise ValueError(f"KFRA(curvature={curvature!r}): expected one of {self.CURVATURES}.")
        #: Which curvature the averaged recursion backpropagates (read by the engine).
        self.averaged_curvature = curvature

    def column_sets(self):
        return (AVERAGED,)

    def reduce_averaged(self, rule: KroneckerRule, name: str, matrices: dict) -> Tensor:
        module = type(rule.module).__name__
        if not rule.outer_product_vectors("weight" if name == "bias" else name):
            raise NotImplementedError(
                f"KFRA is defined for Linear and Conv layers (as BackPACK's); "
                f"{module}.{name} has no Kronecker structure. Use "
                "KFAC(fisher_type='type-2') instead."
            )
        if not rule.grad_first:
            raise NotImplementedError(
                f"KFRA of {module} is not in curvext: its weight [in, out, ...] puts "
                "the output side second, and BackPACK's layout for it is not "
                "reproduced. Use KFAC(fisher_type='type-2') (curvext's layout) instead."
            )
        if len(rule.calls) != 1 or getattr(rule.module, "groups", 1) != 1:
            raise NotImplementedError(
                f"KFRA needs each layer called once and without groups; {module} is "
                f"called {len(rule.calls)} times (groups "
                f"{getattr(rule.module, 'groups', 1)}). Use KFAC(fisher_type='type-2')."
            )
        return rule.dense_grad_factor(name, matrices[id(rule.calls[0])])

    def finalize(self, rule: KroneckerRule, name: str, partial: Tensor, info: RunInfo):
        if name == "bias":
            return [partial]
        positions = rule.inputs().shape[-1]
        return [partial, rule.kfac_input_factor(name, "expand") * positions]
