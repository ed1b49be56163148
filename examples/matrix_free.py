"""Matrix-free curvature of a whole data set: Newton-CG, the spectrum, influence.

The worked example of ``docs/matrix_free.md``, on a small MLP trained on
scikit-learn's digits (bundled, no download):

1. **A Newton-CG step** ``s = -(G + δI)⁻¹ ∇L`` with the GGN ``G`` of the whole
   training set (``GGNOperator``: every product is one pass over the batches,
   nothing stored), solved by ``CGInverse``, with and without a KFAC
   preconditioner (``KronOperator.from_data(...).inverse(...)``).
2. **The spectrum of the Hessian**: its spectral density by stochastic Lanczos
   quadrature (``lanczos_spectrum``, Papyan 2020), its top eigenvalues
   (``top_eigenpairs``) and trace (``hutchpp_trace``), saved as a plot.
3. **The influence of training points** on a test prediction (Koh & Liang,
   2017): ``I(z_i, z_test) = -∇ℓ(z_test)ᵀ (G + δI)⁻¹ ∇ℓ(z_i)``, one CG solve
   for the test point and every training point's gradient from one backward
   pass with ``BatchGrad``. The predicted effect of removing the most
   influential points is checked against actually retraining without them.

Run: ``python examples/matrix_free.py [spectrum.png]`` (about 10 s on 2 CPU
cores; needs scikit-learn, and matplotlib for the plot).
"""

from __future__ import annotations

import argparse
import copy

import torch
from sklearn.datasets import load_digits
from torch import nn

from curvext import backpack, extend
from curvext.extensions import BatchGrad
from curvext.linalg import CGInverse, hutchpp_trace, lanczos_spectrum, top_eigenpairs
from curvext.operators import GGNOperator, HessianOperator, KronOperator


def load(seed: int = 0):
    """Digits as float64 ``[N, 64]`` inputs in ``[0, 1]`` and labels, split 1500/297."""
    digits = load_digits()
    X = torch.tensor(digits.data, dtype=torch.float64) / 16.0
    y = torch.tensor(digits.target)
    order = torch.randperm(len(X), generator=torch.Generator().manual_seed(seed))
    X, y = X[order], y[order]
    return X[:1500], y[:1500], X[1500:], y[1500:]


def make_model() -> nn.Module:
    return nn.Sequential(nn.Linear(64, 32), nn.Tanh(), nn.Linear(32, 10)).double()


def train(model, X, y, steps=300, weight_decay=1e-3, seed=0):
    """Full-batch L-BFGS on the mean cross-entropy plus ``weight_decay/2 ‖θ‖²`` (a near-exact
    minimiser)."""
    torch.manual_seed(seed)
    loss_fn = nn.CrossEntropyLoss()
    optimizer = torch.optim.LBFGS(model.parameters(), max_iter=steps, line_search_fn="strong_wolfe")

    def closure():
        optimizer.zero_grad()
        penalty = sum(p.square().sum() for p in model.parameters())
        loss = loss_fn(model(X), y) + 0.5 * weight_decay * penalty
        loss.backward()
        return loss

    optimizer.step(closure)
    return model


def flat_grad(model, loss) -> torch.Tensor:
    return torch.cat([g.flatten() for g in torch.autograd.grad(loss, list(model.parameters()))])


def newton_cg_step(model, loss_fn, batches, damping=1e-3):
    """One damped Gauss-Newton step over the whole set, with and without a KFAC preconditioner."""
    params = list(model.parameters())
    G = GGNOperator(model, loss_fn, params, batches)  # checks that two passes agree
    X = torch.cat([X for X, _ in batches])
    y = torch.cat([y for _, y in batches])
    gradient = flat_grad(model, loss_fn(model(X), y))
    K_inverse = KronOperator.from_data(model, loss_fn, batches).inverse(
        damping=damping, use_heuristic_damping=True
    )
    for name, preconditioner in (("none", None), ("KFAC", K_inverse)):
        solver = CGInverse(G + damping, tol=1e-4, max_iter=200, preconditioner=preconditioner)
        step = -(solver @ gradient)
        print(
            f"Newton-CG, preconditioner {name:>4}: {solver.info.iterations:3d} CG iterations, "
            f"‖s‖ = {step.norm():.3f}"
        )
    before = loss_fn(model(X), y).item()
    moved = copy.deepcopy(model)
    with torch.no_grad():
        for p, s in zip(moved.parameters(), step.split([p.numel() for p in params])):
            p += s.view_as(p)
    after = loss_fn(moved(X), y).item()
    print(f"training loss {before:.4f} -> {after:.4f} after one step")


