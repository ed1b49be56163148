r"""BackPACK's numeric conventions, computed from what curvext's engine gives.

Two of BackPACK's results are not what curvext stores:

- ``SqrtGGNExact`` for ``CrossEntropyLoss``: BackPACK backpropagates the ``C``
  columns :math:`s_c = \sqrt{p_c}\,(e_c - p)` of the symmetric square root of
  :math:`\mathrm{diag}(p) - pp^\top` per position (class-major, ``c·T + t``
  for ``T`` positions), curvext a rank-``(C-1)`` root (position-major). Both
  are square roots of the same Hessian block, so per sample and position
  BackPACK's columns are linear combinations of curvext's:
  :math:`S = S' M` with :math:`M = S'^{+} S` (:math:`S'` has full column
  rank), and the per-sample vectors follow, :math:`J^\top S = (J^\top S') M`.
  :func:`backpack_exact_columns` applies :math:`M` to the stored vectors.
- ``KFAC``/``KFLR`` on layers that share a weight over positions
  (convolutions): BackPACK's output factor sums the column over positions
  before the outer product (curvext's ``kfac_approx="reduce"`` factor) and
  its input factor is :math:`\frac{1}{N}\sum_{n,t} a a^\top` (``T`` times
  curvext's ``"expand"`` factor). :func:`kfac_layout` says which layers get
  this convention.

Everything else (diagonals, first-order quantities, MC columns, the mean
reduction's :math:`1/\sqrt{c}` in every column) is the same in both.
"""

from __future__ import annotations

from typing import Optional, Sequence

import torch
from torch import Tensor, nn

from curvext.rules import is_linear_or_convolution, is_transposed_convolution
from curvext.rules.conv import unfold_transposed

#: Most elements of curvext's exact columns materialised at once while the
#: per-position square-root blocks are read out of them.
_BLOCK_ELEMENTS = 2**24


def subsample(values: Optional[Tensor], axis: int, subsampling: Optional[Sequence[int]]):
    """BackPACK's ``subsampling``: the samples ``subsampling`` of axis ``axis``."""
    if values is None or subsampling is None:
        return values
    index = torch.as_tensor(list(subsampling), dtype=torch.long, device=values.device)
    return values[(slice(None),) * axis + (index,)]


def check_subsampling(owner: str, subsampling) -> Optional[list]:
    """Validate BackPACK's ``subsampling`` argument (``None`` or sample indices)."""
    if subsampling is None:
        return None
    try:
        indices = [int(i) for i in subsampling]
    except (TypeError, ValueError):
        raise TypeError(
            f"{owner}(subsampling={subsampling!r}) is invalid: use None (all samples) "
            "or a list of sample indices."
        ) from None
    return indices


def backpack_exact_columns(values: Optional[Tensor], loss, cache: dict) -> Optional[Tensor]:
    """curvext's exact per-sample vectors ``[K, N, *p.shape]`` in BackPACK's columns.

    ``loss``: the pass's loss rule (``RunInfo.loss``); ``cache``: holds the
    mixing matrices of that loss for the other parameters of the pass.

    Unchanged for ``MSELoss`` and ``BCEWithLogitsLoss`` (one column per
    output entry in both libraries). For ``CrossEntropyLoss`` on
    ``[N, C, d1, ...]``: ``[C·T, N, *p.shape]``, column ``c·T + t`` being
    BackPACK's column ``c`` of position ``t`` (see the module docstring).
    """
    if values is None or not isinstance(loss.module, nn.CrossEntropyLoss):
        return values
    # a flattened sequence loss keeps the rule of its unflattened [N, C, ..., T] input
    rule = getattr(loss, "inner", loss)
    num_samples, num_classes = rule.prob.shape[:2]
    positions = rule.prob[0, 0].numel()
    roots = rule.num_exact_columns // positions
    if roots == num_classes:  # C = 1: one (zero) column in both
        return values
    if cache.get("loss") is not loss:
        cache["loss"], cache["mixing"] = loss, _mixing(rule, roots)
    mixing = cache["mixing"].to(values.dtype)  # [N, T, roots, C]
    vectors = values.reshape(positions, roots, num_samples, -1)
    converted = torch.einsum("ntjc,tjnp->ctnp", mixing, vectors)
    return converted.reshape(num_classes * positions, *values.shape[1:])


