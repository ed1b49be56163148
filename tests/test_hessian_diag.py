r"""``DiagHessian`` and ``BatchDiagHessian`` against dense float64 Hessians.

The reference never touches curvext: the model's trainable parameters are
flattened into one vector :math:`\theta`, the loss is evaluated through
``torch.func.functional_call`` and differentiated twice by
``torch.autograd.functional.hessian`` (``torch.func.hessian`` is not used: it
is wrong on LayerNorm models in torch 2.14). With the loss written as
:math:`L = c \sum_n s_n` (:math:`s_n` the ``reduction="sum"`` loss of the rows
of sample ``n``; :math:`c = 1` for ``sum``; for mean cross-entropy one over
the summed class weights of the rows not ignored, one over the number of
entries for mean MSE / BCE), the per-sample reference is the Hessian diagonal
of :math:`c\, s_n(\theta)`, the model evaluated on the whole batch and the
rows of sample ``n`` selected (samples of a sequence loss on
``logits.reshape(-1, C)`` are whole sequences), and the full reference their
sum. The reference checks itself: :math:`c \sum_n s_n` is PyTorch's loss.

BackPACK's ``DiagHessian`` / ``BatchDiagHessian`` (``p.diag_h``,
``p.diag_h_batch``) are a second, independent reference where BackPACK
supports the model (``nn.Sequential`` of its modules).

"""

from __future__ import annotations

import copy
import random
from typing import Callable, Optional

import pytest
import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.func import functional_call

from curvext import backpack, extend
from curvext.extensions import BatchDiagHessian, BatchGGNDiag, DiagHessian, GGNDiag
from tests.cases import assert_close
from tests.references import GraphReference

N = 3  # samples

#: custom modules (parents with their own parameters) use the generic rule
pytestmark = pytest.mark.filterwarnings("ignore:curvext has no dedicated rule:UserWarning")


# ---------------------------------------------------------------------------
# Dense reference (never touches curvext)
# ---------------------------------------------------------------------------
def identity(out: Tensor, y: Tensor):
    return out, y


def flatten_rows(out: Tensor, y: Tensor):
    """``[N, T, C]`` logits → ``[N*T, C]`` rows (a sequence loss)."""
    return out.reshape(-1, out.shape[-1]), y.reshape(-1)