def spectrum(model, loss_fn, batches, plot_path):
    """Spectral density, top eigenvalues and trace of the data-set Hessian; plot to
    ``plot_path``."""
    H = HessianOperator(model, loss_fn, list(model.parameters()), batches)
    generator = torch.Generator().manual_seed(0)
    grid, density = lanczos_spectrum(H, ncv=60, num_repeats=2, generator=generator)
    top_values, _ = top_eigenpairs(H, k=5, generator=torch.Generator().manual_seed(0))
    trace = hutchpp_trace(H, num_matvecs=60, generator=torch.Generator().manual_seed(0))
    print(
        f"Hessian: top eigenvalues {[round(v, 3) for v in top_values.tolist()]}, "
        f"trace ≈ {trace:.2f}"
    )
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib is not installed (pip install matplotlib): no plot.")
        return
    figure, axis = plt.subplots(figsize=(6, 3.5))
    axis.semilogy(grid, density.clamp_min(1e-8))
    for value in top_values.tolist():
        axis.axvline(value, color="tab:red", lw=0.7, ls="--")
    axis.set(
        xlabel="eigenvalue",
        ylabel="density",
        title="Hessian spectrum (Lanczos, dashed: top 5)",
        ylim=(1e-6, None),
    )
    figure.tight_layout()
    figure.savefig(plot_path, dpi=120)
    print(f"spectral density saved to {plot_path}")


def influence(model, loss_fn, X, y, test_x, test_y, weight_decay=1e-3, remove=20):
    """Influence of every training point on the test loss; checked by retraining without the
    top ones."""
    batches = list(zip(X.split(500), y.split(500)))
    params = list(model.parameters())
    # the training objective is mean CE + weight_decay/2 ‖θ‖²: its GGN is G + weight_decay·I,
    # positive definite, so no further damping
    G = GGNOperator(model, loss_fn, params, batches) + weight_decay
    test_gradient = flat_grad(model, loss_fn(model(test_x), test_y))
    s_test = CGInverse(G, tol=1e-6) @ test_gradient  # (G + wd·I)⁻¹ ∇ℓ_test

    # every training point's gradient of its own loss ℓ_i, from one backward pass
    extended, sum_loss = extend(copy.deepcopy(model)), extend(nn.CrossEntropyLoss(reduction="sum"))
    with backpack(BatchGrad()):
        sum_loss(extended(X), y).backward()
    per_sample = torch.cat(
        [p.grad_batch.flatten(1) for p in extended.parameters()], dim=1
    )  # [N, P]
    # removing z_i from a mean over N changes θ by ≈ (1/N) H⁻¹ ∇ℓ_i, the test loss by
    # ≈ ∇ℓ_testᵀ that
    predicted_change = per_sample @ s_test / len(X)
    helpful = predicted_change.argsort(descending=True)[:remove]  # removing them hurts most
    print(
        f"test point (label {test_y.item()}): the {remove} most helpful training points "
        "have labels "
        f"{y[helpful].tolist()}"
    )

    keep = torch.ones(len(X), dtype=torch.bool)
    keep[helpful] = False
    before = loss_fn(model(test_x), test_y).item()
    retrained = train(copy.deepcopy(model), X[keep], y[keep], steps=100, weight_decay=weight_decay)
    after = loss_fn(retrained(test_x), test_y).item()
    print(
        f"removing them: test loss {before:.4f} -> {after:.4f} "
        f"(change {after - before:+.4f}; predicted {predicted_change[helpful].sum().item():+.4f})"
    )


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("plot", nargs="?", default="spectrum.png", help="image to write")
    args = parser.parse_args()
    torch.manual_seed(0)
    X, y, test_X, test_y = load()
    model = train(make_model(), X, y)
    loss_fn = nn.CrossEntropyLoss()
    batches = list(zip(X.split(500), y.split(500)))
    with torch.no_grad():
        accuracy = (model(test_X).argmax(1) == test_y).double().mean().item()
    print(f"trained MLP: test accuracy {accuracy:.3f}")
    newton_cg_step(model, loss_fn, batches)
    spectrum(model, loss_fn, batches, args.plot)
    with torch.no_grad():
        test_losses = nn.functional.cross_entropy(model(test_X), test_y, reduction="none")
    hardest = test_losses.argmax()  # the test point the model gets most wrong
    influence(model, loss_fn, X, y, test_X[hardest : hardest + 1], test_y[hardest : hardest + 1])


if __name__ == "__main__":
    main()
