"""Which rule handles which trainable parameter of a loss's graph.

A parameter is handled by the rule of the module that owns it, if that
module was called and every use of the parameter lies inside its calls.
Otherwise it is handled by the nearest called ancestor with the generic
rule, whose output depends on all of the parameter's uses within it:

- ``MultiheadAttention`` uses its ``out_proj`` weight without calling
  ``out_proj``;
- a parent computes ``F.linear(h, self.embed.weight)`` after calling
  ``self.embed`` (tied input/output embeddings, fairseq style).

Parameters that reach the loss outside of every recorded call get nothing
and a warning naming them.
"""

from __future__ import annotations

import warnings
from collections import OrderedDict
from typing import Dict, List, Set, Tuple

from torch import Tensor, nn
from torch.autograd.graph import Node

from curvext.recording import ModuleCall, call_region
from curvext.rules import SharedParameterRule, rules_for
from curvext.rules.base import ModuleRule, own_trainable


class Target:
    """A trainable parameter and the rule(s) that reduce its columns."""

    def __init__(self, param: Tensor, owners: List[Tuple[ModuleRule, str]]):
        self.param = param
        self.owners = owners
        if len(owners) == 1:
            self.rule, self.name = owners[0]
        else:
            self.rule, self.name = SharedParameterRule(owners), owners[0][1]

    def grads(self, call_grads: Dict[int, object]):
        """The ``grads`` argument of the rule's reductions for one chunk."""
        per_owner = [[call_grads[id(c)] for c in rule.calls] for rule, _ in self.owners]
        return per_owner[0] if len(self.owners) == 1 else per_owner


def _inside_consumers(calls: List[ModuleCall], accumulators: Set[Node]) -> Set[Node]:
    """Nodes inside ``calls`` (between outputs and inputs) that consume a
    parameter through one of ``accumulators``."""
    return {
        node
        for call in calls
        for node in call_region(call)
        if any(child in accumulators for child, _ in node.next_functions)
    }


def _next_to_outputs(calls: List[ModuleCall]) -> Set[Node]:
    """The output nodes of ``calls`` and their children that are not input
    nodes: the first two levels of :func:`call_region` (a ``Linear``'s
    ``AddmmBackward0`` and the ``TBackward0`` of its weight)."""
    nodes = set()
    for call in calls:
        stop = call.input_nodes
        for edge in call.edges:
            if edge is not None:
                nodes.add(edge.node)
                nodes.update(
                    child
                    for child, _ in edge.node.next_functions
                    if child is not None and child not in stop
                )
    return nodes


def _used_outside(
    module: nn.Module,
    calls: List[ModuleCall],
    consumers: Dict[Node, Set[Node]],
    accumulator_of: Dict[int, Node],
) -> List[str]:
    """Own trainable parameters of ``module`` with a use outside its calls
    (``accumulator_of``: the gradient accumulator of each leaf in the graph,
    by the leaf's ``id``)."""
    accumulators = {}
    for name in own_trainable(module):
        node = accumulator_of.get(id(module._parameters[name]))
        if node is not None:
            accumulators[node] = name
    if not accumulators:
        return []
    near = _next_to_outputs(calls)
    if all(consumers[node] <= near for node in accumulators):
        return []  # every use at or next to an output node: inside (the common layer)
    inside = _inside_consumers(calls, set(accumulators))
    return [name for node, name in accumulators.items() if not consumers[node] <= inside]


def assign(
    calls: List[ModuleCall], consumers: Dict[Node, Set[Node]], batch_size: int
) -> List[Target]:
    """One :class:`Target` per trainable parameter in the graph.

    Args:
        calls: Recorded calls in the graph.
        consumers: For each gradient accumulator (leaf) in the graph, the
            nodes that consume it.
        batch_size: ``N`` of the loss input.
    """
    calls_by_module: Dict[int, List[ModuleCall]] = OrderedDict()
    for call in calls:
        calls_by_module.setdefault(id(call.module), []).append(call)
    modules = {key: module_calls[0].module for key, module_calls in calls_by_module.items()}
    # the accumulators' leaves, read from the graph (get_gradient_edge of a
    # parameter builds a view each time)
    accumulator_of = {id(node.variable): node for node in consumers}
    excluded = {
        key: _used_outside(modules[key], calls_by_module[key], consumers, accumulator_of)
        for key in modules
    }
    covered = {
        id(module._parameters[name])
        for key, module in modules.items()
        for name in own_trainable(module)
        if name not in excluded[key]
    }
    leaves = [node.variable for node in consumers]
    uncovered = {
        id(leaf): leaf
        for leaf in leaves
        if isinstance(leaf, Tensor) and leaf.requires_grad and id(leaf) not in covered
    }
    extra_names = _nearest_ancestors(
        modules, excluded, uncovered, calls_by_module, consumers, accumulator_of
    )

    owners: Dict[int, list] = OrderedDict()
    params: Dict[int, Tensor] = {}
    for key, module_calls in calls_by_module.items():
        for rule in rules_for(modules[key], module_calls, extra_names[key], excluded[key]):
            rule.check_batch(batch_size)
            for name in rule.param_names():
                param = rule.param(name)
                owners.setdefault(id(param), []).append((rule, name))
                params[id(param)] = param
    return [Target(params[key], owner) for key, owner in owners.items()]


def _nearest_ancestors(
    modules, excluded, uncovered, calls_by_module, consumers, accumulator_of
) -> Dict[int, List[str]]:
    """For each called module, the uncovered parameters it is nearest to,
    among the modules whose calls hold every use of the parameter (a use in
    a forward hook of the ancestor, after its recorded output, is outside)."""
    extra_names: Dict[int, List[str]] = {key: [] for key in modules}
    if not uncovered:
        return extra_names
    nearest: Dict[int, Tuple[int, int, str]] = {}
    for key, module in modules.items():
        candidates = {
            accumulator_of[id(param)]: name  # uncovered leaves are in the graph
            for name, param in module.named_parameters()
            if id(param) in uncovered and name not in excluded[key]
        }  # an owner using it outside its calls cannot cover it
        inside = _inside_consumers(calls_by_module[key], set(candidates)) if candidates else set()
        for node, name in candidates.items():
            if not consumers[node] <= inside:
                continue  # a use outside this module's calls: it cannot cover it
            param = node.variable
            depth = name.count(".")
            if depth < nearest.get(id(param), (depth + 1,))[0]:
                nearest[id(param)] = (depth, key, name)
    for _, key, name in nearest.values():
        extra_names[key].append(name)
    missing = [
        leaf
        for key, leaf in uncovered.items()
        if key not in nearest and isinstance(leaf, nn.Parameter)
    ]
    if missing:
        shapes = ", ".join(str(tuple(leaf.shape)) for leaf in missing)
        warnings.warn(
            f"curvext computes nothing for {len(missing)} parameter(s) of shapes "
            f"{shapes}: they reach the loss outside of every call of an extended "
            "module (or also in a forward hook, after the output curvext records). "
            "Call extend() on the model that uses them (a parent module that uses "
            "them in its forward covers them), or use them inside a forward.",
            stacklevel=5,
        )
    return extra_names