def _normalisation(loss_fn: nn.Module, loss_input: Tensor, target: Tensor) -> float:
    """``c`` in ``L = c * sum-reduced loss``, from the loss's definition."""
    if loss_fn.reduction == "sum":
        return 1.0
    if isinstance(loss_fn, nn.CrossEntropyLoss):
        if target.is_floating_point():  # class probabilities: mean over the rows
            return 1.0 / (loss_input.numel() // loss_input.shape[1])
        # class indices: divided by the summed weights of the rows not ignored
        weight = loss_fn.weight
        if weight is None:
            weight = torch.ones(loss_input.shape[1])
        kept = target != loss_fn.ignore_index
        return 1.0 / (weight[target.clamp(min=0)] * kept).sum().item()
    return 1.0 / loss_input.numel()  # MSE, BCE: mean over all entries


class Reference:
    """Dense Hessian diagonal and per-sample Hessian diagonals.

    Args:
        model: The model (copied, cast to float64; not extended).
        loss_fn: The PyTorch loss (copied).
        X, y: The batch (``X`` cast to float64 if floating).
        transform: ``(output, y) -> (loss input, target)``.
        seed: If given, the global seed is set before every forward pass (the
            same dropout masks as a curvext forward pass after the same seed).
    """

    def __init__(
        self,
        model: nn.Module,
        loss_fn: nn.Module,
        X: Tensor,
        y: Tensor,
        transform: Callable = identity,
        seed: Optional[int] = None,
    ):
        model = copy.deepcopy(model).double()
        X = X.double() if X.is_floating_point() else X
        y = y.double() if y.is_floating_point() else y
        summed = copy.deepcopy(loss_fn)
        summed.reduction = "sum"
        self.names = [n for n, p in model.named_parameters() if p.requires_grad]
        params = [p.detach() for n, p in model.named_parameters() if p.requires_grad]
        self.shapes = [p.shape for p in params]
        theta = torch.cat([p.reshape(-1) for p in params])

        def forward(flat: Tensor) -> Tensor:
            parts = flat.split([s.numel() for s in self.shapes])
            named = {n: t.reshape(s) for n, t, s in zip(self.names, parts, self.shapes)}
            if seed is not None:
                torch.manual_seed(seed)
            return functional_call(model, named, (X,))

        with torch.no_grad():
            loss_input, target = transform(forward(theta), y)
            c = _normalisation(loss_fn, loss_input, target)
            torch.testing.assert_close(
                c * summed(loss_input, target), loss_fn(loss_input, target), rtol=1e-12, atol=0
            )
            output = forward(theta)
            samples = output.shape[0]
            terms = [
                c * summed(*transform(output[n : n + 1], y[n : n + 1])) for n in range(samples)
            ]
            torch.testing.assert_close(
                sum(terms), loss_fn(loss_input, target), rtol=1e-12, atol=1e-15
            )

        def term(flat: Tensor, n: int) -> Tensor:
            out = forward(flat)
            return c * summed(*transform(out[n : n + 1], y[n : n + 1]))

        def hessian_diag(n: int) -> Tensor:
            # vectorize=False: no vmap (torch.func.hessian, vmap-based, is
            # wrong on LayerNorm models in torch 2.14)
            return torch.autograd.functional.hessian(lambda t: term(t, n), theta).diagonal()

        per_sample = torch.stack([hessian_diag(n) for n in range(samples)])
        self.per_sample = self._split(per_sample)
        # L = c sum_n s_n (checked above on the values): its Hessian is the sum
        self.full = self._split(per_sample.sum(0))

    def scaled(self, factor: float) -> "Reference":
        """The reference of ``factor`` times the loss."""
        other = copy.copy(self)
        other.full = {n: factor * t for n, t in self.full.items()}
        other.per_sample = {n: factor * t for n, t in self.per_sample.items()}
        return other

    def _split(self, flat: Tensor) -> dict[str, Tensor]:
        parts = flat.split([s.numel() for s in self.shapes], dim=-1)
        return {
            n: t.reshape(*flat.shape[:-1], *s) for n, t, s in zip(self.names, parts, self.shapes)
        }


def run(
    model: nn.Module,
    loss_fn: nn.Module,
    X: Tensor,
    y: Tensor,
    *extensions,
    transform: Callable = identity,
    seed: Optional[int] = None,
    scale: float = 1.0,
    **context,
) -> nn.Module:
    """Extend, forward, ``(scale * loss).backward()`` under ``backpack``."""
    model, loss_fn = extend(model), extend(loss_fn)
    if seed is not None:
        torch.manual_seed(seed)
    loss = loss_fn(*transform(model(X), y))
    with backpack(*extensions, **context):
        (scale * loss).backward() if scale != 1.0 else loss.backward()
    return model


def check(
    model: nn.Module,
    loss_fn: nn.Module,
    X: Tensor,
    y: Tensor,
    transform: Callable = identity,
    seed: Optional[int] = None,
    rtol: float = 1e-7,
    atol: float = 1e-10,
    reference_model: Optional[nn.Module] = None,
    reference: Optional[Reference] = None,
    **context,
) -> nn.Module:
    """curvext's ``hessian_diag`` and ``batch_hessian_diag`` equal the dense
    reference (of ``reference_model``, the same function written with ops
    PyTorch can differentiate twice, if given); returns the extended model."""
    if reference is None:
        reference = Reference(reference_model or model, loss_fn, X, y, transform, seed)
    model = run(
        model,
        loss_fn,
        X,
        y,
        DiagHessian(),
        BatchDiagHessian(),
        transform=transform,
        seed=seed,
        **context,
    )
    params = dict(model.named_parameters())
    assert set(reference.names) <= set(params)
    for name in reference.names:
        p = params[name]
        assert p.hessian_diag.dtype == p.dtype and p.batch_hessian_diag.dtype == p.dtype
        assert_close(p.hessian_diag, reference.full[name], rtol, atol, msg=name)
        assert_close(p.batch_hessian_diag, reference.per_sample[name], rtol, atol, msg=name)
    return model


def seeded(seed: int, make: Callable):
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return make()


def data(loss: str, out: int, in_shape=(3,), samples: int = N, seed: int = 1):
    """``(X, y)`` for ``loss`` with ``out`` outputs."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        X = torch.randn(samples, *in_shape)
        if loss == "ce":
            return X, torch.randint(0, out, (samples,))
        if loss == "mse":
            return X, torch.randn(samples, out)
        return X, torch.randint(0, 2, (samples, out)).double()


LOSSES = {
    "ce": nn.CrossEntropyLoss,
    "mse": nn.MSELoss,
    "bce": nn.BCEWithLogitsLoss,
}


# ---------------------------------------------------------------------------
# 1. Every supported activation as a module, every loss, both reductions
# ---------------------------------------------------------------------------
ACTIVATIONS = {
    "Tanh": nn.Tanh,
    "Sigmoid": nn.Sigmoid,
    "GELU": nn.GELU,
    "GELU-tanh": lambda: nn.GELU(approximate="tanh"),
    "SiLU": nn.SiLU,
    "Softplus": lambda: nn.Softplus(beta=1.5, threshold=1.0),  # some inputs above it
    "ELU": lambda: nn.ELU(alpha=0.7),
    "ELU-inplace": lambda: nn.ELU(alpha=0.7, inplace=True),
    "SELU": nn.SELU,
    "SELU-inplace": lambda: nn.SELU(inplace=True),
    "CELU": lambda: nn.CELU(alpha=1.3),
    "Mish": nn.Mish,
    "Hardswish": nn.Hardswish,
    "LogSigmoid": nn.LogSigmoid,
    # piecewise linear: nothing beyond the GGN
    "ReLU": nn.ReLU,
    "LeakyReLU": lambda: nn.LeakyReLU(0.1),
}


def act_mlp(activation: Callable[[], nn.Module], out: int) -> nn.Module:
    # weights larger than the default init: pre-activations reach the curved
    # regions (and Softplus's threshold)
    model = nn.Sequential(
        nn.Linear(3, 4), activation(), nn.Linear(4, 3), activation(), nn.Linear(3, out)
    )
    with torch.no_grad():
        for p in model.parameters():
            p.mul_(2.5)
    return model


@pytest.mark.parametrize("loss", list(LOSSES))
@pytest.mark.parametrize("activation", list(ACTIVATIONS))
def test_activation_modules(activation, loss):
    """Both reductions; the reference of the mean is that of the sum times
    ``c`` (the dense Hessians once per model)."""
    out = 3 if loss == "ce" else 2
    make = lambda: act_mlp(ACTIVATIONS[activation], out)  # noqa: E731
    X, y = data(loss, out)
    reference = Reference(seeded(0, make), LOSSES[loss](reduction="sum"), X, y)
    check(seeded(0, make), LOSSES[loss](reduction="sum"), X, y, reference=reference)
    c = 1 / N if loss == "ce" else 1 / (N * out)  # mean over samples / entries
    mean = LOSSES[loss]()
    with torch.no_grad():
        output = seeded(0, make)(X)
        torch.testing.assert_close(mean(output, y), c * LOSSES[loss](reduction="sum")(output, y))
    check(seeded(0, make), mean, X, y, reference=reference.scaled(c))


class Lambda(nn.Module):
    def __init__(self, fn: Callable[[Tensor], Tensor]):
        super().__init__()
        self.fn = fn

    def forward(self, x: Tensor) -> Tensor:
        return self.fn(x)


MORE_ACTIVATIONS = {
    "SiLU-inplace": lambda: nn.SiLU(inplace=True),
    "Mish-inplace": lambda: nn.Mish(inplace=True),
    "Hardswish-inplace": lambda: nn.Hardswish(inplace=True),
    "Hardswish-saturated": lambda: Lambda(lambda h: F.hardswish(2 * h)),  # |2h| > 3 too
    "Tanhshrink": nn.Tanhshrink,
    "Softplus-small-threshold": lambda: nn.Softplus(beta=3.0, threshold=0.5),
    "ELU-alpha-0-inplace": lambda: nn.ELU(alpha=0.0, inplace=True),
    "Hardtanh-inplace": lambda: nn.Hardtanh(-0.5, 0.5, inplace=True),
    "ReLU6": nn.ReLU6,
    "LeakyReLU-inplace": lambda: nn.LeakyReLU(0.2, inplace=True),
    "Threshold": lambda: nn.Threshold(0.1, 20.0),
    "Hardsigmoid": nn.Hardsigmoid,
    "Hardsigmoid-inplace": lambda: nn.Hardsigmoid(inplace=True),
}


def _twice_differentiable(model: nn.Module) -> nn.Module:
    """The model with Hardsigmoid as ``relu6(x + 3) / 6`` (torch has no
    derivative of ``hardsigmoid_backward``; the same function)."""
    model = copy.deepcopy(model)
    for name, child in model.named_children():
        if isinstance(child, nn.Hardsigmoid):
            setattr(model, name, Lambda(lambda h: F.relu6(h + 3) / 6))
    return model


@pytest.mark.parametrize("activation", list(MORE_ACTIVATIONS))
def test_more_activation_modules(activation):
    model = seeded(0, lambda: act_mlp(MORE_ACTIVATIONS[activation], 3))
    X, y = data("ce", 3)
    check(model, nn.CrossEntropyLoss(), X, y, reference_model=_twice_differentiable(model))


@pytest.mark.parametrize(
    "activation",
    [lambda: nn.CELU(alpha=1.3, inplace=True), lambda: Lambda(lambda h: F.celu(h, 0.6, True))],
    ids=["CELU-inplace", "F.celu-inplace"],
)
def test_inplace_celu(activation):
    """The dense reference differentiates CELU twice with torch's own double
    backward, which is off by ~2e-8 from the closed form exp(x/a)/a (measured
    for alpha=1.3, x ~ 3 N(0, 1)), hence rtol 1e-6 here."""
    model = seeded(0, lambda: act_mlp(activation, 3))
    X, y = data("ce", 3)
    check(model, nn.CrossEntropyLoss(), X, y, rtol=1e-6)


def test_curvature_is_added_to_the_ggn():
    """``hessian_diag`` differs from ``ggn_diag`` by the activations' terms
    (so the comparisons above are not GGN-only), both right in one pass."""
    model = seeded(0, lambda: act_mlp(nn.Tanh, 3))
    X, y = data("ce", 3)
    reference = Reference(model, nn.CrossEntropyLoss(), X, y)
    graph_model = copy.deepcopy(model)
    ggn = GraphReference(
        graph_model(X), list(graph_model.parameters()), lambda out: F.cross_entropy(out, y)
    )
    model = run(model, nn.CrossEntropyLoss(), X, y, GGNDiag(), DiagHessian(), BatchGGNDiag())
    ggn_diags = ggn.split(ggn.ggn().diagonal())
    for (name, p), ggn_diag in zip(model.named_parameters(), ggn_diags):
        assert_close(p.ggn_diag, ggn_diag, msg=name)
        assert_close(p.hessian_diag, reference.full[name], msg=name)
    weight = model[0].weight
    assert (weight.hessian_diag - weight.ggn_diag).abs().max() > 1e-3


def test_relu_mlp_hessian_is_the_ggn():
    """No curved operation: the Hessian diagonal is the GGN diagonal."""
    model = seeded(0, lambda: act_mlp(nn.ReLU, 3))
    X, y = data("ce", 3)
    reference = Reference(model, nn.CrossEntropyLoss(), X, y)
    model = run(model, nn.CrossEntropyLoss(), X, y, DiagHessian(), GGNDiag(), BatchDiagHessian())
    for name, p in model.named_parameters():
        assert_close(p.hessian_diag, reference.full[name], msg=name)
        assert_close(p.batch_hessian_diag, reference.per_sample[name], msg=name)
        torch.testing.assert_close(p.hessian_diag, p.ggn_diag, rtol=1e-12, atol=1e-15)


def test_curved_op_on_the_loss_input():
    """A curved op between the model and the loss (outside every module)."""
    model = seeded(0, lambda: nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 2)))
    X, y = data("mse", 2)
    check(model, nn.MSELoss(), X, y, transform=lambda out, y: (torch.sigmoid(out), y))


# ---------------------------------------------------------------------------
# 2. Functional operations and graphs
# ---------------------------------------------------------------------------
class Between(nn.Module):
    """``b(fn(a(x)))``: a functional op between two extended Linear layers,
    in the forward of a parent without parameters of its own."""

    def __init__(self, fn: Callable[[Tensor], Tensor], width: int = 4, out: int = 3):
        super().__init__()
        self.fn = fn
        self.a = nn.Linear(3, width)
        self.b = nn.Linear(width, out)

    def forward(self, x: Tensor) -> Tensor:
        return self.b(self.fn(self.a(x)))


def _positive(h: Tensor) -> Tensor:
    return h.pow(2) + 0.5  # PowBackward0: elementwise with scalar exponent


FUNCTIONAL = {
    "tanh": torch.tanh,
    "sigmoid": torch.sigmoid,
    "gelu": F.gelu,
    "gelu-tanh": lambda h: F.gelu(h, approximate="tanh"),
    "silu": F.silu,
    "softplus": lambda h: F.softplus(h, beta=0.5),
    "elu": lambda h: F.elu(h, alpha=1.2),
    "elu_": lambda h: F.elu(h, alpha=1.2, inplace=True),
    "selu": F.selu,
    "celu": lambda h: F.celu(h, alpha=0.6),
    "mish": F.mish,
    "hardswish": F.hardswish,
    "logsigmoid": F.logsigmoid,
    "exp": lambda h: (0.5 * h).exp(),
    "log": lambda h: torch.log(_positive(h)),
    "sqrt": lambda h: torch.sqrt(_positive(h)),
    "rsqrt": lambda h: torch.rsqrt(_positive(h)),
    "reciprocal": lambda h: torch.reciprocal(_positive(h)),
    "one-over": lambda h: 1 / _positive(h),
    "sin": torch.sin,
    "cos": torch.cos,
    "pow3": lambda h: h**3,
    "pow-frac": lambda h: _positive(h) ** 1.5,
    "tanh-of-exp": lambda h: torch.tanh(h.exp()),
    "tanh_": lambda h: h.tanh_(),
    "sigmoid_": lambda h: h.sigmoid_(),
    "relu": torch.relu,
    "scalar-mul": lambda h: torch.tanh(h * 0.5) * 3.0,
    "input-only": lambda h: h,  # paired with a curved op on the raw input below
}


@pytest.mark.parametrize("fn", list(FUNCTIONAL))
def test_functional_ops(fn):
    model = seeded(0, lambda: Between(FUNCTIONAL[fn]))
    X, y = data("ce", 3)
    if fn == "input-only":
        X = torch.tanh(X)  # no parameter reaches it: nothing to add
    check(model, nn.CrossEntropyLoss(), X, y)


# Linear and piecewise-linear operations add nothing (curvext.rules.curvature).
LINEAR_TENSOR_OPS = {
    "divide-by-constant": lambda h: torch.tanh(h / 2.0),
    "rsub": lambda h: 1 - torch.sigmoid(h),
    "clamp": lambda h: torch.tanh(h.clamp(-0.5, 0.5)),
    "softshrink": lambda h: torch.tanh(F.softshrink(h, 0.3)),
    "hardshrink": lambda h: torch.tanh(F.hardshrink(h, 0.3)),
    "rrelu-eval": lambda h: torch.tanh(F.rrelu(h, training=False)),
    "maximum-with-constant": lambda h: torch.tanh(torch.maximum(h, torch.tensor(0.1))),
    "unsafe-chunk": lambda h: torch.tanh(torch.cat(torch.unsafe_chunk(h, 2, 1)[::-1], 1)),
}


@pytest.mark.parametrize("fn", LINEAR_TENSOR_OPS)
def test_linear_tensor_ops(fn):
    model = seeded(0, lambda: Between(LINEAR_TENSOR_OPS[fn]))
    X, y = data("ce", 3)
    check(model, nn.CrossEntropyLoss(), X, y)


def _sees_inside_copy_slices() -> bool:
    """Whether this torch exposes the op an in-place write on a view wraps
    (``CopySlices._wrapped_node``, torch >= 2.6 or so); without it curvext
    refuses every such write, linear ones (circular padding) included."""
    h = torch.zeros(2, requires_grad=True) * 1
    h[:1].mul_(2)
    return hasattr(h.grad_fn, "_wrapped_node")


def test_circular_padding_after_a_layer():
    def make():
        return nn.Sequential(
            nn.Conv2d(1, 2, 3, padding=1),
            nn.Tanh(),
            nn.Conv2d(2, 2, 3, padding=1, padding_mode="circular"),
            nn.Flatten(),
            nn.Linear(32, 3),
        )

    X, y = data("ce", 3, in_shape=(1, 4, 4))
    if not _sees_inside_copy_slices():
        with pytest.raises(NotImplementedError, match="in-place operation on a view"):
            run(seeded(0, make), nn.CrossEntropyLoss(), X, y, DiagHessian())
        return
    check(seeded(0, make), nn.CrossEntropyLoss(), X, y)


@pytest.mark.parametrize("loss", ["mse", "bce"])
def test_one_dimensional_loss_input(loss):
    def make():
        return nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 1), nn.Flatten(0))

    X, y = data(loss, 1)
    check(seeded(0, make), LOSSES[loss](), X, y.flatten())


class Residual(nn.Module):
    """``h = lin0(x); h + tanh(lin1(h))``, then a head."""

    def __init__(self):
        super().__init__()
        self.lin0 = nn.Linear(3, 4)
        self.lin1 = nn.Linear(4, 4)
        self.head = nn.Linear(4, 3)

    def forward(self, x: Tensor) -> Tensor:
        h = self.lin0(x)
        h = h + torch.tanh(self.lin1(h))
        return self.head(torch.sigmoid(h))


class Branches(nn.Module):
    """Two branches of one input, concatenated; a gated product of
    branches with different parameters."""

    def __init__(self, gate: bool = False):
        super().__init__()
        self.gate = gate
        self.a = nn.Linear(3, 3)
        self.b = nn.Linear(3, 3)
        self.head = nn.Linear(3 if gate else 6, 3)

    def forward(self, x: Tensor) -> Tensor:
        left, right = torch.tanh(self.a(x)), F.gelu(self.b(x))
        h = left * torch.sigmoid(right) if self.gate else torch.cat([left, right], 1)
        return self.head(h)


class ParallelShared(nn.Module):
    """One Linear called on two halves of the input (shared weights, no
    parameter on both factors of a product)."""

    def __init__(self):
        super().__init__()
        self.shared = nn.Linear(2, 3)
        self.head = nn.Linear(6, 3)

    def forward(self, x: Tensor) -> Tensor:
        left, right = x[:, :2], x[:, 1:]
        return self.head(torch.cat([torch.tanh(self.shared(left)), self.shared(right).exp()], 1))


class ScaledParent(nn.Module):
    """A parent's own parameter used after its child's curved op (which
    that parameter does not reach): computed."""

    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(3, 4)
        self.scale = nn.Parameter(torch.randn(4))
        self.head = nn.Linear(4, 3)

    def forward(self, x: Tensor) -> Tensor:
        return self.head(self.scale * torch.tanh(self.lin(x)))


class TwoOutputs(nn.Module):
    """A model with two output branches summed in the loss input."""

    def __init__(self):
        super().__init__()
        self.trunk = nn.Sequential(nn.Linear(3, 4), nn.Softplus())
        self.head1 = nn.Linear(4, 3)
        self.head2 = nn.Sequential(nn.Linear(4, 3), nn.Sigmoid())

    def forward(self, x: Tensor) -> Tensor:
        h = self.trunk(x)
        return self.head1(h) + self.head2(h)


class SharedInput(nn.Module):
    """Two curved ops on one tensor, and one curved output used twice."""

    def __init__(self):
        super().__init__()
        self.a = nn.Linear(3, 4)
        self.b = nn.Linear(4, 3)

    def forward(self, x: Tensor) -> Tensor:
        h = self.a(x)
        t = torch.tanh(h)
        return self.b(torch.sigmoid(h) + t * 0.5 + t.exp() + torch.where(h > 0, t, h.sin()))


class FrozenFirst(nn.Module):
    def __init__(self):
        super().__init__()
        self.a = nn.Linear(3, 4).requires_grad_(False)
        self.b = nn.Linear(4, 4)
        self.c = nn.Linear(4, 3)

    def forward(self, x: Tensor) -> Tensor:
        return self.c(torch.tanh(self.b(torch.tanh(self.a(x)))))


GRAPHS = {
    "residual": Residual,
    "branches-cat": Branches,
    "branches-gated": lambda: Branches(gate=True),
    "parallel-shared-linear": ParallelShared,
    "parent-param-after-tanh": ScaledParent,
    "two-heads": TwoOutputs,
    "frozen-first-layer": FrozenFirst,
    "shared-curved-input": SharedInput,
    "layernorm-on-input": lambda: nn.Sequential(
        nn.LayerNorm(3), nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 3)
    ),
}


@pytest.mark.parametrize("graph", list(GRAPHS))
def test_graphs(graph):
    model = seeded(0, GRAPHS[graph])
    X, y = data("ce", 3)
    model = check(model, nn.CrossEntropyLoss(), X, y)
    if graph == "frozen-first-layer":
        assert not hasattr(model.a.weight, "hessian_diag")


def conv_net(pool: Callable[[], nn.Module], batch_norm: bool = False) -> nn.Module:
    layers = [nn.Conv2d(1, 2, 3, padding=1)]
    if batch_norm:
        layers.append(nn.BatchNorm2d(2))
    layers += [nn.Tanh(), pool(), nn.Conv2d(2, 2, 2), nn.Sigmoid(), nn.Flatten(), nn.Linear(2, 3)]
    model = nn.Sequential(*layers)
    if batch_norm:
        _randomize_batch_norm(model)
    return model


def _randomize_batch_norm(model: nn.Module) -> None:
    for module in model.modules():
        if isinstance(module, nn.modules.batchnorm._BatchNorm):
            with torch.no_grad():
                module.weight.copy_(1 + 0.5 * torch.randn_like(module.weight))
                module.bias.copy_(0.5 * torch.randn_like(module.bias))
                module.running_mean.copy_(0.3 * torch.randn_like(module.running_mean))
                module.running_var.copy_(0.5 + torch.rand_like(module.running_var))
    model.eval()


CONV_NETS = {
    "maxpool": lambda: conv_net(lambda: nn.MaxPool2d(2)),
    "avgpool": lambda: conv_net(lambda: nn.AvgPool2d(2)),
    "adaptive-avg": lambda: conv_net(lambda: nn.AdaptiveAvgPool2d(2)),
    "batchnorm-eval": lambda: conv_net(lambda: nn.MaxPool2d(2), batch_norm=True),
}


def _head(*layers: nn.Module, features: int) -> nn.Module:
    return nn.Sequential(*layers, nn.Flatten(), nn.Linear(features, 3))


#: (model, input shape): curved ops directly on the outputs of convolutions
#: and Linear layers of every kind (the rules' shortcut where they have one).
LAYER_ZOO = {
    "conv-strided-grouped-dilated": (
        lambda: _head(
            nn.Conv2d(2, 4, 3, stride=2, padding=2, dilation=2, groups=2), nn.Tanh(), features=16
        ),
        (2, 4, 4),
    ),
    "conv-reflect-padding-no-bias": (
        lambda: _head(
            nn.Conv2d(1, 2, 3, padding=1, padding_mode="reflect", bias=False),
            nn.SiLU(),
            nn.AvgPool2d(2),
            features=8,
        ),
        (1, 4, 4),
    ),
    "conv1d": (lambda: _head(nn.Conv1d(2, 3, 2, stride=2), nn.Sigmoid(), features=6), (2, 4)),
    "conv3d": (lambda: _head(nn.Conv3d(1, 2, 2), nn.GELU(), features=2), (1, 2, 2, 2)),
    "conv-transpose": (
        lambda: _head(nn.ConvTranspose2d(1, 2, 2, stride=2), nn.Tanh(), features=32),
        (1, 2, 2),
    ),
    "conv-transpose1d": (
        lambda: _head(nn.ConvTranspose1d(2, 1, 3), nn.Softplus(), features=5),
        (2, 3),
    ),
    "linear-no-bias": (
        lambda: _head(nn.Linear(3, 4, bias=False), nn.Mish(), features=4),
        (3,),
    ),
    "linear-frozen-weight": (
        lambda: _head(_frozen(nn.Linear(3, 4), "weight"), nn.Tanh(), features=4),
        (3,),
    ),
    "linear-frozen-bias": (
        lambda: _head(_frozen(nn.Linear(3, 4), "bias"), nn.Tanh(), features=4),
        (3,),
    ),
    "linear-positions-4d": (
        lambda: _head(nn.Linear(2, 2), nn.Sigmoid(), features=8),
        (2, 2, 2),
    ),
    "embedding": (
        lambda: _head(nn.Embedding(5, 2), nn.Tanh(), features=4),
        None,
    ),
    "tanh-of-slice": (
        lambda: _head(nn.Linear(3, 4), Lambda(lambda h: torch.tanh(h[:, 1:])), features=3),
        (3,),
    ),
    "tanh-of-view": (
        lambda: _head(
            nn.Linear(3, 4), Lambda(lambda h: torch.tanh(h.view(-1, 2, 2).mT)), features=4
        ),
        (3,),
    ),
}


def _frozen(module: nn.Module, name: str) -> nn.Module:
    getattr(module, name).requires_grad_(False)
    return module


@pytest.mark.parametrize("layer", list(LAYER_ZOO))
def test_layer_zoo(layer):
    make, in_shape = LAYER_ZOO[layer]
    if in_shape is None:
        X, y = torch.tensor([[0, 4], [2, 2], [1, 3]]), torch.tensor([1, 2, 0])
    else:
        X, y = data("ce", 3, in_shape=in_shape)
    check(seeded(0, make), nn.CrossEntropyLoss(), X, y)


def test_conv_spatial_cross_entropy():
    """``[N, C, H, W]`` logits: each pixel a term of its sample."""
    model = seeded(
        0, lambda: nn.Sequential(nn.Conv2d(1, 2, 2), nn.Sigmoid(), nn.Conv2d(2, 3, 2), nn.GELU())
    )
    X = seeded(1, lambda: torch.randn(N, 1, 4, 4))
    y = seeded(2, lambda: torch.randint(0, 3, (N, 2, 2)))
    check(model, nn.CrossEntropyLoss(), X, y)


@pytest.mark.parametrize("net", list(CONV_NETS))
def test_conv_nets(net):
    model = seeded(0, CONV_NETS[net])
    X, y = data("ce", 3, in_shape=(1, 4, 4))
    check(model, nn.CrossEntropyLoss(), X, y)


def test_batch_norm_1d_eval():
    def make():
        model = nn.Sequential(
            nn.Linear(3, 4), nn.BatchNorm1d(4), nn.Tanh(), nn.Linear(4, 3), nn.GELU()
        )
        _randomize_batch_norm(model)
        return model

    X, y = data("mse", 3)
    check(seeded(0, make), nn.MSELoss(), X, y)


def test_dropout_eval_and_train():
    def make():
        return nn.Sequential(nn.Linear(3, 5), nn.Dropout(0.4), nn.Tanh(), nn.Linear(5, 3))

    X, y = data("ce", 3)
    check(seeded(0, make).eval(), nn.CrossEntropyLoss(), X, y)
    # train mode: the same masks in the reference (seeded forward)
    check(seeded(0, make).train(), nn.CrossEntropyLoss(), X, y, seed=5)


class EmbeddingTanh(nn.Module):
    def __init__(self, vocab: int = 6, dim: int = 3, T: int = 2, classes: int = 3):
        super().__init__()
        self.embed = nn.Embedding(vocab, dim)
        self.head = nn.Linear(T * dim, classes)

    def forward(self, tokens: Tensor) -> Tensor:
        return self.head(torch.tanh(self.embed(tokens)).flatten(1))


def test_embedding_then_tanh():
    model = seeded(0, EmbeddingTanh)
    X = torch.tensor([[0, 3], [5, 3], [1, 1]])
    y = torch.tensor([2, 0, 1])
    check(model, nn.CrossEntropyLoss(), X, y)


class SequenceMLP(nn.Module):
    """``[N, T, D]`` → Linear → tanh → Linear → ``[N, T, C]``."""

    def __init__(self, D: int = 3, hidden: int = 4, C: int = 3):
        super().__init__()
        self.lin = nn.Linear(D, hidden)
        self.out = nn.Linear(hidden, C)

    def forward(self, x: Tensor) -> Tensor:
        return self.out(torch.tanh(self.lin(x)))


@pytest.mark.parametrize("reduction", ["mean", "sum"])
def test_sequence_cross_entropy_on_flattened_logits(reduction):
    model = seeded(0, SequenceMLP)
    X = seeded(1, lambda: torch.randn(N, 4, 3))
    y = seeded(2, lambda: torch.randint(0, 3, (N, 4)))
    check(model, nn.CrossEntropyLoss(reduction=reduction), X, y, transform=flatten_rows)


SEQUENCE_LOSSES = {
    "ignore-index": lambda: nn.CrossEntropyLoss(ignore_index=1),
    "class-weights": lambda: nn.CrossEntropyLoss(weight=torch.tensor([0.3, 1.0, 2.5])),
    "label-smoothing": lambda: nn.CrossEntropyLoss(label_smoothing=0.2),
}


@pytest.mark.parametrize("loss", list(SEQUENCE_LOSSES))
def test_sequence_cross_entropy_options(loss):
    model = seeded(0, SequenceMLP)
    X = seeded(1, lambda: torch.randn(N, 4, 3))
    y = seeded(2, lambda: torch.randint(0, 3, (N, 4)))
    check(model, SEQUENCE_LOSSES[loss](), X, y, transform=flatten_rows)


@pytest.mark.parametrize("loss", ["mse", "bce"])
def test_sequence_outputs_elementwise_losses(loss):
    """``[N, T, C]`` outputs straight into MSE / BCE (``c = 1/(N T C)``)."""
    model = seeded(0, SequenceMLP)
    X = seeded(1, lambda: torch.randn(N, 4, 3))
    y = seeded(2, lambda: torch.randn(N, 4, 3))
    if loss == "bce":
        y = (y > 0).double()
        loss_fn = nn.BCEWithLogitsLoss(pos_weight=torch.tensor([0.5, 1.0, 3.0]))
    else:
        loss_fn = nn.MSELoss()
    check(model, loss_fn, X, y)


def test_sequence_cross_entropy_on_positions():
    """``[N, C, T]`` logits: positions of a sample, one term each."""
    model = seeded(0, SequenceMLP)
    X = seeded(1, lambda: torch.randn(N, 4, 3))
    y = seeded(2, lambda: torch.randint(0, 3, (N, 4)))
    check(
        model,
        nn.CrossEntropyLoss(),
        X,
        y,
        transform=lambda out, y: (out.permute(0, 2, 1), y),
    )


class BatchNotFirst(nn.Module):
    """tanh applied to ``[T, N, D]`` (the batch axis moved)."""

    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(2, 3)
        self.out = nn.Linear(3, 3)

    def forward(self, x: Tensor) -> Tensor:
        h = torch.tanh(self.lin(x).transpose(0, 1)).transpose(0, 1)
        return self.out(h)


def test_batch_axis_not_first_is_refused():
    model = seeded(0, BatchNotFirst)
    X = seeded(1, lambda: torch.randn(N, 4, 2))  # T = 4 != N
    y = seeded(2, lambda: torch.randint(0, 3, (N, 4)))
    with pytest.raises(NotImplementedError, match="samples on axis 0.*Tanh"):
        run(model, nn.CrossEntropyLoss(), X, y, DiagHessian(), transform=flatten_rows)


def test_batch_axis_not_first_with_as_many_positions_as_samples_is_refused():
    """T == N passes the shape check; a probe column on sample 0 finds that
    axis 0 is not the samples (it gave wrong numbers before the probe)."""
    model = seeded(0, BatchNotFirst)
    X = seeded(1, lambda: torch.randn(N, N, 2))
    y = seeded(2, lambda: torch.randint(0, 3, (N, N)))
    with pytest.raises(NotImplementedError, match="samples on axis 0.*Tanh.*reaches several"):
        run(model, nn.CrossEntropyLoss(), X, y, DiagHessian(), transform=flatten_rows)


# ---------------------------------------------------------------------------
# 3. Random small models
# ---------------------------------------------------------------------------
RANDOM_ACTIVATIONS = [
    nn.Tanh,
    nn.Sigmoid,
    nn.GELU,
    nn.SiLU,
    nn.Softplus,
    nn.ELU,
    lambda: nn.ELU(inplace=True),
    nn.SELU,
    nn.Mish,
    nn.LogSigmoid,
    nn.ReLU,
    nn.Identity,
    lambda: Lambda(lambda h: (0.5 * h).exp()),
    lambda: Lambda(torch.sin),
    lambda: Lambda(lambda h: 0.3 * h**3),
    lambda: Lambda(lambda h: torch.sqrt(h.pow(2) + 1)),
]


def random_model(seed: int):
    """Depth 1–3, widths 2–5, activations and loss from a seeded generator."""
    rng = random.Random(seed)
    loss = rng.choice(list(LOSSES))
    reduction = rng.choice(["mean", "sum"])
    widths = [3] + [rng.randint(2, 5) for _ in range(rng.randint(1, 3))]
    out = rng.randint(2, 3)
    layers = []
    for fan_in, fan_out in zip(widths, widths[1:]):
        layers += [nn.Linear(fan_in, fan_out), rng.choice(RANDOM_ACTIVATIONS)()]
        if rng.random() < 0.3:
            layers.append(rng.choice(RANDOM_ACTIVATIONS)())  # two in a row
    layers.append(nn.Linear(widths[-1], out))
    model = seeded(seed, lambda: nn.Sequential(*layers).apply(_reset))
    X, y = data(loss, out, samples=rng.randint(1, 4), seed=seed)
    return model, LOSSES[loss](reduction=reduction), X, y


def _reset(module: nn.Module) -> None:
    if isinstance(module, nn.Linear):
        module.reset_parameters()
        with torch.no_grad():
            module.weight.mul_(2.0)


@pytest.mark.parametrize("seed", range(10))
def test_random_models(seed):
    check(*random_model(seed))


# ---------------------------------------------------------------------------
# 4.–6. Chunking, scaling after the loss, float32
# ---------------------------------------------------------------------------
@pytest.mark.parametrize(
    "make", [lambda: act_mlp(nn.GELU, 3), CONV_NETS["maxpool"]], ids=["gelu-mlp", "conv"]
)
def test_one_column_per_backward(make):
    in_shape = (3,) if isinstance(seeded(0, make)[0], nn.Linear) else (1, 4, 4)
    X, y = data("ce", 3, in_shape=in_shape)
    default = run(seeded(0, make), nn.CrossEntropyLoss(), X, y, DiagHessian(), BatchDiagHessian())
    chunked = check(seeded(0, make), nn.CrossEntropyLoss(), X, y, max_columns=1)
    two = run(
        seeded(0, make),
        nn.CrossEntropyLoss(),
        X,
        y,
        DiagHessian(),
        BatchDiagHessian(),
        max_columns=2,
    )
    for p, q, r in zip(default.parameters(), chunked.parameters(), two.parameters()):
        torch.testing.assert_close(q.hessian_diag, p.hessian_diag, rtol=1e-12, atol=1e-14)
        torch.testing.assert_close(r.hessian_diag, p.hessian_diag, rtol=1e-12, atol=1e-14)
        torch.testing.assert_close(
            q.batch_hessian_diag, p.batch_hessian_diag, rtol=1e-12, atol=1e-14
        )


@pytest.mark.parametrize("extension", [DiagHessian, BatchDiagHessian])
def test_each_extension_alone(extension):
    make = lambda: act_mlp(nn.SiLU, 3)  # noqa: E731
    X, y = data("ce", 3)
    reference = Reference(seeded(0, make), nn.CrossEntropyLoss(), X, y)
    model = run(seeded(0, make), nn.CrossEntropyLoss(), X, y, extension())
    for name, p in model.named_parameters():
        if extension is DiagHessian:
            assert_close(p.hessian_diag, reference.full[name], msg=name)
            assert not hasattr(p, "batch_hessian_diag")
        else:
            assert_close(p.batch_hessian_diag, reference.per_sample[name], msg=name)
            assert not hasattr(p, "hessian_diag")


def test_results_of_the_latest_backward():
    """Two forward/backward passes in one context, then one more in another:
    each pass replaces the results (nothing accumulates)."""
    make = lambda: act_mlp(nn.Sigmoid, 3)  # noqa: E731
    X1, y1 = data("ce", 3, seed=1)
    X2, y2 = data("ce", 3, samples=2, seed=2)
    reference = Reference(seeded(0, make), nn.CrossEntropyLoss(), X2, y2)
    model, loss_fn = extend(seeded(0, make)), extend(nn.CrossEntropyLoss())
    for _ in range(2):
        with backpack(DiagHessian(), BatchDiagHessian()):
            for X, y in ((X1, y1), (X2, y2)):
                loss_fn(model(X), y).backward()
        for name, p in model.named_parameters():
            assert_close(p.hessian_diag, reference.full[name], msg=name)
            assert_close(p.batch_hessian_diag, reference.per_sample[name], msg=name)


def test_scaling_the_loss_after_the_loss_module():
    """``(3 * loss).backward()``: the Hessian of the loss module's output
    (unchanged), the gradient tripled."""
    make = lambda: act_mlp(nn.Tanh, 3)  # noqa: E731
    X, y = data("ce", 3)
    plain = run(seeded(0, make), nn.CrossEntropyLoss(), X, y, DiagHessian(), BatchDiagHessian())
    scaled = run(
        seeded(0, make), nn.CrossEntropyLoss(), X, y, DiagHessian(), BatchDiagHessian(), scale=3.0
    )
    reference = Reference(seeded(0, make), nn.CrossEntropyLoss(), X, y)
    for (name, p), q in zip(plain.named_parameters(), scaled.parameters()):
        assert_close(q.hessian_diag, reference.full[name], msg=name)
        assert_close(q.batch_hessian_diag, reference.per_sample[name], msg=name)
        torch.testing.assert_close(q.hessian_diag, p.hessian_diag, rtol=1e-12, atol=1e-15)
        torch.testing.assert_close(q.grad, 3 * p.grad, rtol=1e-12, atol=1e-15)


@pytest.mark.parametrize("loss", ["ce", "mse"])
def test_float32(loss):
    out = 3 if loss == "ce" else 2

    def make():
        return nn.Sequential(
            nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 4), nn.GELU(), nn.Linear(4, out)
        ).float()

    X, y = data(loss, out)
    X = X.float()
    y = y.float() if y.is_floating_point() else y
    reference = Reference(seeded(0, make), LOSSES[loss](), X, y)  # float64 inside
    model = run(seeded(0, make), LOSSES[loss](), X, y, DiagHessian(), BatchDiagHessian())
    for name, p in model.named_parameters():
        assert p.hessian_diag.dtype == torch.float32
        assert p.batch_hessian_diag.dtype == torch.float32
        assert_close(p.hessian_diag, reference.full[name], rtol=1e-4, atol=1e-5, msg=name)
        assert_close(
            p.batch_hessian_diag, reference.per_sample[name], rtol=1e-4, atol=1e-5, msg=name
        )


# ---------------------------------------------------------------------------
# BackPACK
# ---------------------------------------------------------------------------
def backpack_hessian_diags(model: nn.Module, loss_fn: nn.Module, X: Tensor, y: Tensor):
    bp = pytest.importorskip("backpack")
    assert "curvext" not in bp.__file__  # the real BackPACK, not curvext's compat layer
    from backpack.extensions import BatchDiagHessian as BPBatchDiagHessian
    from backpack.extensions import DiagHessian as BPDiagHessian

    model, loss_fn = bp.extend(copy.deepcopy(model)), bp.extend(copy.deepcopy(loss_fn))
    loss = loss_fn(model(X), y)
    with bp.backpack(BPDiagHessian(), BPBatchDiagHessian()):
        loss.backward()
    return {n: (p.diag_h, p.diag_h_batch) for n, p in model.named_parameters()}


BACKPACK_MODELS = {
    "sigmoid-mlp": (
        lambda: nn.Sequential(
            nn.Linear(3, 4), nn.Sigmoid(), nn.Linear(4, 4), nn.Sigmoid(), nn.Linear(4, 3)
        ),
        (3,),
    ),
    "tanh-cnn": (
        lambda: nn.Sequential(
            nn.Conv2d(1, 2, 3, padding=1),
            nn.Tanh(),
            nn.MaxPool2d(2),
            nn.Conv2d(2, 2, 2),
            nn.Tanh(),
            nn.Flatten(),
            nn.Linear(2, 3),
        ),
        (1, 4, 4),
    ),
}


@pytest.mark.filterwarnings("ignore:Full backward hook is firing:UserWarning")
@pytest.mark.parametrize("loss", ["ce", "mse"])
@pytest.mark.parametrize("reduction", ["mean", "sum"])
@pytest.mark.parametrize("name", list(BACKPACK_MODELS))
def test_backpack_parity(name, reduction, loss):
    make, in_shape = BACKPACK_MODELS[name]
    X, y = data(loss, 3, in_shape=in_shape)
    expected = backpack_hessian_diags(seeded(0, make), LOSSES[loss](reduction=reduction), X, y)
    model = check(seeded(0, make), LOSSES[loss](reduction=reduction), X, y)
    for param_name, p in model.named_parameters():
        diag_h, diag_h_batch = expected[param_name]
        assert_close(p.hessian_diag, diag_h, msg=param_name)
        assert_close(p.batch_hessian_diag, diag_h_batch, msg=param_name)


# ---------------------------------------------------------------------------
# 7. Refusals (DiagHessian only: GGNDiag on the same model works)
# ---------------------------------------------------------------------------
class Attention(nn.Module):
    """Scores ``q k^T`` of one Linear's outputs (no softmax)."""

    def __init__(self):
        super().__init__()
        self.qk = nn.Linear(2, 4)
        self.head = nn.Linear(3, 3)

    def forward(self, x: Tensor) -> Tensor:  # x: [N, 3, 2]
        q, k = self.qk(x).chunk(2, -1)
        return self.head((q @ k.transpose(1, 2)).mean(1))


class Tied(nn.Module):
    """The same Linear twice in a row."""

    def __init__(self):
        super().__init__()
        self.shared = nn.Linear(3, 3)

    def forward(self, x: Tensor) -> Tensor:
        return self.shared(torch.tanh(self.shared(x)))


class Square(nn.Module):
    def __init__(self):
        super().__init__()
        self.a = nn.Linear(3, 3)
        self.b = nn.Linear(3, 3)

    def forward(self, x: Tensor) -> Tensor:
        h = self.a(x)
        return self.b(h * h)


class SharedTrunkGate(nn.Module):
    """Two branches of one parametrized trunk multiplied (a gated unit)."""

    def __init__(self):
        super().__init__()
        self.trunk = nn.Linear(3, 3)
        self.a = nn.Linear(3, 3)
        self.b = nn.Linear(3, 3)

    def forward(self, x: Tensor) -> Tensor:
        h = self.trunk(x)
        return self.a(h) * self.b(h)


class Square3(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x):
        ctx.save_for_backward(x)
        return x**3

    @staticmethod
    def backward(ctx, grad):
        (x,) = ctx.saved_tensors
        return 3 * x**2 * grad


class OwnTanh(nn.Module):
    """A custom layer applying tanh to its own parameters' output."""

    def __init__(self):
        super().__init__()
        self.weight = nn.Parameter(torch.randn(3, 3))
        self.bias = nn.Parameter(torch.randn(3))

    def forward(self, x: Tensor) -> Tensor:
        return torch.tanh(F.linear(x, self.weight, self.bias))


class ScaledInput(nn.Module):
    """A parent's own parameter reaches its child's tanh."""

    def __init__(self):
        super().__init__()
        self.scale = nn.Parameter(torch.randn(3))
        self.lin = nn.Linear(3, 3)

    def forward(self, x: Tensor) -> Tensor:
        return torch.tanh(self.lin(x * self.scale))


class TiedEmbedding(nn.Module):
    """Input and output embeddings tied (``F.linear`` with the embedding)."""

    def __init__(self):
        super().__init__()
        self.embed = nn.Embedding(3, 4)

    def forward(self, tokens: Tensor) -> Tensor:
        return F.linear(torch.tanh(self.embed(tokens)), self.embed.weight)


REFUSALS = {
    "softmax": (
        lambda: Between(lambda h: torch.softmax(h, -1)),
        (3,),
        r"operation Softmax \(SoftmaxBackward0\)",
    ),
    "log-softmax": (
        lambda: Between(lambda h: torch.log_softmax(h, -1)),
        (3,),
        r"operation LogSoftmax \(LogSoftmaxBackward0\)",
    ),
    "layer-norm": (
        lambda: nn.Sequential(nn.Linear(3, 4), nn.LayerNorm(4), nn.Linear(4, 3)),
        (3,),
        r"through NativeLayerNorm is not computed: the normalisation",
    ),
    "group-norm": (
        lambda: nn.Sequential(nn.Linear(3, 4), nn.GroupNorm(2, 4), nn.Linear(4, 3)),
        (3,),
        r"through NativeGroupNorm is not computed: the normalisation",
    ),
    "attention-scores": (Attention, (3, 2), r"Bmm.*a parameter reaches both of its factors"),
    "tied-linear": (Tied, (3,), r"Addmm.*a parameter reaches both of its factors"),
    "x-times-x": (Square, (3,), r"Mul.*a parameter reaches both of its factors"),
    "shared-trunk-gate": (SharedTrunkGate, (3,), r"Mul.*a parameter reaches both"),
    "custom-function": (
        lambda: Between(Square3.apply),
        (3,),
        r"operation Square3Backward \(Square3Backward\)",
    ),
    "atan": (lambda: Between(torch.atan), (3,), r"operation Atan \(AtanBackward0\)"),
    # the parent owns the tied weight (used outside the embedding's call):
    # either refusal names the op
    "tied-embedding": (
        TiedEmbedding,
        None,
        r"Mm.*a parameter reaches both of its factors|Tanh inside TiedEmbedding acts on",
    ),
    "own-parameters": (
        lambda: nn.Sequential(OwnTanh(), nn.Linear(3, 3)),
        (3,),
        r"Tanh inside OwnTanh acts on a tensor that depends on that module's own",
    ),
    "parent-parameter-before-tanh": (
        ScaledInput,
        (3,),
        r"Tanh inside ScaledInput acts on a tensor that depends on that module's own",
    ),
    # autograd hides an in-place op on a view inside CopySlices (these gave
    # wrong numbers before the refusal)
    "in-place-tanh-on-a-view": (
        lambda: Between(_in_place_on_view(lambda v: v.tanh_())),
        (3,),
        r"in-place (Tanh|operation) on a view .* Write it out of place",
    ),
    "in-place-division-on-a-view": (
        lambda: Between(_in_place_on_view(lambda v: v.div_(v.detach().abs() + 1))),
        (3,),
        r"in-place (Div|operation) on a view",
    ),
    "in-place-elu-on-a-view": (
        lambda: Between(_in_place_on_view(lambda v: F.elu(v, inplace=True))),
        (3,),
        r"in-place (Elu|operation) on a view",
    ),
}


def _in_place_on_view(op: Callable[[Tensor], Tensor]) -> Callable[[Tensor], Tensor]:
    """``h`` with ``op`` applied in place to its first two columns."""

    def apply(h: Tensor) -> Tensor:
        h = h * 1.0  # not the Linear's own output
        op(h[:, :2])
        return h

    return apply


class InputTimesActivation(nn.Module):
    """``b(sigmoid(a(x)) * x.sum(1))`` with ``x.requires_grad``: the input is
    a leaf of the graph but no parameter, so the product has one factor
    that parameters reach."""

    def __init__(self):
        super().__init__()
        self.a, self.b = nn.Linear(3, 4), nn.Linear(4, 3)

    def forward(self, x: Tensor) -> Tensor:
        return self.b(torch.sigmoid(self.a(x)) * x.sum(1, keepdim=True))


def test_input_with_requires_grad_is_not_a_parameter():
    X, y = data("ce", 3)
    check(seeded(0, InputTimesActivation), nn.CrossEntropyLoss(), X.requires_grad_(), y)


def refusal_data(in_shape):
    if in_shape is None:  # tokens
        return torch.tensor([0, 2, 1]), torch.tensor([1, 1, 0])
    return data("ce", 3, in_shape=in_shape)


@pytest.mark.parametrize("extension", [DiagHessian, BatchDiagHessian])
@pytest.mark.parametrize("case", list(REFUSALS))
def test_refusals(case, extension):
    make, in_shape, message = REFUSALS[case]
    X, y = refusal_data(in_shape)
    with pytest.raises(NotImplementedError, match=message):
        run(seeded(0, make), nn.CrossEntropyLoss(), X, y, extension())


@pytest.mark.parametrize("case", list(REFUSALS))
def test_refused_models_still_get_the_ggn_diagonal(case):
    """The refusal is DiagHessian's only: GGNDiag on the same extended model,
    after the refused pass, is the exact GGN diagonal."""
    make, in_shape, message = REFUSALS[case]
    X, y = refusal_data(in_shape)
    model = seeded(0, make)
    graph_model = copy.deepcopy(model)
    reference = GraphReference(
        graph_model(X), list(graph_model.parameters()), lambda out: F.cross_entropy(out, y)
    )
    expected = reference.split(reference.ggn().diagonal())
    with pytest.raises(NotImplementedError, match=message):
        run(model, nn.CrossEntropyLoss(), X, y, DiagHessian(), GGNDiag())
    model.zero_grad()
    model = run(model, nn.CrossEntropyLoss(), X, y, GGNDiag())
    for (name, p), ggn_diag in zip(model.named_parameters(), expected):
        assert_close(p.ggn_diag, ggn_diag, msg=name)
