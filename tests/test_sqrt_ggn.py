"""Exact GGN square root: ``V^T V`` against the dense GGN.

The columns of all parameters together must reproduce the *full* GGN,
off-diagonal blocks between parameters included, and for every sample ``n``
the columns ``V[:, n]`` must reproduce the per-sample GGN ``G_n``. Neither
check depends on how many columns curvext uses or how it orders them.
"""

import pytest
import torch

from curvext.extensions import SqrtGGN
from tests.cases import CASES, assert_close, dense_reference, run_case, trainable


def stacked_columns(model) -> tuple[list[str], torch.Tensor]:
    """``[K, N, P]`` columns of all trainable parameters, concatenated."""
    params = trainable(model)
    columns = [p.sqrt_ggn.reshape(*p.sqrt_ggn.shape[:2], -1) for p in params.values()]
    return list(params), torch.cat(columns, dim=2)


@pytest.mark.parametrize("case", CASES, ids=str)
def test_sqrt_ggn_shapes(case):
    reference = dense_reference(case.name)
    model = run_case(case, SqrtGGN())
    num_columns = {p.sqrt_ggn.shape[0] for p in trainable(model).values()}
    assert len(num_columns) == 1, "all parameters must share the same columns"
    for name, param in trainable(model).items():
        assert param.sqrt_ggn.shape[1:] == (reference.N, *param.shape), name


@pytest.mark.parametrize("case", CASES, ids=str)
def test_sqrt_ggn_full_ggn(case):
    reference = dense_reference(case.name)
    model = run_case(case, SqrtGGN())
    names, columns = stacked_columns(model)
    V = columns.flatten(0, 1)
    assert_close(V.T @ V, reference.ggn(names))


@pytest.mark.parametrize("case", CASES, ids=str)
def test_sqrt_ggn_per_sample(case):
    reference = dense_reference(case.name)
    model = run_case(case, SqrtGGN())
    names, columns = stacked_columns(model)
    expected = reference.per_sample_ggn(names)
    for n in range(reference.N):
        assert_close(columns[:, n].T @ columns[:, n], expected[n], msg=f"sample {n}")


@pytest.mark.parametrize("case", CASES, ids=str)
def test_sqrt_ggn_per_parameter_block(case):
    reference = dense_reference(case.name)
    model = run_case(case, SqrtGGN())
    for name, param in trainable(model).items():
        V = param.sqrt_ggn.reshape(-1, param.numel())  # flatten(0, 1).flatten(1)
        assert_close(V.T @ V, reference.block(name), msg=name)
