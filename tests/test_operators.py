"""Curvature operators against dense matrices built independently.

The stored tensors come from curvext's extensions on a small float64 model
(``p.ggn_diag``, ``p.batch_ggn_diag``, ``p.sum_grad_squared``, ``p.kfac``) or
are random SPD factors set on the parameters directly (well conditioned, for
undamped inverses and log-determinants). Every reference is assembled here
from those tensors with ``torch.diag``/``torch.kron``/``torch.block_diag``
and measured with ``torch.linalg``; nothing is compared with the operators'
own ``to_dense``.
"""

import functools
import math

import pytest
import torch
from torch import nn

from curvext import backpack, extend
from curvext.extensions import KFAC, BatchGGNDiag, GGNDiag, SumGradSquared
from curvext.operators import (
    CurvatureOperator,
    DiagonalOperator,
    KronEigenOperator,
    KronOperator,
)


def kron(factors):
    return functools.reduce(torch.kron, factors)


def eye_like(dense):
    return torch.eye(dense.shape[0])


def engine_model():
    """Linear (two factors), LayerNorm (one factor each), Linear; type-2 KFAC etc."""
    torch.manual_seed(1)
    model = extend(nn.Sequential(nn.Linear(3, 4), nn.LayerNorm(4), nn.Tanh(), nn.Linear(4, 3)))
    loss_fn = extend(nn.CrossEntropyLoss())
    X, y = torch.randn(7, 3), torch.randint(0, 3, (7,))
    with backpack(GGNDiag(), BatchGGNDiag(), SumGradSquared(), KFAC(fisher_type="type-2")):
        loss_fn(model(X), y).backward()
    return model


def random_spd(dim):
    root = torch.randn(dim, dim + 2)
    return root @ root.T / dim + 0.1 * torch.eye(dim)


def random_kron_params():
    """A weight [G2, A3], its bias [G2] and a free parameter with one 4×4 factor."""
    torch.manual_seed(2)
    layer = nn.Linear(3, 2)
    free = nn.Parameter(torch.zeros(2, 2))
    G, A = random_spd(2), random_spd(3)
    layer.weight.kfac, layer.bias.kfac, free.kfac = [G, A], [G], [random_spd(4)]
    return [layer.weight, layer.bias, free]


def dense_kron_reference(params):
    return torch.block_diag(*[kron(p.kfac) for p in params])


def dense_diag_reference(params, attribute):
    values = [getattr(p, attribute) for p in params]
    values = [v.sum(0) if v.shape != p.shape else v for v, p in zip(values, params)]
    return torch.diag(torch.cat([v.flatten() for v in values]))


def case_diag(attribute):
    model = engine_model()
    params = list(model.parameters())
    return DiagonalOperator.from_params(params, attribute), dense_diag_reference(params, attribute)


def case_diag_random():
    params = random_kron_params()
    for p in params:
        p.my_curvature = torch.rand_like(p) + 0.5
    return DiagonalOperator.from_params(params, "my_curvature"), dense_diag_reference(
        params, "my_curvature"
    )


def case_diag_power():
    op, dense = case_diag_random()
    return op**-0.5, torch.diag(dense.diagonal() ** -0.5)


def case_kron_engine():
    params = list(engine_model().parameters())
    return KronOperator.from_params(params), dense_kron_reference(params)


def case_kron_random():
    params = random_kron_params()
    return KronOperator.from_params(params), dense_kron_reference(params)


def case_kron_shifted():
    op, dense = case_kron_random()
    return op + 0.3, dense + 0.3 * eye_like(dense)


def case_kron_scaled():
    op, dense = case_kron_random()
    return 2.5 * op - 0.01, 2.5 * dense - 0.01 * eye_like(dense)


def case_kron_exact_inverse():
    op, dense = case_kron_random()
    inverse = op.inverse(damping=0.2, use_exact_damping=True)
    return inverse, torch.linalg.inv(dense + 0.2 * eye_like(dense))


