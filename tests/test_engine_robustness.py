"""Robustness of the engine: which backward passes trigger it, what it keeps
alive, autocast, column chunking and the autograd threading it switches off.

Numbers are compared with the float64 dense ``torch.func`` references of
``tests/references.py``; curvext is compared with itself only where the
property is "the same result with or without X" (chunking, autocast).
"""

from __future__ import annotations

import copy
import gc
import weakref

import pytest
import torch
from torch import nn

from curvext import backpack, extend
from curvext.extensions import (
    KFAC,
    BatchGGNDiag,
    BatchGrad,
    BatchL2Grad,
    GGNDiag,
    SqrtGGN,
    Variance,
)
from curvext.recording import METADATA_KEY
from tests.cases import (
    CASES_BY_NAME,
    NORM_TYPES,
    ScaleShift,
    VectorScaleShift,
    assert_close,
    dense_reference,
    kronecker_modules,
    trainable,
)
from tests.references import DenseReference, dense_factor, kfac_reference, kron

TWO_LOSSES = "Two extended losses"
COMPUTED_NOTHING = "computed nothing"


def small_mlp() -> nn.Module:
    return nn.Sequential(nn.Linear(4, 5), nn.Tanh(), nn.Linear(5, 3))


def classification_batch(N: int = 4, seed: int = 0):
    generator = torch.Generator().manual_seed(seed)
    X = torch.randn(N, 4, generator=generator)
    y = torch.randint(0, 3, (N,), generator=generator)
    return X, y


def check_ggn_diag(model: nn.Module, reference: DenseReference):
    for name, param in trainable(model).items():
        assert_close(param.ggn_diag, reference.diag(name), msg=name)


def clear_results(model: nn.Module):
    for param in model.parameters():
        for attribute in ("ggn_diag", "grad_batch"):
            if hasattr(param, attribute):
                delattr(param, attribute)


# ---------------------------------------------------------------------------
# 1. Two extended losses in one backward pass are refused
# ---------------------------------------------------------------------------
@pytest.mark.parametrize("how", ["sum", "backward_of_list"])
def test_two_losses_of_two_forward_passes_in_one_backward(how):
    torch.manual_seed(0)
    model, loss_fn = extend(small_mlp()), extend(nn.CrossEntropyLoss())
    X1, y1 = classification_batch(4, seed=1)
    X2, y2 = classification_batch(3, seed=2)
    first, second = loss_fn(model(X1), y1), loss_fn(model(X2), y2)
    with pytest.raises(RuntimeError, match=TWO_LOSSES):
        with backpack(GGNDiag()):
            if how == "sum":
                (first + second).backward()
            else:
                torch.autograd.backward([first, second])


@pytest.mark.parametrize("second_loss", ["same_module", "other_module"])
def test_one_output_into_two_losses_in_one_backward(second_loss):
    torch.manual_seed(0)
    model, loss_fn = extend(small_mlp()), extend(nn.CrossEntropyLoss())
    X, y = classification_batch(4)
    target = torch.randn(4, 3)
    out = model(X)
    first = loss_fn(out, y)
    if second_loss == "same_module":
        second = loss_fn(out, y.flip(0))
    else:
        second = extend(nn.MSELoss())(out, target)
    with pytest.raises(RuntimeError, match=TWO_LOSSES):
        with backpack(GGNDiag()):
            (first + second).backward()


def test_two_forward_passes_backpropagated_separately():
    """Each backward (in its own context) gives the GGN of its own loss."""
    torch.manual_seed(0)
    model = small_mlp()
    pristine = copy.deepcopy(model)
    model, loss_fn = extend(model), extend(nn.CrossEntropyLoss())
    X1, y1 = classification_batch(4, seed=1)
    X2, y2 = classification_batch(3, seed=2)
    first, second = loss_fn(model(X1), y1), loss_fn(model(X2), y2)
    with backpack(GGNDiag(), BatchGrad()):
        first.backward()
    check_ggn_diag(model, DenseReference(pristine, nn.CrossEntropyLoss(), X1, y1))
    clear_results(model)
    with backpack(GGNDiag(), BatchGrad()):
        second.backward()
    reference = DenseReference(pristine, nn.CrossEntropyLoss(), X2, y2)
    check_ggn_diag(model, reference)
    for name, param in trainable(model).items():
        assert param.grad_batch.shape[0] == 3, name
        assert_close(param.grad_batch, reference.per_sample_grads(name), msg=name)


