"""Operators and solvers at the edges: non-finite input, numerically singular
factors, BatchNorm in train mode, mixed dtypes, π-damping of biases.

References: ``torch.linalg.solve``/dense products in float64, curvlinops'
``KFACInverseLinearOperator`` for the damping, and the model's own state
for "no mutation".
"""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from curvext.functional import ihvp_at_x_cg
from curvext.linalg import CGInverse
from curvext.operators import (
    DiagonalOperator,
    EKFACOperator,
    GGNOperator,
    HessianOperator,
    KronOperator,
)


def spd(n: int = 4) -> torch.Tensor:
    M = torch.randn(n, n)
    return M @ M.T + n * torch.eye(n)


@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_cg_refuses_non_finite_right_hand_sides(bad):
    rhs = torch.randn(4, 3)
    rhs[2, 1] = bad
    with pytest.raises(ValueError, match=r"right-hand side\(s\) \[1\] contain NaN or Inf"):
        CGInverse(spd()) @ rhs


def test_cg_refuses_non_finite_operator():
    A = spd()
    A[0, 1] = A[1, 0] = float("nan")
    with pytest.raises(ValueError, match="A @ p is not finite.*NaN or Inf"):
        CGInverse(A) @ torch.randn(4)


def test_cg_never_reports_nan_as_converged():
    inverse = CGInverse(spd())
    inverse @ torch.randn(4)
    assert bool(inverse.info.converged.all())


def test_ihvp_at_x_cg_refuses_non_finite_vectors():
    x = torch.randn(3)
    ihvp = ihvp_at_x_cg(lambda x: (x**4).sum() + x.square().sum(), x)
    with pytest.raises(ValueError, match="contain NaN or Inf"):
        ihvp(torch.tensor([1.0, float("nan"), 0.0]))


def one_sample_problem(dtype=torch.float64):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 5), nn.Tanh(), nn.Linear(5, 4)).to(dtype)
    X, y = torch.randn(1, 6, dtype=dtype), torch.randint(0, 4, (1,))
    return model, nn.CrossEntropyLoss(), [(X, y)]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_kron_inverse_of_rank_deficient_factors_is_refused(dtype):
    """Type-2 KFAC of one sample: every factor has rank one, so the undamped
    inverse is rounding noise (1e10 and more); a damping above the noise works."""
    model, loss_fn, data = one_sample_problem(dtype)
    K = KronOperator.from_data(model, loss_fn, data, fisher_type="type-2")
    with pytest.raises(ValueError, match=r"is singular \(numerically.*Pass a damping well above"):
        K.inverse()
    with pytest.raises(ValueError, match="singular"):
        K.inverse(use_exact_damping=True)
    damping = 1e-2
    damped = K.inverse(damping=damping).to_dense()
    # (A + δI)⁻¹ ⊗ (G + δI)⁻¹ with positive semi-definite factors: at most 1/δ²
    assert torch.isfinite(damped).all()
    assert damped.abs().max() <= (1 + 1e-4) / damping**2


def test_a_small_damping_of_a_wide_float32_factor_is_accepted():
    """Damped, the eigenvalues' rounding error is a few eps·λ_max: δ = 1e-4 on a
    rank-deficient 1025-wide float32 factor (λ_max ≈ 57) inverts as well as
    float32 can (against float64)."""
    torch.manual_seed(6)
    features = torch.relu(torch.randn(256, 1025, dtype=torch.float64))
    A = features.T @ features / 256
    p = nn.Parameter(torch.zeros(1025))
    K = KronOperator([p], [[A.float()]])
    v = torch.randn(1025, dtype=torch.float64)
    expected = torch.linalg.solve(A + 1e-4 * torch.eye(1025, dtype=torch.float64), v)
    result = K.inverse(damping=1e-4) @ v
    assert ((result - expected).norm() / expected.norm()) < 0.05


def test_ekfac_inverse_of_rank_deficient_corrections_is_refused():
    model, loss_fn, data = one_sample_problem()
    E = EKFACOperator.from_data(model, loss_fn, data)
    with pytest.raises(ValueError, match=r"EKFACOperator.inverse.*is singular \(numerically"):
        E.inverse(0.0)
    assert torch.isfinite(E.inverse(1e-3).to_dense()).all()


def test_well_conditioned_undamped_inverse_is_exact():
    torch.manual_seed(1)
    model = nn.Sequential(nn.Linear(3, 2))
    X, y = torch.randn(40, 3), torch.randn(40, 2)
    K = KronOperator.from_data(model, nn.MSELoss(), [(X, y)], fisher_type="type-2")
    torch.testing.assert_close(
        K.inverse().to_dense(), torch.linalg.inv(K.to_dense()), rtol=1e-8, atol=1e-10
    )


def bn_model():
    torch.manual_seed(2)
    model = nn.Sequential(nn.Linear(3, 4), nn.BatchNorm1d(4), nn.Tanh(), nn.Linear(4, 2))
    X, y = torch.randn(8, 3), torch.randint(0, 2, (8,))
    return model, [(X, y)]