CASES = {
    "diag-ggn": lambda: case_diag("ggn_diag"),
    "diag-batch-ggn": lambda: case_diag("batch_ggn_diag"),
    "diag-sum-grad-squared": lambda: case_diag("sum_grad_squared"),
    "diag-random": case_diag_random,
    "diag-power": case_diag_power,
    "kron-engine": case_kron_engine,
    "kron-random": case_kron_random,
    "kron-shifted": case_kron_shifted,
    "kron-scaled": case_kron_scaled,
    "kron-eigen": case_kron_exact_inverse,
}
# positive definite as they are (undamped logdet is defined)
POSITIVE_DEFINITE = [
    "diag-random",
    "diag-power",
    "kron-random",
    "kron-shifted",
    "kron-scaled",
    "kron-eigen",
]


def assert_close(actual, expected, **kwargs):
    torch.testing.assert_close(actual, expected, rtol=1e-8, atol=1e-10, **kwargs)


@pytest.fixture(params=list(CASES), ids=str)
def case(request):
    return CASES[request.param]()


def test_shape_dtype_device_params(case):
    op, dense = case
    assert isinstance(op, CurvatureOperator)
    assert op.shape == tuple(dense.shape)
    assert op.dtype == torch.float64 and op.device == torch.device("cpu")
    assert sum(p.numel() for p in op.params) == op.shape[0]


def test_to_dense(case):
    op, dense = case
    assert_close(op.to_dense(), dense)


def test_matmul_vector_matrix_and_list(case):
    op, dense = case
    vector, matrix = torch.randn(op.shape[0]), torch.randn(op.shape[0], 5)
    assert_close(op @ vector, dense @ vector)
    assert_close(op @ matrix, dense @ matrix)
    assert_close(op @ matrix[:, :1], dense @ matrix[:, :1])
    as_list = [
        v.reshape(p.shape) for v, p in zip(vector.split([p.numel() for p in op.params]), op.params)
    ]
    result = op @ as_list
    assert isinstance(result, list)
    assert [r.shape for r in result] == [p.shape for p in op.params]
    assert_close(torch.cat([r.flatten() for r in result]), dense @ vector)
    assert isinstance(op @ tuple(as_list), list)


def test_transpose(case):
    op, dense = case
    vector = torch.randn(op.shape[0])
    assert op.T is op
    assert_close(op.T @ vector, dense.T @ vector)


def test_diag_trace_frobenius(case):
    op, dense = case
    assert_close(op.diag(), dense.diagonal())
    assert_close(op.trace(), dense.trace())
    assert_close(op.frobenius_norm(), torch.linalg.matrix_norm(dense))


def test_logdet_det_damped(case):
    op, dense = case
    damped = dense + 0.5 * eye_like(dense)
    assert_close((op + 0.5).logdet(), torch.linalg.slogdet(damped).logabsdet)
    torch.testing.assert_close((op + 0.5).det(), torch.linalg.det(damped), rtol=1e-8, atol=0)


@pytest.mark.parametrize("name", POSITIVE_DEFINITE)
def test_logdet_det_undamped(name):
    op, dense = CASES[name]()
    sign, logabsdet = torch.linalg.slogdet(dense)
    assert sign == 1
    assert_close(op.logdet(), logabsdet)
    torch.testing.assert_close(op.det(), torch.linalg.det(dense), rtol=1e-8, atol=0)


def test_scipy_eigsh_and_cg(case):
    linalg = pytest.importorskip("scipy.sparse.linalg")
    cg, eigsh = linalg.cg, linalg.eigsh
    op, dense = case
    linear_operator = op.to_scipy()
    assert linear_operator.shape == op.shape
    top = eigsh(linear_operator, k=3, which="LA", return_eigenvectors=False)
    assert_close(torch.from_numpy(top).sort().values, torch.linalg.eigvalsh(dense)[-3:])
    rhs = torch.randn(op.shape[0])
    solution, info = cg((op + 1.0).to_scipy(), rhs.numpy(), rtol=1e-12, atol=0)
    assert info == 0
    torch.testing.assert_close(
        torch.from_numpy(solution),
        torch.linalg.solve(dense + eye_like(dense), rhs),
        rtol=1e-7,
        atol=1e-9,
    )
    product = linear_operator.matmat(torch.randn(op.shape[0], 2).numpy())
    assert product.dtype.name == "float64" and product.shape == (op.shape[0], 2)