def test_one_output_into_two_losses_backpropagated_separately():
    torch.manual_seed(0)
    model = small_mlp()
    pristine = copy.deepcopy(model)
    model = extend(model)
    ce, mse = extend(nn.CrossEntropyLoss()), extend(nn.MSELoss())
    X, y = classification_batch(4)
    target = torch.randn(4, 3)
    out = model(X)
    first, second = ce(out, y), mse(out, target)
    with backpack(GGNDiag()):
        first.backward(retain_graph=True)
    check_ggn_diag(model, DenseReference(pristine, nn.CrossEntropyLoss(), X, y))
    clear_results(model)
    with backpack(GGNDiag()):
        second.backward()
    check_ggn_diag(model, DenseReference(pristine, nn.MSELoss(), X, target))


def test_refusal_leaves_no_state_behind():
    """After the refusal, the next (valid) backward of the thread works."""
    torch.manual_seed(0)
    model = small_mlp()
    pristine = copy.deepcopy(model)
    model, loss_fn = extend(model), extend(nn.CrossEntropyLoss())
    X, y = classification_batch(4)
    with pytest.raises(RuntimeError, match=TWO_LOSSES):
        with backpack(GGNDiag()):
            (loss_fn(model(X), y) + loss_fn(model(X), y)).backward()
    clear_results(model)
    loss = loss_fn(model(X), y)
    with backpack(GGNDiag()):
        loss.backward()
    check_ggn_diag(model, DenseReference(pristine, nn.CrossEntropyLoss(), X, y))


# ---------------------------------------------------------------------------
# 2. A backward pass that does not go through the extended loss
# ---------------------------------------------------------------------------
def test_regulariser_backward_alone_computes_nothing():
    """``reg`` reaches the loss input but not through the loss's output."""
    torch.manual_seed(0)
    model, loss_fn = extend(small_mlp()), extend(nn.CrossEntropyLoss())
    plain = copy.deepcopy(model)
    X, y = classification_batch(4)
    out = model(X)
    task = loss_fn(out, y)  # noqa: F841 - recorded, must not be triggered
    regulariser = out.square().mean()
    with pytest.raises(RuntimeError, match=COMPUTED_NOTHING):
        with backpack(GGNDiag()):
            regulariser.backward()
    for name, param in model.named_parameters():
        assert not hasattr(param, "ggn_diag"), name
    # the ordinary backward of the regulariser ran
    plain(X).square().mean().backward()
    for (name, param), plain_param in zip(model.named_parameters(), plain.parameters()):
        torch.testing.assert_close(param.grad, plain_param.grad, msg=name)


class TaskPlusRegulariser(nn.Module):
    """The total objective as one function of the output (dense reference)."""

    def forward(self, out, y):
        return nn.functional.cross_entropy(out, y) + out.square().mean()


def test_task_plus_regulariser():
    """GGN of the task loss only; per-sample gradients of the total."""
    torch.manual_seed(0)
    model = small_mlp()
    pristine = copy.deepcopy(model)
    model, loss_fn = extend(model), extend(nn.CrossEntropyLoss())
    X, y = classification_batch(4)
    out = model(X)
    total = loss_fn(out, y) + out.square().mean()
    with backpack(GGNDiag(), BatchGrad()):
        total.backward()
    task_reference = DenseReference(pristine, nn.CrossEntropyLoss(), X, y)
    total_reference = DenseReference(pristine, TaskPlusRegulariser(), X, y)
    # the premise: the regulariser changes the GGN of the total
    name = "2.weight"
    assert (total_reference.diag(name) - task_reference.diag(name)).abs().max() > 1e-3
    check_ggn_diag(model, task_reference)
    for name, param in trainable(model).items():
        assert_close(param.grad_batch.sum(0), param.grad, msg=name)
        assert_close(param.grad, total_reference.gradient(name), msg=name)
        assert_close(param.grad_batch, total_reference.per_sample_grads(name), msg=name)


