"""``HessianOperator``, ``GGNOperator`` and ``EFOperator`` over batches of unequal size.

References are dense float64 matrices built with ``torch.func`` over the whole
data set concatenated into one batch: the Hessian of the full-data loss, the
GGN ``Jᵀ H J`` from the full Jacobian and the loss Hessian w.r.t. the output,
and the EF from per-sample gradients. The data set is split into batches of
sizes 3, 5, 2, so a plain mean over batches would be wrong.
"""

import pytest
import torch
from torch import nn
from torch.func import functional_call, hessian, jacrev

from curvext.operators import EFOperator, GGNOperator, HessianOperator

SPLITS = (3, 5, 2)
OPERATORS = {"hessian": HessianOperator, "ggn": GGNOperator, "ef": EFOperator}


def make_problem(loss, reduction):
    """An MLP, its loss and a data set of 10 samples; ``weighted``: CE with
    class weights and an ignored class (the mean's denominator is then the
    summed weights of the kept targets)."""
    torch.manual_seed(0)
    num_outputs = 2 if loss == "mse" else 3
    model = nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, num_outputs))
    X = torch.randn(sum(SPLITS), 3)
    if loss == "mse":
        loss_fn, y = nn.MSELoss(reduction=reduction), torch.randn(sum(SPLITS), 2)
    else:
        kwargs = (
            {"weight": torch.tensor([0.5, 1.0, 2.0]), "ignore_index": 1}
            if loss == "weighted_ce"
            else {}
        )
        loss_fn = nn.CrossEntropyLoss(reduction=reduction, **kwargs)
        y = torch.tensor([0, 1, 2, 2, 0, 1, 1, 2, 0, 2])
    return model, loss_fn, X, y


def batches_of(X, y, sizes=SPLITS):
    return list(zip(X.split(list(sizes)), y.split(list(sizes))))


def dense_reference(kind, model, loss_fn, X, y):
    """The ``[P, P]`` curvature of the full-data loss, built independently."""
    names = [name for name, _ in model.named_parameters()]
    params = [p.detach() for p in model.parameters()]
    flat = torch.cat([p.flatten() for p in params])

    def output_of(theta):
        blocks = theta.split([p.numel() for p in params])
        return functional_call(
            model, {n: b.view_as(p) for n, b, p in zip(names, blocks, params)}, (X,)
        )

    if kind == "hessian":
        return hessian(lambda theta: loss_fn(output_of(theta), y))(flat)
    if kind == "ggn":
        output = output_of(flat).detach()
        jacobian = jacrev(output_of)(flat).flatten(0, -2)  # [N*C, P]
        loss_hessian = hessian(lambda out: loss_fn(out, y))(output)
        loss_hessian = loss_hessian.reshape(output.numel(), output.numel())
        return jacobian.T @ loss_hessian @ jacobian
    unreduced = type(loss_fn)(**{**_loss_kwargs(loss_fn), "reduction": "none"})

    def sample_losses(theta):
        losses = unreduced(output_of(theta), y)
        return losses.reshape(losses.shape[0], -1).sum(1)

    gradients = jacrev(sample_losses)(flat)  # [N, P]
    normalization = 1.0
    if loss_fn.reduction == "mean":
        summed = type(loss_fn)(**{**_loss_kwargs(loss_fn), "reduction": "sum"})
        output = output_of(flat)
        normalization = (loss_fn(output, y) / summed(output, y)).item()
    return normalization * gradients.T @ gradients


def _loss_kwargs(loss_fn):
    if isinstance(loss_fn, nn.CrossEntropyLoss):
        return {"weight": loss_fn.weight, "ignore_index": loss_fn.ignore_index}
    return {}


PROBLEMS = [
    ("mse", "mean"),
    ("mse", "sum"),
    ("ce", "mean"),
    ("ce", "sum"),
    ("weighted_ce", "mean"),
]


@pytest.mark.parametrize("kind", OPERATORS)
@pytest.mark.parametrize("loss,reduction", PROBLEMS)
def test_products_match_full_data_matrix(kind, loss, reduction):
    model, loss_fn, X, y = make_problem(loss, reduction)
    params = list(model.parameters())
    op = OPERATORS[kind](model, loss_fn, params, batches_of(X, y))
    reference = dense_reference(kind, model, loss_fn, X, y)
    P = reference.shape[0]
    assert op.shape == (P, P)
    torch.testing.assert_close(op.to_dense(), reference)

    columns = torch.randn(P, 3)
    torch.testing.assert_close(op @ columns, reference @ columns)
    torch.testing.assert_close(op @ columns[:, 0], reference @ columns[:, 0])
    as_list = [c.reshape(p.shape) for c, p in zip(columns[:, 1].split(op._numels), params)]
    for block, expected in zip(op @ as_list, (reference @ columns[:, 1]).split(op._numels)):
        torch.testing.assert_close(block.flatten(), expected)
    assert op.T is op