def test_scalar_arithmetic(case):
    op, dense = case
    identity = eye_like(dense)
    expected = {
        "op + 0.7": (op + 0.7, dense + 0.7 * identity),
        "0.7 + op": (0.7 + op, dense + 0.7 * identity),
        "op - 0.7": (op - 0.7, dense - 0.7 * identity),
        "0.7 - op": (0.7 - op, 0.7 * identity - dense),
        "3 * op": (3 * op, 3 * dense),
        "op * 3": (op * 3, 3 * dense),
        "tensor(2) * op": (torch.tensor(2.0) * op, 2 * dense),
        "-op": (-op, -dense),
    }
    for name, (result, reference) in expected.items():
        assert type(result) is type(op), name
        assert_close(result @ identity, reference, msg=name)
        assert_close(result.diag(), reference.diagonal(), msg=name)
        assert_close(result.frobenius_norm(), torch.linalg.matrix_norm(reference), msg=name)


def test_sum_with_same_structure(case):
    op, dense = case
    for result, reference in [
        (op + op, 2 * dense),
        (op - 0.25 * op, 0.75 * dense),
        ((op + 1) + 2 * op, 3 * dense + eye_like(dense)),
    ]:
        assert type(result) is type(op)
        assert_close(result @ eye_like(dense), reference)
        assert_close(result.trace(), reference.trace())


def test_diagonal_sum_of_different_diagonals():
    params = random_kron_params()
    first, second = [torch.rand(sum(p.numel() for p in params)) for _ in range(2)]
    total = DiagonalOperator(params, first) - 2 * DiagonalOperator(params, second)
    assert_close(total.to_dense(), torch.diag(first) - 2 * torch.diag(second))


def test_kron_sum_with_one_differing_factor_per_block():
    params = random_kron_params()
    first = KronOperator.from_params(params)
    (G, A), (G_bias,), (F,) = (p.kfac for p in params)
    A2, F2 = random_spd(3), random_spd(4)
    second = KronOperator(params, [[G, A2], [G_bias], [F2]])
    dense_second = torch.block_diag(torch.kron(G, A2), G_bias, F2)
    result = 2 * first + (second + 0.5)
    assert isinstance(result, KronOperator)
    expected = 2 * dense_kron_reference(params) + dense_second + 0.5 * torch.eye(first.shape[0])
    assert_close(result @ torch.eye(first.shape[0]), expected)
    assert_close(result.logdet(), torch.linalg.slogdet(expected).logabsdet)


def test_kron_eigen_sum_in_shared_basis():
    op, dense = case_kron_random()
    inverse = op.inverse(use_exact_damping=True)
    result = inverse + 3 * inverse
    assert isinstance(result, KronEigenOperator)
    assert_close(result.to_dense(), 4 * torch.linalg.inv(dense))


def test_from_params_skips_frozen_parameters():
    model = engine_model()
    frozen = nn.Parameter(torch.zeros(3), requires_grad=False)
    params = [frozen, *model.parameters()]
    assert DiagonalOperator.from_params(params).params == list(model.parameters())
    assert KronOperator.from_params(iter(params)).params == list(model.parameters())


# ---- inverses -------------------------------------------------------------


@pytest.mark.parametrize("damping", [0.0, 0.1])
def test_diagonal_inverse(damping):
    op, dense = case_diag_random()
    damped = dense + damping * eye_like(dense)
    matrix = torch.randn(op.shape[0], 3)
    inverse = op.inverse(damping=damping)
    assert isinstance(inverse, DiagonalOperator)
    assert_close(inverse @ matrix, torch.linalg.solve(damped, matrix))
    assert_close((op**-1) @ matrix, torch.linalg.solve(dense, matrix))


def factor_dampings_reference(factors, damping, heuristic, min_damping):
    """π-damping of Martens & Grosse (2015, §6.3), written out for [G, A] and [F] blocks."""
    if heuristic and len(factors) == 2:
        first, second = factors
        pi = math.sqrt((first.trace() / first.shape[0]) / (second.trace() / second.shape[0]))
        root = math.sqrt(damping)
        return [max(pi * root, min_damping), max(root / pi, min_damping)]
    return [damping] * len(factors)