# ---------------------------------------------------------------------------
# 3. The graph is freed by reference counting alone
# ---------------------------------------------------------------------------
class LeafInForward(nn.Module):
    """Adds a large leaf requiring grad inside the forward; only the graph
    holds it once the forward returns (a weak reference tells)."""

    def __init__(self):
        super().__init__()
        self.first = nn.Linear(4, 5)
        self.norm = nn.BatchNorm1d(5)
        self.second = nn.Linear(5, 3)
        self.leaves = []

    def forward(self, x):
        big = torch.zeros(50_000, 5, requires_grad=True)
        self.leaves.append(weakref.ref(big))
        h = self.first(x) + big[: x.shape[0]]
        return self.second(torch.tanh(self.norm(h)))


def graph_probes(loss) -> list:
    """Weak references to the recorded module calls in the graph of ``loss``,
    and to a probe object stored on every node of it."""

    class Probe:
        pass

    probes, seen, stack = [], set(), [loss.grad_fn]
    while stack:
        node = stack.pop()
        if node is None or node in seen:
            continue
        seen.add(node)
        probe = Probe()
        node.metadata["test_probe"] = probe
        probes.append(weakref.ref(probe))
        slots = node.metadata.get(METADATA_KEY, ())
        probes.extend(weakref.ref(slot.call) for slot in slots)
        stack.extend(next_node for next_node, _ in node.next_functions)
    return probes


def build_and_drop(scenario: str, model: nn.Module, loss_fn: nn.Module):
    """Forward (and maybe backward); returns weak references only."""
    X, y = classification_batch(4)
    loss = loss_fn(model(X), y)
    probes = graph_probes(loss)
    assert len(probes) > 5 and any(p() is not None for p in probes)
    if scenario == "backward_in_backpack":
        extensions = [GGNDiag(), BatchGGNDiag(mc_samples=2), SqrtGGN(), KFAC("type-2")]
        with backpack(*extensions, BatchGrad()):
            loss.backward()
        for name, p in trainable(model).items():
            for value in (p.ggn_diag, p.sqrt_ggn, p.grad_batch, *p.kfac):
                assert value.grad_fn is None and not value.requires_grad, name
    elif scenario == "backward_outside_backpack":
        loss.backward()
    elif scenario == "retained_backward_twice":
        with backpack(GGNDiag()):
            loss.backward(retain_graph=True)
        with backpack(BatchGrad()):
            loss.backward()
    elif scenario == "two_losses_refused":
        with pytest.raises(RuntimeError, match=TWO_LOSSES):
            with backpack(GGNDiag()):
                (loss + loss_fn(model(X), y)).backward()
    elif scenario == "engine_error":  # the forward ran with batch statistics
        with pytest.raises(RuntimeError, match="batch statistics"):
            with backpack(GGNDiag()):
                loss.backward()
    else:
        assert scenario == "no_backward"
    assert model.leaves[0]() is not None, "the graph holds the leaf until dropped"
    return probes


LEAK_SCENARIOS = [
    "no_backward",
    "backward_in_backpack",
    "backward_outside_backpack",
    "retained_backward_twice",
    "two_losses_refused",
    "engine_error",
]


@pytest.mark.parametrize("scenario", LEAK_SCENARIOS)
def test_graph_freed_without_garbage_collector(scenario):
    torch.manual_seed(0)
    model = extend(LeafInForward().eval())
    if scenario == "engine_error":
        model.norm.train()  # batch statistics: refused inside the engine
    loss_fn = extend(nn.CrossEntropyLoss())
    gc.collect()
    gc.disable()
    try:
        probes = build_and_drop(scenario, model, loss_fn)
        alive_leaves = [ref for ref in model.leaves if ref() is not None]
        alive_probes = [ref for ref in probes if ref() is not None]
        assert not alive_leaves, f"{len(alive_leaves)} leaf tensor(s) leaked"
        assert not alive_probes, (
            f"{len(alive_probes)}/{len(probes)} graph objects leaked: "
            f"{[type(ref()).__name__ for ref in alive_probes]}"
        )
    finally:
        gc.enable()


# ---------------------------------------------------------------------------
# 4. Autocast
# ---------------------------------------------------------------------------
def autocast_cnn() -> nn.Module:
    return nn.Sequential(
        nn.Conv2d(2, 3, 3, padding=1),
        nn.GroupNorm(1, 3),
        nn.ReLU(),
        nn.Conv2d(3, 2, 2, stride=2),
        nn.Flatten(),
        nn.LayerNorm(8),
        nn.Linear(8, 3),
    )


