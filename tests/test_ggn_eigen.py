r"""``GGNEigen``: eigenpairs of the GGN and of its blocks against dense references.

The dense GGN ``Jᵀ H J`` (``tests/references.py``, ``torch.func`` only) is
eigendecomposed in float64; curvext's eigenvalues must be its nonzero ones
(the largest ``r``, where ``r`` is how many curvext keeps, and the other
dense eigenvalues must vanish), its eigenvectors must satisfy ``G e = λ e``
and be orthonormal. Neither check depends on the signs or on the order of the
parameters inside a group. The MC variant is checked against the dense
``VᵀV`` of ``SqrtGGN(mc_samples=M)`` under the same seed (the Gram-space
identity), the exact one against ``torch.func`` alone.
"""

import pytest
import torch
from torch import nn

from curvext.extensions import GGNEigen, SqrtGGN
from curvext.rules.linear import LinearRule
from tests.cases import (
    CASES,
    CASES_BY_NAME,
    SINGLE_POSITION_CASES,
    assert_close,
    dense_reference,
    layer_groups,
    run_case,
    run_curvext,
    trainable,
)
from tests.references import DenseReference

ZERO = 1e-10  # relative to the largest eigenvalue
BLOCK_CASES = [CASES_BY_NAME[name] for name in ("mlp_ce", "residual_cnn", "sequence")]


def stacked_eigvecs(params, num: int) -> torch.Tensor:
    """``[k, P]``: the group's eigenvectors, concatenated over its parameters."""
    return torch.cat([p.ggn_eigvecs.reshape(num, -1) for p in params], dim=1)


def assert_eigenpairs(evals, evecs, ggn, msg=""):
    """``evals``, largest first, are the nonzero eigenvalues of ``ggn`` (or its
    top), ``evecs [k, P]`` orthonormal eigenvectors. Returns the dense
    eigenvalues (ascending, as ``eigvalsh``) and the largest."""
    dense = torch.linalg.eigvalsh(ggn)
    scale = dense[-1].item()
    num = len(evals)
    assert num > 0, msg
    assert torch.all(evals[1:] <= evals[:-1]), f"{msg}: not descending"
    assert_close(evals, dense.flip(0)[:num], atol=ZERO, msg=f"{msg}: eigenvalues")
    if evecs is not None:
        assert evecs.shape == (num, ggn.shape[0]), msg
        assert_close(evecs @ evecs.T, torch.eye(num), atol=1e-9, msg=f"{msg}: orthonormal")
        residual = ggn @ evecs.T - evecs.T * evals
        assert residual.abs().max() <= ZERO * scale, f"{msg}: G e != λ e"
    return dense, scale


def assert_all_nonzero(evals, dense, scale, msg=""):
    """The eigenvalues curvext dropped are zero."""
    dropped = dense[: len(dense) - len(evals)]
    if len(dropped):
        assert dropped.abs().max() <= ZERO * scale, (
            f"{msg}: a nonzero eigenvalue is missing ({dropped[-1].item():.3e})"
        )


@pytest.mark.parametrize("case", CASES + SINGLE_POSITION_CASES, ids=str)
def test_full_ggn(case):
    reference = dense_reference(case.name)
    ext = GGNEigen()
    model = run_case(case, ext)
    params = trainable(model)
    evals = next(iter(params.values())).ggn_eigvals
    assert all(p.ggn_eigvals is evals for p in params.values()), "shared by the group"
    ggn = reference.ggn(list(params))
    evecs = stacked_eigvecs(params.values(), len(evals))
    dense, scale = assert_eigenpairs(evals, evecs, ggn, case.name)
    assert_all_nonzero(evals, dense, scale, case.name)
    # result(0) is what the parameters hold, in the order of params(0)
    result_evals, result_evecs = ext.result(0)
    assert result_evals is evals
    assert {id(p) for p in ext.params(0)} == {id(p) for p in params.values()}
    for param, vectors in zip(ext.params(0), result_evecs, strict=True):
        assert vectors is param.ggn_eigvecs
        assert vectors.shape == (len(evals), *param.shape)


