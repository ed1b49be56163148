"""KFAC-preconditioned training and a Laplace posterior, on scikit-learn's digits.

The worked example of ``docs/operators.md``. On a small residual network
(which BackPACK cannot extend) and the 8×8 digits that ship with
scikit-learn (no download):

1. **KFAC-preconditioned steps**: every ``refresh`` steps, the type-2 KFAC of
   the current mini-batch (one backward pass, stored on the parameters) is
   turned into a damped inverse, ``(K + δ)⁻¹``, by
   ``KronOperator.from_params(...).inverse(damping, use_heuristic_damping=True)``,
   and each step moves along ``-(K + δ)⁻¹ ∇L``.
2. **A Laplace posterior** around the trained weights, from the KFAC of the
   whole training set (``KronOperator.from_data``, exact over batches):
   ``H = n·K + τ I`` (``K`` is the curvature of the *mean* loss, so the
   log-likelihood's is ``n·K``; ``τ`` a prior precision), through
   ``KronOperator.decompose()`` (laplace-torch's ``KronDecomposed`` API): its
   log-determinant, the prior precision chosen by the Laplace evidence, and
   the linearised predictive (``J H⁻¹ Jᵀ`` per test point from
   ``inv_square_form``), with the calibration it buys.
3. The same posterior through laplace-torch, with curvext as its backend
   (``Laplace(..., backend=CurvextGGN)``), when ``laplace-torch`` is installed.

Run: ``python examples/kfac_laplace.py`` (about 10 s on 2 CPU cores).
"""

from __future__ import annotations

import math

import torch
from sklearn.datasets import load_digits
from torch import nn
from torch.func import functional_call, jacrev, vmap

from curvext import backpack, extend
from curvext.extensions import KFAC
from curvext.operators import KronOperator


class ResidualMLP(nn.Module):
    """Linear → tanh → (Linear → tanh) + skip → Linear."""

    def __init__(self, in_features: int = 64, hidden: int = 32, classes: int = 10):
        super().__init__()
        self.embed = nn.Linear(in_features, hidden)
        self.block = nn.Linear(hidden, hidden)
        self.head = nn.Linear(hidden, classes)

    def forward(self, x):
        h = torch.tanh(self.embed(x))
        h = h + torch.tanh(self.block(h))
        return self.head(h)


def load(seed: int = 0):
    """Digits as ``[N, 64]`` float inputs in ``[0, 1]`` and class labels, split 1500/297."""
    digits = load_digits()
    X = torch.tensor(digits.data, dtype=torch.float32) / 16.0
    y = torch.tensor(digits.target)
    order = torch.randperm(len(X), generator=torch.Generator().manual_seed(seed))
    X, y = X[order], y[order]
    return X[:1500], y[:1500], X[1500:], y[1500:]


def train_with_kfac(model, loss_fn, X, y, epochs=3, lr=0.05, damping=1e-2, refresh=10):
    """SGD along ``-(K + δ)⁻¹ ∇L`` with the KFAC ``K`` of every ``refresh``-th batch."""
    params = list(model.parameters())
    preconditioner = None
    step = 0
    for epoch in range(epochs):
        for batch in torch.randperm(len(X)).split(64):
            for p in params:
                p.grad = None
            loss = loss_fn(model(X[batch]), y[batch])
            if step % refresh == 0:
                with backpack(KFAC(fisher_type="type-2")):
                    loss.backward()
                K = KronOperator.from_params(params)  # reads p.kfac
                preconditioner = K.inverse(damping=damping, use_heuristic_damping=True)
            else:
                loss.backward()
            direction = preconditioner @ [p.grad for p in params]  # same shapes as the params
            with torch.no_grad():
                for p, d in zip(params, direction):
                    p -= lr * d
            step += 1
        print(f"epoch {epoch}: training loss {loss.item():.3f}")


def per_sample_jacobians(model, X):
    """``J`` ``[N, C, P]``: the Jacobian of the logits w.r.t. the flattened parameters."""
    names = [name for name, _ in model.named_parameters()]
    values = tuple(p.detach() for p in model.parameters())

    def logits(theta, x):
        return functional_call(model, dict(zip(names, theta)), (x.unsqueeze(0),)).squeeze(0)

    blocks = vmap(jacrev(logits), in_dims=(None, 0))(values, X)
    return torch.cat([block.flatten(2) for block in blocks], dim=2)


