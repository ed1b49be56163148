"""A user's rule for their own module type (``curvext.rules.register_rule``).

The module ``Gate`` computes ``y = x * gain + shift`` over the last axis,
with parameters named neither ``weight`` nor ``bias`` and inputs ``[N, D]``
or ``[N, T, D]``; it is called twice (tied) in one model. With its rule
registered, every extension must agree with a reference by reverse mode
through the very graph curvext backpropagates (``GraphReference``), the
generic rule must not run (it would warn and re-run the module per
sample), and the refusals must name what is wrong.
"""

import warnings

import pytest
import torch
from torch import Tensor, nn

from curvext import backpack, extend
from curvext.extensions import KFAC, BatchGGNDiag, BatchGrad, GGNDiag, GGNEigen, SqrtGGN
from curvext.rules import RULES, USER_RULES, ModuleRule, register_rule
from curvext.rules.generic import CurvextNote

from .test_hostile import check_against, run_and_reference

N, D = 6, 4


class Gate(nn.Module):
    def __init__(self, dim: int):
        super().__init__()
        self.gain = nn.Parameter(1 + 0.3 * torch.randn(dim))
        self.shift = nn.Parameter(0.1 * torch.randn(dim))

    def forward(self, x: Tensor) -> Tensor:
        return x * self.gain + self.shift


class GateRule(ModuleRule):
    """``v = g ⊙ x`` (gain) and ``v = g`` (shift), summed over positions and calls."""

    def per_sample(self, name, grads):
        total = 0
        for call, g in zip(self.calls, grads):  # g: [K, N, ..., D]
            if name == "gain":
                g = g * call.args[0]
            total = total + g.reshape(g.shape[0], g.shape[1], -1, g.shape[-1]).sum(2)
        return total


@pytest.fixture
def gate_rule():
    """Register the rule for one test, and leave the registry as it was."""
    register_rule(Gate, GateRule)
    yield
    RULES.pop(Gate, None)
    USER_RULES.pop(Gate, None)


class TiedGates(nn.Module):
    def __init__(self, positions: bool):
        super().__init__()
        self.positions = positions
        self.inp = nn.Linear(3, D)
        self.gate = Gate(D)
        self.out = nn.Linear(D, 3)

    def forward(self, x: Tensor) -> Tensor:
        h = self.gate(torch.tanh(self.gate(self.inp(x))))  # the gate called twice
        return self.out(h).mean(1) if self.positions else self.out(h)


@pytest.mark.parametrize("positions", [False, True], ids=["[N, D]", "[N, T, D]"])
def test_registered_rule_gives_every_extension_exactly(gate_rule, positions):
    torch.manual_seed(0)
    model = extend(TiedGates(positions).double())
    X = torch.randn(N, 5, 3, dtype=torch.float64) if positions else torch.randn(N, 3).double()
    y = torch.randint(0, 3, (N,))
    exts = (GGNDiag(), BatchGGNDiag(), SqrtGGN(), BatchGrad(), KFAC("type-2"), GGNEigen(top_k=3))
    with warnings.catch_warnings():
        warnings.simplefilter("error", CurvextNote)  # the generic rule would note itself
        reference, params, _, _ = run_and_reference(
            model, extend(nn.CrossEntropyLoss()), nn.CrossEntropyLoss(), X, y, *exts
        )
    gate = model.gate
    check_against(reference, params, exact_kfac={id(gate.gain), id(gate.shift)})


def test_rule_is_what_runs(gate_rule, monkeypatch):
    """The registered rule computes the vectors (not the generic rule)."""
    seen = []
    monkeypatch.setattr(
        GateRule, "per_sample", lambda self, name, grads: seen.append(name) or 0 * grads[0][..., :]
    )
    model = extend(nn.Sequential(nn.Linear(3, D), Gate(D)))
    loss = extend(nn.MSELoss())(model(torch.randn(N, 3)), torch.randn(N, D))
    with backpack(BatchGrad()):
        loss.backward()
    assert sorted(set(seen)) == ["gain", "shift"]


def test_without_a_rule_the_generic_rule_runs():
    model = extend(nn.Sequential(nn.Linear(3, D), Gate(D)))
    loss = extend(nn.MSELoss())(model(torch.randn(N, 3)), torch.randn(N, D))
    with pytest.warns(CurvextNote, match="no dedicated rule for Gate"):
        with backpack(GGNDiag()):
            loss.backward()


def test_refusals_name_the_argument():
    with pytest.raises(TypeError, match="module_type must be an nn.Module subclass"):
        register_rule(Gate(2), GateRule)
    with pytest.raises(TypeError, match="rule_class must be a subclass of curvext.rules"):
        register_rule(Gate, object)
    with pytest.raises(ValueError, match="Linear has a rule already .*replace=True"):
        register_rule(nn.Linear, GateRule)


def test_replace_a_builtin_rule_and_restore(monkeypatch):
    monkeypatch.setitem(RULES, nn.Linear, RULES[nn.Linear])  # restored after the test
    register_rule(nn.Linear, GateRule, replace=True)
    assert RULES[nn.Linear] is GateRule
    USER_RULES.pop(nn.Linear)