def damped_kron_reference(params, damping, heuristic=False, min_damping=1e-8):
    """Factor-wise damped blocks; with the heuristic a one-factor block whose
    factor is also a factor of a two-factor block (the engine stores a bias's
    G as the very tensor of its weight's) gets that factor's π-damping there,
    as curvlinops damps biases."""
    dampings = {
        id(p): factor_dampings_reference(p.kfac, damping, heuristic, min_damping) for p in params
    }
    if heuristic:
        for p in params:
            if len(p.kfac) == 1:
                for other in params:
                    positions = [i for i, f in enumerate(other.kfac) if f is p.kfac[0]]
                    if len(other.kfac) == 2 and positions:
                        dampings[id(p)] = [dampings[id(other)][positions[0]]]
    blocks = []
    for p in params:
        factors = p.kfac
        blocks.append(
            kron([f + d * torch.eye(f.shape[0]) for f, d in zip(factors, dampings[id(p)])])
        )
    return torch.block_diag(*blocks)


KRON_BUILDERS = {
    "random": lambda: random_kron_params(),
    "engine": lambda: list(engine_model().parameters()),
}


DAMPED_SETTINGS = [(1e-2, False, 1e-8), (1e-2, True, 1e-8), (1e-10, True, 1e-3)]
UNDAMPED_SETTINGS = [(0.0, False, 1e-8), (0.0, True, 1e-4)]


# type-2 factors of 7 samples are singular: undamped inverses only on random factors
# (with the heuristic, unshared one-factor blocks get plain damping, here 0)
@pytest.mark.parametrize(
    "builder, damping, heuristic, min_damping",
    [("random", *s) for s in DAMPED_SETTINGS + UNDAMPED_SETTINGS]
    + [("engine", *s) for s in DAMPED_SETTINGS],
)
def test_kron_inverse_factorwise(builder, damping, heuristic, min_damping):
    params = KRON_BUILDERS[builder]()
    op = KronOperator.from_params(params)
    damped = damped_kron_reference(params, damping, heuristic, min_damping)
    inverse = op.inverse(damping=damping, use_heuristic_damping=heuristic, min_damping=min_damping)
    assert isinstance(inverse, KronOperator)
    matrix = torch.randn(op.shape[0], 4)
    torch.testing.assert_close(
        inverse @ matrix, torch.linalg.solve(damped, matrix), rtol=1e-6, atol=1e-8
    )
    assert_close(inverse.logdet(), -torch.linalg.slogdet(damped).logabsdet)


def test_heuristic_damping_is_pi_damping():
    """π√δ and √δ/π differ from plain δ when the factors' mean eigenvalues differ."""
    params = random_kron_params()
    params[0].kfac = [100.0 * params[0].kfac[0], params[0].kfac[1]]
    op = KronOperator.from_params(params)
    heuristic, plain = op.inverse(1e-1, use_heuristic_damping=True), op.inverse(1e-1)
    assert not torch.allclose(heuristic.to_dense(), plain.to_dense())


@pytest.mark.parametrize("builder, damping", [("random", 0.0), ("random", 1e-2), ("engine", 1e-2)])
def test_kron_inverse_exact(builder, damping):
    params = KRON_BUILDERS[builder]()
    op = KronOperator.from_params(params)
    dense = dense_kron_reference(params) + damping * torch.eye(op.shape[0])
    inverse = op.inverse(damping=damping, use_exact_damping=True)
    assert isinstance(inverse, KronEigenOperator)
    matrix = torch.randn(op.shape[0], 4)
    torch.testing.assert_close(
        inverse @ matrix, torch.linalg.solve(dense, matrix), rtol=1e-6, atol=1e-8
    )
    torch.testing.assert_close(
        inverse.diag(), torch.linalg.inv(dense).diagonal(), rtol=1e-6, atol=1e-8
    )
    round_trip = inverse.inverse()
    torch.testing.assert_close(round_trip @ matrix, dense @ matrix, rtol=1e-6, atol=1e-8)


def test_kron_inverse_of_shifted_operator_is_exact():
    op, dense = case_kron_random()
    shifted = op + 0.3
    matrix = torch.randn(op.shape[0], 2)
    identity = eye_like(dense)
    assert_close(shifted.inverse() @ matrix, torch.linalg.solve(dense + 0.3 * identity, matrix))
    result = shifted.inverse(damping=0.2, use_exact_damping=True) @ matrix
    assert_close(result, torch.linalg.solve(dense + 0.5 * identity, matrix))


def test_scaled_kron_inverse():
    op, dense = case_kron_random()
    matrix = torch.randn(op.shape[0], 2)
    assert_close((3 * op).inverse() @ matrix, torch.linalg.solve(3 * dense, matrix))
    assert_close((-op).inverse() @ matrix, torch.linalg.solve(-dense, matrix))


