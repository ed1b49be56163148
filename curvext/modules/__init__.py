"""One rule per module type: the parameter Jacobian exposed as reductions."""

from __future__ import annotations

from typing import List

from torch import Tensor, nn

from curvext.modules.base import ModuleRule
from curvext.modules.conv import ConvRule, ConvTransposeRule
from curvext.modules.embedding import EmbeddingRule
from curvext.modules.generic import CurvextNote, GenericRule
from curvext.modules.linear import LinearRule
from curvext.modules.norm import RULES as NORM_RULES
from curvext.recording import ModuleCall

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


def rule_for(module: nn.Module, calls: List[ModuleCall]) -> ModuleRule:
    """The rule of ``module``'s exact type, else the generic ``torch.func`` rule.

    Subclasses of built-in layers get the generic rule: they may override
    ``forward``.
    """
    return RULES.get(type(module), GenericRule)(module, calls)


class SharedParameterRule(ModuleRule):
    """One parameter used by several modules (e.g. tied input/output embeddings).

    The per-sample vectors of all owners are summed before any reduction.
    """

    def __init__(self, owners: List[tuple]):
        self.owners = owners  # (rule, name) pairs
        self.module = owners[0][0].module
        self.calls = owners[0][0].calls
        self._name = owners[0][1]

    def param(self, name):
        return self.owners[0][0].param(self._name)

    def per_sample(self, name, grads) -> Tensor:
        return sum(rule.per_sample(own, g) for (rule, own), g in zip(self.owners, grads))

    def _chunked(self, name, grads, reduce):
        return reduce(self.per_sample(name, grads))

    def kfac_grad_factor(self, name, grads, approx):
        owners = ", ".join(type(rule.module).__name__ for rule, _ in self.owners)
        raise NotImplementedError(
            f"KFAC is not defined for a parameter shared by several modules "
            f"({owners}): the sum of their Kronecker products is not one. Use "
            "GGNDiag or SqrtGGN for it, or untie the parameter."
        )


__all__ = ["ModuleRule", "rule_for", "SharedParameterRule", "CurvextNote", "RULES"]