def expected_calibration_error(probs, y, bins=10):
    """Mean |accuracy − confidence| over equal-width confidence bins, weighted by their size."""
    confidence, prediction = probs.max(1)
    correct = (prediction == y).float()
    edges = torch.linspace(0, 1, bins + 1)
    error = 0.0
    for low, high in zip(edges[:-1], edges[1:]):
        inside = (confidence > low) & (confidence <= high)
        if inside.any():
            error += (
                inside.float().mean() * (correct[inside].mean() - confidence[inside].mean()).abs()
            )
    return float(error)


def laplace_with_curvext(model, loss_fn, X, y, test_X, test_y):
    """Laplace posterior ``N(θ*, (n·K + τ I)⁻¹)`` from curvext's KFAC; returns ``τ``."""
    n = len(X)
    batches = list(zip(X.split(128), y.split(128)))
    K = KronOperator.from_data(model, loss_fn, batches, fisher_type="type-2")
    decomposed = (n * K).decompose()  # eigendecomposes every factor once
    theta = torch.cat([p.detach().flatten() for p in model.parameters()])
    with torch.no_grad():
        nll = n * loss_fn(model(X), y).item()  # −log p(D | θ*)

    def log_evidence(tau: torch.Tensor) -> torch.Tensor:
        """Laplace log marginal likelihood with the prior ``N(0, τ⁻¹ I)``."""
        P = theta.numel()
        return (
            -nll
            - 0.5 * tau * theta.square().sum()
            + 0.5 * P * tau.log()
            - 0.5 * (decomposed + tau).logdet()  # differentiable in τ
        )

    # maximise the evidence over log τ by gradient ascent, as laplace-torch's "marglik"
    log_tau = torch.zeros((), requires_grad=True)
    optimizer = torch.optim.Adam([log_tau], lr=0.1)
    for _ in range(100):
        optimizer.zero_grad()
        (-log_evidence(log_tau.exp())).backward()
        optimizer.step()
    tau = log_tau.exp().item()
    evidence = log_evidence(torch.tensor(tau)).item()
    print(f"prior precision by the Laplace evidence: τ = {tau:.3g} (log evidence {evidence:.1f})")

    posterior = decomposed + tau
    with torch.no_grad():
        logits = model(test_X)
    J = per_sample_jacobians(model, test_X)  # [N, C, P]
    covariance = posterior.inv_square_form(J)  # J H⁻¹ Jᵀ, [N, C, C]
    # probit approximation of the predictive (MacKay 1992): logits / √(1 + π/8 var)
    variance = covariance.diagonal(dim1=1, dim2=2)
    laplace_probs = torch.softmax(logits / torch.sqrt(1 + math.pi / 8 * variance), dim=1)
    map_probs = torch.softmax(logits, dim=1)
    for name, probs in (("MAP", map_probs), ("KFAC-Laplace", laplace_probs)):
        nll_test = nn.functional.nll_loss(probs.log(), test_y).item()
        accuracy = (probs.argmax(1) == test_y).float().mean().item()
        print(
            f"{name:>12}: test accuracy {accuracy:.3f}, NLL {nll_test:.3f}, "
            f"ECE {expected_calibration_error(probs, test_y):.3f}"
        )
    return tau


def laplace_torch_backend(model, X, y, test_X, test_y):
    """The same posterior by laplace-torch, with curvext computing its curvature."""
    try:
        from laplace import Laplace
    except ImportError:
        print("laplace-torch is not installed (pip install laplace-torch); skipped.")
        return
    from curvext.integrations.laplace import CurvextGGN

    loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(X, y), batch_size=128)
    la = Laplace(
        model,
        "classification",
        subset_of_weights="all",
        hessian_structure="kron",
        backend=CurvextGGN,
    )
    la.fit(loader)
    la.optimize_prior_precision(method="marglik")
    probs = la(test_X, link_approx="probit")
    print(
        f"laplace-torch, backend=CurvextGGN: τ = {la.prior_precision.item():.3g} "
        f"(log evidence {la.log_marginal_likelihood().item():.1f}), test NLL "
        f"{nn.functional.nll_loss(probs.log(), test_y).item():.3f}, "
        f"ECE {expected_calibration_error(probs, test_y):.3f}"
    )


def main():
    torch.manual_seed(0)
    X, y, test_X, test_y = load()
    model = extend(ResidualMLP())
    loss_fn = extend(nn.CrossEntropyLoss())
    train_with_kfac(model, loss_fn, X, y)
    laplace_with_curvext(model, loss_fn, X, y, test_X, test_y)
    laplace_torch_backend(model, X, y, test_X, test_y)


if __name__ == "__main__":
    main()
