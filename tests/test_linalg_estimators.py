"""Trace, diagonal and norm estimators of ``curvext.linalg`` against dense matrices.

The matrices are random float64 symmetric / SPD tensors and curvext
operators (``KronOperator``, ``DiagonalOperator``) built from random factors
as in ``tests/test_operators.py``; the exact values come from the dense matrix.
Unbiasedness: the mean of many estimates (fixed seeds) lies within five
standard errors of the exact value, the standard error taken from the
estimates' own spread.
"""

import pytest
import torch

from curvext.linalg import (
    hutchinson_diag,
    hutchinson_squared_fro,
    hutchinson_trace,
    hutchpp_trace,
    xdiag,
    xtrace,
)
from tests.test_operators import case_diag_random, case_kron_shifted

DIM = 12
NUM_RUNS = 200
DISTRIBUTIONS = ["rademacher", "normal"]


def random_symmetric():
    torch.manual_seed(3)
    root = torch.randn(DIM, DIM)
    dense = (root + root.T) / 2
    return dense, dense


def random_spd():
    torch.manual_seed(4)
    root = torch.randn(DIM, DIM + 3)
    dense = root @ root.T / DIM + 0.1 * torch.eye(DIM)
    return dense, dense


def kron_operator():
    op, dense = case_kron_shifted()
    return op, dense


def diagonal_operator():
    return case_diag_random()


CASES = {
    "symmetric": random_symmetric,
    "spd": random_spd,
    "kron": kron_operator,
    "diagonal": diagonal_operator,
}

# estimator, exact value from the dense matrix, smallest valid budget used here
ESTIMATORS = {
    "hutchinson_trace": (hutchinson_trace, torch.trace, 4),
    "hutchpp_trace": (hutchpp_trace, torch.trace, 6),
    "xtrace": (xtrace, torch.trace, 6),
    "hutchinson_diag": (hutchinson_diag, torch.diagonal, 4),
    "xdiag": (xdiag, torch.diagonal, 6),
    "hutchinson_squared_fro": (
        hutchinson_squared_fro,
        lambda dense: dense.square().sum(),
        4,
    ),
}


def low_rank(rank, dim=DIM, seed=5):
    torch.manual_seed(seed)
    factor = torch.randn(dim, rank)
    return factor @ torch.diag(torch.linspace(1.0, 3.0, rank)) @ factor.T


@pytest.mark.parametrize("distribution", DISTRIBUTIONS)
@pytest.mark.parametrize("case", CASES)
@pytest.mark.parametrize("name", ESTIMATORS)
def test_unbiased(name, case, distribution):
    estimator, exact_of, num_matvecs = ESTIMATORS[name]
    operator, dense = CASES[case]()
    generator = torch.Generator().manual_seed(0)
    estimates = torch.stack(
        [
            estimator(operator, num_matvecs, distribution, generator=generator)
            for _ in range(NUM_RUNS)
        ]
    )
    exact = exact_of(dense)
    standard_error = estimates.std(dim=0) / NUM_RUNS**0.5
    tolerance = 5 * standard_error + 1e-8 * dense.abs().max()
    assert ((estimates.mean(dim=0) - exact).abs() <= tolerance).all()


@pytest.mark.parametrize("case", CASES)
@pytest.mark.parametrize("name", ESTIMATORS)
def test_operator_and_tensor_agree(name, case):
    """The adapter: a curvext operator and its dense matrix give the same estimate."""
    estimator, _, num_matvecs = ESTIMATORS[name]
    operator, dense = CASES[case]()
    from_operator = estimator(operator, num_matvecs, generator=torch.Generator().manual_seed(1))
    from_dense = estimator(dense, num_matvecs, generator=torch.Generator().manual_seed(1))
    assert torch.allclose(from_operator, from_dense, atol=1e-10)


@pytest.mark.parametrize("distribution", DISTRIBUTIONS)
@pytest.mark.parametrize("rank", [1, 2])
def test_hutchpp_exact_for_low_rank(rank, distribution):
    dense = low_rank(rank)
    generator = torch.Generator().manual_seed(0)
    estimate = hutchpp_trace(dense, 3 * rank, distribution, generator=generator)
    assert torch.allclose(estimate, dense.trace(), atol=1e-9)


def test_hutchpp_exact_when_basis_spans_the_space():
    dense, _ = random_symmetric()
    estimate = hutchpp_trace(dense, 3 * DIM, generator=torch.Generator().manual_seed(0))
    assert torch.allclose(estimate, dense.trace(), atol=1e-9)


