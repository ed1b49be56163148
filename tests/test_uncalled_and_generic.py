"""Parameters no dedicated rule sees, and the generic rule beyond the easy case.

Against dense float64 ``torch.func`` references (GGN diagonal, per-sample
gradients, per-sample GGN from ``SqrtGGN``, and the single KFAC factor of a
generic parameter, which is its exact GGN block):

* parameters used without a call of the module that owns them
  (``MultiheadAttention.out_proj``, ``F.linear(x, self.inner.weight)``):
  covered through the nearest recorded ancestor call;
* ``TransformerEncoderLayer`` (eval, no dropout);
* ``LSTM``/``GRU``, batch-first and time-major, using the output sequence and
  the final states (``[layers, N, H]``, samples on axis 1): ``vmap`` cannot
  run them, curvext loops and says so once with a ``CurvextNote``;
* the generic rule on modules whose inputs/outputs hold the samples on an
  axis other than the first.

And the refusals: a parameter that reaches the loss outside every extended
module is named in a warning; a module with trainable parameters called
without the batch axis is a ``ValueError``.

The dense references run with the math kernel of scaled-dot-product attention
(``jacrev`` has no batching rule through the fused kernels); curvext runs with
whatever kernel PyTorch picks, as a user's code would.

``CurvextNote`` (one-time notes) is tolerated where a test expects one; vmap's
"performance drop" warning is still an error everywhere (pyproject.toml,
conftest.py), and so is the "computes nothing" warning where every parameter
must be covered.
"""

from __future__ import annotations

import copy
import warnings

import pytest
import torch
from torch import nn
from torch.nn import functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

from curvext import backpack, extend
from curvext.extensions import KFAC, BatchGrad, GGNDiag, SqrtGGN
from curvext.rules import generic
from curvext.rules.generic import CurvextNote
from tests.cases import ScaleShift, assert_close, run_curvext, trainable
from tests.references import DenseReference

NOTE = "ignore::curvext.rules.generic.CurvextNote"
UNCOVERED = "curvext computes nothing"
pytestmark = pytest.mark.filterwarnings(f"error:{UNCOVERED}:UserWarning")

# tiny sizes, pairwise different so that no axis is mistaken for the batch axis
N, T, S, D, H, LAYERS = 3, 4, 5, 4, 5, 2


def extensions():
    return [GGNDiag(), SqrtGGN(), BatchGrad(), KFAC("type-2")]


def dense_reference(model, loss_fn, X, y) -> DenseReference:
    with sdpa_kernel(SDPBackend.MATH):
        return DenseReference(copy.deepcopy(model), loss_fn, X, y)


def check_against_reference(model, reference, generic_names=(), prefix=""):
    """GGN diagonal, per-sample gradients, per-sample GGN (via SqrtGGN) of all
    trainable parameters; single KFAC factor = exact block for ``generic_names``.

    ``prefix``: the reference's parameter names are ``prefix + name``.
    """
    params = trainable(model)
    for name, param in params.items():
        assert_close(param.ggn_diag, reference.diag(prefix + name), msg=name)
        assert_close(param.grad_batch, reference.per_sample_grads(prefix + name), msg=name)
    columns = torch.cat([p.sqrt_ggn.reshape(*p.sqrt_ggn.shape[:2], -1) for p in params.values()], 2)
    per_sample = reference.per_sample_ggn([prefix + name for name in params])
    for n in range(reference.N):
        assert_close(columns[:, n].T @ columns[:, n], per_sample[n], msg=f"sample {n}")
    for name in generic_names:
        factors = params[name].kfac
        assert len(factors) == 1, f"{name}: {len(factors)} factors"
        assert_close(factors[0], reference.block(prefix + name), msg=name)


def run_and_check(make_model, make_data, loss_fn=None, generic_prefixes=()):
    torch.manual_seed(0)
    model = make_model()
    X, y = make_data()
    loss_fn = nn.CrossEntropyLoss() if loss_fn is None else loss_fn
    reference = dense_reference(model, loss_fn, X, y)
    plain = copy.deepcopy(model)
    loss_fn(plain(X), y).backward()
    model = run_curvext(model, loss_fn, X, y, *extensions())
    generic_names = [
        name
        for name in trainable(model)
        if any(name.startswith(prefix) for prefix in generic_prefixes)
    ]
    assert generic_names or not generic_prefixes
    check_against_reference(model, reference, generic_names)
    for (name, param), plain_param in zip(model.named_parameters(), plain.parameters()):
        torch.testing.assert_close(param.grad, plain_param.grad, rtol=0, atol=0, msg=name)
    return model


