r"""``symmetric_eigen`` (GGNEigen's eigensolver) and the Gram blocks it solves.

``symmetric_eigen`` runs LAPACK's ``syevr`` through SciPy on CPU for large
matrices and ``torch.linalg.eigh`` otherwise; both paths are checked against
float64 ``torch.linalg.eigvalsh`` of the same matrix (eigenvalues) and
against the definition ``A u = λ u``, ``Uᵀ U = I`` (eigenvectors, whose
signs are free). ``GGNEigen`` on the SciPy path is checked against the dense
``torch.func`` GGN of the model zoo. Layers whose weight and bias share one
Gram product are checked with the two in one group and in separate groups,
and the squared norm of the summed per-sample vectors on both of its paths.
"""

import pytest
import torch
from torch import nn

import curvext.extensions.ggn_eigen as ggn_eigen
from curvext.extensions import GGNEigen
from curvext.extensions.ggn_eigen import LAPACK_MIN_SIZE, symmetric_eigen
from tests.cases import CASES_BY_NAME, dense_reference, run_curvext, trainable
from tests.references import DenseReference
from tests.test_ggn_eigen import assert_all_nonzero, assert_eigenpairs, stacked_eigvecs

SIZE = LAPACK_MIN_SIZE + 44
#: Accuracy of a backward-stable eigensolver relative to the largest
#: eigenvalue: a small multiple of n·ε.
TOLERANCE = {torch.float32: SIZE * 2e-7, torch.float64: SIZE * 1e-15}


def low_rank_psd(size: int, rank: int, dtype: torch.dtype) -> torch.Tensor:
    generator = torch.Generator().manual_seed(size + rank)
    factor = torch.randn(size, rank, dtype=torch.float64, generator=generator)
    factor = factor * torch.logspace(0, -3, rank, dtype=torch.float64)  # a spread spectrum
    return (factor @ factor.T).to(dtype)