def autocast_mlp() -> nn.Module:
    return nn.Sequential(nn.Linear(5, 6), nn.Tanh(), nn.Linear(6, 4), nn.Sigmoid(), nn.Linear(4, 3))


AUTOCAST_MODELS = {"mlp": (autocast_mlp, (5,)), "cnn": (autocast_cnn, (2, 4, 4))}

#: bfloat16 keeps 8 significant bits: unit roundoff u = 2^-8 ≈ 3.9e-3. The
#: GGN diagonal is a sum of squared products of activations and backpropagated
#: columns, each through 3-4 layers of rounded matmuls and nonlinearities, so a
#: norm-wise relative error of a few times L·u ≈ 1e-2 is expected (≈ 1e-2
#: measured); 5e-2 leaves room for that while any dtype or scaling mistake
#: (lost normalisation, wrong columns) is an O(1) error.
AUTOCAST_RTOL = 5e-2


def relative_error(actual, expected) -> float:
    actual, expected = actual.double(), expected.double()
    return ((actual - expected).norm() / expected.norm()).item()


def implied_ggn_diag(sqrt_ggn):
    return sqrt_ggn.square().sum((0, 1))


@pytest.mark.parametrize("name", AUTOCAST_MODELS)
def test_autocast_bfloat16(name):
    make_model, in_shape = AUTOCAST_MODELS[name]
    torch.manual_seed(0)
    model64 = make_model()
    X64, y = torch.randn(6, *in_shape), torch.randint(0, 3, (6,))
    model32 = model64.float()  # the float64 weights are float32 numbers now
    model64 = copy.deepcopy(model32).double()
    reference = DenseReference(model64, nn.CrossEntropyLoss(), X64, y)
    X = X64.float()

    results = {}
    for autocast in (False, True):
        model, loss_fn = extend(copy.deepcopy(model32)), extend(nn.CrossEntropyLoss())
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
            out = model(X)
            loss = loss_fn(out, y)
        if autocast:
            assert out.dtype == torch.bfloat16  # the premise: autocast is on
        with backpack(GGNDiag(), KFAC("type-2"), BatchGrad(), SqrtGGN()):
            loss.backward()
        results[autocast] = trainable(model)

    tol = AUTOCAST_RTOL
    for name, p in results[True].items():
        plain = results[False][name]
        for value in (p.grad, p.ggn_diag, p.grad_batch, p.sqrt_ggn, *p.kfac):
            assert value.dtype == torch.float32, name
            assert torch.isfinite(value).all(), name
        # float32 without autocast: the dense float64 reference, tightly
        exact_diag = reference.diag(name)
        assert relative_error(plain.ggn_diag, exact_diag) < 1e-5, name
        assert relative_error(plain.grad_batch, reference.per_sample_grads(name)) < 1e-5
        # autocast: close to float32 (and so to the reference), loosely
        assert relative_error(p.ggn_diag, plain.ggn_diag) < tol, name
        assert relative_error(p.ggn_diag, exact_diag) < tol, name
        assert relative_error(p.grad_batch, plain.grad_batch) < tol, name
        assert relative_error(implied_ggn_diag(p.sqrt_ggn), exact_diag) < tol, name
        assert relative_error(kron(p.kfac), kron(plain.kfac)) < tol, name


@pytest.mark.parametrize("smoothing", [0.0, 0.1])
def test_autocast_bfloat16_weighted_cross_entropy_over_positions(smoothing):
    """bfloat16 logits ``[N, C, T]`` with float32 class weights: the exact
    columns (several positions) were built from bfloat16 probabilities and
    float32 weights and failed to be written into their bfloat16 tensor."""
    torch.manual_seed(0)
    model32 = nn.Conv1d(2, 3, 1).float()  # the suite's default dtype is float64
    weight = torch.rand(3).float() + 0.5
    X, y = torch.randn(4, 2, 5).float(), torch.randint(0, 3, (4, 5))
    loss64 = nn.CrossEntropyLoss(weight=weight.double(), label_smoothing=smoothing)
    reference = DenseReference(copy.deepcopy(model32).double(), loss64, X.double(), y)
    model = extend(copy.deepcopy(model32))
    loss_fn = extend(nn.CrossEntropyLoss(weight=weight, label_smoothing=smoothing))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss = loss_fn(model(X), y)
    with backpack(GGNDiag(), SqrtGGN()):
        loss.backward()
    for name, p in trainable(model).items():
        assert p.ggn_diag.dtype == torch.float32, name
        assert relative_error(p.ggn_diag, reference.diag(name)) < AUTOCAST_RTOL, name
        assert relative_error(implied_ggn_diag(p.sqrt_ggn), reference.diag(name)) < AUTOCAST_RTOL