# ---- bad input ------------------------------------------------------------


def test_matmul_shape_errors():
    op, _ = case_kron_random()
    P = op.shape[0]
    for bad in [
        torch.randn(P + 1),
        torch.randn(P + 1, 2),
        torch.randn(P, 2, 1),
        torch.randn(2, P),
    ]:
        with pytest.raises(ValueError, match=rf"expected x of shape \[{P}\] or \[{P}, M\]"):
            op @ bad
    expected = (
        r"expected a list of 3 tensors shaped like the parameters, \[\(2, 3\), \(2,\), \(2, 2\)\]"
    )
    with pytest.raises(ValueError, match=expected):
        op @ [torch.randn(2, 3), torch.randn(2)]
    with pytest.raises(ValueError, match=expected):
        op @ [torch.randn(2, 3), torch.randn(2), torch.randn(4)]
    with pytest.raises(TypeError):
        op @ "x"


@pytest.mark.parametrize(
    "attribute, extension",
    [
        ("ggn_diag", r"GGNDiag\(\)"),
        ("batch_ggn_diag", r"BatchGGNDiag\(\)"),
        ("sum_grad_squared", r"SumGradSquared\(\)"),
    ],
)
def test_missing_attribute_names_parameter_and_extension(attribute, extension):
    layer = nn.Linear(3, 2)
    with pytest.raises(
        AttributeError,
        match=(
            rf"parameter 0 \(shape \(2, 3\)\) has no attribute '{attribute}': "
            rf"run {extension} inside backpack"
        ),
    ):
        DiagonalOperator.from_params(layer.parameters(), attribute)


def test_missing_kfac_and_unknown_attribute():
    layer = nn.Linear(3, 2)
    layer.weight.kfac = [torch.eye(2), torch.eye(3)]
    with pytest.raises(
        AttributeError,
        match=r"parameter 1 \(shape \(2,\)\) has no attribute 'kfac': run KFAC\(\)",
    ):
        KronOperator.from_params(layer.parameters())
    with pytest.raises(AttributeError, match="'my_curvature': no curvext extension stores it"):
        DiagonalOperator.from_params(layer.parameters(), "my_curvature")


def test_bad_stored_shapes_and_empty_params():
    layer = nn.Linear(3, 2)
    layer.weight.ggn_diag, layer.bias.ggn_diag = torch.ones(3, 2), torch.ones(2)
    with pytest.raises(
        ValueError,
        match=r"p.ggn_diag of parameter 0 has shape \(3, 2\); expected .* \(2, 3\)",
    ):
        DiagonalOperator.from_params(layer.parameters())
    layer.weight.kfac, layer.bias.kfac = [torch.eye(2), torch.eye(2)], [torch.eye(2)]
    with pytest.raises(ValueError, match=r"factors of parameter 0 \(shape \(2, 3\), 6 entries\)"):
        KronOperator.from_params(layer.parameters())
    with pytest.raises(ValueError, match="no parameter with requires_grad=True"):
        DiagonalOperator.from_params([])


@pytest.mark.parametrize("damping", [-1e-3, math.nan, math.inf, "1"])
def test_bad_damping(damping):
    diagonal, _ = case_diag_random()
    kron_op, _ = case_kron_random()
    eigen = kron_op.inverse(use_exact_damping=True)
    for inverse in [diagonal.inverse, kron_op.inverse, eigen.inverse]:
        with pytest.raises(ValueError, match="damping must be a finite number >= 0"):
            inverse(damping=damping)
    with pytest.raises(ValueError, match="min_damping must be a finite number >= 0"):
        kron_op.inverse(1e-3, use_heuristic_damping=True, min_damping=damping)


def test_kron_inverse_option_conflicts():
    op, _ = case_kron_random()
    with pytest.raises(ValueError, match="not both"):
        op.inverse(1e-3, use_heuristic_damping=True, use_exact_damping=True)
    for kwargs in [dict(damping=1e-3), dict(damping=1e-3, use_heuristic_damping=True)]:
        with pytest.raises(ValueError, match="identity term"):
            (op + 1.0).inverse(**kwargs)