@pytest.mark.parametrize("loss,reduction", PROBLEMS)
def test_ggn_through_torch_func_loss_hessian(loss, reduction, monkeypatch):
    """Loss square roots too large for the output-space product (budget 0)
    send the exact GGN through ``vmap(grad(jvp))`` of the loss instead."""
    import curvext.operators.matrix_free as matrix_free

    monkeypatch.setattr(matrix_free, "_LOSS_ROOT_ELEMENTS", 0)
    model, loss_fn, X, y = make_problem(loss, reduction)
    op = GGNOperator(model, loss_fn, list(model.parameters()), batches_of(X, y))
    torch.testing.assert_close(op.to_dense(), dense_reference("ggn", model, loss_fn, X, y))
    vector = torch.randn(op.shape[0])
    torch.testing.assert_close(op @ vector, dense_reference("ggn", model, loss_fn, X, y) @ vector)


@pytest.mark.parametrize("num_columns", [1, 4, 7, 9])
@pytest.mark.parametrize("kind,loss", [("ggn", "ce"), ("hessian", "ce"), ("hessian", "mse")])
def test_convolutional_model_in_column_chunks(kind, loss, num_columns):
    """With a convolution the GGN and the Hessian run the columns one at a time
    (the GGN through one dual-number forward pass per column). Every column
    count against the dense reference, for CE and the mean MSELoss."""
    torch.manual_seed(0)
    num_outputs = 2 if loss == "mse" else 3
    model = nn.Sequential(nn.Conv1d(2, 3, 3), nn.Tanh(), nn.Flatten(), nn.Linear(12, num_outputs))
    X = torch.randn(10, 2, 6)
    if loss == "mse":
        loss_fn, y = nn.MSELoss(), torch.randn(10, 2)
    else:
        loss_fn, y = nn.CrossEntropyLoss(), torch.tensor([0, 1, 2, 2, 0, 1, 1, 2, 0, 2])
    op = OPERATORS[kind](model, loss_fn, list(model.parameters()), batches_of(X, y))
    assert op._convolutional
    reference = dense_reference(kind, model, loss_fn, X, y)
    columns = torch.randn(reference.shape[0], num_columns)
    torch.testing.assert_close(op @ columns, reference @ columns)


def test_subset_of_params_and_measures():
    """Rows for the first layer's weight only; diag/trace/logdet/norm from dense."""
    model, loss_fn, X, y = make_problem("ce", "mean")
    weight = model[0].weight
    op = GGNOperator(model, loss_fn, [weight], batches_of(X, y))
    full = dense_reference("ggn", model, loss_fn, X, y)
    reference = full[: weight.numel(), : weight.numel()]
    torch.testing.assert_close(op.to_dense(), reference)
    torch.testing.assert_close(op.diag(), reference.diagonal())
    torch.testing.assert_close(op.trace(), reference.trace())
    damped = reference + 0.1 * torch.eye(weight.numel())
    torch.testing.assert_close((op + 0.1).logdet(), torch.logdet(damped))
    torch.testing.assert_close(op.frobenius_norm(), torch.linalg.matrix_norm(reference))


def test_arithmetic_and_inverse():
    model, loss_fn, X, y = make_problem("mse", "mean")
    params = list(model.parameters())
    data = batches_of(X, y)
    G = GGNOperator(model, loss_fn, params, data)
    G_sum = GGNOperator(model, nn.MSELoss(reduction="sum"), params, data)
    reference = dense_reference("ggn", model, loss_fn, X, y)
    identity = torch.eye(reference.shape[0])
    v = torch.randn(reference.shape[0], 2)
    torch.testing.assert_close((2 * G + 1) @ v, (2 * reference + identity) @ v)
    torch.testing.assert_close((G - G) @ v, torch.zeros_like(v))
    torch.testing.assert_close((G_sum + G) @ v, (2 * sum(SPLITS) + 1) * reference @ v)
    with pytest.raises(ValueError, match="same structure"):
        G + HessianOperator(model, loss_fn, params, data)
    solution = G.inverse(damping=0.5, tol=1e-12, max_iter=200) @ v
    torch.testing.assert_close(solution, torch.linalg.solve(reference + 0.5 * identity, v))


def test_mc_fisher_is_fixed_and_close_to_ggn():
    model, loss_fn, X, y = make_problem("ce", "mean")
    params, data = list(model.parameters()), batches_of(X, y)
    fisher = GGNOperator(model, loss_fn, params, data, mc_samples=4000)
    v = torch.randn(fisher.shape[0], 2)
    torch.testing.assert_close(fisher @ v, fisher @ v)  # one matrix: seeded per pass
    reference = dense_reference("ggn", model, loss_fn, X, y)
    error = torch.linalg.matrix_norm(fisher.to_dense() - reference)
    assert error < 0.1 * torch.linalg.matrix_norm(reference)


