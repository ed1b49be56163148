r"""Monte-Carlo extensions: unbiasedness, reproducibility, sample counts.

Statistical design (why the tolerances are what they are)
---------------------------------------------------------
Each quantity is estimated in ``S = 16`` independent runs (global seeds
``0..15``) of ``M = 2000`` MC samples each. If curvext is unbiased, the mean
``m`` of the runs has ``E‖m - exact‖² = Σ_i Var_i / S =: SE²`` (``Var_i`` the
run-to-run variance of entry ``i``, estimated from the ``S`` runs). We assert

1. ``‖m - exact‖ ≤ 5 SE``: a wrong *expectation* (missing ``1/√M``, wrong
   loss scaling, columns shared across positions, a wrong sampling
   distribution) gives an error that does not shrink with ``SE``. For an
   unbiased estimator the ratio is at worst (one effective degree of
   freedom, e.g. a rank-one KFAC factor) t-distributed with 15 degrees of
   freedom: ``P(|t| > 5) ≈ 2e-4``; with many entries it concentrates near 1.
   Measured on this zoo: mean ratio 1.0, maximum 3.1.
2. ``‖m - exact‖ ≤ 0.05 ‖exact‖``: guarantees the test has power (a 5 %
   bias is always caught) and that the estimator's variance is sane (with
   ``S·M = 32000`` samples the measured relative error is at most 1 %).

A 2x scaling bug or a factor ``M`` violate (2) by orders of magnitude. The
seeds are fixed, so the test is deterministic for a given implementation.
"""

import re

import pytest
import torch

from curvext.extensions import KFAC, BatchGGNDiag, GGNDiag, SqrtGGN
from tests.cases import (
    CASES_BY_NAME,
    LOSS_CASES,
    dense_reference,
    kronecker_modules,
    run_case,
    trainable,
)
from tests.references import dense_factor, kfac_reference

SEEDS = range(16)
MC_SAMPLES = 2000
Z = 5.0
REL_TOL = 0.05
REFUSALS = (ValueError, NotImplementedError, TypeError, RuntimeError)

ZOO_MC_CASES = [
    CASES_BY_NAME[name]
    for name in [
        "mlp_ce",
        "mlp_mse_sum",
        "mlp_bce",
        "mlp_bce_pos_weight",
        "mse_multidim",
        "sequence",
        "tied",
        "residual_cnn",
        "attention",
    ]
]
MC_CASES = ZOO_MC_CASES + LOSS_CASES
OPTIONS = {
    "mlp_bce_pos_weight": "pos_weight",
    **{case.name: case.option for case in LOSS_CASES},
}


def assert_unbiased(estimates: list[torch.Tensor], exact: torch.Tensor, label=""):
    samples = torch.stack([estimate.flatten() for estimate in estimates])
    exact = exact.flatten()
    error = (samples.mean(0) - exact).norm()
    standard_error = (samples.var(0).sum() / samples.shape[0]).sqrt()
    scale = exact.norm()
    assert error <= Z * standard_error + 1e-12 * scale, (
        f"{label}: error {error:.3e} > {Z} x standard error {standard_error:.3e} "
        f"(|exact| = {scale:.3e}): biased"
    )
    assert error <= REL_TOL * scale, f"{label}: relative error {error / scale:.3f} > {REL_TOL}"


def mc_runs(case, make_extension, read):
    """``read(model)`` for each seed; ``None`` if curvext refused the option."""
    estimates = []
    for seed in SEEDS:
        torch.manual_seed(seed)
        try:
            model = run_case(case, make_extension())
        except REFUSALS as error:
            option = OPTIONS.get(case.name)
            if option is None:
                raise
            assert re.search(option, str(error)), (
                f"refusal of {case.name} must name {option!r}: {error!r}"
            )
            return None
        estimates.append(read(model))
    return estimates


