"""Curvature of a small residual network trained on scikit-learn's digits.

Trains a residual MLP with LayerNorm for a few epochs on the 8×8 digits that
ship with scikit-learn (no download), then computes, from one backward pass
over a batch,

- the exact GGN diagonal and its Monte-Carlo estimate,
- KFAC factors (type-2) and the eigenvalues of each Kronecker block,
- per-sample gradients, their norms and the gradient variance,

and prints a per-parameter summary with a legend of its columns.

Run: ``python examples/digits.py``.
"""

from __future__ import annotations

import textwrap

import torch
from sklearn.datasets import load_digits
from torch import nn

from curvext import backpack, extend
from curvext.extensions import KFAC, BatchGrad, BatchL2Grad, GGNDiag, SqrtGGN, Variance

MC_SAMPLES = 32


def legend(batch_size: int, mc_samples: int, width: int = 90) -> str:
    """What each column of the table means, printed under it."""
    columns = {
        "parameter": "name of the parameter tensor p; shape: its shape",
        "tr GGN": "trace of p's block of the exact GGN: the sum of its diagonal (GGNDiag)",
        f"tr MC{mc_samples}": f"the same trace of the Monte-Carlo GGN, {mc_samples} labels "
        "sampled from the model's predictive per input (SqrtGGN): an unbiased estimate of tr GGN",
        "KFAC λmax": "largest eigenvalue of p's type-2 KFAC block: the product of the largest "
        "eigenvalues of its Kronecker factors p.kfac (LayerNorm: exact block)",
        "|g_n| mean": "mean over the batch of the norm of p's individual gradients "
        "g_n = ∇ℓ_n / N, which sum to the gradient p.grad (BatchL2Grad)",
        "noise": "gradient noise scale B_simple = tr(Σ)/|g|²: the variance over the batch (1/N) "
        "of the per-sample gradients ∇ℓ_n, summed over p's entries (Variance), over the squared "
        "norm of their mean g = p.grad; about the batch size at which the gradient noise is as "
        "large as the gradient",
    }
    lines = [
        f"Columns, for the batch's mean loss L = (1/N) Σ_n ℓ_n (cross-entropy, N = {batch_size}):"
    ]
    for name, text in columns.items():
        lines += textwrap.wrap(
            text, width, initial_indent=f"  {name:<11s} ", subsequent_indent=" " * 14
        )
    return "\n".join(lines)


class ResidualMLP(nn.Module):
    """Linear → (LayerNorm → Linear → GELU) + skip → Linear."""

    def __init__(self, in_features: int = 64, hidden: int = 48, classes: int = 10):
        super().__init__()
        self.embed = nn.Linear(in_features, hidden)
        self.norm = nn.LayerNorm(hidden)
        self.block = nn.Linear(hidden, hidden)
        self.head = nn.Linear(hidden, classes)

    def forward(self, x):
        h = torch.tanh(self.embed(x))
        h = h + nn.functional.gelu(self.block(self.norm(h)))
        return self.head(h)


def main():
    torch.manual_seed(0)
    digits = load_digits()
    X = torch.tensor(digits.data, dtype=torch.float32) / 16.0
    y = torch.tensor(digits.target)
    train_X, train_y, test_X, test_y = X[:1500], y[:1500], X[1500:], y[1500:]

    model = extend(ResidualMLP())
    loss_fn = extend(nn.CrossEntropyLoss())
    optimizer = torch.optim.Adam(model.parameters(), lr=3e-3)
    for epoch in range(5):
        for batch in torch.randperm(len(train_X)).split(64):
            optimizer.zero_grad()
            loss_fn(model(train_X[batch]), train_y[batch]).backward()
            optimizer.step()
        with torch.no_grad():
            accuracy = (model(test_X).argmax(1) == test_y).float().mean().item()
        print(f"epoch {epoch}: test accuracy {accuracy:.3f}")

    batch_X, batch_y = train_X[:128], train_y[:128]
    optimizer.zero_grad()
    loss = loss_fn(model(batch_X), batch_y)
    with backpack(
        GGNDiag(),
        SqrtGGN(mc_samples=MC_SAMPLES),
        KFAC(fisher_type="type-2"),
        BatchGrad(),
        BatchL2Grad(),
        Variance(),
    ):
        loss.backward()

    print(f"\nCurvature at the trained model (batch of {len(batch_X)}, loss {loss:.3f})")
    header = (
        f"{'parameter':14s} {'shape':>10s} {'tr GGN':>9s} {f'tr MC{MC_SAMPLES}':>9s} "
        f"{'KFAC λmax':>10s} {'|g_n| mean':>10s} {'noise':>8s}"
    )
    print(header)
    print("-" * len(header))
    for name, p in model.named_parameters():
        mc_diag = p.sqrt_ggn.square().sum((0, 1))  # MC estimate of the diagonal
        kfac_max = 1.0
        for factor in p.kfac:
            kfac_max *= torch.linalg.eigvalsh(factor)[-1].item()
        # gradient noise scale: summed variance of the individual gradients
        # over the squared norm of their mean (see legend())
        mean_grad = p.grad / len(batch_X)
        noise = (p.variance.sum() / mean_grad.square().sum().clamp_min(1e-20)).item()
        print(
            f"{name:14s} {str(tuple(p.shape)):>10s} {p.ggn_diag.sum().item():9.4f} "
            f"{mc_diag.sum().item():9.4f} {kfac_max:10.4f} "
            f"{p.batch_l2.sqrt().mean().item():10.4f} {noise:8.2f}"
        )
    total = sum(p.ggn_diag.sum() for p in model.parameters())
    print(legend(len(batch_X), MC_SAMPLES))
    print(f"\ntrace of the GGN: {total:.4f} (sum of the GGN diagonal)")
    print(
        "per-sample gradients sum to the gradient:",
        all(torch.allclose(p.grad_batch.sum(0), p.grad, atol=1e-6) for p in model.parameters()),
    )


if __name__ == "__main__":
    main()