@pytest.mark.parametrize("case", BLOCK_CASES, ids=str)
def test_layer_blocks(case):
    reference = dense_reference(case.name)
    model, loss_fn, X, y = case.build()
    ext = GGNEigen(param_groups=layer_groups(model))
    run_curvext(model, loss_fn, X, y, ext)
    names = {id(p): name for name, p in trainable(model).items()}
    assert len(ext.param_groups) > 1
    for index, group in enumerate(ext.param_groups):
        evals, evecs = ext.result(index)
        assert all(p.ggn_eigvals is evals for p in group)
        ggn = reference.ggn([names[id(p)] for p in group])
        stacked = torch.cat([e.reshape(len(evals), -1) for e in evecs], dim=1)
        dense, scale = assert_eigenpairs(evals, stacked, ggn, f"group {index}")
        assert_all_nonzero(evals, dense, scale, f"group {index}")


@pytest.mark.parametrize("case", BLOCK_CASES, ids=str)
def test_top_k_and_criterion(case):
    reference = dense_reference(case.name)
    params = trainable(run_case(case, GGNEigen(top_k=3)))
    ggn = reference.ggn(list(params))
    evals = next(iter(params.values())).ggn_eigvals
    assert len(evals) == 3
    assert_eigenpairs(evals, stacked_eigvecs(params.values(), 3), ggn, "top_k")

    # criterion: the smallest and the largest nonzero eigenvalue
    all_evals = next(iter(trainable(run_case(case, GGNEigen())).values())).ggn_eigvals
    ext = GGNEigen(criterion=lambda evals: [len(evals) - 1, 0], eigenvectors=False)
    params = trainable(run_case(case, ext))
    evals = next(iter(params.values())).ggn_eigvals
    assert_close(evals, all_evals[[0, -1]])
    assert not any(hasattr(p, "ggn_eigvecs") for p in params.values())
    assert ext.result(0)[1] is None


def test_parameters_outside_groups_get_nothing():
    case = CASES_BY_NAME["mlp_ce"]
    model, loss_fn, X, y = case.build()
    layers = [m for m in model.modules() if isinstance(m, nn.Linear)]
    ext = GGNEigen(param_groups=[{"params": layers[-1].weight}])
    run_curvext(model, loss_fn, X, y, ext)
    assert hasattr(layers[-1].weight, "ggn_eigvals")
    others = [p for p in model.parameters() if p is not layers[-1].weight]
    assert not any(hasattr(p, "ggn_eigvals") for p in others)


def test_unused_parameter_gets_zero_eigenvectors():
    case = CASES_BY_NAME["mlp_ce"]
    model, loss_fn, X, y = case.build()
    unused = nn.Parameter(torch.randn(2, 3))
    ext = GGNEigen(param_groups=[{"params": [*model.parameters(), unused]}])
    run_curvext(model, loss_fn, X, y, ext)
    reference = dense_reference(case.name)
    params = trainable(model)
    evals = unused.ggn_eigvals
    assert unused.ggn_eigvecs.shape == (len(evals), 2, 3)
    assert unused.ggn_eigvecs.abs().max() == 0
    evecs = stacked_eigvecs(params.values(), len(evals))
    assert_eigenpairs(evals, evecs, reference.ggn(list(params)))


@pytest.mark.parametrize("case", BLOCK_CASES, ids=str)
def test_chunked_columns(case):
    """Columns in several chunks concatenate into the same Gram matrix."""
    from curvext import backpack, extend

    reference = dense_reference(case.name)
    model, loss_fn, X, y = case.build()
    model, loss_fn = extend(model), extend(loss_fn)
    loss = loss_fn(model(X), y)
    with backpack(GGNEigen(), max_columns=2):
        loss.backward()
    params = trainable(model)
    evals = next(iter(params.values())).ggn_eigvals
    evecs = stacked_eigvecs(params.values(), len(evals))
    dense, scale = assert_eigenpairs(evals, evecs, reference.ggn(list(params)))
    assert_all_nonzero(evals, dense, scale)