def test_nondeterministic_model_is_detected():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 4), nn.Dropout(0.5), nn.Linear(4, 2)).train()
    X, y = torch.randn(10, 3), torch.randn(10, 2)
    with pytest.raises(ValueError, match="dropout"):
        GGNOperator(model, nn.MSELoss(), list(model.parameters()), batches_of(X, y))
    # switched off, products run (each pass with its own dropout masks)
    op = HessianOperator(
        model,
        nn.MSELoss(),
        list(model.parameters()),
        batches_of(X, y),
        check_deterministic=False,
    )
    assert (op @ torch.ones(op.shape[0])).shape == (op.shape[0],)


@pytest.mark.parametrize("kind", OPERATORS)
def test_bad_data(kind):
    model, loss_fn, X, y = make_problem("mse", "mean")
    params = list(model.parameters())
    with pytest.raises(ValueError, match="yielded no batch"):
        OPERATORS[kind](model, loss_fn, params, [])
    with pytest.raises(ValueError, match="re-iterable"):
        OPERATORS[kind](model, loss_fn, params, iter(batches_of(X, y)))
    with pytest.raises(ValueError, match="num_data=11"):
        OPERATORS[kind](model, loss_fn, params, batches_of(X, y), num_data=11)
    with pytest.raises(ValueError, match="not an \\(X, y\\) pair"):
        OPERATORS[kind](model, loss_fn, params, [X])


def test_bad_arguments():
    model, loss_fn, X, y = make_problem("mse", "mean")
    data = batches_of(X, y)
    with pytest.raises(ValueError, match="not parameters of model"):
        GGNOperator(model, loss_fn, [torch.zeros(3, requires_grad=True)], data)
    with pytest.raises(ValueError, match="reduction='mean' or 'sum'"):
        GGNOperator(model, nn.MSELoss(reduction="none"), list(model.parameters()), data)
    with pytest.raises(ValueError, match="mc_samples"):
        GGNOperator(model, loss_fn, list(model.parameters()), data, mc_samples=-1)
    op = GGNOperator(model, loss_fn, list(model.parameters()), data)
    with pytest.raises(ValueError, match="expected x of shape"):
        op @ torch.ones(3)


@pytest.mark.parametrize("kind", ["hessian", "ggn", "ef"])
@pytest.mark.parametrize("loss", ["mse", "ce"])
def test_parity_with_curvlinops(kind, loss):
    curvlinops = pytest.importorskip("curvlinops")
    model, loss_fn, X, y = make_problem(loss, "mean")
    params, data = list(model.parameters()), batches_of(X, y)
    peer_class = {
        "hessian": curvlinops.HessianLinearOperator,
        "ggn": curvlinops.GGNLinearOperator,
        "ef": curvlinops.EFLinearOperator,
    }[kind]
    peer = peer_class(model, loss_fn, params, data)
    ours = OPERATORS[kind](model, loss_fn, params, data)
    v = torch.randn(ours.shape[0], 3)
    torch.testing.assert_close(ours @ v, peer @ v)


class _WithIdle(nn.Module):
    """An MLP plus a parameter that its forward pass never uses."""

    def __init__(self, mlp):
        super().__init__()
        self.mlp, self.idle = mlp, nn.Parameter(torch.ones(2))

    def forward(self, x):
        return self.mlp(x)


@pytest.mark.parametrize("num_columns", [1, 3])
@pytest.mark.parametrize("kind", ["hessian", "ggn"])
def test_parameter_the_loss_does_not_use(kind, num_columns):
    """Its rows and columns of the Hessian and the GGN are zero, the product
    equals the dense reference (one column: the GGN's dual forward pass and
    the Hessian's plain backward; three: the batched paths)."""
    mlp, loss_fn, X, y = make_problem("ce", "mean")
    model = _WithIdle(mlp)
    operator = OPERATORS[kind](model, loss_fn, list(model.parameters()), batches_of(X, y))
    dense = dense_reference(kind, model, loss_fn, X, y)
    idle = [name for name, _ in model.named_parameters()].index("idle")
    start = sum(p.numel() for p in list(model.parameters())[:idle])
    assert dense[start : start + 2].abs().max() == 0  # the reference agrees: zero rows
    torch.manual_seed(1)
    V = torch.randn(operator.shape[0], num_columns)
    product = operator @ (V[:, 0] if num_columns == 1 else V)
    torch.testing.assert_close(product.reshape(operator.shape[0], -1), dense @ V)
    assert product.reshape(operator.shape[0], -1)[start : start + 2].abs().max() == 0