def _mixing(rule, roots: int) -> Tensor:
    r""":math:`M = S'^{+} S` per sample and position, ``[N, T, roots, C]``."""
    prob = rule.prob.reshape(*rule.prob.shape[:2], -1).transpose(1, 2)  # [N, T, C]
    num_samples, positions, _ = prob.shape
    root_prob = prob.sqrt()
    # BackPACK's root: column c is sqrt(p_c) (e_c - p), scaled like curvext's
    target = torch.diag_embed(root_prob) - prob.unsqueeze(-1) * root_prob.unsqueeze(-2)
    weight = rule.normalization * rule.position_weight.reshape(num_samples, positions)
    target = target * weight.to(prob.dtype).sqrt()[..., None, None]
    return torch.linalg.pinv(_root_blocks(rule, roots)) @ target


def _root_blocks(rule, roots: int) -> Tensor:
    """curvext's root of each position's Hessian block, ``[N, T, C, roots]``.

    Columns ``t·roots .. (t+1)·roots`` of the exact square root are those of
    position ``t`` and vanish elsewhere; they are read position chunk by
    position chunk.
    """
    num_samples, num_classes = rule.prob.shape[:2]
    positions = rule.prob[0, 0].numel()
    per_position = roots * num_samples * num_classes * positions
    step = max(1, _BLOCK_ELEMENTS // per_position)
    blocks = []
    for start in range(0, positions, step):
        stop = min(start + step, positions)
        columns = rule.exact_columns(start * roots, stop * roots)
        columns = columns.reshape(stop - start, roots, num_samples, num_classes, positions)
        diagonal = torch.diagonal(columns[..., start:stop], dim1=0, dim2=4)  # [r, N, C, t]
        blocks.append(diagonal.permute(1, 3, 2, 0))
    return torch.cat(blocks, dim=1)


def kfac_layout(rule) -> str:
    """``"backpack"``, ``"transposed"``, ``"refuse"`` or ``"curvext"``: how the
    compat KFAC/KFLR factor the parameters of ``rule``.

    ``"backpack"``: Linear and Conv layers with curvext's outer-product rule
    (BackPACK's convention, see the module docstring). ``"transposed"``:
    transposed convolutions, whose weight BackPACK factors as
    ``weight.transpose(0, 1)`` ``[C_out, C_in · prod(kernel)]``, the kernel on
    the input side (:func:`transposed_input_factor`). ``"refuse"``:
    transposed convolutions BackPACK has no factors for (``groups > 1``) or
    whose output these factors do not describe (``output_padding``).
    ``"curvext"``: everything else (layers BackPACK has no KFAC for:
    curvext's own factors).
    """
    if not rule.outer_product_vectors("weight"):
        return "curvext"
    module = rule.module
    if is_transposed_convolution(module):
        plain = module.groups == 1 and not any(module.output_padding)
        plain = plain and all(len(c.args) < 2 and "output_size" not in c.kwargs for c in rule.calls)
        return "transposed" if plain else "refuse"
    if is_linear_or_convolution(module) and rule.grad_first:
        return "backpack"
    return "curvext"


def transposed_input_factor(rule) -> Tensor:
    r"""BackPACK's input-side factor of a transposed convolution's weight:
    :math:`\frac1N \sum_{n,x} u u^\top` over the columns ``u`` of the input
    spread over the output positions (:func:`curvext.rules.conv.unfold_transposed`),
    ``[C_in · prod(kernel), C_in · prod(kernel)]``."""
    module = rule.module
    columns = torch.cat(
        [
            unfold_transposed(
                call.args[0], module.kernel_size, module.stride, module.padding, module.dilation
            )
            for call in rule.calls
        ],
        dim=-1,
    ).to(module.weight.dtype)
    return torch.einsum("nix,njx->ij", columns, columns) / columns.shape[0]