def classification(*shape, classes=3):
    return lambda: (torch.randn(*shape), torch.randint(0, classes, (N,)))


# ---------------------------------------------------------------------------
# MultiheadAttention (out_proj is never called) and TransformerEncoderLayer
# ---------------------------------------------------------------------------
class SelfAttention(nn.Module):
    """``[N, T, D]`` (or ``[T, N, D]``) → MHA → mean over positions → Linear."""

    def __init__(self, batch_first=True, **kwargs):
        super().__init__()
        self.batch_first = batch_first
        self.mha = nn.MultiheadAttention(D, 2, batch_first=batch_first, **kwargs)
        self.head = nn.Linear(D, 3)

    def forward(self, x):
        h, _ = self.mha(x, x, x)
        return self.head(torch.tanh(h).mean(1 if self.batch_first else 0))


class CrossAttention(nn.Module):
    """kdim/vdim, a key padding mask (keyword input) and the averaged attention
    weights (a second output) in the loss."""

    def __init__(self):
        super().__init__()
        self.mha = nn.MultiheadAttention(D, 2, batch_first=True, kdim=3, vdim=2)
        self.head = nn.Linear(D, 3)

    def forward(self, x):  # [N, S, D + 3 + 2]
        query, key, value = x[..., :D], x[..., D : D + 3], x[..., D + 3 :]
        mask = torch.zeros(x.shape[:2], dtype=torch.bool)
        mask[:, -1] = True
        h, weights = self.mha(query, key, value, key_padding_mask=mask)
        return self.head(h.mean(1)) + weights.square().sum((1, 2)).unsqueeze(1)


def encoder(norm_first):
    layer = nn.TransformerEncoderLayer(
        D, 2, dim_feedforward=6, dropout=0.0, batch_first=True, norm_first=norm_first
    )
    return nn.Sequential(layer, nn.Flatten(), nn.Linear(T * D, 3)).eval()


ATTENTION_MODELS = {
    "mha": (SelfAttention, classification(N, T, D), ["mha."]),
    "mha_bias_kv_zero_attn": (
        lambda: SelfAttention(add_bias_kv=True, add_zero_attn=True),
        classification(N, T, D),
        ["mha."],
    ),
    "mha_cross_mask_weights": (CrossAttention, classification(N, S, D + 5), ["mha."]),
    # generic rule with the samples on axis 1 (batch_first=False)
    "mha_time_major": (
        lambda: SelfAttention(batch_first=False),
        classification(T, N, D),
        ["mha."],
    ),
    "encoder_layer": (
        lambda: encoder(norm_first=False),
        classification(N, T, D),
        ["0.self_attn.", "0.norm"],
    ),
    "encoder_layer_norm_first": (
        lambda: encoder(norm_first=True),
        classification(N, T, D),
        ["0.self_attn.", "0.norm"],
    ),
}


@pytest.mark.filterwarnings(NOTE)
@pytest.mark.parametrize("name", ATTENTION_MODELS)
def test_attention(name):
    make_model, make_data, generic_prefixes = ATTENTION_MODELS[name]
    model = run_and_check(make_model, make_data, generic_prefixes=generic_prefixes)
    mha = next(m for m in model.modules() if isinstance(m, nn.MultiheadAttention))
    assert hasattr(mha.out_proj.weight, "ggn_diag")


# ---------------------------------------------------------------------------
# F.linear on a child's parameters, a root's own parameters
# ---------------------------------------------------------------------------
class FunctionalChild(nn.Module):
    """Uses ``inner``'s parameters through ``F.linear``, never calls ``inner``."""

    def __init__(self):
        super().__init__()
        self.inner = nn.Linear(5, 4)
        self.head = nn.Linear(4, 3)

    def forward(self, x):
        return self.head(torch.tanh(F.linear(x, self.inner.weight, self.inner.bias)))


