"""BackPACK's public helpers in ``backpack.utils``, with BackPACK's signatures.

- ``convert_parameters``: ``vector_to_parameter_list`` (and torch's
  ``parameters_to_vector``).
- ``kroneckers``: dense Kronecker products of factor lists
  (``kfacs_to_mat``), products with them and their damped inverses.
- ``subsampling.subsample``: the samples ``subsampling`` of one axis.
- ``conv`` / ``conv_transpose``: the unfolded input of a (transposed)
  convolution, ``[N, C_in · prod(kernel), L]``.
- ``module_classification``: ``is_loss``, ``is_nll`` (the losses with a
  negative log-likelihood form: MSE, cross-entropy, BCE with logits),
  ``is_no_op`` (containers).
- ``examples.autograd_diag_ggn_exact``: the GGN diagonal by one GGN-vector
  product per entry (a reference for small models).
"""

from __future__ import annotations

import math
from typing import Callable, Iterable, List, Optional, Sequence, Union

import torch
from torch import Tensor, nn
from torch.nn.utils import parameters_to_vector

from curvext.compat.backpack._conventions import subsample as _subsample
from curvext.compat.backpack.hessianfree import ggn_vector_product
from curvext.rules.conv import unfold, unfold_transposed


def vector_to_parameter_list(vec: Tensor, parameters: Iterable[Tensor]) -> List[Tensor]:
    """Views of ``vec`` ``[P]`` shaped like ``parameters`` (in order), which stay unchanged.

    The inverse of :func:`torch.nn.utils.parameters_to_vector`.

    Raises:
        TypeError: If ``vec`` is not a tensor.
        ValueError: If ``vec`` has another number of entries than ``parameters``.
    """
    if not isinstance(vec, Tensor):
        raise TypeError(f"vector_to_parameter_list: expected a Tensor, got {type(vec).__name__}.")
    parameters = list(parameters)
    total = sum(p.numel() for p in parameters)
    if vec.numel() != total:
        raise ValueError(
            f"vector_to_parameter_list: vec has {vec.numel()} entries, the parameters {total}."
        )
    views, start = [], 0
    for param in parameters:
        views.append(vec[start : start + param.numel()].view_as(param).data)
        start += param.numel()
    return views


# ---------------------------------------------------------------------------
# kroneckers
# ---------------------------------------------------------------------------
def is_matrix(tensor: Tensor) -> bool:
    """Whether ``tensor`` has two axes."""
    return tensor.dim() == 2


def is_vector(tensor: Tensor) -> bool:
    """Whether ``tensor`` has one axis."""
    return tensor.dim() == 1


def two_kfacs_to_mat(A: Tensor, B: Tensor) -> Tensor:  # noqa: N803 - BackPACK's names
    """``A ⊗ B`` for matrices ``A [a, a']``, ``B [b, b']``: ``[a·b, a'·b']``."""
    if not (is_matrix(A) and is_matrix(B)):
        raise ValueError(
            f"two_kfacs_to_mat: expected two matrices, got shapes {tuple(A.shape)} "
            f"and {tuple(B.shape)}."
        )
    return torch.kron(A, B)


def kfacs_to_mat(factors: Sequence[Tensor]) -> Tensor:
    """``A ⊗ B ⊗ ...`` for the matrices ``factors = [A, B, ...]``."""
    matrix = factors[0]
    if not is_matrix(matrix):
        raise ValueError(f"kfacs_to_mat: expected matrices, got shape {tuple(matrix.shape)}.")
    for factor in factors[1:]:
        matrix = two_kfacs_to_mat(matrix, factor)
    return matrix


def kfac_mat_prod(factors: Sequence[Tensor]) -> Callable[[Tensor], Tensor]:
    """``M ↦ (A ⊗ B ⊗ ...) M`` for ``M`` ``[prod(cols), V]`` or a vector,
    without forming the Kronecker product."""
    if not all(is_matrix(f) for f in factors):
        raise ValueError(
            f"kfac_mat_prod: expected matrices, got shapes {[tuple(f.shape) for f in factors]}."
        )
    rows = [f.shape[0] for f in factors]
    cols = [f.shape[1] for f in factors]

    def product(mat: Tensor) -> Tensor:
        vector = is_vector(mat)
        if mat.dim() not in (1, 2) or mat.shape[0] != math.prod(cols):
            raise ValueError(
                f"kfac_mat_prod: expected a matrix [{math.prod(cols)}, V] or a vector "
                f"[{math.prod(cols)}] for factors with {cols} columns, got shape "
                f"{tuple(mat.shape)}."
            )
        result = mat.reshape(*cols, -1)
        for axis, factor in enumerate(factors):  # apply each factor to its axis
            result = torch.tensordot(factor, result, dims=([1], [axis])).movedim(0, axis)
        result = result.reshape(math.prod(rows), -1)
        return result.squeeze(-1) if vector else result

    return product


def apply_kfac_mat_prod(factors: Sequence[Tensor], mat: Tensor) -> Tensor:
    """``(A ⊗ B ⊗ ...) mat``."""
    return kfac_mat_prod(factors)(mat)


