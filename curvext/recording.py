"""What a forward pass leaves behind for the engine.

A call of an extended module with trainable parameters is recorded as a
:class:`ModuleCall` (detached inputs, output shapes). The record is stored in
the ``metadata`` dict of the autograd node that produced each output, so it
lives exactly as long as the graph does: a forward pass that is never
backpropagated leaks nothing, and the engine finds the records of one loss by
walking that loss's graph (:func:`collect_calls`), never a global tape.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass, field
from typing import Callable, Dict, List, Optional, Set, Tuple

import torch
from torch import Tensor, nn
from torch.autograd.graph import GradientEdge, Node, get_gradient_edge

METADATA_KEY = "curvext"


@dataclass(eq=False)
class ModuleCall:
    """One call of an extended module.

    Attributes:
        module: The module that was called.
        args: Positional inputs, tensors detached (they share storage).
        kwargs: Keyword inputs, tensors detached.
        output_shapes: Shape of each recorded output tensor, ``[N, ...]``.
        output_positions: Position of each recorded output among the
            floating-point tensors of the module's output (a re-run of the
            module returns them all; only those in the graph are recorded).
        edges: Filled by the engine: gradient edge of each recorded output.
        couples_samples: The call mixes samples (BatchNorm in train mode).
        input_nodes: Autograd nodes of the inputs that require grad (they
            bound the call's part of the graph).
        plain: The module's own forward made the recorded output from
            ``args``: no pre-hook or earlier forward hook ran.
        reproducible: Re-running the module on ``args`` with its pre-hooks
            (and without its forward hooks) gives the recorded output.
    """

    module: nn.Module
    args: Tuple
    kwargs: Dict
    output_shapes: List[torch.Size] = field(default_factory=list)
    output_positions: List[int] = field(default_factory=list)
    edges: List[GradientEdge] = field(default_factory=list)
    couples_samples: bool = False
    input_nodes: List[Node] = field(default_factory=list)
    plain: bool = True
    reproducible: bool = True


@dataclass(eq=False)
class OutputSlot:
    """Marks output number ``index`` of ``call`` on the node that produced it."""

    call: ModuleCall
    index: int
    output_nr: int


def detach_tree(obj):
    """Detach every tensor in a (nested) tuple/list/dict, keep everything else."""
    if isinstance(obj, Tensor):
        return obj.detach()
    if type(obj) is tuple and len(obj) == 1 and isinstance(obj[0], Tensor):
        return (obj[0].detach(),)  # the common call, without the generator
    if isinstance(obj, (tuple, list)):
        return type(obj)(detach_tree(o) for o in obj)
    if isinstance(obj, dict):
        return {key: detach_tree(value) for key, value in obj.items()}
    return obj


def output_tensors(output) -> List[Tensor]:
    """Tensors in a module's output (nested tuples, lists and dicts), in order."""
    if isinstance(output, Tensor):
        return [output]
    if isinstance(output, (tuple, list)):
        return [t for o in output for t in output_tensors(o)]
    if isinstance(output, dict):
        return [t for o in output.values() for t in output_tensors(o)]
    return []


def floating_outputs(output) -> List[Tensor]:
    """Floating-point tensors of a module output, in the order that
    :attr:`ModuleCall.output_positions` counts them (a re-run of the module
    inside ``torch.func`` returns them all)."""
    return [t for t in output_tensors(output) if t.is_floating_point()]


def graph_outputs(output) -> Tuple[List[Tensor], List[int]]:
    """Floating-point tensors in a module's output that are part of an
    autograd graph, and their positions among all floating-point ones."""
    if isinstance(output, Tensor):  # the common case, without the walk
        in_graph = output.grad_fn is not None and output.is_floating_point()
        return ([output], [0]) if in_graph else ([], [])
    floating = floating_outputs(output)
    positions = [i for i, t in enumerate(floating) if t.grad_fn is not None]
    return [floating[i] for i in positions], positions


def separate_outputs(output):
    """``output`` with every tensor in the graph replaced by a copy, or
    ``output`` itself where that is not needed.

    A module returning several tensors may return one twice or compute one
    from another (``LSTMCell``'s ``h`` from its ``c``). The gradient that
    reaches such an output then already contains the path through the
    other, and a rule that adds the contributions of all outputs counts it
    twice. After a copy, each recorded output is a node of its own that
    receives only the gradient from outside the module. Outputs of one
    autograd node (the fused ``LSTM``) cannot depend on each other and are
    kept.
    """
    if not isinstance(output, (tuple, list, dict)):
        return output
    tensors = [t for t in output_tensors(output) if t.grad_fn is not None]
    edges = {(t.grad_fn, get_gradient_edge(t).output_nr) for t in tensors}
    one_node = len({t.grad_fn for t in tensors}) == 1 and len(edges) == len(tensors)
    if len(tensors) < 2 or one_node:
        return output
    return _copy_graph_tensors(output)


def _copy_graph_tensors(obj):
    """``obj`` rebuilt with its tensors in the graph cloned, in the traversal
    order of :func:`output_tensors`: tuples, lists, named tuples and dicts
    (``OrderedDict`` subclasses such as Hugging Face's ``ModelOutput`` keep
    their class through a shallow copy)."""
    if isinstance(obj, Tensor):
        return obj.clone() if obj.grad_fn is not None else obj
    if isinstance(obj, tuple) and hasattr(obj, "_fields"):  # a named tuple
        return type(obj)(*(_copy_graph_tensors(o) for o in obj))
    if isinstance(obj, (tuple, list)):
        return type(obj)(_copy_graph_tensors(o) for o in obj)
    if isinstance(obj, dict):
        copied = copy.copy(obj)
        for key, value in obj.items():
            copied[key] = _copy_graph_tensors(value)
        return copied
    return obj


def graph_inputs(inputs) -> List[Tensor]:
    """Tensors among a call's inputs that require grad.

    Tuples, lists, dicts and scalars are walked directly (on every forward
    call: ``tree_flatten`` took half of the recording hook's time); other
    containers through ``torch.utils._pytree``.
    """
    found: List[Tensor] = []
    _collect_graph_inputs(inputs, found)
    return found


def call_graph_inputs(args: tuple, kwargs: dict) -> List[Tensor]:
    """:func:`graph_inputs` of a call's ``(args, kwargs)``, with a fast path
    for the common call on tensors alone."""
    if not kwargs and all(isinstance(arg, Tensor) for arg in args):
        return [arg for arg in args if arg.requires_grad]
    return graph_inputs((args, kwargs))


def _collect_graph_inputs(obj, found: List[Tensor]) -> None:
    # a module-level function, not a closure: a recursive closure is a
    # reference cycle that would keep the inputs alive until the cycle
    # collector runs
    if isinstance(obj, Tensor):
        if obj.requires_grad:
            found.append(obj)
    elif isinstance(obj, (tuple, list)):
        for item in obj:
            _collect_graph_inputs(item, found)
    elif isinstance(obj, dict):
        for item in obj.values():
            _collect_graph_inputs(item, found)
    elif obj is not None and not isinstance(obj, (bool, int, float, str)):
        leaves, _ = torch.utils._pytree.tree_flatten(obj)
        found.extend(t for t in leaves if isinstance(t, Tensor) and t.requires_grad)


def attach(
    call: ModuleCall, inputs: List[Tensor], outputs: List[Tensor], positions: List[int]
) -> List[Node]:
    """Store ``call`` on the autograd nodes that produced ``outputs``.

    Returns the nodes that hold no record before this call (the caller
    registers its gradient hook on each node once).
    """
    call.output_positions = list(positions)
    new_nodes = []
    # outputs are in the graph (grad_fn set): their node and output_nr are
    # read directly (get_gradient_edge costs a Python call each, every forward)
    output_nodes = [tensor.grad_fn for tensor in outputs]
    for tensor in inputs:
        node = tensor.grad_fn if tensor.grad_fn is not None else get_gradient_edge(tensor).node
        # an input node that is also an output node would hold itself
        if node not in output_nodes:
            call.input_nodes.append(node)
    for index, (tensor, node) in enumerate(zip(outputs, output_nodes)):
        call.output_shapes.append(tensor.shape)
        metadata = node.metadata
        slots = metadata.get(METADATA_KEY)
        if slots is None:
            slots = metadata[METADATA_KEY] = []
            new_nodes.append(node)
        slots.append(OutputSlot(call, index, tensor.output_nr))
    return new_nodes


def collect_calls(root: Node) -> Tuple[List[ModuleCall], Dict[Node, Set[Node]]]:
    """Recorded calls and gradient accumulators reachable from ``root``.

    Sets ``call.edges`` (one gradient edge per recorded output). Outputs that
    do not reach ``root`` keep no edge and receive zero gradients. The
    accumulators (``node.variable`` is the leaf tensor, e.g. a parameter)
    map to the nodes that consume them.
    """
    return _walk([root], None)


def collect_reached_calls(
    reached: List[Node],
) -> Tuple[List[ModuleCall], Dict[Node, Set[Node]]]:
    """:func:`collect_calls` for a backward pass without a root known to
    curvext: the graph below the recorded output nodes in ``reached`` (those
    the backward pass executed), not entering a node with records that is
    not among them (the backward pass did not get there: ``inputs=`` of
    ``backward`` or ``torch.autograd.grad`` stopped before it).

    Only calls with an output on a reached node are returned.
    """
    return _walk(list(reached), set(reached))


def _walk(
    roots: List[Node], reached: Optional[Set[Node]]
) -> Tuple[List[ModuleCall], Dict[Node, Set[Node]]]:
    """The walk of :func:`collect_calls` from ``roots``; with ``reached``, a
    node holding records that is not in it is not entered."""
    calls: Dict[int, ModuleCall] = {}
    consumers: Dict[Node, Set[Node]] = {}
    seen = set()
    stack = list(roots)
    while stack:
        node = stack.pop()
        if node is None or node in seen:
            continue
        seen.add(node)
        slots = node.metadata.get(METADATA_KEY, ())
        if slots and reached is not None and node not in reached:
            continue
        for slot in slots:
            call = calls.setdefault(id(slot.call), slot.call)
            if not call.edges:
                call.edges = [None] * len(call.output_shapes)
            call.edges[slot.index] = GradientEdge(node, slot.output_nr)
        for next_node, _ in node.next_functions:
            if next_node is not None and hasattr(next_node, "variable"):
                consumers.setdefault(next_node, set()).add(node)
            stack.append(next_node)
    return list(calls.values()), consumers


def call_region(call: ModuleCall) -> List[Node]:
    """The nodes between ``call``'s recorded outputs and its inputs (the
    operations of its forward, and the leaves they read, such as its
    parameters' accumulators)."""
    stop = set(call.input_nodes)
    region, seen = [], set()
    stack = [edge.node for edge in call.edges if edge is not None]
    while stack:
        node = stack.pop()
        if node is None or node in seen or node in stop:
            continue
        seen.add(node)
        region.append(node)
        stack.extend(child for child, _ in node.next_functions)
    return region


def post_order(root: Node) -> List[Node]:
    """The nodes below ``root``, every node after all the nodes it depends on."""
    order: List[Node] = []
    seen: Set[Node] = set()
    stack: List[Tuple[Node, bool]] = [(root, False)]
    while stack:  # without recursion: graphs may be deep
        node, done = stack.pop()
        if done:
            order.append(node)
            continue
        if node in seen:
            continue
        seen.add(node)
        stack.append((node, True))
        for child, _ in node.next_functions:
            if child is not None and child not in seen:
                stack.append((child, False))
    return order


def reach_masks(order: List[Node], own_bits: Callable[[Node], int]) -> Dict[Node, int]:
    """For every node of ``order``: the bits of ``own_bits`` of it and of
    every node below it."""
    reach: Dict[Node, int] = {}
    for node in order:
        mask = own_bits(node)
        for child, _ in node.next_functions:
            if child is not None:
                mask |= reach.get(child, 0)
        reach[node] = mask
    return reach


#: Autograd nodes that only move entries of their input (views, copies,
#: casts, slices): a chain of them between a model output ``[N, T, ...]``
#: and the loss input is a flatten such as ``logits.view(-1, V)``.
_MOVING_NODES = {
    "ViewBackward0",
    "UnsafeViewBackward0",
    "ReshapeAliasBackward0",
    "CloneBackward0",
    "ToCopyBackward0",
    "AliasBackward0",
    "SliceBackward0",
    "TransposeBackward0",
    "PermuteBackward0",
    "TBackward0",
    "SqueezeBackward0",
    "SqueezeBackward1",
    "UnsqueezeBackward0",
}


def flattened_samples(edge: GradientEdge, loss_input: Tensor) -> Optional[int]:
    """Number of samples ``S`` when the rows of ``loss_input`` are the
    positions of ``S`` samples, flattened sample-major; else ``None``.

    The language-model pattern ``loss_fn(logits.view(-1, V), y.view(-1))``
    with ``logits [N, T, V]`` (or ``logits[:, :-1].contiguous().view(-1, V)``)
    gives ``N·T`` rows of which ``T`` belong to each sequence. Following the
    chain of view and copy nodes back from the loss input to the tensor
    ``[S, ...]`` it was made from (axis 0 holds the samples, as for any loss
    input), the rows' ids are backpropagated through the chain: row ``r``
    must land in sample ``r // T`` for every ``r``. A flatten in another
    order (``logits.transpose(0, 1).reshape(-1, V)``, time-major) is refused,
    naming the order found.

    Args:
        edge: Gradient edge of the loss input.
        loss_input: The loss input ``[R, ...]`` (detached).
    """
    rows = loss_input.shape[0] if loss_input.dim() > 0 else 0
    source, chain, casts = edge, 0, False
    while (
        source.node is not None
        and type(source.node).__name__ in _MOVING_NODES
        and not _is_unflattened_output(source, rows)
    ):
        following = [(n, nr) for n, nr in source.node.next_functions if n is not None]
        if len(following) != 1:
            return None
        casts = casts or type(source.node).__name__ == "ToCopyBackward0"
        source, chain = GradientEdge(*following[0]), chain + 1
    if chain == 0 or rows == 0:
        return None
    # a cast may lead to bfloat16, exact for integers up to 256 only
    dtype = torch.bfloat16 if casts else loss_input.dtype
    row_ids = _backpropagated_ids(edge, source, loss_input, dtype)  # [S, ...], -1: no row
    samples = row_ids.shape[0] if row_ids.dim() > 0 else 0
    if samples in (0, rows) or rows % samples:
        return None
    per_sample = rows // samples
    owner = torch.arange(samples, device=row_ids.device).view(-1, *[1] * (row_ids.dim() - 1))
    present = row_ids >= 0
    if not bool(((row_ids // per_sample == owner) | ~present).all()):
        first = row_ids[0][present[0]].unique()[:4].tolist()
        raise ValueError(
            f"The loss input [{rows}, ...] is a flatten of a tensor of shape "
            f"{tuple(row_ids.shape)} whose axis 0 holds {samples} samples, but its rows "
            f"are not grouped by sample (sample 0 has rows {first}...; a time-major "
            "flatten such as x.transpose(0, 1).reshape(-1, V)?). curvext needs the "
            "rows of one sample to be consecutive: flatten [N, T, V] as "
            "x.reshape(-1, V), with the samples on axis 0."
        )
    return samples


def _is_unflattened_output(edge: GradientEdge, rows: int) -> bool:
    """Whether ``edge`` is an output of a recorded module call with other
    than ``rows`` entries on axis 0: a module's output holds its samples on
    the axis the module's rule knows, so the walk of
    :func:`flattened_samples` stops there (a container whose output is the
    flattened tensor itself is walked through)."""
    slots = edge.node.metadata.get(METADATA_KEY, ()) if edge.node is not None else ()
    return any(
        slot.output_nr == edge.output_nr
        and slot.call.output_shapes[slot.index][:1] != torch.Size([rows])
        for slot in slots
    )


def _backpropagated_ids(
    edge: GradientEdge, source: GradientEdge, loss_input: Tensor, dtype: torch.dtype
) -> Tensor:
    """Where each row of the loss input lands in the tensor at ``source``:
    its row index, or -1 for entries no row comes from (sliced off).

    The ids are sent as digits small enough to be exact in ``dtype`` (a view
    chain only moves entries), one backward per digit.
    """
    rows = loss_input.shape[0]
    base = max(2, int(1 / torch.finfo(dtype).eps) // 2)
    ids = torch.arange(rows, device=loss_input.device)
    shape = (rows,) + (1,) * (loss_input.dim() - 1)
    total, scale = None, 1
    remaining = rows
    while True:
        digit = (ids // scale) % base + 1  # 0 marks entries without a row
        probe = digit.to(loss_input.dtype).view(shape).expand_as(loss_input).contiguous()
        (landed,) = torch.autograd.grad([edge], [source], [probe], retain_graph=True)
        landed = landed.round().long()
        total = (landed - 1) * scale if total is None else total + (landed - 1) * scale
        remaining //= base
        scale *= base
        if remaining == 0:
            return torch.where(landed > 0, total, -1)
