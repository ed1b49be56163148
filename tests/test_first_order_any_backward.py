"""First-order extensions on a backward pass without an extended loss.

As in BackPACK, ``with backpack(BatchGrad()): out[:, i].sum().backward()``
gives the individual gradients of output ``i`` (laplace-torch's Jacobians,
Cockpit). References: the gradient of the same scalar computed with one
sample at a time (the model run on ``X[n : n + 1]``), and BackPACK itself.
"""

import copy
import warnings

import pytest
import torch
from torch import nn

from curvext import backpack, extend
from curvext.extensions import (
    KFAC,
    BatchGrad,
    BatchL2Grad,
    GGNDiag,
    SqrtGGN,
    SumGradSquared,
    Variance,
)

FIRST_ORDER = (BatchGrad(), BatchL2Grad(), SumGradSquared(), Variance())


def assert_close(actual, expected, msg=""):
    torch.testing.assert_close(actual, expected, rtol=1e-10, atol=1e-12, msg=msg)


def per_sample_reference(model, X, scalar):
    """``{name: [N, *p.shape]}``: the gradient of ``scalar(model(x_n))`` for
    each sample alone (the model run on ``X[n : n + 1]``)."""
    params = dict(model.named_parameters())
    grads = {name: [] for name in params}
    for n in range(X.shape[0]):
        value = scalar(model(X[n : n + 1]))
        parts = torch.autograd.grad(value, list(params.values()), allow_unused=True)
        for name, part, param in zip(params, parts, params.values()):
            grads[name].append(torch.zeros_like(param) if part is None else part)
    return {name: torch.stack(parts) for name, parts in grads.items()}


def check_first_order(model, reference, N, names=None):
    for name, param in model.named_parameters():
        if names is not None and name not in names:
            continue
        expected = reference[name]
        assert_close(param.grad_batch, expected, msg=name)
        assert_close(param.grad_batch.sum(0), param.grad, msg=name)
        assert_close(param.batch_l2, expected.flatten(1).square().sum(1), msg=name)
        assert_close(param.sum_grad_squared, expected.square().sum(0), msg=name)
        variance = expected.square().sum(0) / N - (expected.sum(0) / N) ** 2
        assert_close(param.variance, variance, msg=name)


class Residual(nn.Module):
    def __init__(self, width=5):
        super().__init__()
        self.inner = nn.Sequential(nn.Linear(width, width), nn.Tanh(), nn.Linear(width, width))

    def forward(self, x):
        return x + self.inner(x)


def mlp():
    return nn.Sequential(nn.Linear(4, 5), nn.Tanh(), nn.Linear(5, 3))


def residual_mlp():
    return nn.Sequential(nn.Linear(4, 5), Residual(), nn.ReLU(), Residual(), nn.Linear(5, 3))


def conv_net():
    return nn.Sequential(
        nn.Conv2d(2, 3, 3, padding=1),
        nn.ReLU(),
        nn.Conv2d(3, 2, 2, stride=2),
        nn.Flatten(),
        nn.Linear(8, 3),
    )


MODELS = {
    "mlp": (mlp, (4,)),
    "residual": (residual_mlp, (4,)),
    "conv": (conv_net, (2, 4, 4)),
}


@pytest.mark.parametrize("kind", sorted(MODELS))
@pytest.mark.parametrize("output", [0, 2])
def test_output_entry_matches_per_sample_autograd(kind, output):
    make, shape = MODELS[kind]
    model = make()
    pristine = copy.deepcopy(model)
    extend(model)
    X = torch.randn(5, *shape)
    with backpack(*FIRST_ORDER):
        model(X)[:, output].sum().backward()
    reference = per_sample_reference(pristine, X, lambda out: out[:, output].sum())
    check_first_order(model, reference, N=5)


@pytest.mark.parametrize("kind", sorted(MODELS))
def test_nonlinear_scalar(kind):
    """Any scalar that is a sum over samples: ``(out**2).sum() + out.sin().sum()``."""
    make, shape = MODELS[kind]
    model = make()
    pristine = copy.deepcopy(model)
    extend(model)
    X = torch.randn(4, *shape)

    def scalar(out):
        return 0.5 * out.square().sum() + out[:, 1:].sin().sum()

    with backpack(*FIRST_ORDER):
        scalar(model(X)).backward()
    check_first_order(model, per_sample_reference(pristine, X, scalar), N=4)


