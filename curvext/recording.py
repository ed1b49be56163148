"""What a forward pass leaves behind for the engine.

A call of an extended module with trainable parameters is recorded as a
:class:`ModuleCall` (detached inputs, output shapes). The record is stored in
the ``metadata`` dict of the autograd node that produced each output, so it
lives exactly as long as the graph does: a forward pass that is never
backpropagated leaks nothing, and the engine finds the records of one loss by
walking that loss's graph (:func:`collect_calls`), never a global tape.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Dict, List, Set, Tuple

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
            ``args``: no pre-hook, global hook or earlier forward hook ran.
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


def graph_outputs(output) -> Tuple[List[Tensor], List[int]]:
    """Floating-point tensors in a module's output that are part of an
    autograd graph, and their positions among all floating-point ones."""
    floating = [t for t in output_tensors(output) if t.is_floating_point()]
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
    tensors = [t for t in output_tensors(output) if t.grad_fn is not None]
    edges = {(t.grad_fn, get_gradient_edge(t).output_nr) for t in tensors}
    one_node = len({t.grad_fn for t in tensors}) == 1 and len(edges) == len(tensors)
    if len(tensors) < 2 or one_node or type(output) not in (tuple, list):
        return output

    def copy(obj):
        if isinstance(obj, Tensor):
            return obj.clone() if obj.grad_fn is not None else obj
        if type(obj) in (tuple, list):
            return type(obj)(copy(o) for o in obj)
        return obj

    return copy(output)


def graph_inputs(inputs) -> List[Tensor]:
    """Tensors among a call's inputs that require grad."""
    leaves, _ = torch.utils._pytree.tree_flatten(inputs)
    return [t for t in leaves if isinstance(t, Tensor) and t.requires_grad]


def attach(
    call: ModuleCall, inputs: List[Tensor], outputs: List[Tensor], positions: List[int]
):
    """Store ``call`` on the autograd nodes that produced ``outputs``."""
    call.output_positions = list(positions)
    output_edges = [get_gradient_edge(tensor) for tensor in outputs]
    output_nodes = {edge.node for edge in output_edges}
    for tensor in inputs:
        node = get_gradient_edge(tensor).node
        # an input node that is also an output node would hold itself
        if node not in output_nodes:
            call.input_nodes.append(node)
    for index, (tensor, edge) in enumerate(zip(outputs, output_edges)):
        call.output_shapes.append(tensor.shape)
        slots = edge.node.metadata.setdefault(METADATA_KEY, [])
        slots.append(OutputSlot(call, index, edge.output_nr))


def collect_calls(root: Node) -> Tuple[List[ModuleCall], Dict[Node, Set[Node]]]:
    """Recorded calls and gradient accumulators reachable from ``root``.

    Sets ``call.edges`` (one gradient edge per recorded output). Outputs that
    do not reach ``root`` keep no edge and receive zero gradients. The
    accumulators (``node.variable`` is the leaf tensor, e.g. a parameter)
    map to the nodes that consume them.
    """
    calls: Dict[int, ModuleCall] = {}
    consumers: Dict[Node, Set[Node]] = {}
    seen = set()
    stack = [root]
    while stack:
        node = stack.pop()
        if node is None or node in seen:
            continue
        seen.add(node)
        for slot in node.metadata.get(METADATA_KEY, ()):
            call = calls.setdefault(id(slot.call), slot.call)
            if not call.edges:
                call.edges = [None] * len(call.output_shapes)
            call.edges[slot.index] = GradientEdge(node, slot.output_nr)
        for next_node, _ in node.next_functions:
            if next_node is not None and hasattr(next_node, "variable"):
                consumers.setdefault(next_node, set()).add(node)
            stack.append(next_node)
    return list(calls.values()), consumers
