r"""The curvature terms that do not come from the loss columns.

- :func:`add_residuals`: the Hessian's second-order terms of curved
  elementwise operations (:mod:`curvext.rules.curvature` finds them), for
  the extensions reading :data:`~curvext.extensions.base.RESIDUAL`
  (``DiagHessian``, ``HMP``, ...);
- :func:`add_averaged`: the batch-averaged curvature at each module output
  (:mod:`curvext.recursion`), for those reading
  :data:`~curvext.extensions.base.AVERAGED` (``KFRA``).

Both add to the engine's ``partials`` (``(extension index, target index,
column set)`` → partial result) before it finalises.
"""

from __future__ import annotations

from typing import Dict, List

import torch
from torch import Tensor
from torch.autograd.graph import GradientEdge

from curvext.context import max_columns_per_backward
from curvext.extensions.base import AVERAGED, RESIDUAL, Combine
from curvext.push import CHUNK_BYTES, backpropagate
from curvext.recursion import averaged_output_curvature
from curvext.rules.curvature import CurvedNode, curved_nodes, path_second_derivative


def add_averaged(edge, loss, loss_gradient, extensions, targets, partials) -> None:
    """Partials of the extensions reading :data:`AVERAGED` (KFRA) from the
    batch-averaged curvature at each call output (:mod:`curvext.recursion`),
    one recursion per kind of curvature the extensions ask for."""
    if loss.batch_size != loss.input.shape[0]:
        raise NotImplementedError(
            f"KFRA needs one row of the {type(loss.module).__name__} input per sample; "
            "this loss input holds the positions of several rows per sample (a "
            "flattened sequence). Use KFAC(fisher_type='type-2') instead."
        )
    columns = loss.exact_columns(0, loss.num_exact_columns)
    columns = columns.reshape(*columns.shape[:2], -1)  # [K, N, D]; D = 1 for inputs [N]
    summed_hessian = torch.einsum("kni,knj->ij", columns, columns)
    calls = list({id(c): c for t in targets for rule, _ in t.owners for c in rule.calls}.values())
    by_curvature: Dict[str, dict] = {}
    for ext_index, ext in enumerate(extensions):
        if AVERAGED not in ext.column_sets():
            continue
        curvature = ext.averaged_curvature
        if curvature not in by_curvature:
            residual = None
            if curvature != "ggn":
                gradient = loss_gradient().to(loss.input.dtype)
                residual = _summed_residual(edge, gradient, curvature)
            by_curvature[curvature] = averaged_output_curvature(
                edge, summed_hessian, calls, loss.input.shape, residual
            )
        for target_index, target in enumerate(targets):
            partial = ext.reduce_averaged(target.rule, target.name, by_curvature[curvature])
            partials[(ext_index, target_index, AVERAGED)] = partial


#: How the averaged recursion treats second-order terms (BackPACK's curvatures).
_RESIDUAL_MODIFICATIONS = {
    "hessian": lambda d: d,
    "pch-abs": torch.abs,
    "pch-clip": lambda d: d.clamp(min=0),
}


def _summed_residual(edge, loss_gradient: Tensor, curvature: str):
    r"""``node ↦`` :math:`\sum_n g_n \odot \phi''(x_n)` (flattened per sample,
    modified for the positive-curvature variants) for an elementwise curved
    operation, ``None`` for one without a second-order term in its input."""
    modify = _RESIDUAL_MODIFICATIONS[curvature]

    def residual(node):
        second = path_second_derivative(node, f"KFRA of the {curvature} curvature")
        if second is None:
            return None  # linear in the tensor on the path
        (gradient,) = torch.autograd.grad(
            [edge],
            [GradientEdge(node, 0)],
            grad_outputs=[loss_gradient],
            retain_graph=True,
        )
        return modify((gradient * second.to(gradient.dtype)).sum(0).flatten())

    return residual


def add_residuals(edge, loss_gradient, loss, used_calls, extensions, targets, partials):
    r"""Add the second-order terms of the graph's curved operations to the
    partials of the extensions reading :data:`RESIDUAL`.

    For an elementwise ``y = phi(x)`` with loss gradient ``g`` at ``y``, the
    term is :math:`J_x^\top \operatorname{diag}(d) J_x`, ``d = g phi''(x)``.
    One column per feature ``f`` of ``x``, :math:`\sqrt{|d_{:,f}|}\, e_f`
    (all samples at once), is pushed from ``x`` to the module outputs; each
    column's gradients there are split by the sign of ``d`` per sample (the
    samples do not mix, as everywhere in the engine), and the extension's
    reduction of the negative part is subtracted from that of the positive
    part.
    """
    handled: Dict[int, tuple] = {}
    for target in targets:
        for rule, _ in target.owners:
            handled.setdefault(id(rule), (rule.calls, []))[1].append(target.param)
    nodes = curved_nodes(edge.node, list(handled.values()))
    if not nodes:
        return
    at_outputs = torch.autograd.grad(
        [edge],
        [node.output for node in nodes],
        grad_outputs=[loss_gradient.to(loss.input.dtype)],
        retain_graph=True,
        allow_unused=True,
    )
    readers = [(i, ext) for i, ext in enumerate(extensions) if RESIDUAL in ext.column_sets()]
    for node, gradient in zip(nodes, at_outputs):
        reached = {id(call) for call in node.calls}
        # only the parameters whose rules read a call below the node get a term
        indices = [
            i
            for i, target in enumerate(targets)
            if any(id(c) in reached for rule, _ in target.owners for c in rule.calls)
        ]
        if gradient is None or not indices:
            continue
        _check_samples_apart(node, gradient, loss.batch_size)
        curvature = gradient * node.second_derivative.to(gradient.dtype)
        indices = _add_direct(node, curvature, readers, targets, indices, partials)
        calls = {id(c): c for i in indices for rule, _ in targets[i].owners for c in rule.calls}
        if indices:
            _add_node_residual(
                node, curvature, list(calls.values()), readers, targets, indices, partials
            )