@pytest.mark.parametrize("operator", [HessianOperator, GGNOperator])
def test_batchnorm_in_train_mode_is_refused_and_state_kept(operator):
    model, data = bn_model()
    params = list(model.parameters())
    state = copy.deepcopy(model.state_dict())
    with pytest.raises(ValueError, match=r"(?s)BatchNorm1d.*train mode.*model.eval\(\)"):
        operator(model, nn.CrossEntropyLoss(), params, data)
    model.eval()
    op = operator(model, nn.CrossEntropyLoss(), params, data)
    model.train()  # switched back after construction: refused at the product
    with pytest.raises(ValueError, match="train mode"):
        op @ torch.randn(op.shape[0])
    for name, value in model.state_dict().items():
        assert torch.equal(value, state[name]), name


def float32_operators():
    torch.manual_seed(3)
    model = nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 2)).float()
    X, y = torch.randn(10, 3), torch.randint(0, 2, (10,))
    params = list(model.parameters())
    data = [(X.float(), y)]
    return {
        "kron": KronOperator.from_data(model, nn.CrossEntropyLoss(), data),
        "diagonal": DiagonalOperator.from_data(model, nn.CrossEntropyLoss(), data),
        "ggn": GGNOperator(model, nn.CrossEntropyLoss(), params, data),
        "kron_inverse": KronOperator.from_data(model, nn.CrossEntropyLoss(), data).inverse(1e-2),
    }


@pytest.mark.parametrize("name", ["kron", "diagonal", "ggn", "kron_inverse"])
def test_one_dtype_rule_for_every_operator(name):
    """float32 operator @ float64 vector: float64 result, float32 accuracy;
    float32 @ float32 stays float32."""
    op = float32_operators()[name]
    assert op.dtype == torch.float32
    v = torch.randn(op.shape[0], dtype=torch.float64)
    expected = op.to_dense().double() @ v
    result = op @ v
    assert result.dtype == torch.float64
    torch.testing.assert_close(result, expected, rtol=1e-5, atol=1e-6)
    assert (op @ v.float()).dtype == torch.float32
    assert (op @ v.float()[:, None].repeat(1, 2)).dtype == torch.float32


def test_heuristic_damping_of_biases_matches_curvlinops():
    curvlinops = pytest.importorskip("curvlinops")
    torch.manual_seed(4)
    model = nn.Sequential(nn.Linear(3, 5), nn.Tanh(), nn.Linear(5, 2))
    X, y = torch.randn(20, 3), torch.randint(0, 2, (20,))
    data = [(X[:12], y[:12]), (X[12:], y[12:])]
    params = list(model.parameters())
    K = KronOperator.from_data(model, nn.CrossEntropyLoss(), data, fisher_type="type-2")
    reference_kfac = curvlinops.KFACLinearOperator(
        model,
        nn.CrossEntropyLoss(),
        params,
        data,
        fisher_type="type-2",
        separate_weight_and_bias=True,
        check_deterministic=False,
    )
    reference = curvlinops.KFACInverseLinearOperator(
        reference_kfac, damping=1e-2, use_heuristic_damping=True, min_damping=1e-8
    )
    identity = torch.eye(K.shape[0])
    torch.testing.assert_close(
        K.inverse(damping=1e-2, use_heuristic_damping=True) @ identity,
        reference @ identity,
        rtol=1e-8,
        atol=1e-10,
    )


def embedding_kron():
    torch.manual_seed(5)
    model = nn.Sequential(nn.Embedding(6, 3), nn.Flatten(), nn.Linear(6, 2))
    X, y = torch.randint(0, 5, (9, 2)), torch.randint(0, 2, (9,))  # token 5 never seen
    K = KronOperator.from_data(model, nn.CrossEntropyLoss(), [(X, y)], fisher_type="type-2")
    return model, K


def dense_blocks(K, transform):
    """Dense linear algebra on each block built with torch.kron."""
    from tests.references import kron

    return torch.block_diag(*[transform(kron(block)) for block in K.factors])