@pytest.mark.parametrize("case", BLOCK_CASES, ids=str)
def test_mc_samples(case):
    """Eigenpairs of the MC estimate ``VᵀV``, V from SqrtGGN under the same seed."""
    model, loss_fn, X, y = case.build()
    torch.manual_seed(3)
    params = trainable(run_curvext(model, loss_fn, X, y, GGNEigen(mc_samples=2)))
    model, loss_fn, X, y = case.build()
    torch.manual_seed(3)
    sqrt_params = trainable(run_curvext(model, loss_fn, X, y, SqrtGGN(mc_samples=2)))
    V = torch.cat([p.sqrt_ggn.flatten(0, 1).flatten(1) for p in sqrt_params.values()], 1)
    assert V.shape[0] == 2 * X.shape[0]
    mc_ggn = V.T @ V
    evals = next(iter(params.values())).ggn_eigvals
    evecs = stacked_eigvecs(params.values(), len(evals))
    dense, scale = assert_eigenpairs(evals, evecs, mc_ggn, "mc")
    assert_all_nonzero(evals, dense, scale, "mc")
    exact = torch.linalg.eigvalsh(dense_reference(case.name).ggn(list(params)))
    assert not torch.allclose(dense[-len(evals) :], exact[-len(evals) :]), "not an estimate"


def grouped_single_position_model():
    """Layers at one position: a grouped Conv2d (per-sample vectors) and a
    ConvTranspose2d (factored Gram block, weight laid out [in, out, ...])."""
    return nn.Sequential(
        nn.Conv2d(4, 6, 3, groups=2),
        nn.Tanh(),
        nn.ConvTranspose2d(6, 4, 1),
        nn.Flatten(),
        nn.Sigmoid(),
        nn.Linear(4, 3),
    )


def test_grouped_single_position_layers():
    torch.manual_seed(1)
    model = grouped_single_position_model()
    X, y = torch.randn(3, 4, 3, 3), torch.randint(0, 3, (3,))
    reference = DenseReference(model, nn.CrossEntropyLoss(), X, y)
    params = trainable(run_curvext(model, nn.CrossEntropyLoss(), X, y, GGNEigen()))
    evals = next(iter(params.values())).ggn_eigvals
    evecs = stacked_eigvecs(params.values(), len(evals))
    dense, scale = assert_eigenpairs(evals, evecs, reference.ggn(list(params)))
    assert_all_nonzero(evals, dense, scale)


def test_linear_weights_without_per_sample_vectors(monkeypatch):
    """Gram blocks and eigenvectors of single-position Linear weights come from
    the factors ``G`` and ``A``; the weights' per-sample vectors never exist."""
    per_sample = LinearRule.per_sample

    def refuse_weights(self, name, grads):
        assert name != "weight", "per-sample vectors of a Linear weight were formed"
        return per_sample(self, name, grads)

    monkeypatch.setattr(LinearRule, "per_sample", refuse_weights)
    case = CASES_BY_NAME["mlp_ce"]
    reference = dense_reference(case.name)
    params = trainable(run_case(case, GGNEigen()))
    evals = next(iter(params.values())).ggn_eigvals
    evecs = stacked_eigvecs(params.values(), len(evals))
    assert_eigenpairs(evals, evecs, reference.ggn(list(params)))