def inv_kfacs(
    factors: Sequence[Tensor], shift: Union[None, float, Sequence[float]] = None
) -> List[Tensor]:
    """``[(A + λ_1 I)⁻¹, (B + λ_2 I)⁻¹, ...]`` for symmetric factors.

    By eigendecomposition, as BackPACK: the inverse eigenvalues are clipped to
    ``[-1e8, 1e8]`` (eigenvalues within ``1e-8`` of zero are not inverted
    exactly).

    Args:
        factors: Symmetric matrices.
        shift: One damping for all factors (``None``: 0), or one per factor.
    """
    if shift is None or isinstance(shift, (int, float)):
        shifts = [float(shift or 0.0)] * len(factors)
    else:
        shifts = list(shift)
        if len(shifts) != len(factors):
            raise ValueError(
                f"inv_kfacs: {len(shifts)} shifts for {len(factors)} factors; pass one "
                "shift per factor or a single float."
            )
    inverses = []
    for factor, damping in zip(factors, shifts):
        eigvals, eigvecs = torch.linalg.eigh(factor)
        inverse_eigvals = (1.0 / (eigvals + damping)).clamp(min=-1e8, max=1e8)
        inverses.append((eigvecs * inverse_eigvals) @ eigvecs.T)
    return inverses


def inv_kfac_mat_prod(
    factors: Sequence[Tensor], shift: Union[None, float, Sequence[float]] = None
) -> Callable[[Tensor], Tensor]:
    """``M ↦ [(A + λ_1 I)⁻¹ ⊗ (B + λ_2 I)⁻¹ ⊗ ...] M`` (see :func:`inv_kfacs`)."""
    return kfac_mat_prod(inv_kfacs(factors, shift))


def apply_inv_kfac_mat_prod(
    factors: Sequence[Tensor], mat: Tensor, shift: Union[None, float, Sequence[float]] = None
) -> Tensor:
    """``[(A + λ_1 I)⁻¹ ⊗ (B + λ_2 I)⁻¹ ⊗ ...] mat``."""
    return inv_kfac_mat_prod(factors, shift)(mat)


# ---------------------------------------------------------------------------
# subsampling, conv, conv_transpose
# ---------------------------------------------------------------------------
def subsample(tensor: Tensor, dim: int = 0, subsampling: Optional[List[int]] = None) -> Tensor:
    """The entries ``subsampling`` of axis ``dim`` (``None``: ``tensor`` itself)."""
    return _subsample(tensor, dim, subsampling)


def unfold_input(module: nn.Module, input: Tensor) -> Tensor:
    """The patches of the input of ``module`` (a ``ConvNd``) ``[N, C_in · prod(kernel), L]``,
    ordered like the flattened weight, ``L`` the output positions."""
    return unfold(input, module.kernel_size, module.stride, module.padding, module.dilation)


def unfold_by_conv(input: Tensor, module: nn.Module) -> Tensor:
    """:func:`unfold_input` (BackPACK's name for the one computed by convolution)."""
    return unfold_input(module, input)


def unfold_by_conv_transpose(input: Tensor, module: nn.Module) -> Tensor:
    """The unfolded input of a ``ConvTransposeNd`` ``[N, C_in · prod(kernel), X]``:
    entry ``(c, k)`` at output position ``x`` is the input pixel of channel
    ``c`` that kernel element ``k`` carries to ``x`` (``X`` the output
    positions without ``output_padding``)."""
    return unfold_transposed(
        input, module.kernel_size, module.stride, module.padding, module.dilation
    )


# ---------------------------------------------------------------------------
# module_classification
# ---------------------------------------------------------------------------
def is_loss(module: nn.Module) -> bool:
    """Whether ``module`` is a torch loss module."""
    return isinstance(module, nn.modules.loss._Loss)


def is_nll(module: nn.Module) -> bool:
    """Whether ``module`` is a negative log-likelihood loss (MSE, cross-entropy,
    BCE with logits)."""
    return isinstance(module, (nn.MSELoss, nn.CrossEntropyLoss, nn.BCEWithLogitsLoss))


def is_no_op(module: nn.Module) -> bool:
    """Whether ``module`` only routes its children (a container)."""
    from torch.fx import GraphModule

    from curvext.compat.backpack.custom_module import Parallel, ReduceTuple, _Branch

    return isinstance(module, (nn.Sequential, _Branch, Parallel, ReduceTuple, GraphModule))


# ---------------------------------------------------------------------------
# examples
# ---------------------------------------------------------------------------
def autograd_diag_ggn_exact(
    X: Tensor,  # noqa: N803 - BackPACK's names
    y: Tensor,
    model: nn.Module,
    loss_function: nn.Module,
    idx: Optional[List[int]] = None,
) -> Tensor:
    """The GGN diagonal of ``loss_function(model(X), y)`` w.r.t. the trainable
    parameters (flattened, concatenated), by one GGN-vector product per entry.

    Args:
        idx: The entries to compute (``None``: all).
    """
    params = [p for p in model.parameters() if p.requires_grad]
    total = sum(p.numel() for p in params)
    output = model(X)
    loss = loss_function(output, y)
    entries = []
    for index in range(total) if idx is None else idx:
        unit = torch.zeros(total, dtype=loss.dtype, device=loss.device)
        unit[index] = 1.0
        column = ggn_vector_product(loss, output, model, vector_to_parameter_list(unit, params))
        entries.append(parameters_to_vector(column)[index])
    return torch.stack(entries)


__all__ = [
    "parameters_to_vector",
    "vector_to_parameter_list",
    "is_matrix",
    "is_vector",
    "two_kfacs_to_mat",
    "kfacs_to_mat",
    "kfac_mat_prod",
    "apply_kfac_mat_prod",
    "inv_kfacs",
    "inv_kfac_mat_prod",
    "apply_inv_kfac_mat_prod",
    "subsample",
    "unfold_input",
    "unfold_by_conv",
    "unfold_by_conv_transpose",
    "is_loss",
    "is_nll",
    "is_no_op",
    "autograd_diag_ggn_exact",
]
