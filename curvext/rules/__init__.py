"""One rule per module type: the parameter Jacobian exposed as reductions."""

from __future__ import annotations

from typing import Dict, List, Tuple, Type

from torch import Tensor, nn
from torch.nn.modules.batchnorm import _BatchNorm
from torch.nn.utils import parametrize

from curvext.recording import ModuleCall
from curvext.rules.base import ModuleRule, own_trainable
from curvext.rules.conv import ConvRule, ConvTransposeRule
from curvext.rules.embedding import EmbeddingRule
from curvext.rules.families import GramRule, KroneckerRule, OuterProductRule, PerSampleRule
from curvext.rules.generic import CurvextNote, GenericRule, RecurrentRule
from curvext.rules.linear import LinearRule
from curvext.rules.norm import RULES as NORM_RULES

RULES = {
    nn.Linear: LinearRule,
    nn.Conv1d: ConvRule,
    nn.Conv2d: ConvRule,
    nn.Conv3d: ConvRule,
    nn.ConvTranspose1d: ConvTransposeRule,
    nn.ConvTranspose2d: ConvTransposeRule,
    nn.ConvTranspose3d: ConvTransposeRule,
    nn.Embedding: EmbeddingRule,
    **NORM_RULES,
}

#: The parameters a dedicated rule knows; a module of a ruled type holding
#: others (``weight_orig`` after ``torch.nn.utils.prune``) gets the generic rule.
RULED_NAMES = {"weight", "bias"}

#: Modules without a dedicated rule whose generic rule needs to know more.
GENERIC_RULES = {nn.RNN: RecurrentRule, nn.LSTM: RecurrentRule, nn.GRU: RecurrentRule}

#: Module types whose rules users registered (:func:`register_rule`): their
#: parameters may have any names.
USER_RULES: Dict[type, Type[ModuleRule]] = {}


def register_rule(
    module_type: Type[nn.Module], rule_class: Type[ModuleRule], replace: bool = False
) -> None:
    """Give curvext a rule for your own module type (BackPACK's ``set_module_extension``).

    Without a rule, a module that owns parameters gets the generic rule:
    exact, but it re-runs the module once per sample (``torch.func``) and
    checks the result. A rule computes the per-sample vectors from what the
    forward pass recorded, as fast as the module's own backward. Write a
    subclass of :class:`~curvext.rules.base.ModuleRule` with one method,
    ``per_sample(name, grads)``: for the parameter ``name``, the vectors
    ``[K, N, *p.shape]``, where ``grads`` holds one tensor per recorded call
    of the module, ``[K, *output.shape]`` (``K`` columns pushed back to the
    module's output, samples on axis 1), and ``self.calls[i].args`` /
    ``.kwargs`` are that call's inputs (detached). Every extension then
    works (GGN diagonals, KFAC with the whole block as one factor, GGN
    eigenpairs, first-order statistics); a rule may override the families of
    :mod:`curvext.rules.families` where it knows a faster way. The rule is
    used for modules of exactly ``module_type`` (not subclasses), on every
    call that ran the module's own ``forward`` (a module with a forward
    pre-hook or a parametrization keeps the generic rule).

    Args:
        module_type: The ``nn.Module`` subclass.
        rule_class: A subclass of ``ModuleRule``.
        replace: Allow replacing a rule curvext or an earlier call gave the type.

    Raises:
        TypeError: If ``module_type`` is not an ``nn.Module`` subclass or
            ``rule_class`` not a ``ModuleRule`` subclass.
        ValueError: If the type has a rule already and ``replace`` is false.

    Example:
        >>> import torch
        >>> from torch import nn
        >>> from curvext import backpack, extend
        >>> from curvext.extensions import GGNDiag
        >>> from curvext.rules import ModuleRule, register_rule
        >>> class Scale(nn.Module):  # y = x * weight, elementwise over features
        ...     def __init__(self, dim):
        ...         super().__init__()
        ...         self.weight = nn.Parameter(torch.ones(dim))
        ...     def forward(self, x):
        ...         return x * self.weight
        >>> class ScaleRule(ModuleRule):
        ...     def per_sample(self, name, grads):
        ...         # d y / d weight = x: the vectors are g * x, one call at a time
        ...         return sum(g * call.args[0] for call, g in zip(self.calls, grads))
        >>> register_rule(Scale, ScaleRule)
        >>> model = extend(nn.Sequential(nn.Linear(3, 4), Scale(4)))
        >>> loss_fn = extend(nn.MSELoss())
        >>> loss = loss_fn(model(torch.randn(5, 3)), torch.randn(5, 4))
        >>> with backpack(GGNDiag()):
        ...     loss.backward()
        >>> model[1].weight.ggn_diag.shape
        torch.Size([4])
    """
    if not (isinstance(module_type, type) and issubclass(module_type, nn.Module)):
        raise TypeError(
            f"register_rule: module_type must be an nn.Module subclass, got {module_type!r}."
        )
    if not (isinstance(rule_class, type) and issubclass(rule_class, ModuleRule)):
        raise TypeError(
            f"register_rule: rule_class must be a subclass of curvext.rules.ModuleRule "
            f"(implementing per_sample), got {rule_class!r}."
        )
    current = RULES.get(module_type) or GENERIC_RULES.get(module_type)
    if current is not None and not replace:
        raise ValueError(
            f"register_rule: {module_type.__name__} has a rule already "
            f"({current.__name__}); pass replace=True to use {rule_class.__name__} instead."
        )
    RULES[module_type] = rule_class
    USER_RULES[module_type] = rule_class