def test_several_outputs_in_one_context_jacobian():
    """laplace-torch's BackPACK Jacobians: one backward per output, results
    overwritten by each backward, read in between."""
    model = mlp()
    pristine = copy.deepcopy(model)
    extend(model)
    X = torch.randn(6, 4)
    out = model(X)
    rows = []
    with backpack(BatchGrad()):
        for i in range(3):
            model.zero_grad()
            out[:, i].sum().backward(retain_graph=True)
            rows.append(torch.cat([p.grad_batch.flatten(1) for p in model.parameters()], 1))
    jacobian = torch.stack(rows, 1)  # [N, C, P]
    params = {k: v.detach() for k, v in pristine.named_parameters()}

    def single(params, x):
        return torch.func.functional_call(pristine, params, (x.unsqueeze(0),))[0]

    expected = torch.func.vmap(torch.func.jacrev(single), in_dims=(None, 0))(params, X)
    expected = torch.cat([expected[k].flatten(2) for k in params], 2)
    assert_close(jacobian, expected)


class TwoHeads(nn.Module):
    def __init__(self, as_dict: bool):
        super().__init__()
        self.as_dict = as_dict
        self.body = nn.Linear(4, 5)
        self.a = nn.Linear(5, 2)
        self.b = nn.Linear(5, 3)

    def forward(self, x):
        h = torch.tanh(self.body(x))
        a, b = self.a(h), self.b(h)
        return {"a": a, "b": b} if self.as_dict else (a, b)


@pytest.mark.parametrize("as_dict", [True, False], ids=["dict", "tuple"])
def test_dict_and_tuple_outputs(as_dict):
    model = TwoHeads(as_dict)
    pristine = copy.deepcopy(model)
    extend(model)
    X = torch.randn(5, 4)
    key_a, key_b = ("a", "b") if as_dict else (0, 1)
    with backpack(*FIRST_ORDER):
        model(X)[key_a][:, 1].sum().backward()
    reference = per_sample_reference(pristine, X, lambda out: out[key_a][:, 1].sum())
    check_first_order(model, reference, N=5, names={"body.weight", "body.bias", "a.weight"})
    for param in model.b.parameters():  # not on the backward path
        assert not hasattr(param, "grad_batch")
    # both heads: every parameter
    model.zero_grad()
    with backpack(*FIRST_ORDER):
        out = model(X)
        (out[key_a].sum() + out[key_b][:, 0].square().sum()).backward()

    def both(out):
        return out[key_a].sum() + out[key_b][:, 0].square().sum()

    check_first_order(model, per_sample_reference(pristine, X, both), N=5)
    # the next pass through head a alone removes head b's results
    with backpack(BatchGrad()):
        model(X)[key_a].sum().backward()
    assert all(not hasattr(p, "grad_batch") for p in model.b.parameters())
    assert all(not hasattr(p, "variance") for p in model.parameters())


class CalledTwice(nn.Module):
    """One Linear applied twice, and a weight tied between two modules."""

    def __init__(self):
        super().__init__()
        self.square = nn.Linear(4, 4)
        self.first = nn.Linear(4, 3, bias=False)
        self.second = nn.Linear(3, 4, bias=False)
        self.tied = nn.Linear(4, 3, bias=False)
        self.tied.weight = self.first.weight

    def forward(self, x):
        h = torch.tanh(self.square(torch.tanh(self.square(x))))
        return self.tied(torch.tanh(self.second(self.first(h))))


def test_called_twice_and_tied():
    model = CalledTwice()
    pristine = copy.deepcopy(model)
    extend(model)
    X = torch.randn(5, 4)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the generic rule's note (the tied weight)
        with backpack(*FIRST_ORDER):
            model(X)[:, 2].sum().backward()
    reference = per_sample_reference(pristine, X, lambda out: out[:, 2].sum())
    check_first_order(model, reference, N=5)


def test_branch_off_the_path_stores_nothing():
    model = TwoHeads(as_dict=True)
    extend(model)
    X = torch.randn(3, 4)
    out = model(X)
    with backpack(BatchGrad()):
        out["b"].sum().backward()
    assert not hasattr(model.a.weight, "grad_batch")
    assert model.b.weight.grad_batch.shape == (3, 3, 5)