class FunctionalConvChild(nn.Module):
    """``F.conv1d`` on a never-called ``Conv1d``'s parameters."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv1d(2, 3, 3)
        self.head = nn.Linear(3 * 4, 3)

    def forward(self, x):  # [N, 2, 6]
        h = F.conv1d(x, self.conv.weight, self.conv.bias)
        return self.head(torch.sigmoid(h).flatten(1))


class OwnParameters(nn.Module):
    """A module with its own parameters used in tensor code, and a child."""

    def __init__(self):
        super().__init__()
        self.scale = nn.Parameter(torch.randn(5))
        self.temperature = nn.Parameter(torch.tensor(0.7))
        self.head = nn.Linear(5, 3)

    def forward(self, x):
        return self.head(torch.tanh(x * self.scale)) / self.temperature


FUNCTIONAL_MODELS = {
    "functional_linear": (FunctionalChild, classification(N, 5), ["inner."]),
    # the nearest recorded ancestor (FunctionalChild, not the Sequential) covers
    # inner.*; nothing may be counted twice
    "functional_linear_nested": (
        lambda: nn.Sequential(nn.Linear(5, 5), nn.Tanh(), FunctionalChild()),
        classification(N, 5),
        ["2.inner."],
    ),
    "functional_conv": (FunctionalConvChild, classification(N, 2, 6), ["conv."]),
    "own_parameters": (OwnParameters, classification(N, 5), ["scale", "temperature"]),
    # a module returning its parameter itself records no call (no graph node):
    # the parameter is covered by the calling ancestor
    "parameter_returned_as_is": (
        lambda: PositionalModel("parameter", expand=False),
        lambda: token_data(),
        ["positions.table"],
    ),
    "own_parameters_nested": (
        lambda: nn.Sequential(OwnParameters(), nn.Tanh(), nn.Linear(3, 3)),
        classification(N, 5),
        ["0.scale", "0.temperature"],
    ),
}


@pytest.mark.filterwarnings(NOTE)
@pytest.mark.parametrize("name", FUNCTIONAL_MODELS)
def test_parameters_used_without_a_call(name):
    make_model, make_data, generic_prefixes = FUNCTIONAL_MODELS[name]
    run_and_check(make_model, make_data, generic_prefixes=generic_prefixes)


# ---------------------------------------------------------------------------
# LSTM / GRU: vmap cannot run them, curvext loops
# ---------------------------------------------------------------------------
class Recurrent(nn.Module):
    """Output sequence and final states ``[layers, N, H]`` both reach the loss."""

    def __init__(self, rnn_type, batch_first, initial_state=False):
        super().__init__()
        self.batch_first = batch_first
        self.initial_state = initial_state
        self.rnn = rnn_type(2, H, num_layers=LAYERS, batch_first=batch_first)
        self.lstm = rnn_type is nn.LSTM
        states = 2 if self.lstm else 1
        self.head = nn.Linear(H + states * LAYERS * H, 3)
        self.register_buffer("to_state", torch.randn(2, LAYERS * H))

    def forward(self, x):
        time = 1 if self.batch_first else 0
        state = None
        if self.initial_state:  # depends on the sample, not on parameters
            h0 = torch.tanh(x.mean(time) @ self.to_state)
            h0 = h0.reshape(-1, LAYERS, H).transpose(0, 1).contiguous()
            state = (h0, 0.5 * h0) if self.lstm else h0
        out, final = self.rnn(x, state)
        final = final if self.lstm else (final,)
        features = [torch.tanh(out).mean(time)]
        features += [f.transpose(0, 1).flatten(1) for f in final]
        return self.head(torch.cat(features, 1))


def sequence_input(batch_first):
    shape = (N, T, 2) if batch_first else (T, N, 2)
    return classification(*shape)


RNN_TYPES = {"lstm": nn.LSTM, "gru": nn.GRU}


@pytest.mark.filterwarnings(NOTE)
@pytest.mark.parametrize("initial_state", [False, True], ids=["zero_state", "h0"])
@pytest.mark.parametrize("batch_first", [True, False], ids=["batch_first", "time_major"])
@pytest.mark.parametrize("rnn", RNN_TYPES)
def test_recurrent(rnn, batch_first, initial_state):
    run_and_check(
        lambda: Recurrent(RNN_TYPES[rnn], batch_first, initial_state),
        sequence_input(batch_first),
        generic_prefixes=["rnn."],
    )


@pytest.mark.parametrize("rnn", RNN_TYPES)
def test_recurrent_loop_is_noted_once(rnn, monkeypatch):
    monkeypatch.setattr(generic, "_NOTED", set())
    torch.manual_seed(0)
    X, y = sequence_input(True)()

    def step():
        model = Recurrent(RNN_TYPES[rnn], batch_first=True)
        run_curvext(model, nn.CrossEntropyLoss(), X, y, GGNDiag())

    with pytest.warns(CurvextNote) as record:
        step()
    loop_notes = [w for w in record if "loops over samples" in str(w.message)]
    assert len(loop_notes) == 1, [str(w.message) for w in record]
    assert RNN_TYPES[rnn].__name__ in str(loop_notes[0].message)
    with warnings.catch_warnings():
        warnings.simplefilter("error", CurvextNote)
        step()  # noted once: no second note


@pytest.mark.filterwarnings(NOTE)
def test_performance_drop_still_an_error():
    """Tolerating CurvextNote must not swallow vmap's slow-fallback warning."""
    message = (
        "There is a performance drop because we have not yet implemented the "
        "batching rule for aten::something."
    )
    with pytest.raises(UserWarning, match="performance drop"):
        warnings.warn(message, UserWarning)


