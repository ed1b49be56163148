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
        edges: Filled by the engine: gradient edge of each recorded output.
        couples_samples: The call mixes samples (BatchNorm in train mode).
        input_nodes: Autograd nodes of the inputs that require grad (they
            bound the call's part of the graph).
    """

    module: nn.Module
    args: Tuple
    kwargs: Dict
    output_shapes: List[torch.Size] = field(default_factory=list)
    edges: List[GradientEdge] = field(default_factory=list)
    couples_samples: bool = False
    input_nodes: List[Node] = field(default_factory=list)


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


def graph_outputs(output) -> List[Tensor]:
    """Tensors in a module's output that are part of an autograd graph."""
    if isinstance(output, Tensor):
        return [output] if output.grad_fn is not None else []
    if isinstance(output, (tuple, list)):
        return [t for o in output for t in graph_outputs(o)]
    if isinstance(output, dict):
        return [t for o in output.values() for t in graph_outputs(o)]
    return []


def graph_inputs(inputs) -> List[Tensor]:
    """Tensors among a call's inputs that require grad."""
    leaves, _ = torch.utils._pytree.tree_flatten(inputs)
    return [t for t in leaves if isinstance(t, Tensor) and t.requires_grad]


def attach(call: ModuleCall, inputs: List[Tensor], outputs: List[Tensor]):
    """Store ``call`` on the autograd nodes that produced ``outputs``."""
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