@pytest.mark.parametrize("distribution", DISTRIBUTIONS)
@pytest.mark.parametrize("num_probes, rank", [(2, 1), (4, 3), (5, 2), (DIM, DIM - 1)])
def test_xtrace_and_xdiag_exact_below_the_number_of_probes(num_probes, rank, distribution):
    """Exact when rank(A) < m, including the numerically singular R (rank < m - 1)."""
    dense = low_rank(rank)
    generator = torch.Generator().manual_seed(0)
    trace = xtrace(dense, 2 * num_probes, distribution, generator=generator)
    diagonal = xdiag(dense, 2 * num_probes, distribution, generator=generator)
    assert torch.allclose(trace, dense.trace(), atol=1e-8)
    assert torch.allclose(diagonal, dense.diagonal(), atol=1e-8)


def test_xdiag_on_nonsymmetric_tensor_uses_the_transpose():
    torch.manual_seed(6)
    dense = torch.randn(DIM, 2) @ torch.randn(2, DIM)
    diagonal = xdiag(dense, 6, generator=torch.Generator().manual_seed(0))
    assert torch.allclose(diagonal, dense.diagonal(), atol=1e-8)


def test_hutchpp_and_xtrace_beat_hutchinson_on_a_decaying_spectrum():
    dense = low_rank(DIM) + low_rank(2, seed=7) * 50
    generator = torch.Generator().manual_seed(0)

    def error(estimator):
        runs = torch.stack([estimator(dense, 12, generator=generator) for _ in range(50)])
        return (runs - dense.trace()).square().mean()

    assert error(hutchpp_trace) < error(hutchinson_trace)
    assert error(xtrace) < error(hutchinson_trace)


class CountingOperator:
    """A dense matrix that records the width of every product."""

    def __init__(self, dense):
        self.dense, self.shape = dense, dense.shape
        self.dtype, self.device = dense.dtype, dense.device
        self.widths = []

    def __matmul__(self, matrix):
        self.widths.append(matrix.shape[1])
        return self.dense @ matrix

    @property
    def T(self):
        return self


@pytest.mark.parametrize(
    "name, num_matvecs, widths",
    [
        ("hutchinson_trace", 7, [7]),
        ("hutchinson_diag", 7, [7]),
        ("hutchinson_squared_fro", 7, [7]),
        ("hutchpp_trace", 9, [3, 6]),
        ("xtrace", 8, [4, 4]),
        ("xdiag", 8, [4, 4]),
    ],
)
def test_matvecs_are_batched(name, num_matvecs, widths):
    operator = CountingOperator(random_spd()[0])
    ESTIMATORS[name][0](operator, num_matvecs)
    assert operator.widths == widths


@pytest.mark.parametrize("name", ESTIMATORS)
def test_not_square(name):
    with pytest.raises(
        ValueError,
        match=rf"{name}: A must be a square \[P, P\] operator, got shape \(3, 4\)",
    ):
        ESTIMATORS[name][0](torch.zeros(3, 4), 6)


@pytest.mark.parametrize("name", ESTIMATORS)
def test_not_an_operator(name):
    with pytest.raises(TypeError, match=f"{name}: A must be a square linear operator"):
        ESTIMATORS[name][0]([[1.0]], 6)


@pytest.mark.parametrize("name", ESTIMATORS)
def test_unknown_distribution(name):
    with pytest.raises(
        ValueError, match="distribution must be 'rademacher' or 'normal', got 'uniform'"
    ):
        ESTIMATORS[name][0](torch.eye(4), 6, "uniform")


@pytest.mark.parametrize(
    "name, num_matvecs, message",
    [
        ("hutchinson_trace", 0, "num_matvecs must be an integer >= 1, got 0"),
        ("hutchinson_diag", 2.5, "num_matvecs must be an integer >= 1, got 2.5"),
        ("hutchinson_squared_fro", -1, "num_matvecs must be an integer >= 1"),
        ("hutchpp_trace", 2, "hutchpp_trace: num_matvecs must be at least 3, got 2"),
        ("xtrace", 2, "xtrace: num_matvecs must be at least 4, got 2"),
        ("xdiag", 3, "xdiag: num_matvecs must be at least 4, got 3"),
        ("xtrace", 5, "num_matvecs must be a multiple of 2, got 5; use 4 or 6"),
        ("xdiag", 7, "num_matvecs must be a multiple of 2, got 7; use 6 or 8"),
        ("xtrace", 10, "must be at most 8 for an operator of dimension 4, got 10"),
        ("xdiag", 10, "must be at most 8 for an operator of dimension 4, got 10"),
        ("hutchpp_trace", 15, "must be at most 14 for an operator of dimension 4"),
    ],
)
def test_num_matvecs_checks(name, num_matvecs, message):
    with pytest.raises(ValueError, match=message):
        ESTIMATORS[name][0](torch.eye(4), num_matvecs)