# ---------------------------------------------------------------------------
# The generic rule with the samples on another axis than the first
# ---------------------------------------------------------------------------
class TimeMajorScaleShift(nn.Module):
    """``ScaleShift`` (generic rule) on ``[T, N, D]``."""

    def __init__(self):
        super().__init__()
        self.inp = nn.Linear(3, D)
        self.mid = ScaleShift(D)
        self.out = nn.Linear(T * D, 3)

    def forward(self, x):  # [N, T, 3]
        h = self.mid(self.inp(x).transpose(0, 1))  # [T, N, D]
        return self.out(h.transpose(0, 1).flatten(1))


class BatchLast(nn.Module):
    """Input ``[T, D, N]`` (samples last), output ``[N, T, D]``."""

    def __init__(self):
        super().__init__()
        self.weight = nn.Parameter(torch.randn(D, 1))
        self.mix = nn.Parameter(torch.randn(T, T))

    def forward(self, x):
        h = torch.tanh(x * self.weight)  # [T, D, N]
        return torch.einsum("st,tdn->nsd", self.mix, h)


class BatchMoved(nn.Module):
    """Input ``[N, D]``, output ``[D, N]``."""

    def __init__(self):
        super().__init__()
        self.weight = nn.Parameter(torch.randn(D, D))

    def forward(self, x):
        return torch.tanh(self.weight @ x.T)


class NonFirstAxes(nn.Module):
    def __init__(self):
        super().__init__()
        self.batch_last = BatchLast()
        self.moved = BatchMoved()
        self.head = nn.Linear(D, 3)

    def forward(self, x):  # [N, T, D]
        h = self.batch_last(x.permute(1, 2, 0)).mean(1)  # [N, D]
        return self.head(self.moved(h).T)


NON_FIRST_MODELS = {
    "time_major_scale_shift": (
        TimeMajorScaleShift,
        classification(N, T, 3),
        ["mid."],
    ),
    "batch_last_and_moved": (
        NonFirstAxes,
        classification(N, T, D),
        ["batch_last.", "moved."],
    ),
}


@pytest.mark.filterwarnings(NOTE)
@pytest.mark.parametrize("name", NON_FIRST_MODELS)
def test_generic_rule_batch_axis_not_first(name):
    make_model, make_data, generic_prefixes = NON_FIRST_MODELS[name]
    run_and_check(make_model, make_data, generic_prefixes=generic_prefixes)


# ---------------------------------------------------------------------------
# Parameters outside every extended module: named in a warning
# ---------------------------------------------------------------------------
def small_mlp():
    return nn.Sequential(nn.Linear(4, 5), nn.Tanh(), nn.Linear(5, 3))


EXTENSION_SETS = {
    "second_order": lambda: [GGNDiag(), SqrtGGN()],
    "first_order": lambda: [BatchGrad()],
}


