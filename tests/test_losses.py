"""Losses, reductions and loss options against the dense reference.

For every option (class weights, ``ignore_index``, label smoothing,
probability targets, ``pos_weight``, BCE ``weight``) curvext may either
support it -- then every quantity must match the dense reference built from
PyTorch's own loss -- or refuse it with an error naming the option.
"""

import re

import pytest
import torch

from curvext.extensions import KFAC, BatchGGNDiag, BatchGrad, GGNDiag, SqrtGGN
from tests.cases import (
    CASES_BY_NAME,
    LOSS_CASES,
    assert_close,
    dense_reference,
    kronecker_modules,
    run_case,
    trainable,
)
from tests.references import kfac_reference

REFUSALS = (ValueError, NotImplementedError, TypeError, RuntimeError)


def check_ggn_diag(case, model, reference):
    for name, param in trainable(model).items():
        assert_close(param.ggn_diag, reference.diag(name), msg=name)


def check_batch_ggn_diag(case, model, reference):
    for name, param in trainable(model).items():
        assert_close(param.batch_ggn_diag, reference.per_sample_diag(name), msg=name)


def check_sqrt_ggn(case, model, reference):
    params = trainable(model)
    columns = torch.cat(
        [p.sqrt_ggn.reshape(*p.sqrt_ggn.shape[:2], -1) for p in params.values()], dim=2
    )
    per_sample = reference.per_sample_ggn(list(params))
    for n in range(reference.N):
        assert_close(columns[:, n].T @ columns[:, n], per_sample[n], msg=f"sample {n}")


def check_batch_grad(case, model, reference):
    for name, param in trainable(model).items():
        assert_close(param.grad_batch, reference.per_sample_grads(name), msg=name)


def kfac_checker(fisher_type):
    def check(case, model, reference):
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
                "expand",
            )
            for param_name, expected_factors in expected.items():
                factors = getattr(modules[module_name], param_name).kfac
                assert len(factors) == len(expected_factors)
                for i, (factor, expected_factor) in enumerate(zip(factors, expected_factors)):
                    assert_close(factor, expected_factor, msg=f"{module_name}.{param_name} [{i}]")

    return check


CHECKS = {
    "ggn_diag": (GGNDiag, check_ggn_diag),
    "batch_ggn_diag": (BatchGGNDiag, check_batch_ggn_diag),
    "sqrt_ggn": (SqrtGGN, check_sqrt_ggn),
    "batch_grad": (BatchGrad, check_batch_grad),
    "kfac_type2": (lambda: KFAC("type-2"), kfac_checker("type-2")),
    "kfac_empirical": (lambda: KFAC("empirical"), kfac_checker("empirical")),
}


def run_supported_or_refused(case, extension):
    """Run curvext; ``None`` if it refused ``case.option`` with a clear error."""
    if case.option is None:
        return run_case(case, extension)
    try:
        return run_case(case, extension)
    except REFUSALS as error:
        assert re.search(case.option, str(error)), (
            f"refusal of {case.name} must name the option ({case.option!r}): {error!r}"
        )
        return None


@pytest.mark.parametrize("check", CHECKS)
@pytest.mark.parametrize("case", LOSS_CASES, ids=str)
def test_loss(case, check):
    make_extension, verify = CHECKS[check]
    model = run_supported_or_refused(case, make_extension())
    if model is not None:
        verify(case, model, dense_reference(case.name))


def test_ce_sequence_positions_need_c_times_t_columns():
    """[N, C, T] cross-entropy: per-sample Hessian is block-diagonal over T.

    Any exact square root reproducing G_n per sample needs rank up to C*T; a
    square root with only C columns (one per class, shared by all positions)
    generally cannot reproduce it. Checked via the per-sample GGN of the
    zoo's sequence model, whose per-sample GGN rank exceeds C.
    """
    case = CASES_BY_NAME["sequence"]
    reference = dense_reference(case.name)
    model = run_case(case, SqrtGGN())
    params = trainable(model)
    per_sample = reference.per_sample_ggn(list(params))
    classes = reference.output.shape[1]
    assert torch.linalg.matrix_rank(per_sample[0]) > classes  # the test has power
    columns = torch.cat(
        [p.sqrt_ggn.reshape(*p.sqrt_ggn.shape[:2], -1) for p in params.values()], dim=2
    )
    for n in range(reference.N):
        assert_close(columns[:, n].T @ columns[:, n], per_sample[n], msg=f"sample {n}")
