"""The known traps of the engine (docs/design.md) and the conventions users rely on."""

import copy
import inspect

import pytest
import torch
from torch import nn

from curvext import backpack, disable, extend
from curvext.extensions import (
    KFAC,
    BatchGGNDiag,
    BatchGrad,
    BatchL2Grad,
    GGNDiag,
    SqrtGGN,
    SumGradSquared,
    Variance,
)
from tests.cases import (
    ATTRIBUTES,
    CASES,
    CASES_BY_NAME,
    assert_close,
    dense_reference,
    run_case,
    run_curvext,
    trainable,
)
from tests.references import DenseReference


def exact_extensions():
    return [
        GGNDiag(),
        BatchGGNDiag(),
        SqrtGGN(),
        KFAC("type-2"),
        BatchGrad(),
        BatchL2Grad(),
        SumGradSquared(),
        Variance(),
    ]


def check_against_reference(model, reference: DenseReference):
    """GGN diagonal, per-sample GGN (via SqrtGGN) and per-sample gradients."""
    params = trainable(model)
    for name, param in params.items():
        assert_close(param.ggn_diag, reference.diag(name), msg=name)
        assert_close(param.grad_batch, reference.per_sample_grads(name), msg=name)
    columns = torch.cat([p.sqrt_ggn.reshape(*p.sqrt_ggn.shape[:2], -1) for p in params.values()], 2)
    per_sample = reference.per_sample_ggn(list(params))
    for n in range(reference.N):
        assert_close(columns[:, n].T @ columns[:, n], per_sample[n], msg=f"sample {n}")


# ---------------------------------------------------------------------------
# In-place ops after a layer
# ---------------------------------------------------------------------------
class InPlaceAfterLinear(nn.Module):
    def __init__(self):
        super().__init__()
        self.first = nn.Linear(4, 5)
        self.second = nn.Linear(5, 5)
        self.out = nn.Linear(5, 3)

    def forward(self, x):
        h = torch.relu_(self.first(x))
        h = self.second(h)
        h.mul_(torch.sigmoid(h.detach()) + 0.5).add_(0.1)  # in-place on an output
        h = nn.functional.relu(h, inplace=True)
        return self.out(h)


INPLACE_MODELS = {
    "relu_inplace_after_linear": (
        lambda: nn.Sequential(nn.Linear(4, 5), nn.ReLU(inplace=True), nn.Linear(5, 3)),
        (4,),
    ),
    "inplace_chain": (InPlaceAfterLinear, (4,)),
    "relu_inplace_after_conv": (
        lambda: nn.Sequential(
            nn.Conv1d(4, 3, 2), nn.ReLU(inplace=True), nn.Flatten(), nn.Linear(6, 3)
        ),
        (4, 3),
    ),
}


@pytest.mark.parametrize("name", INPLACE_MODELS)
def test_inplace_after_layer(name):
    make_model, in_shape = INPLACE_MODELS[name]
    torch.manual_seed(0)
    model = make_model()
    X = torch.randn(5, *in_shape)
    y = torch.randint(0, 3, (5,))
    loss_fn = nn.CrossEntropyLoss()
    reference = DenseReference(copy.deepcopy(model), loss_fn, X, y)
    model = run_curvext(model, loss_fn, X, y, GGNDiag(), SqrtGGN(), BatchGrad())
    check_against_reference(model, reference)


# ---------------------------------------------------------------------------
# Weight tying
# ---------------------------------------------------------------------------
class SharedParameter(nn.Module):
    """Two modules holding the same Parameter (embedding/unembedding style)."""

    def __init__(self):
        super().__init__()
        self.encode = nn.Linear(4, 4)
        self.decode = nn.Linear(4, 4, bias=False)
        self.decode.weight = self.encode.weight

    def forward(self, x):
        return self.decode(torch.tanh(self.encode(x)))


class RecurrentCell(nn.Module):
    """A Linear applied at every step of a short recurrence."""

    def __init__(self):
        super().__init__()
        self.cell = nn.Linear(3, 3)
        self.out = nn.Linear(3, 3)

    def forward(self, x):  # [N, T, 3]
        h = torch.zeros_like(x[:, 0])
        for t in range(x.shape[1]):
            h = torch.tanh(self.cell(h) + x[:, t])
        return self.out(h)


TIED_MODELS = {
    "module_called_twice": (CASES_BY_NAME["tied"].make_model, (5,)),
    "shared_parameter": (SharedParameter, (4,)),
    "recurrence": (RecurrentCell, (4, 3)),
}


@pytest.mark.parametrize("name", TIED_MODELS)
def test_tied_weights(name):
    make_model, in_shape = TIED_MODELS[name]
    torch.manual_seed(0)
    model = make_model()
    X, y = torch.randn(4, *in_shape), torch.randint(0, 3, (4,))
    loss_fn = nn.CrossEntropyLoss()
    reference = DenseReference(copy.deepcopy(model), loss_fn, X, y)
    model = run_curvext(model, loss_fn, X, y, GGNDiag(), SqrtGGN(), BatchGrad())
    check_against_reference(model, reference)


