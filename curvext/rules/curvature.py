r"""The second-order terms of the graph's own operations (Hessian diagonals).

The Hessian of a loss :math:`L(\theta)` computed through a graph of
operations is the GGN plus one term per operation that is curved in its
inputs:

.. math::
    \nabla^2_\theta L = J^\top \nabla^2 \ell \, J
        + \sum_{a} J_a^\top \operatorname{diag}(g_a \odot \phi_a''(x_a)) J_a

for elementwise operations :math:`y_a = \phi_a(x_a)` (``tanh``, ``sigmoid``,
GELU, ...), with :math:`g_a` the gradient of the loss w.r.t. :math:`y_a`
and :math:`J_a` the Jacobian of :math:`x_a` w.r.t. the parameters. Linear
operations (views, sums, pooling by averages, piecewise linear activations)
add nothing. A product of two tensors (matrix products, convolutions,
``x * y``) is curved only across its two factors, so it adds nothing to the
*diagonal* unless one parameter reaches both factors (attention's
:math:`QK^\top`, a weight tied across two layers, ``x * x``). Everything
else (softmax or normalisation of a tensor that depends on parameters,
division by one, an operation this module does not know) is refused, naming
the operation.

:func:`curved_nodes` walks the graph below the loss input and returns the
elementwise operations with their :math:`\phi''(x_a)`; the engine pushes the
columns :math:`\sqrt{|g_a \phi_a''|}\, e_f` from each one's input
(:mod:`curvext.engine`).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Dict, List, Optional, Set, Tuple

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.autograd.graph import GradientEdge, Node

from curvext.recording import ModuleCall, call_region, post_order, reach_masks

#: Operations without second-order term: linear, or piecewise linear
#: (second derivative zero almost everywhere).
LINEAR_OPS = frozenset(
    """
    AccumulateGrad AddBackward0 AddBackward1 SubBackward0 SubBackward1 NegBackward0
    ViewBackward0 UnsafeViewBackward0 ReshapeAliasBackward0 AsStridedBackward0
    CloneBackward0 ToCopyBackward0 AliasBackward0 ExpandBackward0 RepeatBackward0
    SliceBackward0 SelectBackward0 NarrowBackward0 IndexBackward0 IndexSelectBackward0
    GatherBackward0 TakeBackward0 TransposeBackward0 PermuteBackward0 TBackward0
    SqueezeBackward0 SqueezeBackward1 SqueezeBackward2 UnsqueezeBackward0 FlipBackward0
    RollBackward0 CatBackward0 StackBackward0 SplitBackward0 SplitWithSizesBackward0
    UnbindBackward0 SumBackward0 SumBackward1 MeanBackward0 MeanBackward1 CumsumBackward0
    ConstantPadNdBackward0 ReflectionPad1DBackward0 ReflectionPad2DBackward0
    ReplicationPad1DBackward0 ReplicationPad2DBackward0 PixelShuffleBackward0
    PixelUnshuffleBackward0 Im2ColBackward0 Col2ImBackward0 TrilBackward0 TriuBackward0
    ReluBackward0 ThresholdBackward0 LeakyReluBackward0 LeakyReluBackward1
    HardtanhBackward0 HardtanhBackward1 HardsigmoidBackward0 AbsBackward0
    MaxBackward0 MaxBackward1 MinBackward0 MinBackward1 AmaxBackward0 AminBackward0
    MaxPool1DWithIndicesBackward0 MaxPool2DWithIndicesBackward0
    MaxPool3DWithIndicesBackward0 AdaptiveMaxPool1DBackward0 AdaptiveMaxPool2DBackward0
    AdaptiveMaxPool3DBackward0 AvgPool2DBackward0 AvgPool3DBackward0
    AdaptiveAvgPool2DBackward0 AdaptiveAvgPool3DBackward0 UpsampleNearest1DBackward0
    UpsampleNearest2DBackward0 UpsampleLinear1DBackward0 UpsampleBilinear2DBackward0
    NativeDropoutBackward0 EmbeddingBackward0 WhereBackward0 MaskedFillBackward0
    BackwardHookFunctionBackward RsubBackward0 RsubBackward1 ClampBackward0 ClampBackward1
    ClampMinBackward0 ClampMaxBackward0 MaximumBackward0 MinimumBackward0 FmaxBackward0
    FminBackward0 SoftshrinkBackward0 HardshrinkBackward0 RreluWithNoiseBackward0
    UnsafeSplitBackward0 UnsafeSplitWithSizesBackward0 DiagonalBackward0
    DiagEmbedBackward0 UnfoldBackward0 MaskedSelectBackward0 ScatterBackward0
    ScatterBackward1 ScatterAddBackward0 IndexPutBackward0 IndexFillBackward0
    IndexAddBackward0 IndexCopyBackward0 UpsampleBicubic2DBackward0
    UpsampleNearestExact1DBackward0 UpsampleNearestExact2DBackward0
    UpsampleNearest3DBackward0 UpsampleTrilinear3DBackward0 ReplicationPad3DBackward0
    ReflectionPad3DBackward0 NansumBackward0 TraceBackward0 SortBackward0 TopkBackward0
    KthvalueBackward0 MedianBackward0 MedianBackward1 CummaxBackward0 CumminBackward0
    NarrowCopyBackward0 ChannelShuffleBackward0 NanToNumBackward0 SgnBackward0
    SignBackward0 RoundBackward0 FloorBackward0 CeilBackward0 TruncBackward0
    AvgPool1DBackward0 AdaptiveAvgPool1DBackward0 ExpandAsBackward0 ViewAsBackward0
    LerpBackward0 FracBackward0 TrilBackward0 CopyBackwards
    """.split()
)

#: Divisions ``x / y``: linear in ``x``.
DIVISIONS = frozenset({"DivBackward0", "DivBackward1", "DivBackward2"})

#: Products: for each, the positions of its factors among ``next_functions``
#: (other inputs enter additively, as the bias of ``addmm``).
PRODUCT_OPS: Dict[str, Tuple[int, ...]] = {
    "MulBackward0": (0, 1),
    "MmBackward0": (0, 1),
    "BmmBackward0": (0, 1),
    "MvBackward0": (0, 1),
    "DotBackward0": (0, 1),
    "AddmmBackward0": (1, 2),
    "AddmvBackward0": (1, 2),
    "BaddbmmBackward0": (1, 2),
    "ConvolutionBackward0": (0, 1),
    "AddcmulBackward0": (1, 2),
    "PreluKernelBackward0": (0, 1),
    # affine in its input with the running statistics (train mode is
    # refused by the engine: it couples the samples)
    "NativeBatchNormBackward0": (0, 1),
    "CudnnBatchNormBackward0": (0, 1),
}


def _from_input(function: Callable[..., Tensor]) -> Callable[[Node], Tensor]:
    """``phi''(x)`` by differentiating ``function`` twice at the saved input."""

    def second(node: Node) -> Tensor:
        x = node._saved_self.detach()
        with torch.enable_grad():
            x = x.requires_grad_()
            (first,) = torch.autograd.grad(function(node, x).sum(), x, create_graph=True)
            (second,) = torch.autograd.grad(first.sum(), x)
        return second

    return second


def _tanh(node: Node) -> Tensor:
    y = node._saved_result
    return -2 * y * (1 - y * y)


def _sigmoid(node: Node) -> Tensor:
    y = node._saved_result
    return y * (1 - y) * (1 - 2 * y)


def _elu_from_result(node: Node) -> Tensor:
    # inplace ELU saves its result y; for x < 0, y = s a (exp(i x) - 1) and
    # phi'' = s a i^2 exp(i x) = i^2 (y + s a)
    y, alpha = node._saved_result, node._saved_alpha
    scale, input_scale = node._saved_scale, node._saved_input_scale
    negative = input_scale**2 * (y + scale * alpha)
    return torch.where(y > 0, torch.zeros_like(y), negative)


def _celu_from_result(node: Node) -> Tensor:
    # inplace CELU: for x < 0, y = a (exp(x / a) - 1) and phi'' = exp(x / a) / a
    y, alpha = node._saved_result, node._saved_alpha
    return torch.where(y > 0, torch.zeros_like(y), (y + alpha) / alpha**2)


#: ``phi''(x_a)`` of the elementwise operations, from what their node saved.
SECOND_DERIVATIVES: Dict[str, Callable[[Node], Tensor]] = {
    "TanhBackward0": _tanh,
    "SigmoidBackward0": _sigmoid,
    "ExpBackward0": lambda node: node._saved_result,
    "SqrtBackward0": lambda node: -0.25 / node._saved_result**3,
    "RsqrtBackward0": lambda node: 0.75 * node._saved_result**5,
    "ReciprocalBackward0": lambda node: 2 * node._saved_result**3,
    "EluBackward1": _elu_from_result,
    "CeluBackward1": _celu_from_result,
    "GeluBackward0": _from_input(lambda n, x: F.gelu(x, approximate=n._saved_approximate)),
    "SiluBackward0": _from_input(lambda n, x: F.silu(x)),
    "MishBackward0": _from_input(lambda n, x: F.mish(x)),
    "HardswishBackward0": _from_input(lambda n, x: F.hardswish(x)),
    "SoftplusBackward0": _from_input(
        lambda n, x: F.softplus(x, beta=n._saved_beta, threshold=n._saved_threshold)
    ),
    "EluBackward0": _from_input(
        lambda n, x: (
            n._saved_scale
            * torch.where(x > 0, x, n._saved_alpha * torch.expm1(n._saved_input_scale * x))
        )
    ),
    "CeluBackward0": _from_input(lambda n, x: F.celu(x, alpha=n._saved_alpha)),
    "LogSigmoidBackward0": _from_input(lambda n, x: F.logsigmoid(x)),
    "LogBackward0": _from_input(lambda n, x: torch.log(x)),
    "SinBackward0": _from_input(lambda n, x: torch.sin(x)),
    "CosBackward0": _from_input(lambda n, x: torch.cos(x)),
    "PowBackward0": _from_input(lambda n, x: x**n._saved_exponent),
}


@dataclass(eq=False)
class CurvedNode:
    """An elementwise operation ``y = phi(x)`` whose ``phi''`` is not zero.

    Attributes:
        name: The autograd node's class name (``TanhBackward0``).
        output: Gradient edge of ``y`` (where the loss gradient ``g`` is read).
        input: Gradient edge of ``x`` (where the columns start).
        second_derivative: ``phi''(x)``, shaped like ``x``.
        calls: The recorded calls with an output below ``x`` (the only ones
            its columns reach).
    """

    name: str
    output: GradientEdge
    input: GradientEdge
    second_derivative: Tensor
    calls: List[ModuleCall]


#: What the refusals recommend instead.
_INSTEAD = (
    "For the diagonal of this Hessian use a matrix-free estimate: "
    "curvext.linalg.hutchinson_diag or xdiag on curvext.operators.HessianOperator "
    "(or GGNDiag for the GGN's)."
)


def _op(node: Node) -> str:
    return type(node).__name__.replace("Backward0", "").replace("Backward1", "")


def curved_nodes(
    root: Node, owners: List[Tuple[List[ModuleCall], List[Tensor]]]
) -> List[CurvedNode]:
    """The elementwise curved operations below ``root`` that parameters reach.

    Args:
        root: The loss input's autograd node.
        owners: For each rule, its calls and the parameters it handles.

    Raises:
        NotImplementedError: for an operation whose second-order term is not
            elementwise (and reached by parameters), naming it; or for a
            curved operation inside a module call whose own parameters it
            reaches (the module's rule reads gradients at the module's output
            only).
    """
    order = post_order(root)
    # bit masks of the parameters (their accumulators) each node depends on,
    # and of the recorded call outputs below each node; inputs with
    # requires_grad are not parameters
    handled = {id(p) for _, params in owners for p in params}
    leaves = [n for n in order if hasattr(n, "variable") and id(n.variable) in handled]
    bits = {node: 1 << i for i, node in enumerate(leaves)}
    reach = reach_masks(order, lambda node: bits.get(node, 0))
    calls = list({id(c): c for rule_calls, _ in owners for c in rule_calls}.values())
    call_bits: Dict[Node, int] = {}
    for index, call in enumerate(calls):
        for edge in call.edges:
            if edge is not None:
                call_bits[edge.node] = call_bits.get(edge.node, 0) | 1 << index
    below = reach_masks(order, lambda node: call_bits.get(node, 0))
    inside = _call_regions(owners, bits)
    found = []
    for node, params in reach.items():
        if not params:
            continue
        name = type(node).__name__
        if name in LINEAR_OPS:
            continue
        if name in PRODUCT_OPS:
            _check_product(node, reach)
            continue
        if name == "NativeLayerNormBackward0" or name == "NativeGroupNormBackward0":
            if reach.get(node.next_functions[0][0], 0):
                raise NotImplementedError(
                    f"The Hessian diagonal through {_op(node)} is not computed: the "
                    "normalisation of a tensor that depends on parameters has a "
                    "second-order term that is not elementwise. " + _INSTEAD
                )
            continue
        if name == "CopySlices":  # an in-place op on a view: the op is wrapped
            wrapped = getattr(node, "_wrapped_node", None)
            if wrapped is not None and type(wrapped).__name__ in LINEAR_OPS:
                continue
            wrapped_name = _op(wrapped) if wrapped is not None else "operation"
            raise NotImplementedError(
                f"The Hessian diagonal through an in-place {wrapped_name} on a view "
                "(x[:, :k].tanh_(), x[:, :k] /= y) is not computed: autograd hides the "
                "operation inside CopySlices. Write it out of place "
                "(torch.cat([x[:, :k].tanh(), x[:, k:]], 1)). " + _INSTEAD
            )
        if name in DIVISIONS:
            divisor = node.next_functions[1][0] if len(node.next_functions) > 1 else None
            if divisor is None or not reach.get(divisor, 0):
                continue  # a division by a constant is linear
            raise NotImplementedError(
                f"The Hessian diagonal through {_op(node)} is not computed: the "
                "divisor depends on parameters, so its second-order term is not "
                "elementwise in what curvext tracks. " + _INSTEAD
            )
        if name not in SECOND_DERIVATIVES:
            raise NotImplementedError(
                f"curvext does not know the second-order term of the operation "
                f"{_op(node)} ({name}), which parameters reach, so it cannot compute "
                f"the Hessian diagonal exactly. " + _INSTEAD
            )
        producer, output_nr = node.next_functions[0]
        if producer is None or not reach.get(producer, 0):
            continue
        owner = inside.get(node)
        if owner is not None and reach[producer] & owner[1]:
            raise NotImplementedError(
                f"{_op(node)} inside {type(owner[0].module).__name__} acts on a tensor "
                f"that depends on that module's own parameters; curvext reads the "
                "module's gradients at its output and cannot add this second-order "
                "term. Apply the activation outside the module (as nn.Tanh() after "
                "it). " + _INSTEAD
            )
        found.append(
            CurvedNode(
                name=name,
                output=GradientEdge(node, 0),
                input=GradientEdge(producer, output_nr),
                second_derivative=SECOND_DERIVATIVES[name](node).detach(),
                calls=[c for i, c in enumerate(calls) if below.get(producer, 0) >> i & 1],
            )
        )
    return found


def path_second_derivative(node: Node, what: str) -> Optional[Tensor]:
    """``phi''(x)`` of the operation of ``node`` in the input on a single path
    of operations (KFRA's), shaped like ``x``; ``None`` where the operation
    is linear in that input (a product or a division with its other factor
    off the path included).

    Raises:
        NotImplementedError: naming the operation (``what`` says who asks),
            where its second-order term is not elementwise or unknown, or
            hidden in ``CopySlices``.
    """
    name = type(node).__name__
    if name == "CopySlices" and getattr(node, "_wrapped_node", None) is not None:
        name = type(node._wrapped_node).__name__  # an in-place op on a view
        if name not in LINEAR_OPS:
            raise NotImplementedError(
                f"{what}: an in-place {name.replace('Backward0', '')} on a view "
                "(x[:, :k].tanh_()) hides its operation inside CopySlices. Write it "
                "out of place."
            )
    if name in LINEAR_OPS or name in PRODUCT_OPS or name in DIVISIONS:
        return None
    if name not in SECOND_DERIVATIVES:
        raise NotImplementedError(
            f"{what} adds the second-order terms of elementwise operations; "
            f"{name.replace('Backward0', '')} on its path has one that is not "
            "elementwise (or unknown to curvext). Use the GGN (KFRA()), or "
            "HMP()/DiagHessian() for the exact Hessian block by block."
        )
    return SECOND_DERIVATIVES[name](node).detach()


def _check_product(node: Node, reach: Dict[Node, int]) -> None:
    name = type(node).__name__
    if name in ("NativeBatchNormBackward0", "CudnnBatchNormBackward0"):
        if getattr(node, "_saved_training", False):
            return  # refused by the engine for every extension (couples samples)
    masks = []
    for index in PRODUCT_OPS[name]:
        if index < len(node.next_functions):
            child = node.next_functions[index][0]
            masks.append(reach.get(child, 0) if child is not None else 0)
    for i, first in enumerate(masks):
        for second in masks[i + 1 :]:
            if first & second:
                raise NotImplementedError(
                    f"The Hessian diagonal through {_op(node)} is not computed: a "
                    "parameter reaches both of its factors (attention's scores, a "
                    "weight tied across layers, x * x), so its second-order term is "
                    "not elementwise. " + _INSTEAD
                )


def _call_regions(
    owners: List[Tuple[List[ModuleCall], List[Tensor]]], bits: Dict[Node, int]
) -> Dict[Node, Tuple[ModuleCall, int]]:
    """Nodes inside each call (between its outputs and its inputs) → the call
    and the bit mask (``bits``) of the parameters its rule handles."""
    regions: Dict[Node, Tuple[ModuleCall, int]] = {}
    for rule_calls, params in owners:
        own = {id(p) for p in params}
        for call in rule_calls:
            _add_region(call, own, bits, regions)
    return regions


def _add_region(call: ModuleCall, own: Set[int], bits: Dict[Node, int], regions) -> None:
    region = call_region(call)
    mask = 0
    for node in region:
        if hasattr(node, "variable") and id(node.variable) in own:
            mask |= bits.get(node, 0)
    if mask:
        for node in region:
            if not hasattr(node, "variable"):
                regions.setdefault(node, (call, mask))


__all__ = [
    "CurvedNode",
    "curved_nodes",
    "path_second_derivative",
    "DIVISIONS",
    "LINEAR_OPS",
    "PRODUCT_OPS",
    "SECOND_DERIVATIVES",
]