def uncovered_warning(record, count, shapes):
    messages = [str(w.message) for w in record if UNCOVERED in str(w.message)]
    assert len(messages) == 1, messages
    message = messages[0]
    assert f"{count} parameter(s)" in message, message
    for shape in shapes:
        assert str(shape) in message, message


@pytest.mark.parametrize("make_extensions", EXTENSION_SETS.values(), ids=EXTENSION_SETS)
def test_only_a_submodule_extended(make_extensions):
    torch.manual_seed(0)
    model = small_mlp()
    X, y = torch.randn(N, 4), torch.randint(0, 3, (N,))
    loss_fn = nn.CrossEntropyLoss()
    reference = dense_reference(model, loss_fn, X, y)
    extend(model[2])  # model[0] is not extended
    loss = extend(loss_fn)(model(X), y)
    with pytest.warns(UserWarning, match=UNCOVERED) as record:
        with backpack(*make_extensions()):
            loss.backward()
    uncovered_warning(record, 2, [(5, 4), (5,)])
    for param in model[0].parameters():
        assert param.grad is not None
        assert not hasattr(param, "ggn_diag") and not hasattr(param, "grad_batch")
    for name, param in model[2].named_parameters():
        if hasattr(param, "ggn_diag"):
            assert_close(param.ggn_diag, reference.diag(f"2.{name}"), msg=name)
        if hasattr(param, "grad_batch"):
            expected = reference.per_sample_grads(f"2.{name}")
            assert_close(param.grad_batch, expected, msg=name)


class OutsideOffset(nn.Module):
    """Reference only: the model plus a bare parameter added to its output."""

    def __init__(self, model, offset):
        super().__init__()
        self.model = model
        self.offset = offset

    def forward(self, x):
        return self.model(x) + self.offset


@pytest.mark.parametrize("make_extensions", EXTENSION_SETS.values(), ids=EXTENSION_SETS)
def test_bare_parameter_outside_the_model(make_extensions):
    torch.manual_seed(0)
    model = small_mlp()
    offset = nn.Parameter(torch.randn(3))
    X, y = torch.randn(N, 4), torch.randint(0, 3, (N,))
    loss_fn = nn.CrossEntropyLoss()
    reference = dense_reference(OutsideOffset(model, offset), loss_fn, X, y)
    model, extended_loss = extend(model), extend(loss_fn)
    loss = extended_loss(model(X) + offset, y)
    with pytest.warns(UserWarning, match=UNCOVERED) as record:
        with backpack(*make_extensions()):
            loss.backward()
    uncovered_warning(record, 1, [(3,)])
    assert offset.grad is not None and not hasattr(offset, "ggn_diag")
    for name, param in model.named_parameters():
        if hasattr(param, "ggn_diag"):
            assert_close(param.ggn_diag, reference.diag(f"model.{name}"), msg=name)
        else:
            expected = reference.per_sample_grads(f"model.{name}")
            assert_close(param.grad_batch, expected, msg=name)


# ---------------------------------------------------------------------------
# A module with trainable parameters called without the batch axis
# ---------------------------------------------------------------------------
class LearnedPositions(nn.Module):
    """Generic rule, called without any input: ``[S, D]``."""

    def __init__(self):
        super().__init__()
        self.table = nn.Parameter(torch.randn(S, D))

    def forward(self):
        return torch.tanh(self.table)


class ReturnsParameter(LearnedPositions):
    def forward(self):
        return self.table


class PositionalModel(nn.Module):
    """Token embedding ``[N, S, D]`` + positional term ``[S, D]`` (broadcast)."""

    def __init__(self, kind, expand):
        super().__init__()
        self.kind = kind
        self.expand = expand
        self.tokens = nn.Embedding(7, D)
        if kind == "embedding":
            self.positions = nn.Embedding(S, D)
        elif kind == "parameter":
            self.positions = ReturnsParameter()
        else:
            self.positions = LearnedPositions()
        self.head = nn.Linear(D, 3)

    def forward(self, x):  # [N, S] token ids
        if self.kind == "embedding":
            positions = torch.arange(x.shape[1])
            if self.expand:  # what the error message suggests
                positions = positions.expand(x.shape[0], -1)
            position_term = self.positions(positions)
        else:
            position_term = self.positions()
        h = torch.tanh(self.tokens(x) + position_term)
        return self.head(h).permute(0, 2, 1)  # [N, C, S]