# ---------------------------------------------------------------------------
# .grad is PyTorch's, frozen parameters get nothing
# ---------------------------------------------------------------------------
@pytest.mark.parametrize("case", CASES, ids=str)
def test_grad_identical_to_pytorch(case):
    model, loss_fn, X, y = case.build()
    plain = copy.deepcopy(model)
    loss_fn(plain(X), y).backward()
    model = run_curvext(model, loss_fn, X, y, *exact_extensions())
    for (name, param), plain_param in zip(model.named_parameters(), plain.parameters()):
        if plain_param.grad is None:
            assert param.grad is None, name
        else:
            torch.testing.assert_close(param.grad, plain_param.grad, rtol=0, atol=0, msg=name)


def test_extended_model_outside_context_is_plain_pytorch():
    case = CASES_BY_NAME["residual_cnn"]
    model, loss_fn, X, y = case.build()
    plain = copy.deepcopy(model)
    loss_fn(plain(X), y).backward()
    model, loss_fn = extend(model), extend(loss_fn)
    loss_fn(model(X), y).backward()
    for param, plain_param in zip(model.parameters(), plain.parameters()):
        torch.testing.assert_close(param.grad, plain_param.grad, rtol=0, atol=0)
        assert not any(hasattr(param, attribute) for attribute in ATTRIBUTES)


def test_batchnorm_train_mode_without_extensions_works():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 5), nn.BatchNorm1d(5), nn.Linear(5, 3)).train()
    plain = copy.deepcopy(model)
    X, y = torch.randn(6, 4), torch.randint(0, 3, (6,))
    loss_fn = nn.CrossEntropyLoss()
    loss_fn(plain(X), y).backward()
    model, loss_fn = extend(model), extend(loss_fn)
    loss_fn(model(X), y).backward()
    for param, plain_param in zip(model.parameters(), plain.parameters()):
        torch.testing.assert_close(param.grad, plain_param.grad, rtol=0, atol=0)


def test_frozen_parameters_get_nothing():
    case = CASES_BY_NAME["frozen"]
    model = run_case(case, *exact_extensions())
    frozen = [(n, p) for n, p in model.named_parameters() if not p.requires_grad]
    assert frozen, "the case must have frozen parameters"
    for name, param in frozen:
        assert param.grad is None, name
        present = [a for a in ATTRIBUTES if hasattr(param, a)]
        assert not present, f"{name} (requires_grad=False) got {present}"
    for name, param in trainable(model).items():
        missing = [a for a in ATTRIBUTES if not hasattr(param, a)]
        assert not missing, f"{name} is missing {missing}"


@pytest.mark.parametrize("case", CASES, ids=str)
def test_all_extensions_in_one_backward(case):
    """Every exact extension at once, each against the dense reference."""
    reference = dense_reference(case.name)
    model = run_case(case, *exact_extensions())
    N = reference.N
    check_against_reference(model, reference)
    for name, param in trainable(model).items():
        per_sample = reference.per_sample_grads(name)
        assert_close(param.batch_ggn_diag, reference.per_sample_diag(name), msg=name)
        assert_close(param.batch_l2, (per_sample.reshape(N, -1) ** 2).sum(1), msg=name)
        assert_close(param.sum_grad_squared, (per_sample**2).sum(0), msg=name)
        variance = (per_sample**2).sum(0) / N - (per_sample.sum(0) / N) ** 2
        assert_close(param.variance, variance, msg=name)


# ---------------------------------------------------------------------------
# Extensions do not influence each other; the user's RNG stream
# ---------------------------------------------------------------------------
COMPANIONS = {
    "KFAC-type-2": lambda: [KFAC("type-2")],
    "KFAC-mc-1": lambda: [KFAC("mc", mc_samples=1)],
    "KFAC-mc-3": lambda: [KFAC("mc", mc_samples=3)],
    "SqrtGGN-mc-2": lambda: [SqrtGGN(mc_samples=2)],
    "BatchGGNDiag-mc-1+BatchGrad": lambda: [BatchGGNDiag(mc_samples=1), BatchGrad()],
    "all-exact": lambda: [e for e in exact_extensions() if not isinstance(e, GGNDiag)],
}


@pytest.mark.parametrize("companions", COMPANIONS.values(), ids=COMPANIONS)
@pytest.mark.parametrize("case_name", ["mlp_ce", "sequence", "mse_multidim"])
def test_mc_result_independent_of_other_extensions(case_name, companions):
    case = CASES_BY_NAME[case_name]
    torch.manual_seed(7)
    alone = run_case(case, GGNDiag(mc_samples=1))
    torch.manual_seed(7)
    together = run_case(case, GGNDiag(mc_samples=1), *companions())
    for (name, a), b in zip(trainable(alone).items(), trainable(together).values()):
        torch.testing.assert_close(a.ggn_diag, b.ggn_diag, rtol=0, atol=0, msg=name)


