r"""Batch-averaged curvature backpropagation (Botev et al., 2017: KFRA).

Instead of columns, one dense matrix per layer boundary travels down the
graph: at the loss input the summed loss Hessian
:math:`\bar G = \sum_n c\, \nabla^2 \ell_n` (``[D, D]``, ``D`` entries per
sample), and through every operation ``y_n = f(x_n)`` on the way

.. math::
    \bar G_x = \frac{1}{N} \sum_n J_n^\top \bar G_y J_n ,

with :math:`J_n` the operation's per-sample Jacobian (the average is
exact where :math:`J_n` does not depend on the sample: linear layers,
views). :func:`averaged_output_curvature` returns :math:`\bar G` at the
output of every recorded call; the ``KFRA`` extension turns it into
Kronecker factors.

The recursion follows one path, operation by operation, as BackPACK's does
through an ``nn.Sequential``: a graph in which curvature reaches a module
along two paths (a residual connection) is refused, since the averaged
matrices of the two paths have no defined sum of cross terms.
:math:`J_n^\top \bar G J_n` is formed with two batched backward passes
through the operation alone (the rows of :math:`\bar G` as columns, then
the rows of the result), so any differentiable operation works.
"""

from __future__ import annotations

from typing import Callable, Dict, List, Optional, Tuple

import torch
from torch import Tensor
from torch.autograd.graph import GradientEdge, Node

from curvext.recording import ModuleCall, post_order, reach_masks

#: Most entries of one chunk of columns ``[k, *shape]`` pushed at once.
CHUNK_ELEMENTS = 2**24


def averaged_output_curvature(
    edge: GradientEdge,
    summed_hessian: Tensor,
    calls: List[ModuleCall],
    shape: torch.Size,
    residual: Optional[Callable[[Node], Optional[Tensor]]] = None,
) -> Dict[int, Tensor]:
    """:math:`\\bar G` ``[D, D]`` at the output of each of ``calls`` (by ``id``).

    Args:
        edge: Gradient edge of the loss input.
        summed_hessian: :math:`\\sum_n c \\nabla^2 \\ell_n` w.r.t. one sample's
            loss input, ``[D, D]``.
        calls: The recorded calls whose parameters need factors.
        shape: Shape of the loss input, ``[N, ...]``.
        residual: For the Hessian instead of the GGN: given an operation's
            node, the diagonal ``[D_in]`` added to :math:`\\bar G` at its
            input (its second-order term summed over the batch), or ``None``.

    Raises:
        NotImplementedError: where the recursion leaves a single path (a call
            reached along two paths, or a call with several outputs).
    """
    wanted = {id(call): call for call in calls}
    for call in calls:
        if len(call.edges) != 1:
            raise NotImplementedError(
                f"KFRA backpropagates one averaged matrix along a path of modules; "
                f"{type(call.module).__name__} has {len(call.edges)} outputs."
            )
    outputs = {(c.edges[0].node, c.edges[0].output_nr): c for c in calls}
    below = _calls_below(edge.node, outputs)
    found: Dict[int, Tensor] = {}
    current, matrix = edge, summed_hessian
    while True:
        call = outputs.get((current.node, current.output_nr))
        if call is not None:
            found[id(call)] = matrix
        if len(found) == len(wanted):
            return found
        paths = [
            (child, nr)
            for child, nr in current.node.next_functions
            if child is not None and below.get(child, False)
        ]
        if len(paths) != 1:
            missing = [type(c.module).__name__ for i, c in wanted.items() if i not in found]
            raise NotImplementedError(
                f"KFRA backpropagates one averaged matrix along a single path of "
                f"operations (a sequence of layers, as BackPACK's nn.Sequential); "
                f"at {type(current.node).__name__} the path to {', '.join(missing)} "
                f"{'splits' if paths else 'ends'}. Use KFAC(fisher_type='type-2') "
                "(exact columns, any graph) instead."
            )
        following = GradientEdge(*paths[0])
        matrix, shape = _sandwich(current, following, matrix, shape)
        diagonal = residual(current.node) if residual is not None else None
        if diagonal is not None:
            matrix = matrix + torch.diag(diagonal.to(matrix.dtype))
        current = following


def _calls_below(root: Node, outputs: Dict) -> Dict[Node, bool]:
    """Whether a wanted call output lies at or below each node."""
    output_nodes = {node for node, _ in outputs}
    masks = reach_masks(post_order(root), lambda node: int(node in output_nodes))
    return {node: bool(mask) for node, mask in masks.items()}


def _sandwich(
    output: GradientEdge, inputs: GradientEdge, matrix: Tensor, shape: torch.Size
) -> Tuple[Tensor, torch.Size]:
    r""":math:`\frac1N \sum_n J_n^\top M J_n` through the operation between
    ``inputs`` and ``output`` (one autograd node), ``M`` ``[D_out, D_out]``
    for the output of ``shape`` ``[N, ...]``; and the input's shape."""
    samples = shape[0]
    # J_n^T M: the rows of M (symmetric) pushed for every sample at once
    columns = matrix.unsqueeze(1).expand(-1, samples, -1)
    first, input_shape = _push(output, inputs, columns, shape)  # [D_out, N, D_in]
    # a column on sample 0 alone must come back on sample 0 alone (a transpose
    # with as many positions as samples would pass a shape check)
    probe = matrix.new_zeros(1, samples, matrix.shape[0])
    probe[0, 0] = 1
    reached, _ = _push(output, inputs, probe, shape)
    if input_shape[:1] != shape[:1] or reached[0, 1:].any():
        raise NotImplementedError(
            f"KFRA needs the samples on axis 0 of every tensor on its path, apart: "
            f"{type(output.node).__name__} maps {tuple(shape)} to {tuple(input_shape)} "
            "and mixes the entries of axis 0. Keep the batch axis first, or use "
            "KFAC(fisher_type='type-2')."
        )
    # J_n^T (J_n^T M)^T per sample: the columns of the first result, averaged
    second, _ = _push(output, inputs, first.permute(2, 1, 0), shape)  # [D_in, N, D_in]
    return second.mean(1), input_shape


def _push(
    output: GradientEdge, inputs: GradientEdge, columns: Tensor, shape: torch.Size
) -> Tuple[Tensor, torch.Size]:
    """Vector-Jacobian products of ``columns`` ``[k, N, D_out]`` through one
    operation whose output has ``shape``: ``[k, N, D_in]`` and the input's shape."""
    parts, input_shape = [], None
    step = max(1, CHUNK_ELEMENTS // max(shape.numel(), 1))
    for start in range(0, columns.shape[0], step):
        chunk = columns[start : start + step].reshape(-1, *shape)
        (result,) = torch.autograd.grad(
            [output], [inputs], grad_outputs=[chunk], retain_graph=True, is_grads_batched=True
        )
        input_shape = result.shape[1:]
        parts.append(result.reshape(chunk.shape[0], shape[0], -1))
    return torch.cat(parts), input_shape


__all__ = ["averaged_output_curvature"]