def rules_for(
    module: nn.Module,
    calls: List[ModuleCall],
    extra_names: List[str] = (),
    excluded: List[str] = (),
) -> List[ModuleRule]:
    """Rules for ``module``'s own trainable parameters and ``extra_names``.

    Own parameters in ``excluded`` (also used outside the module's calls)
    are left to an ancestor.

    A module's own parameters get the rule of its exact type (subclasses of
    built-in layers may override ``forward``, so they get the generic rule).
    ``extra_names`` are parameters of sub-modules that the forward pass used
    without calling those sub-modules; only the generic ``torch.func`` rule
    can differentiate the module's output with respect to them.
    """
    own = [name for name in own_trainable(module) if name not in excluded]
    rule_class = RULES.get(type(module)) if runs_plain_forward(module, calls) else None
    if rule_class is None:
        names = own + list(extra_names)
        generic = GENERIC_RULES.get(type(module), GenericRule)
        return [generic(module, calls, names)] if names else []
    rules = [rule_class(module, calls, own)] if own else []
    if extra_names:
        rules.append(GenericRule(module, calls, list(extra_names)))
    return rules


def runs_plain_forward(module: nn.Module, calls: List[ModuleCall]) -> bool:
    """Whether every call of ``module`` is its class's ``forward`` on its own
    ``weight``/``bias``, as a dedicated rule assumes.

    Not so with a forward pre-hook (``torch.nn.utils.prune`` computes the
    weight in one, the old ``weight_norm`` too), a parametrization, other
    parameters than ``weight``/``bias``, or a forward
    hook that ran before curvext's recording hook (registered with
    ``prepend=True`` after ``extend``): see :attr:`ModuleCall.plain`. Forward
    hooks that run after the recording hook are harmless: the recorded output
    is the forward's, and autograd carries the hook's change in the gradient.
    Such modules get the generic rule.
    """
    return (
        all(call.plain for call in calls)
        and not parametrize.is_parametrized(module)
        and (
            type(module) in USER_RULES  # a user's rule knows its parameters' names
            or all(name in RULED_NAMES for name in module._parameters)
        )
    )


def records_calls(module: nn.Module) -> bool:
    """Whether ``extend`` records the calls of ``module``: it owns trainable
    parameters (directly or through sub-modules whose parameters its forward
    may use without calling them), or it may couple samples (BatchNorm,
    refused then); never a parametrization, which computes a weight, not a
    batch (its parameters are covered by the module it parametrizes), nor a
    plain ``nn.Sequential`` (its children's records cover it)."""
    if isinstance(module, parametrize.ParametrizationList):
        return False
    if type(module) is nn.Sequential:
        # its forward only calls its children, whose own records cover every
        # parameter: a record of the container would be read by no rule
        return False
    return next(module.parameters(), None) is not None or isinstance(module, _BatchNorm)