def rng_after(case, extensions, batch_size=None):
    torch.manual_seed(123)
    run_case(case, *extensions, batch_size=batch_size)
    return torch.rand(16)


def rng_after_plain(case, batch_size=None):
    model, loss_fn, X, y = case.build(batch_size)
    torch.manual_seed(123)
    loss_fn(model(X), y).backward()
    return torch.rand(16)


@pytest.mark.parametrize("case_name", ["mlp_ce", "sequence"])
def test_rng_untouched_without_mc(case_name):
    case = CASES_BY_NAME[case_name]
    assert torch.equal(rng_after(case, exact_extensions()), rng_after_plain(case))


@pytest.mark.parametrize("case_name", ["mlp_ce", "sequence", "mse_multidim"])
def test_rng_stream_independent_of_mc_configuration(case_name):
    case = CASES_BY_NAME[case_name]
    configurations = [
        ([GGNDiag(mc_samples=1)], None),
        ([GGNDiag(mc_samples=7)], None),
        ([GGNDiag(mc_samples=2)], 1),
        ([GGNDiag(mc_samples=2)], 6),
        ([KFAC("mc", mc_samples=4)], None),
        ([SqrtGGN(mc_samples=3), BatchGGNDiag(mc_samples=5), KFAC("mc")], None),
        ([GGNDiag(mc_samples=2), *exact_extensions()[1:]], 2),
    ]
    streams = [rng_after(case, exts, batch_size) for exts, batch_size in configurations]
    for stream in streams[1:]:
        assert torch.equal(stream, streams[0])
    # one draw happened (MC is seeded from the global generator)
    assert not torch.equal(streams[0], rng_after_plain(case))


# ---------------------------------------------------------------------------
# disable(), repeated iterations, chunked columns
# ---------------------------------------------------------------------------
def test_disable_does_not_record():
    case = CASES_BY_NAME["residual_cnn"]
    reference = dense_reference(case.name)
    model, loss_fn, X, y = case.build()
    model, loss_fn = extend(model), extend(loss_fn)
    with disable():
        model(torch.randn(7, *X.shape[1:]))  # e.g. an evaluation pass
    loss = loss_fn(model(X), y)
    with disable():
        model(X[:2] + 1)
    with backpack(GGNDiag(), SqrtGGN(), BatchGrad()):
        loss.backward()
    check_against_reference(model, reference)


@pytest.mark.parametrize("where", ["before_forward", "between_forward_and_backward"])
def test_no_grad_forward_is_not_recorded(where):
    """A validation pass under torch.no_grad() must not disturb the step."""
    case = CASES_BY_NAME["sequence"]
    reference = dense_reference(case.name)
    model, loss_fn, X, y = case.build()
    model, loss_fn = extend(model), extend(loss_fn)
    if where == "before_forward":
        with torch.no_grad():
            model(X[:1])
    loss = loss_fn(model(X), y)
    if where == "between_forward_and_backward":
        with torch.no_grad():
            model(X[:2])
    with backpack(GGNDiag(), SqrtGGN(), BatchGrad()):
        loss.backward()
    check_against_reference(model, reference)


def test_repeated_iterations():
    """A second step on other data sees only its own forward pass."""
    case = CASES_BY_NAME["sequence"]
    model, loss_fn, X, y = case.build()
    model, loss_fn = extend(model), extend(loss_fn)
    for step in range(3):
        batch_size = 2 + step
        _, _, X, y = case.build(batch_size)
        model.zero_grad()
        loss = loss_fn(model(X), y)
        with backpack(GGNDiag(), SqrtGGN(), BatchGrad()):
            loss.backward()
        pristine, pristine_loss, _, _ = case.build()
        check_against_reference(model, DenseReference(pristine, pristine_loss, X, y))


@pytest.mark.parametrize("max_columns", [1, 2, 5])
@pytest.mark.parametrize("case_name", ["sequence", "mse_multidim", "residual_cnn"])
def test_column_chunking(case_name, max_columns):
    """Columns processed in chunks add up to the same exact results."""
    if "max_columns" not in inspect.signature(backpack).parameters:
        pytest.skip("backpack() has no max_columns argument")
    case = CASES_BY_NAME[case_name]
    reference = dense_reference(case.name)
    model, loss_fn, X, y = case.build()
    model, loss_fn = extend(model), extend(loss_fn)
    loss = loss_fn(model(X), y)
    with backpack(GGNDiag(), SqrtGGN(), BatchGrad(), max_columns=max_columns):
        loss.backward()
    check_against_reference(model, reference)