def test_regulariser_next_to_an_extended_loss():
    """A backward that does not go through the recorded loss's output (a
    regulariser on the prediction) is a backward without a loss."""
    model = mlp()
    pristine = copy.deepcopy(model)
    model, loss_fn = extend(model), extend(nn.CrossEntropyLoss())
    X, y = torch.randn(4, 4), torch.tensor([0, 2, 1, 1])
    out = model(X)
    loss = loss_fn(out, y)  # noqa: F841 - recorded, not backpropagated
    with backpack(*FIRST_ORDER):
        out.square().mean().backward()
    reference = per_sample_reference(pristine, X, lambda o: o.square().sum() / (4 * 3))
    check_first_order(model, reference, N=4)


def test_loss_path_unchanged():
    """With an extended loss, the loss path computes (the same numbers as a
    backward on the loss without extending it: grads of ``c ℓ_n``)."""
    model = mlp()
    pristine = copy.deepcopy(model)
    model, loss_fn = extend(model), extend(nn.CrossEntropyLoss())
    X, y = torch.randn(4, 4), torch.tensor([0, 2, 1, 1])
    with backpack(*FIRST_ORDER):
        loss_fn(model(X), y).backward()
    # per sample: the loss of sample n alone, scaled like the mean over 4
    reference = {name: [] for name, _ in pristine.named_parameters()}
    for n in range(4):
        out = pristine(X[n : n + 1])
        value = nn.functional.cross_entropy(out, y[n : n + 1], reduction="sum") / 4
        for name, g in zip(reference, torch.autograd.grad(value, list(pristine.parameters()))):
            reference[name].append(g)
    reference = {name: torch.stack(g) for name, g in reference.items()}
    check_first_order(model, reference, N=4)


def test_autograd_grad_and_inputs():
    """``torch.autograd.grad`` computes like ``backward`` (as on the loss
    path); ``backward(inputs=...)`` covers the modules it executes."""
    model = mlp()
    pristine = copy.deepcopy(model)
    extend(model)
    X = torch.randn(5, 4)
    with backpack(BatchGrad()):
        grads = torch.autograd.grad(model(X)[:, 0].sum(), list(model.parameters()))
    reference = per_sample_reference(pristine, X, lambda out: out[:, 0].sum())
    for (name, param), grad in zip(model.named_parameters(), grads):
        assert_close(param.grad_batch, reference[name], msg=name)
        assert_close(param.grad_batch.sum(0), grad, msg=name)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no "computes nothing for parameters" warning
        with backpack(BatchGrad()):
            model(X)[:, 0].sum().backward(inputs=[model[2].weight])
    assert_close(model[2].weight.grad_batch, reference["2.weight"])
    assert_close(model[2].bias.grad_batch, reference["2.bias"])
    assert not hasattr(model[0].weight, "grad_batch")


def test_second_order_needs_a_loss():
    model = extend(mlp())
    X = torch.randn(3, 4)
    for ext in (GGNDiag(), KFAC(), SqrtGGN(), KFAC(fisher_type="empirical")):
        with pytest.raises(RuntimeError, match=f"backpack\\({type(ext).__name__}\\) computed"):
            with backpack(ext):
                model(X).sum().backward()
        assert not hasattr(model[0].weight, ext.savefield)
    # mixed: the first-order results are stored, the error names the others
    with pytest.raises(RuntimeError, match=r"backpack\(GGNDiag\) computed nothing"):
        with backpack(GGNDiag(), BatchGrad()):
            model(X).sum().backward()
    assert model[0].weight.grad_batch.shape == (3, 5, 4)
    # no extended module on the path at all
    with pytest.raises(RuntimeError, match="went through a module wrapped"):
        with backpack(BatchGrad()):
            (torch.randn(3, requires_grad=True) * 2).sum().backward()


def test_batchnorm_train_refused_eval_fine():
    model = extend(nn.Sequential(nn.Linear(4, 5), nn.BatchNorm1d(5), nn.Linear(5, 2)))
    X = torch.randn(6, 4)
    with pytest.raises(RuntimeError, match="couples the samples"):
        with backpack(BatchGrad()):
            model(X).sum().backward()
    model.eval()
    model.zero_grad()
    pristine = copy.deepcopy(model)
    with backpack(*FIRST_ORDER):
        model(X)[:, 1].sum().backward()
    check_first_order(model, per_sample_reference(pristine, X, lambda o: o[:, 1].sum()), N=6)


