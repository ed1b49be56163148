"""KFAC against dense references.

* With one sample and no shared positions, type-2 KFAC is the exact GGN
  block (``kron(*p.kfac)`` vs the dense block; independent of conventions).
* Factor by factor against the conventions in ``references.kfac_reference``
  for Linear (any leading dims), Conv (groups=1), ConvTranspose (groups=1) and
  Embedding, for type-2, empirical and forward-only, expand and reduce.
* Parameters without Kronecker structure (norm layers, generic rule) get a
  single factor: their exact GGN block (type-2).
* Every factorisation is a symmetric PSD ``[P, P]`` matrix after ``kron``.
"""

import re

import pytest
import torch

from curvext.extensions import KFAC
from tests.cases import (
    CASES,
    CASES_BY_NAME,
    NORM_TYPES,
    SINGLE_POSITION_CASES,
    ScaleShift,
    VectorScaleShift,
    assert_close,
    dense_reference,
    kronecker_modules,
    run_case,
    trainable,
)
from tests.references import dense_factor, kfac_reference, kron

APPROXIMATIONS = ["expand", "reduce"]
FISHER_TYPES = ["mc", "type-2", "empirical", "forward-only"]
EXACT_CASES = [c for c in CASES if c.kfac_exact_n1] + SINGLE_POSITION_CASES


@pytest.mark.parametrize("kfac_approx", APPROXIMATIONS)
@pytest.mark.parametrize("case", EXACT_CASES, ids=str)
def test_type2_exact_for_one_sample(case, kfac_approx):
    reference = dense_reference(case.name, 1)
    model = run_case(case, KFAC("type-2", kfac_approx=kfac_approx), batch_size=1)
    for name, param in trainable(model).items():
        assert_close(kron(param.kfac), reference.block(name), msg=name)


FACTOR_CASES = [c for c in CASES if kronecker_modules(c)]


@pytest.mark.parametrize("kfac_approx", APPROXIMATIONS)
@pytest.mark.parametrize("fisher_type", ["type-2", "empirical", "forward-only"])
@pytest.mark.parametrize("case", FACTOR_CASES, ids=str)
def test_factors_match_reference(case, fisher_type, kfac_approx):
    model = run_case(case, KFAC(fisher_type, kfac_approx=kfac_approx))
    modules = dict(model.named_modules())
    pristine, loss_fn, X, y = case.build()
    pristine_modules = dict(pristine.named_modules())
    for module_name in kronecker_modules(case):
        expected = kfac_reference(
            pristine,
            loss_fn,
            X,
            y,
            pristine_modules[module_name],
            fisher_type,
            kfac_approx,
        )
        for param_name, expected_factors in expected.items():
            param = getattr(modules[module_name], param_name)
            if not param.requires_grad:
                continue
            label = f"{module_name}.{param_name}"
            factors = param.kfac
            assert len(factors) == len(expected_factors), (
                f"{label}: {len(factors)} factors, expected {len(expected_factors)} "
                f"with shapes {[tuple(f.shape) for f in expected_factors]}"
            )
            for i, (factor, expected_factor) in enumerate(zip(factors, expected_factors)):
                if factor.dim() == 1:  # stored as its diagonal: the rest must be 0
                    assert_close(
                        expected_factor,
                        torch.diag(expected_factor.diagonal()),
                        msg=f"{label} factor {i} is diagonal",
                    )
                assert_close(dense_factor(factor), expected_factor, msg=f"{label} factor {i}")


def single_factor_params(case):
    """Trainable params of norm layers and modules without a dedicated rule."""
    model, *_ = case.build()
    names = []
    for module_name, module in model.named_modules():
        if isinstance(module, NORM_TYPES + (ScaleShift, VectorScaleShift)):
            names += [
                f"{module_name}.{n}"
                for n, p in module.named_parameters(recurse=False)
                if p.requires_grad
            ]
    return names


SINGLE_FACTOR_CASES = [c for c in CASES if single_factor_params(c)]


@pytest.mark.parametrize("kfac_approx", APPROXIMATIONS)
@pytest.mark.parametrize("case", SINGLE_FACTOR_CASES, ids=str)
def test_single_factor_is_exact_block(case, kfac_approx):
    reference = dense_reference(case.name)
    model = run_case(case, KFAC("type-2", kfac_approx=kfac_approx))
    params = dict(model.named_parameters())
    for name in single_factor_params(case):
        factors = params[name].kfac
        assert len(factors) == 1, f"{name}: {len(factors)} factors"
        assert_close(factors[0], reference.block(name), msg=name)


