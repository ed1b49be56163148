"""``JacobianOperator`` and ``TransposedJacobianOperator`` over batches of unequal size.

The reference is the dense float64 Jacobian of the predictions on the whole
data set concatenated into one batch, built with ``torch.func.jacrev`` over
the flattened parameters: ``[N, *S, P]`` reshaped to ``[N·C, P]`` (samples,
then each sample's output entries row-major; parameters in the given order).
The data set is split into batches of sizes 3, 5, 2.
"""

import copy

import numpy
import pytest
import torch
from torch import nn
from torch.func import functional_call, jacrev

from curvext.operators import JacobianOperator, TransposedJacobianOperator

SPLITS = (3, 5, 2)


def make_mlp():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 2))
    return model, torch.randn(sum(SPLITS), 3)


def make_cnn():
    """Multi-dimensional predictions ``S = (2, 4, 4)``; ``P = 38 < N·C = 320``."""
    torch.manual_seed(1)
    model = nn.Sequential(nn.Conv2d(1, 2, 3, padding=1), nn.Tanh(), nn.Conv2d(2, 2, 2))
    return model, torch.randn(sum(SPLITS), 1, 5, 5)


MODELS = {"mlp": make_mlp, "cnn": make_cnn}


def batches_of(X, sizes=SPLITS):
    return [(X_b, torch.zeros(X_b.shape[0])) for X_b in X.split(list(sizes))]


def dense_jacobian(model, X, names=None):
    """``[N·C, P]`` with the parameters ``names`` (default: all), in that order."""
    params = dict(model.named_parameters())
    names = list(params) if names is None else names
    chosen = [params[name].detach() for name in names]

    def output_of(theta):
        blocks = theta.split([p.numel() for p in chosen])
        replaced = {n: b.view_as(p) for n, b, p in zip(names, blocks, chosen)}
        return functional_call(model, replaced, (X,))

    flat = torch.cat([p.flatten() for p in chosen])
    return jacrev(output_of)(flat).reshape(-1, flat.numel())


@pytest.fixture(params=sorted(MODELS))
def problem(request):
    model, X = MODELS[request.param]()
    J = JacobianOperator(model, list(model.parameters()), batches_of(X))
    return model, X, J, dense_jacobian(model, X)