def test_singular_operators():
    params = random_kron_params()
    diagonal = torch.rand(sum(p.numel() for p in params)) + 0.1
    diagonal[3] = 0.0
    D = DiagonalOperator(params, diagonal)
    with pytest.raises(
        ValueError,
        match=r"logdet\(\): the determinant is zero \(the operator is singular\)",
    ):
        D.logdet()
    assert D.det() == 0
    assert_close((D + 0.5).logdet(), (diagonal + 0.5).log().sum())
    with pytest.raises(ValueError, match="singular"):
        D.inverse()
    with pytest.raises(ValueError, match="zero entry"):
        D.pow(-1)
    with pytest.raises(ValueError, match="negative entry"):
        (D - 1.0).pow(0.5)
    negative_entry = DiagonalOperator(params, torch.cat([-torch.ones(1), diagonal[1:] + 1]))
    with pytest.raises(ValueError, match="determinant is negative"):
        negative_entry.logdet()
    assert negative_entry.det() < 0

    params[2].kfac = [torch.zeros(4, 4)]
    K = KronOperator.from_params(params)
    with pytest.raises(ValueError, match="determinant is zero"):
        K.logdet()
    assert K.det() == 0
    with pytest.raises(
        ValueError,
        match=r"a factor of block 2 \(parameter shape \(2, 2\)\) is singular",
    ):
        K.inverse()
    with pytest.raises(ValueError, match=r"block 2 \(parameter shape \(2, 2\)\) is singular"):
        K.inverse(use_exact_damping=True)
    assert_close(
        (K + 0.5).logdet(),
        torch.linalg.slogdet(dense_kron_reference(params) + 0.5 * torch.eye(K.shape[0])).logabsdet,
    )


def test_combining_mismatched_operators():
    diagonal, _ = case_diag_random()
    kron_op, _ = case_kron_random()
    with pytest.raises(ValueError, match="Cannot combine DiagonalOperator with KronOperator"):
        diagonal + kron_op
    with pytest.raises(ValueError, match="Cannot combine KronOperator with DiagonalOperator"):
        kron_op - diagonal
    other, _ = case_kron_random()  # same shapes, other parameter tensors
    with pytest.raises(
        ValueError, match=r"different parameter lists: 3 parameters .* vs 3 parameters"
    ):
        kron_op + other
    shorter = KronOperator(kron_op.params[:2], kron_op.factors[:2])
    with pytest.raises(
        ValueError, match=r"3 parameters \[\(2, 3\), \(2,\), \(2, 2\)\] vs 2 parameters"
    ):
        kron_op + shorter
    params = kron_op.params
    unrelated = KronOperator(
        params, [[random_spd(2), random_spd(3)], [random_spd(2)], [random_spd(4)]]
    )
    with pytest.raises(
        ValueError,
        match=r"block 0 \(parameter shape \(2, 3\)\) the factors differ in 2 positions",
    ):
        kron_op + unrelated
    eigen = kron_op.inverse(use_exact_damping=True)
    with pytest.raises(ValueError, match="different eigenbasis"):
        eigen + unrelated.inverse(use_exact_damping=True)
    with pytest.raises(TypeError):
        diagonal + torch.ones(diagonal.shape[0])
    with pytest.raises(TypeError):
        diagonal * diagonal
    with pytest.raises(ValueError, match="must be finite"):
        diagonal + math.inf


def test_sums_of_kron_operators_keep_a_shared_factor_shared():
    """K + K' where the weight's and bias's G differ: the summed G is one
    tensor for both blocks again, so the bias keeps its weight's π-damping."""
    model = engine_model()
    params = list(model[0].parameters())  # Linear: weight [G, A], bias [G]
    G, A = params[0].kfac
    assert params[1].kfac[0] is G
    first = KronOperator.from_params(params)
    doubled = 2 * G
    second = KronOperator(params, [[doubled, A], [doubled]])
    total = first + second
    assert total.factors[0][0] is total.factors[1][0]
    for p in params:  # the reference reads the sum's factors off the parameters
        p.kfac = [3 * G, A] if p.dim() == 2 else None
    shared = params[0].kfac[0]
    params[1].kfac = [shared]
    expected = damped_kron_reference(params, 1e-2, heuristic=True)
    inverse = total.inverse(damping=1e-2, use_heuristic_damping=True)
    assert_close(inverse.to_dense(), torch.linalg.inv(expected))