@pytest.mark.parametrize("case", MC_CASES, ids=str)
def test_ggn_diag_mc_unbiased(case):
    reference = dense_reference(case.name)
    estimates = mc_runs(
        case,
        lambda: GGNDiag(mc_samples=MC_SAMPLES),
        lambda model: torch.cat([p.ggn_diag.flatten() for p in trainable(model).values()]),
    )
    if estimates is not None:
        exact = torch.cat([reference.diag(name).flatten() for name in reference.names])
        assert_unbiased(estimates, exact, case.name)


@pytest.mark.parametrize("case", ZOO_MC_CASES, ids=str)
def test_batch_ggn_diag_mc_unbiased(case):
    reference = dense_reference(case.name)
    estimates = mc_runs(
        case,
        lambda: BatchGGNDiag(mc_samples=MC_SAMPLES),
        lambda model: torch.cat(
            [p.batch_ggn_diag.flatten(1) for p in trainable(model).values()], dim=1
        ),
    )
    if estimates is not None:
        exact = torch.cat(
            [reference.per_sample_diag(name).flatten(1) for name in reference.names], 1
        )
        for n in range(reference.N):
            assert_unbiased([e[n] for e in estimates], exact[n], f"sample {n}")


def sqrt_ggn_matrix(model):
    params = trainable(model).values()
    for param in params:
        assert param.sqrt_ggn.shape[0] == MC_SAMPLES, "K must equal mc_samples"
    V = torch.cat([p.sqrt_ggn.reshape(MC_SAMPLES * p.sqrt_ggn.shape[1], -1) for p in params], 1)
    return V.T @ V


@pytest.mark.parametrize("case", ZOO_MC_CASES, ids=str)
def test_sqrt_ggn_mc_unbiased(case):
    reference = dense_reference(case.name)
    estimates = mc_runs(case, lambda: SqrtGGN(mc_samples=MC_SAMPLES), sqrt_ggn_matrix)
    if estimates is not None:
        assert_unbiased(estimates, reference.ggn(), case.name)


KFAC_MC_CASES = [
    CASES_BY_NAME[name]
    for name in [
        "mlp_ce",
        "mlp_mse_sum",
        "mse_multidim",
        "sequence",
        "residual_cnn",
        "conv1d_strings_reflect_circular",
        "ce_spatial_mean",
        "bce_mean",
    ]
]


@pytest.mark.parametrize("kfac_approx", ["expand", "reduce"])
@pytest.mark.parametrize("case", KFAC_MC_CASES, ids=str)
def test_kfac_mc_unbiased(case, kfac_approx):
    """``A`` is deterministic and exact; ``G`` is unbiased for the type-2 ``G``."""
    module_names = kronecker_modules(case)

    def read(model):
        modules = dict(model.named_modules())
        return {name: modules[name].weight.kfac for name in module_names}

    estimates = mc_runs(
        case, lambda: KFAC("mc", mc_samples=MC_SAMPLES, kfac_approx=kfac_approx), read
    )
    pristine, loss_fn, X, y = case.build()
    pristine_modules = dict(pristine.named_modules())
    for name in module_names:
        expected = kfac_reference(
            pristine, loss_fn, X, y, pristine_modules[name], "mc", kfac_approx
        )["weight"]
        module = pristine_modules[name]
        g_index = (
            1
            if isinstance(
                module,
                (
                    torch.nn.Embedding,
                    torch.nn.ConvTranspose1d,
                    torch.nn.ConvTranspose2d,
                    torch.nn.ConvTranspose3d,
                ),
            )
            else 0
        )
        a_index = 1 - g_index
        for estimate in estimates:
            torch.testing.assert_close(dense_factor(estimate[name][a_index]), expected[a_index])
        assert_unbiased([e[name][g_index] for e in estimates], expected[g_index], name)