def positional_input(module: nn.Module, args: tuple, kwargs: dict) -> Tuple[tuple, dict]:
    """``(args, kwargs)`` of a call with the input of a module of a dedicated
    rule positional: ``linear(input=x)`` reads as ``linear(x)`` (the rules
    read ``call.args[0]``); other calls unchanged."""
    if args or "input" not in kwargs or type(module) not in RULES:
        return args, kwargs
    rest = {key: value for key, value in kwargs.items() if key != "input"}
    return (kwargs["input"],), rest


def has_trainable(module: nn.Module) -> bool:
    """Whether ``module`` or a sub-module has a parameter with ``requires_grad``
    (its own parameters first: the common case returns without a walk)."""
    for param in module._parameters.values():
        if param is not None and param.requires_grad:
            return True
    return any(has_trainable(child) for child in module._modules.values() if child is not None)


def couples_samples(module: nn.Module) -> bool:
    """Whether ``module`` mixes the samples of a batch (BatchNorm in train
    mode, or without running statistics)."""
    return isinstance(module, _BatchNorm) and (module.training or not module.track_running_stats)


def updates_state(module: nn.Module) -> bool:
    """Whether a forward pass of ``module`` changes its buffers (BatchNorm in
    train mode with running statistics)."""
    return isinstance(module, _BatchNorm) and module.training and module.track_running_stats


def constant_rows(module: nn.Module) -> List[Tuple[Tensor, int]]:
    """``(parameter, row)`` that PyTorch's backward treats as constants:
    ``Embedding(padding_idx=...)``'s padding row (forward-mode AD does not)."""
    if isinstance(module, nn.Embedding) and module.padding_idx is not None:
        return [(module.weight, module.padding_idx % module.num_embeddings)]
    return []


def is_convolution(module: nn.Module) -> bool:
    return isinstance(module, nn.modules.conv._ConvNd)


def is_transposed_convolution(module: nn.Module) -> bool:
    return isinstance(module, nn.modules.conv._ConvTransposeNd)


def is_linear_or_convolution(module: nn.Module) -> bool:
    """``Linear`` or ``Conv1d/2d/3d`` (not transposed): the layers BackPACK
    gives Kronecker factors in its own convention."""
    return isinstance(module, (nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d))


class SharedParameterRule(ModuleRule):
    """One parameter used by several modules (e.g. tied input/output embeddings).

    The per-sample vectors of all owners are summed before any reduction.
    """

    def __init__(self, owners: List[tuple]):
        self.owners = owners  # (rule, name) pairs
        self.module = owners[0][0].module
        self.calls = owners[0][0].calls
        self.batch_size = owners[0][0].batch_size
        self._name = owners[0][1]

    def param(self, name):
        return self.owners[0][0].param(self._name)

    def per_sample(self, name, grads) -> Tensor:
        return sum(rule.per_sample(own, g) for (rule, own), g in zip(self.owners, grads))

    def chunked(self, name, grads, reduce):
        return reduce(self.per_sample(name, grads))

    def kfac_grad_factor(self, name, grads, approx):
        owners = ", ".join(type(rule.module).__name__ for rule, _ in self.owners)
        raise NotImplementedError(
            f"KFAC is not defined for a parameter shared by several modules "
            f"({owners}): the sum of their Kronecker products is not one. Use "
            "GGNDiag or SqrtGGN for it, or untie the parameter."
        )


__all__ = [
    "ModuleRule",
    "register_rule",
    "PerSampleRule",
    "GramRule",
    "KroneckerRule",
    "OuterProductRule",
    "rules_for",
    "SharedParameterRule",
    "CurvextNote",
    "RULES",
    "records_calls",
    "has_trainable",
    "couples_samples",
    "updates_state",
    "constant_rows",
    "is_convolution",
]