@pytest.mark.parametrize("kfac_approx", APPROXIMATIONS)
@pytest.mark.parametrize("fisher_type", ["type-2", "empirical"])
def test_embedding_padding_row_has_no_curvature(fisher_type, kfac_approx):
    """PyTorch never backpropagates into ``weight[padding_idx]``: its exact GGN
    block and its gradients are zero, so the Kronecker approximation of that
    row (and its coupling to other rows) must be zero too, whatever the
    normalisation convention for padding positions."""
    case = CASES_BY_NAME["embedding_padding_idx"]
    reference = dense_reference(case.name)
    model = run_case(case, KFAC(fisher_type, kfac_approx=kfac_approx))
    embedding = model[0]
    rows = embedding.weight.shape[0]
    dim = embedding.weight.shape[1]
    padding_entries = slice(embedding.padding_idx * dim, (embedding.padding_idx + 1) * dim)
    exact_block = reference.block("0.weight")
    assert exact_block[padding_entries].abs().max() == 0  # the premise
    approximation = kron(embedding.weight.kfac)
    assert approximation.shape == (rows * dim, rows * dim)
    assert_close(approximation[padding_entries], torch.zeros_like(approximation[padding_entries]))


# Modules for which the factorisation convention is not pinned down: a clear
# refusal naming the module (or its `groups`) is acceptable.
MAY_REFUSE = {
    "residual_cnn": r"groups|Conv2d",
    "conv_transpose2d": r"groups|ConvTranspose2d",
}


@pytest.mark.parametrize("kfac_approx", APPROXIMATIONS)
@pytest.mark.parametrize("fisher_type", FISHER_TYPES)
@pytest.mark.parametrize("case", CASES, ids=str)
def test_kron_is_symmetric_psd(case, fisher_type, kfac_approx):
    extension = KFAC(fisher_type, mc_samples=2, kfac_approx=kfac_approx)
    if case.name in MAY_REFUSE:
        try:
            model = run_case(case, extension)
        except (NotImplementedError, ValueError) as error:
            assert re.search(MAY_REFUSE[case.name], str(error)), str(error)
            return
    else:
        model = run_case(case, extension)
    for name, param in trainable(model).items():
        factors = param.kfac
        assert isinstance(factors, (list, tuple)) and len(factors) >= 1, name
        for factor in factors:
            if factor.ndim == 1:  # a diagonal factor, stored as its diagonal
                continue
            assert factor.ndim == 2 and factor.shape[0] == factor.shape[1], name
            assert_close(factor, factor.T, msg=f"{name} symmetric")
        matrix = kron(factors)
        assert matrix.shape == (param.numel(), param.numel()), name
        eigenvalues = torch.linalg.eigvalsh(matrix)
        assert eigenvalues.min() >= -1e-10 * max(1.0, eigenvalues.abs().max()), name


@pytest.mark.parametrize("kfac_approx", ["expand", "reduce"])
def test_embedding_input_factor_is_stored_as_its_diagonal(kfac_approx):
    """Expand: the covariance of one-hot rows is diagonal and stored ``[V]``
    (the token frequencies, padding positions left out); reduce: dense."""
    from curvext import backpack, extend

    torch.manual_seed(0)
    embedding = torch.nn.Embedding(7, 3, padding_idx=1)
    model = extend(torch.nn.Sequential(embedding, torch.nn.Flatten(), torch.nn.Linear(12, 2)))
    loss_fn = extend(torch.nn.CrossEntropyLoss())
    tokens = torch.randint(0, 7, (5, 4))
    with backpack(KFAC(kfac_approx=kfac_approx)):
        loss_fn(model(tokens), torch.randint(0, 2, (5,))).backward()
    input_factor = embedding.weight.kfac[0]
    if kfac_approx == "expand":
        present = tokens.flatten()[tokens.flatten() != 1]
        expected = torch.bincount(present, minlength=7).double() / tokens.numel()
        assert input_factor.shape == (7,)
        assert_close(input_factor, expected)
    else:
        assert input_factor.shape == (7, 7)