def test_kron_operator_with_a_diagonal_embedding_factor():
    """The embedding's input factor is 1-D; every operation against dense
    linear algebra on the block matrices."""
    _, K = embedding_kron()
    assert K.factors[0][0].shape == (6,)
    dense = dense_blocks(K, lambda block: block)
    v = torch.randn(K.shape[0], 3)
    torch.testing.assert_close(K.to_dense(), dense)
    torch.testing.assert_close(K @ v, dense @ v)
    torch.testing.assert_close(K.diag(), dense.diagonal())
    torch.testing.assert_close(K.trace(), dense.trace())
    torch.testing.assert_close(K.frobenius_norm(), dense.norm())
    shifted = K + 0.3
    torch.testing.assert_close(shifted.logdet(), torch.logdet(dense + 0.3 * torch.eye(len(dense))))
    exact = K.inverse(damping=0.3, use_exact_damping=True)
    torch.testing.assert_close(
        exact @ v, torch.linalg.solve(dense + 0.3 * torch.eye(len(dense)), v)
    )
    identity = torch.eye(K.shape[0])
    factorwise = K.inverse(damping=0.3)
    from tests.references import dense_factor

    expected = torch.block_diag(
        *[
            torch.linalg.inv(dense_factor(block[0]) + 0.3 * torch.eye(block[0].shape[0]))
            if len(block) == 1
            else torch.kron(
                torch.linalg.inv(dense_factor(block[0]) + 0.3 * torch.eye(block[0].shape[0])),
                torch.linalg.inv(dense_factor(block[1]) + 0.3 * torch.eye(block[1].shape[0])),
            )
            for block in K.factors
        ]
    )
    torch.testing.assert_close(factorwise @ identity, expected)
    decomposed = K.decompose() + 0.3
    torch.testing.assert_close(
        decomposed.logdet(), torch.logdet(dense + 0.3 * torch.eye(len(dense)))
    )
    with pytest.raises(ValueError, match="singular"):  # the unseen token's row
        K.inverse()


def test_ekfac_with_a_diagonal_embedding_factor():
    """EKFAC's basis of a diagonal factor is the identity: the corrected
    eigenvalues of the embedding block are the exact GGN diagonal there
    (the eigenbasis of A ⊗ G is e_v ⊗ Q_G)."""
    model, _ = embedding_kron()
    torch.manual_seed(5)
    X, y = torch.randint(0, 5, (9, 2)), torch.randint(0, 2, (9,))
    E = EKFACOperator.from_data(model, nn.CrossEntropyLoss(), [(X, y)])
    assert E.eigenvectors[0][0].shape == (6,)
    from tests.references import GraphReference

    reference = GraphReference(model(X), [model[0].weight], lambda f: nn.CrossEntropyLoss()(f, y))
    block = reference.ggn()
    basis = torch.kron(torch.eye(6), E.eigenvectors[0][1].contiguous())
    torch.testing.assert_close(E.eigenvalues[0], (basis.T @ block @ basis).diagonal())


def test_large_vocabulary_kfac_stays_small():
    """A GPT-2-sized vocabulary: the dense V x V factor would be 10 GB."""
    vocabulary = 50_257
    model = nn.Sequential(nn.Embedding(vocabulary, 2), nn.Flatten(), nn.Linear(6, 2))
    X, y = torch.randint(0, vocabulary, (4, 3)), torch.randint(0, 2, (4,))
    K = KronOperator.from_data(model, nn.CrossEntropyLoss(), [(X, y)])
    assert K.factors[0][0].shape == (vocabulary,)
    step = K.inverse(damping=1e-3) @ torch.randn(K.shape[0])
    assert torch.isfinite(step).all()


def test_batchnorm_without_running_statistics_is_accepted():
    """No state to update: the curvature of the batched loss is defined."""
    torch.manual_seed(7)
    model = nn.Sequential(
        nn.Linear(3, 4), nn.BatchNorm1d(4, track_running_stats=False), nn.Linear(4, 2)
    )
    X, y = torch.randn(8, 3), torch.randint(0, 2, (8,))
    params = list(model.parameters())
    G = GGNOperator(model, nn.CrossEntropyLoss(), params, [(X, y)])
    from tests.references import GraphReference

    reference = GraphReference(model(X), params, lambda f: nn.CrossEntropyLoss()(f, y))
    torch.testing.assert_close(G @ torch.eye(G.shape[0]), reference.ggn())


def test_forward_mode_products_print_no_torch_future_warning():
    """torch 2.14 warns ("torch.jit.script is deprecated") when forward-mode AD
    first loads its decompositions; curvext's products load them quietly. A
    fresh process: the decompositions load once per process."""
    import subprocess
    import sys

    script = (
        "import torch\n"
        "from torch import nn\n"
        "from curvext.operators import GGNOperator\n"
        "model = nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 2))\n"
        "X, y = torch.randn(8, 3), torch.randint(0, 2, (8,))\n"
        "G = GGNOperator(model, nn.CrossEntropyLoss(), list(model.parameters()), [(X, y)])\n"
        "G @ torch.randn(G.shape[0])\n"
    )
    result = subprocess.run(
        [sys.executable, "-W", "error::FutureWarning", "-c", script],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 0, result.stderr[-2000:]


def test_progress_bars_say_which_pass_they_count(capsys):
    pytest.importorskip("tqdm")
    torch.manual_seed(8)
    model = nn.Sequential(nn.Linear(3, 2))
    data = [(torch.randn(4, 3), torch.randint(0, 2, (4,)))] * 2
    G = GGNOperator(model, nn.CrossEntropyLoss(), list(model.parameters()), data, progressbar=True)
    G @ torch.randn(G.shape[0], 3)
    err = capsys.readouterr().err
    assert "GGNOperator: determinism check, pass 1 of 2" in err
    assert "GGNOperator: determinism check, pass 2 of 2" in err
    assert "GGNOperator: A @ V, V [8, 3]" in err