@pytest.fixture(params=["lapack", "torch"])
def solver(request, monkeypatch):
    """Which path ``symmetric_eigen`` takes for a ``SIZE`` matrix."""
    if request.param == "torch":
        monkeypatch.setattr(ggn_eigen, "_LAPACK", [None])
    else:
        pytest.importorskip("scipy")
        pytest.importorskip("threadpoolctl")
    return request.param


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=str)
@pytest.mark.parametrize("top", [None, 5])
@pytest.mark.parametrize("with_basis", [True, False])
def test_symmetric_eigen(solver, dtype, top, with_basis):
    matrix = low_rank_psd(SIZE, SIZE // 2, dtype)
    assert (ggn_eigen._cpu_syevr(matrix) is not None) == (solver == "lapack")
    evals, basis = symmetric_eigen(matrix, with_basis=with_basis, top=top)
    reference = torch.linalg.eigvalsh(matrix.double())
    expected = reference if top is None else reference[-top:]
    scale = reference[-1].item()
    assert evals.dtype == dtype and evals.shape == expected.shape
    assert (evals.double() - expected).abs().max() <= TOLERANCE[dtype] * scale
    if not with_basis:
        assert basis is None
        return
    assert basis.dtype == dtype and basis.shape == (SIZE, len(expected))
    basis, evals, matrix = basis.double(), evals.double(), matrix.double()
    eye = torch.eye(len(expected), dtype=torch.float64)
    assert (basis.T @ basis - eye).abs().max() <= TOLERANCE[dtype]
    residual = matrix @ basis - basis * evals
    assert residual.abs().max() <= TOLERANCE[dtype] * scale


@pytest.mark.parametrize("size", [SIZE, 6], ids=["lapack-size", "small"])
def test_symmetric_eigen_reads_the_lower_triangle(size):
    """As ``torch.linalg.eigh``: the strict upper triangle is never read."""
    matrix = low_rank_psd(size, size, torch.float64)
    garbage = matrix + torch.triu(torch.randn(size, size, dtype=torch.float64), 1)
    evals, basis = symmetric_eigen(garbage)
    assert torch.allclose(evals, torch.linalg.eigvalsh(matrix), rtol=1e-10, atol=1e-10)
    assert torch.allclose(matrix @ basis, basis * evals, atol=1e-9 * evals[-1].item())


def test_ggn_eigen_on_the_lapack_path(monkeypatch):
    """Every Gram matrix of the case goes to ``syevr``; the eigenpairs are the
    dense GGN's (all, top 3, eigenvalues only)."""
    pytest.importorskip("scipy")
    pytest.importorskip("threadpoolctl")
    monkeypatch.setattr(ggn_eigen, "LAPACK_MIN_SIZE", 1)
    case = CASES_BY_NAME["mlp_ce"]
    reference = dense_reference(case.name)
    calls = []
    original = ggn_eigen._cpu_syevr

    def spy(matrix):
        found = original(matrix)
        calls.append(found is not None)
        return found

    monkeypatch.setattr(ggn_eigen, "_cpu_syevr", spy)
    for ext, num in ((GGNEigen(), None), (GGNEigen(top_k=3), 3)):
        model, loss_fn, X, y = case.build()
        run_curvext(model, loss_fn, X, y, ext)
        params = trainable(model)
        evals = next(iter(params.values())).ggn_eigvals
        ggn = reference.ggn(list(params))
        evecs = stacked_eigvecs(params.values(), len(evals))
        dense, scale = assert_eigenpairs(evals, evecs, ggn, f"top_k={num}")
        if num is None:
            assert_all_nonzero(evals, dense, scale)
        else:
            assert len(evals) == num
    model, loss_fn, X, y = case.build()
    ext = GGNEigen(eigenvectors=False)
    run_curvext(model, loss_fn, X, y, ext)
    evals_only = ext.result(0)[0]  # against the dense GGN, not the path above
    dense, scale = assert_eigenpairs(
        evals_only, None, reference.ggn(list(trainable(model))), "eigenvalues only"
    )
    assert_all_nonzero(evals_only, dense, scale)
    assert calls and all(calls)


@pytest.mark.parametrize("bias_group", ["with_weight", "alone", "with_next_layer"])
def test_weight_and_bias_blocks(bias_group):
    """A Linear layer's weight and bias (one ``G Gᵀ`` product when they are in
    one group) against the dense GGN block of the group."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 5), nn.Tanh(), nn.Linear(5, 3)).double()
    loss_fn = nn.CrossEntropyLoss()
    X, y = torch.randn(6, 4, dtype=torch.float64), torch.randint(0, 3, (6,))
    first, second = model[0], model[2]
    if bias_group == "with_weight":
        groups = [[first.weight, first.bias], [second.weight, second.bias]]
    elif bias_group == "alone":
        groups = [[first.weight], [first.bias], [second.weight, second.bias]]
    else:
        groups = [[first.weight], [first.bias, second.weight], [second.bias]]
    dense = DenseReference(model, loss_fn, X, y)
    names = {id(p): name for name, p in model.named_parameters()}
    ext = GGNEigen(param_groups=[{"params": group} for group in groups])
    run_curvext(model, loss_fn, X, y, ext)
    for index, group in enumerate(groups):
        evals, evecs = ext.result(index)
        ggn = dense.ggn([names[id(p)] for p in group])
        stacked = torch.cat([e.reshape(len(evals), -1) for e in evecs], dim=1)
        dense_evals, scale = assert_eigenpairs(evals, stacked, ggn, f"group {index}")
        assert_all_nonzero(evals, dense_evals, scale, f"group {index}")


@pytest.mark.parametrize("batch", [3, 40], ids=["gram-path", "direct-path"])
def test_sum_norm_sq_of_linear_layers(batch):
    """``||Σ_n v_n||²`` per parameter (GradientNoise's reduction): from the
    Gram matrices for N (d_out + d_in) < d_out d_in, from the batch gradient
    otherwise; both against torch.func's per-sample gradients."""
    from curvext import backpack, extend
    from curvext.monitor import GradientNoise

    torch.manual_seed(1)
    model = nn.Sequential(nn.Linear(12, 9), nn.Tanh(), nn.Linear(9, 3)).double()
    loss_fn = nn.CrossEntropyLoss()
    X, y = torch.randn(batch, 12, dtype=torch.float64), torch.randint(0, 3, (batch,))
    dense = DenseReference(model, loss_fn, X, y)
    model, loss_fn = extend(model), extend(loss_fn)
    noise = GradientNoise()
    with backpack(noise):
        loss_fn(model(X), y).backward()
    for name, param in model.named_parameters():
        expected = dense.per_sample_grads(name).sum(0).square().sum()
        got = noise.statistics([param])["grad_norm_sq"]
        assert got == pytest.approx(float(expected), rel=1e-10), name