def test_float32():
    """float32: eigenvalues to float32 accuracy, rounding-level ones filtered."""
    case = CASES_BY_NAME["sequence"]
    reference = dense_reference(case.name)
    model, loss_fn, X, y = case.build()
    model = model.float()
    params = trainable(run_curvext(model, loss_fn, X, y, GGNEigen()))
    evals = next(iter(params.values())).ggn_eigvals
    assert evals.dtype == torch.float32
    dense = torch.linalg.eigvalsh(reference.ggn(list(params)))
    rank = int((dense > 1e-10 * dense[-1]).sum())
    assert len(evals) == rank  # N·K = 45 > rank: 24 rounding-level ones dropped
    assert_close(evals.double(), dense.flip(0)[:rank], rtol=1e-4, atol=1e-5)
    evecs = stacked_eigvecs(params.values(), len(evals)).double()
    top = evecs[:5]  # the top 5: largest first
    assert_close(top @ top.T, torch.eye(5), atol=1e-4)


# ---------------------------------------------------------------------------
# Bad input
# ---------------------------------------------------------------------------
def test_top_k_larger_than_rank_bound():
    case = CASES_BY_NAME["mlp_ce"]  # N = 4, K = 2
    with pytest.raises(ValueError, match=r"top_k=9.*N·K = 8"):
        run_case(case, GGNEigen(top_k=9))


def test_empty_group():
    layer = nn.Linear(2, 2)
    with pytest.raises(ValueError, match=r"param_groups\[1\] has no parameters"):
        GGNEigen(param_groups=[{"params": layer.parameters()}, {"params": []}])


def test_parameter_in_two_groups():
    layer = nn.Linear(2, 2)
    with pytest.raises(ValueError, match=r"param_groups\[0\] and param_groups\[1\]"):
        GGNEigen(param_groups=[{"params": [layer.weight]}, {"params": layer.parameters()}])


def test_group_without_trainable_parameter():
    layer, frozen = nn.Linear(2, 2), nn.Linear(2, 2).requires_grad_(False)
    with pytest.raises(ValueError, match=r"param_groups\[1\].*requires grad"):
        GGNEigen(param_groups=[{"params": layer.parameters()}, {"params": frozen.parameters()}])


def test_non_finite_eigenvalues_name_the_group():
    """Inputs of 1e20 meet weights of 1e-20: the loss is finite, the float32
    Gram block of the weights (entries ~1e40) is not."""
    torch.manual_seed(0)
    head, tiny = nn.Linear(3, 3).float(), nn.Linear(3, 3).float()
    with torch.no_grad():
        tiny.weight.mul_(1e-20)
    model = nn.Sequential(tiny, nn.Tanh(), head)
    X, y = 1e20 * torch.randn(4, 3, dtype=torch.float32), torch.tensor([0, 1, 2, 0])
    groups = [{"params": head.parameters()}, {"params": tiny.parameters()}]
    with pytest.raises(RuntimeError, match=r"param_groups\[1\].*non-finite"):
        run_curvext(model, nn.CrossEntropyLoss(), X, y, GGNEigen(param_groups=groups))


@pytest.mark.parametrize(
    "kwargs, error",
    [
        ({"top_k": 0}, ValueError),
        ({"top_k": 2, "criterion": lambda evals: [0]}, ValueError),
        ({"criterion": 3}, TypeError),
        ({"mc_samples": -1}, ValueError),
        ({"param_groups": nn.Linear(2, 2).parameters()}, TypeError),
        ({"param_groups": [nn.Linear(2, 2).weight]}, TypeError),
        ({"param_groups": []}, ValueError),
    ],
    ids=[
        "top_k=0",
        "top_k+criterion",
        "criterion",
        "mc_samples",
        "generator",
        "tensors",
        "no group",
    ],
)
def test_invalid_arguments(kwargs, error):
    with pytest.raises(error, match="GGNEigen"):
        GGNEigen(**kwargs)


def test_result_before_backward_and_out_of_range():
    ext = GGNEigen()
    with pytest.raises(RuntimeError, match="backward"):
        ext.result(0)
    run_case(CASES_BY_NAME["mlp_ce"], ext)
    with pytest.raises(IndexError, match="1 parameter group"):
        ext.result(1)