def _check_samples_apart(node: CurvedNode, gradient: Tensor, samples: int) -> None:
    """Refuse unless axis 0 of the op's input holds the ``samples``: its size,
    and a column on sample 0 alone must reach sample 0 alone of every module
    output below (a batch axis moved elsewhere with as many entries as
    samples, as in ``tanh(h.transpose(0, 1))`` with ``T == N``, would pass
    the size check)."""
    if gradient.dim() == 0 or gradient.shape[0] != samples:
        raise NotImplementedError(
            f"The Hessian diagonal needs the samples on axis 0 of the input of "
            f"{node.name.replace('Backward0', '')} (shape {tuple(gradient.shape)}, "
            f"{samples} samples): move the batch axis first before the activation."
        )
    if samples < 2:
        return
    probe = torch.zeros_like(gradient)
    probe[0] = 1
    reached = backpropagate(node.input, node.calls, probe.unsqueeze(0), gradient.dtype)
    for call_grads in reached.values():
        for grads in call_grads if isinstance(call_grads, tuple) else (call_grads,):
            if grads.dim() < 2 or grads.shape[1] != samples or grads[0, 1:].any():
                raise NotImplementedError(
                    f"The Hessian diagonal needs the samples on axis 0 of the input of "
                    f"{node.name.replace('Backward0', '')} and of every module output "
                    f"below it; entry 0 of axis 0 there (shape {tuple(gradient.shape)}) "
                    "reaches several samples of a module output. Keep the batch axis "
                    "first up to the activation (transpose after it)."
                )


def _add_direct(node: CurvedNode, curvature, readers, targets, indices, partials) -> List[int]:
    """Add the term of ``node`` for the parameters of the call whose output is
    the node's input, where the rule computes it from the curvature alone
    (:meth:`~curvext.rules.base.ModuleRule.output_curvature_diag`). Returns
    the target indices left for the columns."""
    left = []
    for target_index in indices:
        target = targets[target_index]
        rule = target.rule
        direct = len(target.owners) == 1 and [
            (e.node, e.output_nr) for c in rule.calls for e in c.edges
        ] == [(node.input.node, node.input.output_nr)]
        if not direct:
            left.append(target_index)
            continue
        parts = [ext.reduce_curvature(rule, target.name, curvature) for _, ext in readers]
        if any(part is None for part in parts):
            left.append(target_index)
            continue
        for (ext_index, ext), part in zip(readers, parts):
            _accumulate(partials, (ext_index, target_index, RESIDUAL), ext, part)
    return left


def _add_node_residual(
    node: CurvedNode, curvature, used_calls, readers, targets, indices, partials
) -> None:
    samples, shape = curvature.shape[0], curvature.shape
    curvature = curvature.reshape(samples, -1)
    features = curvature.ne(0).any(0).nonzero().flatten()
    if features.numel() == 0:
        return
    scale, positive = curvature.abs().sqrt(), curvature > 0
    itemsize = curvature.element_size()
    per_column = itemsize * (
        curvature.numel() + sum(s.numel() for c in used_calls for s in c.output_shapes)
    )
    requested = max_columns_per_backward()
    step = requested or max(1, CHUNK_BYTES // max(per_column, 1))
    for start in range(0, features.numel(), step):
        chosen = features[start : start + step]
        columns = curvature.new_zeros(chosen.numel(), samples, curvature.shape[1])
        picks = torch.arange(chosen.numel(), device=chosen.device)
        columns[picks, :, chosen] = scale[:, chosen].T
        call_grads = backpropagate(
            node.input, used_calls, columns.reshape(-1, *shape), curvature.dtype
        )
        mask = positive[:, chosen].T  # [columns, N]
        plus = {key: _masked(grads, mask, samples) for key, grads in call_grads.items()}
        minus = {
            key: _map_grads(lambda g, p: g - p, grads, plus[key])
            for key, grads in call_grads.items()
        }
        for ext_index, ext in readers:
            for target_index in indices:
                target = targets[target_index]
                part = ext.reduce_residual(
                    target.rule, target.name, target.grads(plus), target.grads(minus)
                )
                _accumulate(partials, (ext_index, target_index, RESIDUAL), ext, part)
        del call_grads, plus, minus, columns
        for target_index in indices:
            targets[target_index].rule.release()


def _accumulate(partials, slot, ext, part) -> None:
    """Add ``part`` to the partial in ``slot`` (appended for ``Combine.CAT``)."""
    if ext.combine is Combine.CAT:
        partials.setdefault(slot, []).append(part)
    else:
        partials[slot] = part if slot not in partials else partials[slot] + part


def _map_grads(function, grads, *others):
    """``function`` applied to a call's gradients (a tensor, or a tuple of them)."""
    if isinstance(grads, tuple):
        return tuple(function(g, *(o[i] for o in others)) for i, g in enumerate(grads))
    return function(grads, *others)


def _masked(grads, mask: Tensor, samples: int):
    """The entries of ``grads [columns, N, ...]`` where ``mask [columns, N]``."""

    def keep(g: Tensor) -> Tensor:
        if g.dim() < 2 or g.shape[1] != samples:
            raise NotImplementedError(
                f"The Hessian diagonal needs the samples on axis 0 of every module "
                f"output; one has shape {tuple(g.shape[1:])} for {samples} samples."
            )
        return g * mask.reshape(*mask.shape, *([1] * (g.dim() - 2))).to(g.dtype)

    return _map_grads(keep, grads)


__all__ = ["add_averaged", "add_residuals"]