def test_no_context_no_results_and_graph_freed():
    """Outside a context the hook does nothing; the graph (and the records on
    it) is freed by reference counting, with or without a pass inside one."""
    import weakref

    class Probe:
        pass

    model = extend(mlp())
    out = model(torch.randn(3, 4))
    out.sum().backward()
    assert not hasattr(model[0].weight, "grad_batch")
    probes = []
    for inside in (False, True):
        out = model(torch.randn(3, 4))
        probe = Probe()
        out.grad_fn.metadata["probe"] = probe
        probes.append(weakref.ref(probe))
        del probe
        if inside:
            with backpack(BatchGrad()):
                out.sum().backward()
        else:
            out.sum().backward()
        del out
    assert [p() for p in probes] == [None, None]


def test_loss_not_extended_is_a_backward_without_loss():
    """A loss module that was not extended: first-order results are those of
    the gradient that arrives, the same as with the extended loss."""
    model = extend(mlp())
    X, y = torch.randn(5, 4), torch.tensor([0, 2, 1, 1, 0])
    with backpack(*FIRST_ORDER):
        nn.CrossEntropyLoss()(model(X), y).backward()
    plain = {f: [getattr(p, f) for p in model.parameters()] for f in ("grad_batch", "variance")}
    with backpack(*FIRST_ORDER):
        extend(nn.CrossEntropyLoss())(model(X), y).backward()
    for field, values in plain.items():
        for value, param in zip(values, model.parameters()):
            assert_close(value, getattr(param, field), msg=field)


class LanguageModel(nn.Module):
    def __init__(self):
        super().__init__()
        self.embed = nn.Embedding(7, 4)
        self.norm = nn.LayerNorm(4)
        self.head = nn.Linear(4, 7)

    def forward(self, tokens):
        return self.head(torch.tanh(self.norm(self.embed(tokens))))


class Recurrent(nn.Module):
    def __init__(self):
        super().__init__()
        self.rnn = nn.LSTM(3, 4, batch_first=True)
        self.head = nn.Linear(4, 2)

    def forward(self, x):
        return self.head(self.rnn(x)[0][:, -1])


def pruned_mlp():
    model = mlp()
    torch.nn.utils.prune.custom_from_mask(model[0], "weight", torch.rand(5, 4) > 0.5)
    return model


@pytest.mark.parametrize(
    "make, inputs",
    [
        (LanguageModel, lambda: torch.randint(0, 7, (5, 3))),
        (Recurrent, lambda: torch.randn(4, 5, 3)),
        (pruned_mlp, lambda: torch.randn(5, 4)),
    ],
    ids=["embedding-layernorm", "lstm", "pruned-generic"],
)
def test_other_layers(make, inputs):
    import torch.nn.utils.prune  # noqa: F401 - for pruned_mlp

    model = make()
    pristine = make()
    pristine.load_state_dict(model.state_dict())
    extend(model)
    X = inputs()

    def scalar(out):
        return out[..., 1].sum() + 0.5 * out.square().sum()

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the generic rule's note
        with backpack(*FIRST_ORDER):
            scalar(model(X)).backward()
    check_first_order(model, per_sample_reference(pristine, X, scalar), N=X.shape[0])


class RandomLinear(nn.Module):
    """Parameters and dropout: the generic rule replays the recorded graph."""

    def __init__(self):
        super().__init__()
        self.weight = nn.Parameter(torch.randn(4, 3))

    def forward(self, x):
        return nn.functional.dropout(x @ self.weight, 0.5, training=True)


def test_replay_needs_the_graph():
    model = extend(nn.Sequential(nn.Linear(4, 4), RandomLinear()))
    X = torch.randn(5, 4)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        with pytest.raises(RuntimeError, match="retain_graph=True"):
            with backpack(BatchGrad()):
                model(X).sum().backward()
        model.zero_grad()
        with backpack(BatchGrad()):
            model(X).sum().backward(retain_graph=True)
    for name, param in model.named_parameters():
        assert_close(param.grad_batch.sum(0), param.grad, msg=name)


@pytest.mark.parametrize("seed", range(6))
def test_random_networks(seed):
    generator = torch.Generator().manual_seed(seed)

    def draw(high):
        return int(torch.randint(1, high, (1,), generator=generator))

    width = draw(6) + 1
    layers = [nn.Linear(3, width)]
    for _ in range(draw(4)):
        if draw(3) == 1:
            layers += [nn.Tanh(), Residual(width)]
        else:
            layers += [nn.Sigmoid(), nn.Linear(width, width)]
    classes = draw(4) + 1
    layers += [nn.Tanh(), nn.Linear(width, classes)]
    model = nn.Sequential(*layers)
    pristine = copy.deepcopy(model)
    extend(model)
    N = draw(6) + 1
    X = torch.randn(N, 3, generator=generator)
    weights = torch.randn(classes, generator=generator)

    def scalar(out):
        return (out * weights).sin().sum()

    with backpack(*FIRST_ORDER):
        scalar(model(X)).backward()
    check_first_order(model, per_sample_reference(pristine, X, scalar), N=N)