@pytest.mark.parametrize(
    "make_extension, attribute",
    [
        (lambda: GGNDiag(mc_samples=3), "ggn_diag"),
        (lambda: BatchGGNDiag(mc_samples=2), "batch_ggn_diag"),
        (lambda: SqrtGGN(mc_samples=2), "sqrt_ggn"),
        (lambda: KFAC("mc", mc_samples=2), "kfac"),
    ],
    ids=["GGNDiag", "BatchGGNDiag", "SqrtGGN", "KFAC"],
)
@pytest.mark.parametrize("case_name", ["mlp_ce", "sequence", "mse_multidim"])
def test_reproducible_under_manual_seed(case_name, make_extension, attribute):
    case = CASES_BY_NAME[case_name]

    def results(seed):
        torch.manual_seed(seed)
        model = run_case(case, make_extension())
        values = [getattr(p, attribute) for p in trainable(model).values()]
        return [torch.cat([f.flatten() for f in v]) if isinstance(v, list) else v for v in values]

    first, again, other = results(3), results(3), results(4)
    for a, b in zip(first, again):
        assert torch.equal(a, b)
    assert any(not torch.equal(a, c) for a, c in zip(first, other)), (
        "different seeds must give different MC samples"
    )


@pytest.mark.parametrize("case_name", ["mlp_ce", "sequence"])
def test_single_mc_sample_is_rank_one_per_sample(case_name):
    """One MC column per sample (also over positions): ``V[:, n]`` has rank 1."""
    case = CASES_BY_NAME[case_name]
    model = run_case(case, SqrtGGN(mc_samples=1))
    params = trainable(model).values()
    columns = torch.cat([p.sqrt_ggn.reshape(*p.sqrt_ggn.shape[:2], -1) for p in params], 2)
    assert columns.shape[0] == 1


def test_categorical_sampler_frequencies_match_the_probabilities():
    """The labels behind cross-entropy's MC columns: with 200 000 draws the
    frequency of a class has standard deviation at most 0.0011, so 0.006 is
    over 5 of them; classes of probability 0 are never drawn; unnormalised
    rows are normalised; labels are always classes (also for one class)."""
    from curvext.losses import sample_categorical

    generator = torch.Generator().manual_seed(0)
    prob = torch.tensor(
        [[0.1, 0.0, 0.6, 0.3], [0.25, 0.25, 0.25, 0.25], [0.0, 0.0, 0.0, 1.0], [2.0, 0.0, 0.0, 2.0]]
    )
    labels = sample_categorical(prob, 200_000, generator)
    assert labels.shape == (200_000, 4)
    frequencies = torch.nn.functional.one_hot(labels, 4).double().mean(0)  # [rows, classes]
    expected = (prob / prob.sum(1, keepdim=True)).double()
    torch.testing.assert_close(frequencies, expected, atol=0.006, rtol=0)
    assert not frequencies[expected == 0].any()
    assert sample_categorical(torch.ones(3, 1), 5, generator).eq(0).all()
    half = sample_categorical(prob.half(), 1000, generator)
    assert half.min() >= 0 and half.max() <= 3 and not (half[:, 0] == 1).any()


@pytest.mark.parametrize("mc_samples", [1, 3])
@pytest.mark.parametrize("case_name", ["mlp_ce", "mlp_bce", "mlp_mse_sum", "sequence"])
def test_mc_columns_leave_exact_extensions_of_the_same_pass_exact(case_name, mc_samples):
    """An MC extension drawn before the exact columns of the same backward
    pass must not touch what the exact ones read (a sample column built in
    place on a view of the loss's probabilities made the exact columns of a
    cross-entropy loss NaN): the exact diagonal equals the dense one."""
    reference = dense_reference(case_name)
    model = run_case(CASES_BY_NAME[case_name], SqrtGGN(mc_samples=mc_samples), BatchGGNDiag())
    for name, param in trainable(model).items():
        torch.testing.assert_close(
            param.batch_ggn_diag.sum(0), reference.diag(name), rtol=1e-4, atol=1e-6
        )
        assert param.sqrt_ggn.shape[0] == mc_samples