# ---------------------------------------------------------------------------
# 5. Column chunking with every kind of column set at once
# ---------------------------------------------------------------------------
def all_extensions():
    """Exact, two MC sets of different sizes and the gradient column."""
    return [
        GGNDiag(),
        BatchGGNDiag(mc_samples=2),
        SqrtGGN(mc_samples=3),
        KFAC("type-2"),
        BatchGrad(),
        Variance(),
        BatchL2Grad(),
    ]


RESULT_ATTRIBUTES = (
    "ggn_diag",
    "batch_ggn_diag",
    "sqrt_ggn",
    "kfac",
    "grad_batch",
    "variance",
    "batch_l2",
)
CHUNK_CASES = ["sequence", "mse_multidim", "residual_cnn", "attention"]


def run_chunked(case, max_columns):
    model, loss_fn, X, y = CASES_BY_NAME[case].build()
    model, loss_fn = extend(model), extend(loss_fn)
    loss = loss_fn(model(X), y)
    torch.manual_seed(1234)  # the MC seed is drawn at backward time
    with backpack(*all_extensions(), max_columns=max_columns):
        loss.backward()
    return model


def single_factor_params(model: nn.Module) -> set[str]:
    return {
        f"{module_name}.{n}"
        for module_name, module in model.named_modules()
        if isinstance(module, NORM_TYPES + (ScaleShift, VectorScaleShift))
        for n, p in module.named_parameters(recurse=False)
        if p.requires_grad
    }


@pytest.mark.parametrize("max_columns", [1, 2, 5])
@pytest.mark.parametrize("case", CHUNK_CASES)
def test_chunking_all_extensions(case, max_columns):
    unchunked = trainable(run_chunked(case, None))
    model = run_chunked(case, max_columns)
    chunked = trainable(model)
    for name, param in chunked.items():
        for attribute in RESULT_ATTRIBUTES:
            value = getattr(param, attribute)
            expected = getattr(unchunked[name], attribute)
            if attribute == "kfac":
                assert len(value) == len(expected), name
                for factor, expected_factor in zip(value, expected):
                    assert_close(factor, expected_factor, rtol=0, msg=f"{name} kfac")
            else:
                assert_close(value, expected, rtol=0, msg=f"{name} {attribute}")

    # the exact extensions against the dense reference
    reference = dense_reference(case)
    N = reference.N
    for name, param in chunked.items():
        per_sample = reference.per_sample_grads(name)
        assert_close(param.ggn_diag, reference.diag(name), msg=name)
        assert_close(param.grad_batch, per_sample, msg=name)
        assert_close(param.batch_l2, (per_sample.reshape(N, -1) ** 2).sum(1), msg=name)
        variance = (per_sample**2).sum(0) / N - (per_sample.sum(0) / N) ** 2
        assert_close(param.variance, variance, msg=name)
        assert param.sqrt_ggn.shape == (3, N, *param.shape), name
        assert param.batch_ggn_diag.shape == (N, *param.shape), name
    for name in single_factor_params(model):
        (factor,) = chunked[name].kfac
        assert_close(factor, reference.block(name), msg=f"{name} kfac")
    pristine, loss_fn, X, y = CASES_BY_NAME[case].build()
    modules = dict(model.named_modules())
    pristine_modules = dict(pristine.named_modules())
    checked = 0
    for module_name in kronecker_modules(CASES_BY_NAME[case]):
        expected = kfac_reference(
            pristine, loss_fn, X, y, pristine_modules[module_name], "type-2", "expand"
        )
        for param_name, expected_factors in expected.items():
            factors = getattr(modules[module_name], param_name).kfac
            assert len(factors) == len(expected_factors)
            for factor, expected_factor in zip(factors, expected_factors):
                assert_close(
                    dense_factor(factor), expected_factor, msg=f"{module_name}.{param_name}"
                )
                checked += 1
    assert checked > 0