def token_data():
    return torch.randint(0, 7, (N, S)), torch.randint(0, 3, (N, S))


@pytest.mark.filterwarnings(NOTE)
@pytest.mark.parametrize(
    "make_extension",
    [GGNDiag, SqrtGGN, lambda: KFAC("type-2"), BatchGrad],
    ids=["GGNDiag", "SqrtGGN", "KFAC", "BatchGrad"],
)
@pytest.mark.parametrize("kind", ["embedding", "generic"])
def test_called_without_batch_axis(kind, make_extension):
    torch.manual_seed(0)
    model = PositionalModel(kind, expand=False)
    X, y = token_data()
    with pytest.raises(ValueError, match="without the batch axis") as error:
        run_curvext(model, nn.CrossEntropyLoss(), X, y, make_extension())
    culprit = "Embedding(5, 4)" if kind == "embedding" else "LearnedPositions"
    assert culprit in str(error.value)


def test_positions_expanded_to_the_batch():
    """The fix the error message suggests gives exact results."""
    run_and_check(lambda: PositionalModel("embedding", expand=True), token_data)


# ---------------------------------------------------------------------------
# Former failures (library bugs/limitations found while writing this file,
# fixed since): parameters used inside and outside a call, RNN hidden states
# whose layer count equals N, Linear on time-major outputs.
# ---------------------------------------------------------------------------
class TiedFunctionalHead(nn.Module):
    """fairseq-style tied output layer: ``F.linear(h, self.embed.weight)`` on an
    Embedding that is also called."""

    def __init__(self):
        super().__init__()
        self.embed = nn.Embedding(6, D)
        self.mix = nn.Linear(D, D)

    def forward(self, x):  # [N, S]
        h = torch.tanh(self.mix(self.embed(x)))
        return F.linear(h, self.embed.weight).permute(0, 2, 1)


class ParentUsesChildWeight(nn.Module):
    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(4, 3)

    def forward(self, x):
        return self.lin(x) * self.lin.weight.sum(1)


class RecurrentHeadTimeMajor(nn.Module):
    """A Linear on the whole time-major output ``[T, N, H]`` of a GRU."""

    def __init__(self):
        super().__init__()
        self.rnn = nn.GRU(2, H)
        self.head = nn.Linear(H, 3)

    def forward(self, x):  # [T, N, 2]
        out, _ = self.rnn(x)
        return self.head(out).permute(1, 2, 0)  # [N, C, T]


class LayersEqualBatch(nn.Module):
    def __init__(self):
        super().__init__()
        self.rnn = nn.LSTM(2, H, num_layers=N, batch_first=True)
        self.head = nn.Linear(N * H, 3)

    def forward(self, x):  # [N, T, 2]
        _, (h_n, _) = self.rnn(x)  # [N (layers), N, H]
        return self.head(h_n.transpose(0, 1).flatten(1))


FORMER_FAILURES = {
    # a parameter of a called module that is also used directly must get the
    # contribution of both uses (through the nearest ancestor)
    "tied_functional_head": (
        TiedFunctionalHead,
        lambda: (torch.randint(0, 6, (N, S)), torch.randint(0, 6, (N, S))),
        AssertionError,
    ),
    "parent_uses_called_child_weight": (
        ParentUsesChildWeight,
        classification(N, 4),
        AssertionError,
    ),
    # hidden states [layers, N, H] with layers == N: the samples are on axis 1
    "rnn_layers_equal_batch": (
        LayersEqualBatch,
        classification(N, T, 2),
        RuntimeError,
    ),
    # a Linear on [T, N, H]: the samples are on axis 1
    "linear_on_time_major_output": (
        RecurrentHeadTimeMajor,
        lambda: (torch.randn(T, N, 2), torch.randint(0, 3, (N, T))),
        ValueError,
    ),
}


@pytest.mark.filterwarnings(NOTE)
@pytest.mark.parametrize("name", list(FORMER_FAILURES))
def test_former_failure(name):
    make_model, make_data, _ = FORMER_FAILURES[name]
    run_and_check(make_model, make_data)