def test_shape_and_dense(problem):
    model, X, J, reference = problem
    output = model(X)
    assert J.shape == (output.numel(), sum(p.numel() for p in model.parameters()))
    assert J.T.shape == J.shape[::-1]
    assert J.output_shape == tuple(output.shape[1:]) and J.num_samples == X.shape[0]
    # the MLP has P > N·C (to_dense via vjp), the CNN P < N·C (via jvp)
    torch.testing.assert_close(J.to_dense(), reference, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(J.T.to_dense(), reference.T, rtol=1e-10, atol=1e-12)
    assert J.T.T is J and isinstance(J.T, TransposedJacobianOperator)


def test_products_all_forms(problem):
    model, X, J, reference = problem
    rows, columns = reference.shape
    V, W = torch.randn(columns, 4), torch.randn(rows, 3)
    torch.testing.assert_close(J @ V, reference @ V, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(J @ V[:, 0], reference @ V[:, 0], rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(J.T @ W, reference.T @ W, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(J.T @ W[:, 0], reference.T @ W[:, 0], rtol=1e-10, atol=1e-12)
    # list forms: parameter-shaped in, one [N, *S] tensor out, and back
    params = list(model.parameters())
    numels = [p.numel() for p in params]
    blocks = [b.reshape(p.shape) for b, p in zip(V[:, 0].split(numels), params)]
    (prediction_tangent,) = J @ blocks
    assert prediction_tangent.shape == model(X).shape
    torch.testing.assert_close(
        prediction_tangent.flatten(), reference @ V[:, 0], rtol=1e-10, atol=1e-12
    )
    pulled = J.T @ [W[:, 0].reshape(model(X).shape)]
    assert [g.shape for g in pulled] == [p.shape for p in params]
    torch.testing.assert_close(
        torch.cat([g.flatten() for g in pulled]),
        reference.T @ W[:, 0],
        rtol=1e-10,
        atol=1e-12,
    )


def test_transposed_constructor_and_scipy(problem):
    pytest.importorskip("scipy")
    model, X, _, reference = problem
    JT = TransposedJacobianOperator(model, list(model.parameters()), batches_of(X))
    assert JT.shape == reference.T.shape and JT.T.shape == reference.shape
    torch.testing.assert_close(JT.to_dense(), reference.T, rtol=1e-10, atol=1e-12)
    scipy_J = JT.T.to_scipy()
    rng = numpy.random.default_rng(0)
    v = rng.standard_normal(reference.shape[1])
    w = rng.standard_normal(reference.shape[0])
    dense = reference.numpy()
    assert scipy_J.shape == dense.shape
    close = dict(rtol=1e-10, atol=1e-12)
    numpy.testing.assert_allclose(scipy_J.matvec(v), dense @ v, **close)
    numpy.testing.assert_allclose(scipy_J.rmatvec(w), dense.T @ w, **close)
    V = rng.standard_normal((reference.shape[1], 2))
    numpy.testing.assert_allclose(scipy_J @ V, dense @ V, rtol=1e-10, atol=1e-12)
    numpy.testing.assert_allclose(JT.to_scipy().matvec(w), dense.T @ w, rtol=1e-10, atol=1e-12)


def test_parameter_subset_order_dict_and_function():
    """Columns follow ``params``' order; a dict of names and a function model
    ``(params_dict, X) -> prediction`` give the same matrix."""
    model, X = make_mlp()
    names = ["2.weight", "0.bias"]
    reference = dense_jacobian(model, X, names)
    named = dict(model.named_parameters())
    data = batches_of(X)
    J_list = JacobianOperator(model, [named[n] for n in names], data)
    J_dict = JacobianOperator(model, {n: named[n] for n in names}, data)

    def function(params, X):
        return functional_call(model, params, (X,))

    J_function = JacobianOperator(function, {n: named[n] for n in names}, data)
    for J in (J_list, J_dict, J_function):
        torch.testing.assert_close(J.to_dense(), reference, rtol=1e-10, atol=1e-12)


def test_function_model_with_scalar_parameter():
    """``f(x) = s · tanh(W x)``: a 0-d parameter is one column."""
    torch.manual_seed(0)
    params = {"scale": torch.tensor(1.5), "weight": torch.randn(2, 3)}
    X = torch.randn(sum(SPLITS), 3)

    def function(p, X):
        return p["scale"] * torch.tanh(X @ p["weight"].T)

    J = JacobianOperator(function, params, batches_of(X))
    columns = jacrev(function)(params, X)  # {name: [N, 2, *p.shape]}
    reference = torch.cat([columns["scale"].reshape(-1, 1), columns["weight"].reshape(-1, 6)], 1)
    torch.testing.assert_close(J.to_dense(), reference, rtol=1e-10, atol=1e-12)
    W = torch.randn(J.shape[0], 2)
    torch.testing.assert_close(J.T @ W, reference.T @ W, rtol=1e-10, atol=1e-12)


def test_one_entry_per_sample_and_progressbar():
    """Predictions ``[N]`` (``S = ()``, ``C = 1``): ``J`` is ``[N, P]``."""
    pytest.importorskip("tqdm")
    model, X = make_mlp()

    def function(p, X):
        return functional_call(model, p, (X,)).sum(1)

    params = dict(model.named_parameters())
    J = JacobianOperator(function, params, batches_of(X), progressbar=True)
    reference = dense_jacobian(model, X).reshape(X.shape[0], 2, -1).sum(1)
    assert J.shape == reference.shape and J.output_shape == ()
    torch.testing.assert_close(J.to_dense(), reference, rtol=1e-10, atol=1e-12)
    (prediction_tangent,) = J.T.T @ [torch.ones_like(p) for p in params.values()]
    assert prediction_tangent.shape == (X.shape[0],)


def test_without_determinism_check_and_num_data():
    model, X = make_cnn()
    reference = dense_jacobian(model, X)
    params = list(model.parameters())
    for num_data in (None, sum(SPLITS)):
        J = JacobianOperator(
            model, params, batches_of(X), check_deterministic=False, num_data=num_data
        )
        assert J.shape == reference.shape
        V = torch.randn(reference.shape[1], 2)
        torch.testing.assert_close(J @ V, reference @ V, rtol=1e-10, atol=1e-12)


def test_float32():
    model, X = make_mlp()
    model, X = model.float(), X.float()
    J = JacobianOperator(model, list(model.parameters()), batches_of(X))
    assert J.dtype == torch.float32 and J.device == torch.device("cpu")
    reference = dense_jacobian(copy.deepcopy(model).double(), X.double())
    # computed in J's float32, returned in the promoted dtype (every operator's rule)
    product = J @ torch.ones(J.shape[1], dtype=torch.float64)
    assert product.dtype == torch.float64
    torch.testing.assert_close(product.double(), reference.sum(1), rtol=1e-5, atol=1e-5)


def test_parity_with_curvlinops():
    pytest.importorskip("curvlinops")
    from curvlinops import JacobianLinearOperator, TransposedJacobianLinearOperator

    model, X = make_cnn()
    params = list(model.parameters())
    data = batches_of(X)
    J = JacobianOperator(model, params, data)
    theirs = JacobianLinearOperator(model, params, data)
    theirs_T = TransposedJacobianLinearOperator(model, params, data)
    assert tuple(theirs.shape) == J.shape
    V, W = torch.randn(J.shape[1], 3), torch.randn(J.shape[0], 3)
    torch.testing.assert_close(J @ V, theirs @ V, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(J.T @ W, theirs_T @ W, rtol=1e-10, atol=1e-12)


# ---- refusals ---------------------------------------------------------------


@pytest.fixture
def mlp_operator():
    model, X = make_mlp()
    return model, X, JacobianOperator(model, list(model.parameters()), batches_of(X))


def test_wrong_operand_shapes(mlp_operator):
    model, X, J = mlp_operator
    rows, columns = J.shape  # 20, 26
    with pytest.raises(
        ValueError,
        match=rf"JacobianOperator @ x: expected x of shape \[{columns}\] "
        rf"or \[{columns}, M\], got \[{rows}\]",
    ):
        J @ torch.ones(rows)
    with pytest.raises(
        ValueError,
        match=rf"TransposedJacobianOperator @ x: expected x of shape "
        rf"\[{rows}\] or \[{rows}, M\], got \[{columns}, 2\]",
    ):
        J.T @ torch.ones(columns, 2)
    with pytest.raises(ValueError, match=r"shaped like the parameters, \[\(4, 3\), \(4,\)"):
        J @ [torch.ones(4, 3)]
    with pytest.raises(
        ValueError,
        match=r"expected a list of 1 tensors shaped like the predictions over `data`, "
        r"\[\(10, 2\)\], got 1 shaped \[\(2, 10\)\]",
    ):
        J.T @ [torch.ones(2, 10)]


def test_params_not_of_model():
    model, X = make_mlp()
    not_of_model = r"params \[1\] \(shapes \[\(4,\)\]\) are not parameters of model"
    with pytest.raises(ValueError, match=not_of_model):
        JacobianOperator(model, [model[0].weight, torch.zeros(4)], batches_of(X))
    with pytest.raises(ValueError, match=r"params keys \['0.kernel'\] are not parameters"):
        JacobianOperator(model, {"0.kernel": torch.zeros(4, 3)}, batches_of(X))
    with pytest.raises(ValueError, match=r"params keys \['0.bias'\] .*another shape"):
        JacobianOperator(model, {"0.bias": torch.zeros(5)}, batches_of(X))
    with pytest.raises(ValueError, match="non-empty list of tensors"):
        TransposedJacobianOperator(model, [], batches_of(X))
    with pytest.raises(ValueError, match="params must be a dict name -> tensor"):
        JacobianOperator(lambda p, X: X, list(model.parameters()), batches_of(X))
    with pytest.raises(TypeError, match="model must be an nn.Module or a function"):
        JacobianOperator("model", list(model.parameters()), batches_of(X))


def test_empty_and_one_shot_data():
    model, X = make_mlp()
    params = list(model.parameters())
    for check in (True, False):
        with pytest.raises(ValueError, match="`data` yielded no batch; pass a non-empty"):
            JacobianOperator(model, params, [], check_deterministic=check)
    with pytest.raises(ValueError, match="on its second pass: pass a re-iterable"):
        JacobianOperator(model, params, iter(batches_of(X)))
    with pytest.raises(ValueError, match="batch 0 of `data` is a Tensor, not an"):
        JacobianOperator(model, params, [X])


def test_non_deterministic_model():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 4), nn.Dropout(0.5), nn.Linear(4, 2))
    data = batches_of(torch.randn(10, 3))
    with pytest.raises(
        ValueError, match=r"two passes over `data` gave different products.*model.eval"
    ):
        JacobianOperator(model, list(model.parameters()), data)
    model.eval()
    assert JacobianOperator(model, list(model.parameters()), data).shape == (20, 26)


def test_data_changing_between_passes_and_num_data():
    model, X = make_mlp()
    params = list(model.parameters())
    data = batches_of(X)
    J = JacobianOperator(model, params, data)
    data.append(data[0])  # one more batch than at construction
    with pytest.raises(ValueError, match=r"gave batches of sizes \[3, 5, 2, 3\].*\[3, 5, 2\]"):
        J @ torch.ones(J.shape[1])
    with pytest.raises(ValueError, match="now yields more than the 10 samples"):
        J.T @ torch.ones(J.shape[0])
    with pytest.raises(ValueError, match="num_data=7, but a pass over `data` gave 10 samples"):
        JacobianOperator(model, params, batches_of(X), num_data=7)
    with pytest.raises(ValueError, match="num_data must be a positive int"):
        JacobianOperator(model, params, batches_of(X), num_data=0)
    # batches of 3, 5, 2 samples predict 2, 2, 1 entries per sample
    with pytest.raises(ValueError, match=r"per-sample shapes \[\(1,\), \(2,\)\]"):
        JacobianOperator(
            lambda p, X: functional_call(model, p, (X,))[:, : X.shape[0] % 2 + 1],
            dict(model.named_parameters()),
            batches_of(X),
        )


@pytest.mark.parametrize("kind", ["0-d", "tuple"])
def test_prediction_without_a_batch_axis(kind):
    model, X = make_mlp()

    def function(p, X):
        output = functional_call(model, p, (X,))
        return output.sum() if kind == "0-d" else (output, output)

    expected = "is a 0-d tensor" if kind == "0-d" else "is tuple"
    with pytest.raises(ValueError, match=rf"prediction on batch 0 {expected}; it must be"):
        JacobianOperator(function, dict(model.named_parameters()), batches_of(X))
