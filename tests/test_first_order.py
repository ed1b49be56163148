"""First-order extensions (BackPACK definitions) against dense per-sample gradients.

``grad_batch[n] = J_n^T ∇_{f_n} L`` includes the loss scaling, so it sums to
``p.grad``; ``batch_l2`` are its squared row norms, ``sum_grad_squared`` the
sum of its squares and ``variance = sgs / N - (grad / N)^2``.
"""

import pytest

from curvext.extensions import BatchGrad, BatchL2Grad, SumGradSquared, Variance
from tests.cases import CASES, assert_close, dense_reference, run_case, trainable


@pytest.mark.parametrize("case", CASES, ids=str)
def test_batch_grad(case):
    reference = dense_reference(case.name)
    model = run_case(case, BatchGrad())
    for name, param in trainable(model).items():
        assert_close(param.grad_batch, reference.per_sample_grads(name), msg=name)
        assert_close(param.grad, reference.gradient(name), msg=name)


@pytest.mark.parametrize("case", CASES, ids=str)
def test_batch_l2_grad(case):
    reference = dense_reference(case.name)
    model = run_case(case, BatchL2Grad())
    for name, param in trainable(model).items():
        per_sample = reference.per_sample_grads(name).reshape(reference.N, -1)
        assert_close(param.batch_l2, (per_sample**2).sum(1), msg=name)


@pytest.mark.parametrize("case", CASES, ids=str)
def test_sum_grad_squared(case):
    reference = dense_reference(case.name)
    model = run_case(case, SumGradSquared())
    for name, param in trainable(model).items():
        expected = (reference.per_sample_grads(name) ** 2).sum(0)
        assert_close(param.sum_grad_squared, expected, msg=name)


@pytest.mark.parametrize("case", CASES, ids=str)
def test_variance(case):
    reference = dense_reference(case.name)
    model = run_case(case, Variance())
    N = reference.N
    for name, param in trainable(model).items():
        per_sample = reference.per_sample_grads(name)
        expected = (per_sample**2).sum(0) / N - (per_sample.sum(0) / N) ** 2
        assert_close(param.variance, expected, msg=name)


@pytest.mark.parametrize("case", CASES, ids=str)
def test_all_first_order_together(case):
    reference = dense_reference(case.name)
    model = run_case(case, BatchGrad(), BatchL2Grad(), SumGradSquared(), Variance())
    N = reference.N
    for name, param in trainable(model).items():
        per_sample = reference.per_sample_grads(name)
        assert_close(param.grad_batch, per_sample, msg=name)
        assert_close(param.batch_l2, (per_sample.reshape(N, -1) ** 2).sum(1), msg=name)
        assert_close(param.sum_grad_squared, (per_sample**2).sum(0), msg=name)
        expected_variance = (per_sample**2).sum(0) / N - (per_sample.sum(0) / N) ** 2
        assert_close(param.variance, expected_variance, msg=name)
