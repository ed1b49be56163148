"""Exact GGN diagonal and per-sample GGN diagonal against the dense GGN."""

import pytest

from curvext.extensions import BatchGGNDiag, GGNDiag
from tests.cases import CASES, assert_close, dense_reference, run_case, trainable


@pytest.mark.parametrize("case", CASES, ids=str)
def test_ggn_diag_exact(case):
    reference = dense_reference(case.name)
    model = run_case(case, GGNDiag())
    for name, param in trainable(model).items():
        assert_close(param.ggn_diag, reference.diag(name), msg=name)


@pytest.mark.parametrize("case", CASES, ids=str)
def test_batch_ggn_diag_exact(case):
    reference = dense_reference(case.name)
    model = run_case(case, BatchGGNDiag())
    for name, param in trainable(model).items():
        assert_close(param.batch_ggn_diag, reference.per_sample_diag(name), msg=name)


@pytest.mark.parametrize("case", CASES, ids=str)
def test_ggn_diag_batch_of_one(case):
    """N=1: the per-sample and the full diagonal are the same dense quantity."""
    reference = dense_reference(case.name, 1)
    model = run_case(case, GGNDiag(), BatchGGNDiag(), batch_size=1)
    for name, param in trainable(model).items():
        assert_close(param.ggn_diag, reference.diag(name), msg=name)
        assert_close(param.batch_ggn_diag, reference.per_sample_diag(name), msg=name)