# ---------------------------------------------------------------------------
# 6. Autograd multithreading is switched off inside the context, then restored
# ---------------------------------------------------------------------------
def multithreading():
    return torch.autograd.is_multithreading_enabled()


def one_step(extension):
    model, loss_fn = extend(small_mlp()), extend(nn.CrossEntropyLoss())
    X, y = classification_batch(3)
    loss = loss_fn(model(X), y)
    with backpack(extension):
        assert not multithreading()
        loss.backward()
        assert not multithreading()


def test_multithreading_off_inside_and_restored():
    assert multithreading(), "autograd multithreading is on by default"
    one_step(GGNDiag())
    assert multithreading()


def test_multithreading_previous_value_false_restored():
    with torch.autograd.set_multithreading_enabled(False):
        one_step(BatchGrad())
        assert not multithreading()
    assert multithreading()


def test_multithreading_restored_after_errors():
    model, loss_fn = extend(small_mlp()), extend(nn.CrossEntropyLoss())
    X, y = classification_batch(3)
    with pytest.raises(ValueError, match="from the body"):
        with backpack(GGNDiag()):
            assert not multithreading()
            raise ValueError("from the body")
    assert multithreading()
    with pytest.raises(RuntimeError, match=COMPUTED_NOTHING):
        with backpack(GGNDiag()):
            model(X).square().mean().backward()
    assert multithreading()
    with pytest.raises(RuntimeError, match=TWO_LOSSES):
        with backpack(GGNDiag()):
            (loss_fn(model(X), y) + loss_fn(model(X), y)).backward()
    assert multithreading()


def test_multithreading_nested_contexts():
    model, loss_fn = extend(small_mlp()), extend(nn.CrossEntropyLoss())
    X, y = classification_batch(3)
    with backpack(GGNDiag()):
        assert not multithreading()
        with backpack(BatchGrad()):
            loss_fn(model(X), y).backward()
        assert not multithreading()
        loss_fn(model(X), y).backward()
    assert multithreading()


def test_a_loss_on_a_leaf_input_says_that_no_model_computed_it():
    """BackPACK's own suite backpropagates ``extend(MSELoss())(y_pred, y)``
    with ``y_pred`` a leaf: nothing to compute, and the message must not
    claim that the loss was not extended."""
    prediction = torch.rand(5, 1, requires_grad=True)
    loss = extend(nn.MSELoss())(prediction, torch.randn(5, 1))
    message = f"{COMPUTED_NOTHING}.*whose input a model computed.*leaf"
    with pytest.raises(RuntimeError, match=message):
        with backpack(GGNDiag()):
            loss.backward()


def test_sum_of_squares_of_many_bfloat16_columns_is_accurate():
    """A running sum of 2000 bfloat16 squares would keep 8 bits of a sum of
    thousands (42 % off at this size); added up in float32 the result is
    within bfloat16's roundings of the float64 sum of the unrounded columns:
    each input rounded (at most 2^-8 relative per square) and the result
    rounded (2^-9), so at most 2^-8 + 2^-9 < 2^-7 (0.4 % measured)."""
    from curvext.rules.factored import SMALL_COLUMNS, sum_of_squares

    generator = torch.Generator().manual_seed(0)
    columns = torch.randn(2000, 300, dtype=torch.float64, generator=generator)
    assert columns.numel() > SMALL_COLUMNS  # the column-by-column path
    expected = columns.square().sum(0)
    result = sum_of_squares(columns.bfloat16())
    assert result.dtype == torch.bfloat16
    assert ((result.double() - expected).abs() / expected).max() < 2**-7


def test_cross_entropy_normalisation_under_bfloat16_counts_exactly():
    """967 valid targets: a bfloat16 sum of the mask gives 968; the
    normalisation must be PyTorch's 1 / 967 (its loss sums in float32)."""
    from curvext.losses import loss_rule

    generator = torch.Generator().manual_seed(0)
    logits = torch.randn(1000, 5, generator=generator).bfloat16()
    target = torch.randint(0, 5, (1000,), generator=generator)
    target[:33] = -100
    rule = loss_rule(nn.CrossEntropyLoss(), logits, target)
    assert rule.normalization == 1 / 967