# ---------------------------------------------------------------------------
# BackPACK itself
# ---------------------------------------------------------------------------
@pytest.mark.filterwarnings("ignore:Full backward hook is firing")
@pytest.mark.parametrize("kind", sorted(MODELS))
def test_against_backpack(kind):
    bp = pytest.importorskip("backpack")
    bpext = pytest.importorskip("backpack.extensions")
    make, shape = MODELS[kind]
    ours = make()
    # BackPACK needs its converter (torch.fx) for the residual connection
    theirs = bp.extend(copy.deepcopy(ours), use_converter=kind == "residual")
    extend(ours)
    X = torch.randn(5, *shape)
    with backpack(*FIRST_ORDER):
        ours(X)[:, 1].sum().backward()
    with bp.backpack(
        bpext.BatchGrad(), bpext.BatchL2Grad(), bpext.SumGradSquared(), bpext.Variance()
    ):
        theirs(X)[:, 1].sum().backward()
    theirs_params = dict(theirs.named_parameters())
    ours_params = list(ours.named_parameters())
    assert len(theirs_params) == len(ours_params)
    for (name, param), other in zip(ours_params, theirs_params.values()):
        for field in ("grad_batch", "batch_l2", "sum_grad_squared", "variance"):
            assert_close(getattr(param, field), getattr(other, field), msg=f"{name}.{field}")


def test_compat_layer_without_loss():
    from curvext.compat.backpack import backpack as compat_backpack
    from curvext.compat.backpack import extensions as cext

    model = mlp()
    pristine = copy.deepcopy(model)
    extend(model)
    X = torch.randn(5, 4)
    seen = []
    with compat_backpack(cext.BatchGrad(subsampling=[0, 3]), extension_hook=seen.append):
        model(X)[:, 0].sum().backward()
    reference = per_sample_reference(pristine, X, lambda out: out[:, 0].sum())
    for name, param in model.named_parameters():
        assert_close(param.grad_batch, reference[name][[0, 3]], msg=name)
    assert sorted(map(id, seen)) == sorted([id(model[0]), id(model[2])])


# ---- refusals found in review: never silently wrong -----------------------------


def test_create_graph_without_a_loss_is_refused():
    """BackPACK's results of a create_graph pass are differentiable, curvext's
    are not: derivatives through them would silently miss terms."""
    model = extend(nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 2)))
    x = torch.randn(5, 3, requires_grad=True)
    with pytest.raises(RuntimeError, match="create_graph=True"):
        with backpack(BatchGrad()):
            model(x)[:, 0].sum().backward(create_graph=True)


def _penalised_step(extensions, penalty_on_aux: bool):
    torch.manual_seed(0)
    first, head, aux = nn.Linear(3, 4), nn.Linear(4, 2), nn.Linear(4, 1)
    first, head, aux = extend(first), extend(head), extend(aux)
    loss_fn = extend(nn.CrossEntropyLoss())
    x, y = torch.randn(5, 3), torch.randint(0, 2, (5,))
    h = first(x)
    loss = loss_fn(head(torch.tanh(h)), y)
    extra = aux(h).pow(2).sum() if penalty_on_aux else 0.5 * h.pow(2).sum()
    with backpack(*extensions):
        (loss + extra).backward()


@pytest.mark.parametrize("penalty_on_aux", [False, True], ids=["on a hidden output", "aux"])
def test_gradient_from_outside_the_loss_is_refused(penalty_on_aux):
    """A term added outside the loss module reaches a module output: the
    first-order results, computed from the loss, would miss it (BackPACK
    attributes it); refused, naming the module."""
    with pytest.raises(RuntimeError, match="does not come from the extended loss"):
        _penalised_step((BatchGrad(),), penalty_on_aux)


def test_second_order_extensions_keep_the_loss_with_a_penalty():
    """Without first-order extensions the loss path defines everything (the
    GGN is the loss's): no refusal."""
    _penalised_step((GGNDiag(),), penalty_on_aux=False)
