"""Random models against the graph reference: what a hand-written zoo misses.

Each seed builds a small sequence model from a random stack of blocks —
linear layers, residual branches, norms, in-place activations, attention
written with tensor ops (causal masks passed as arguments), ``MultiheadAttention``,
convolutions and transposed convolutions over time, tied layers called twice, modules without a
dedicated rule (with and without dropout in train mode), pruned and hooked
layers, ``LSTMCell`` — with a random head and loss (cross-entropy per
position, flattened language-model style, pooled; MSE; BCE; either
reduction). Sizes are tiny and may coincide (``N == T`` is allowed on
purpose), and a sequence may have one step. Every model is compared with
:class:`tests.references.GraphReference` of the same forward pass for the
GGN diagonal, the per-sample GGN diagonals, the per-sample gradients and
the square root of the GGN.
"""

from __future__ import annotations

import copy
import math
import random

import pytest
import torch
import torch.nn.utils.prune as prune
from torch import Tensor, nn
from torch.nn import functional as F

from curvext import backpack, extend
from curvext.extensions import BatchGGNDiag, BatchGrad, GGNDiag, SqrtGGN
from tests.cases import assert_close
from tests.references import GraphReference

pytestmark = pytest.mark.filterwarnings("ignore::curvext.rules.generic.CurvextNote")

SEEDS = range(240)
SEEDS_PER_TEST = 20


class Gain(nn.Module):
    """Own parameters, no dedicated rule; optional dropout (random draws)."""

    def __init__(self, dim: int, dropout: float):
        super().__init__()
        self.gain = nn.Parameter(1 + 0.3 * torch.randn(dim))
        self.shift = nn.Parameter(0.3 * torch.randn(dim))
        self.dropout = nn.Dropout(dropout)

    def forward(self, h: Tensor) -> Tensor:
        return self.dropout(torch.tanh(h * self.gain + self.shift))


class MaskedAttention(nn.Module):
    """Single-head attention with a learned temperature (so the module has a
    parameter of its own and gets the generic rule); the mask ``[T, T]`` and
    a position table ``[T, D]`` come in as arguments."""

    def __init__(self, dim: int):
        super().__init__()
        self.qkv = nn.Linear(dim, 3 * dim)
        self.temperature = nn.Parameter(torch.tensor(1.0 / math.sqrt(dim)))

    def forward(self, h: Tensor, mask: Tensor, table: Tensor) -> Tensor:
        q, k, v = self.qkv(h + table).chunk(3, dim=-1)
        scores = (q @ k.transpose(1, 2) * self.temperature).masked_fill(~mask, -1e9)
        return scores.softmax(-1) @ v


class Cell(nn.Module):
    """``LSTMCell`` over the positions, both its ``h`` and ``c`` used."""

    def __init__(self, dim: int):
        super().__init__()
        self.cell = nn.LSTMCell(dim, dim)

    def forward(self, h: Tensor) -> Tensor:
        outputs, state = [], None
        for t in range(h.shape[1]):
            hx, cx = self.cell(h[:, t], state)
            state = (hx, cx)
            outputs.append(hx + 0.5 * cx)
        return torch.stack(outputs, 1)


BLOCKS = [
    "linear",
    "residual",
    "norm",
    "activation",
    "inplace_relu",
    "attention",
    "mha",
    "conv",
    "tied",
    "generic",
    "generic_dropout",
    "pruned",
    "hooked",
    "prelu",
    "cell",
    "conv_transpose",
]
LOSSES = ["ce_positions", "ce_flat", "ce_pooled", "mse", "bce"]


class RandomModel(nn.Module):
    def __init__(self, rng: random.Random, dim: int, steps: int, classes: int, loss: str):
        super().__init__()
        self.kinds = [rng.choice(BLOCKS) for _ in range(rng.randint(1, 4))]
        self.loss = loss
        self.layers = nn.ModuleList()
        self.register_buffer("mask", torch.ones(steps, steps, dtype=torch.bool).tril())
        self.register_buffer("table", 0.5 * torch.randn(steps, dim))
        self.shared = nn.Linear(dim, dim)
        for kind in self.kinds:
            self.layers.append(self._make(kind, dim, rng))
        self.head = nn.Linear(dim, classes, bias=rng.random() < 0.7)

    def _make(self, kind: str, dim: int, rng: random.Random) -> nn.Module:
        if kind in ("linear", "residual", "hooked"):
            layer = nn.Linear(dim, dim)
            if kind == "hooked":
                layer.register_forward_hook(lambda module, args, out: 0.5 * out)
            return layer
        if kind == "norm":
            return rng.choice([nn.LayerNorm(dim), nn.RMSNorm(dim)])
        if kind == "attention":
            return MaskedAttention(dim)
        if kind == "mha":
            return nn.MultiheadAttention(dim, 1, batch_first=True)
        if kind == "conv":
            return nn.Conv1d(dim, dim, 3, padding=1)
        if kind == "conv_transpose":  # over time, one step longer (folded in forward)
            return nn.ConvTranspose1d(dim, dim, 2)
        if kind in ("generic", "generic_dropout"):
            return Gain(dim, 0.3 if kind == "generic_dropout" else 0.0)
        if kind == "pruned":
            layer = nn.Linear(dim, dim)
            prune.random_unstructured(layer, "weight", amount=0.4)
            return layer
        if kind == "prelu":
            return nn.PReLU()
        if kind == "cell":
            return Cell(dim)
        return nn.Identity()  # activation, inplace_relu, tied: no own parameters

    def forward(self, h: Tensor) -> Tensor:
        for kind, layer in zip(self.kinds, self.layers):
            if kind == "residual":
                h = h + torch.tanh(layer(h))
            elif kind == "activation":
                h = F.gelu(h)
            elif kind == "inplace_relu":
                h = F.relu(self.shared(h), inplace=True)
            elif kind == "attention":
                steps = h.shape[1]
                h = h + layer(h, self.mask[:steps, :steps], self.table[:steps])
            elif kind == "mha":
                h = h + layer(h, h, h, need_weights=False)[0]
            elif kind == "conv":
                h = layer(h.transpose(1, 2)).transpose(1, 2)
            elif kind == "conv_transpose":
                out = layer(h.transpose(1, 2))  # [N, D, T + 1]: every step is used
                h = (out[..., :-1] + out[..., 1:]).transpose(1, 2)
            elif kind == "tied":
                h = torch.tanh(self.shared(torch.tanh(self.shared(h))))
            else:
                h = layer(h)
        logits = self.head(h)  # [N, T, C]
        if self.loss == "ce_positions":
            return logits.transpose(1, 2)
        if self.loss == "ce_pooled":
            return logits.mean(1)
        return logits


def build(seed: int):
    rng = random.Random(seed)
    torch.manual_seed(seed)
    N, T, D, C = rng.randint(1, 3), rng.randint(1, 3), rng.randint(2, 3), rng.randint(2, 3)
    loss = rng.choice(LOSSES)
    model = RandomModel(rng, D, T, C, loss).train(rng.random() < 0.5)
    X = torch.randn(N, T, D)
    reduction = rng.choice(["mean", "sum"])
    if loss.startswith("ce"):
        y = torch.randint(0, C, (N,) if loss == "ce_pooled" else (N, T))
        loss_fn = nn.CrossEntropyLoss(reduction=reduction)
    elif loss == "mse":
        y, loss_fn = torch.randn(N, T, C), nn.MSELoss(reduction=reduction)
    else:
        y = torch.randint(0, 2, (N, T, C)).to(torch.get_default_dtype())
        loss_fn = nn.BCEWithLogitsLoss(reduction=reduction)
    return model, loss_fn, X, y


def loss_input(model: RandomModel, output: Tensor, y: Tensor):
    if model.loss == "ce_flat":
        return output.view(-1, output.shape[-1]), y.reshape(-1)
    return output, y


def check_seed(seed: int):
    model, loss_fn, X, y = build(seed)
    reference_loss = copy.deepcopy(loss_fn)
    model, loss_fn = extend(model), extend(loss_fn)
    params = [p for p in model.parameters() if p.requires_grad]
    output = model(X)
    reference = GraphReference(output, params, lambda f: reference_loss(*loss_input(model, f, y)))
    used = reference.J.abs().sum(0) > 0  # parameters the loss does not reach get nothing
    with backpack(GGNDiag(), BatchGGNDiag(), BatchGrad(), SqrtGGN()):
        loss_fn(*loss_input(model, output, y)).backward()
    reached = [p for p, u in zip(params, reference.split(used)) if u.any()]
    ggn = reference.ggn()
    message = f"seed {seed}: {model.kinds}, {model.loss}, {loss_fn.reduction}"
    for param, diag, batch_diag, grads, u in zip(
        params,
        reference.split(ggn.diagonal()),
        reference.split(reference.per_sample_ggn_diag()),
        reference.split(reference.per_sample_grads()),
        reference.split(used),
    ):
        if not u.any():
            continue
        assert_close(param.ggn_diag, diag, msg=f"{message}: ggn_diag")
        assert_close(param.batch_ggn_diag, batch_diag, msg=f"{message}: batch_ggn_diag")
        assert_close(param.grad_batch, grads, msg=f"{message}: grad_batch")
    if not reached:  # every ReLU dead (one sample, one step): nothing to compare
        assert not ggn.any(), message
        return
    sqrt = torch.cat([p.sqrt_ggn.reshape(-1, p.numel()) for p in reached], dim=1)
    rows = torch.cat([u.flatten().fill_(bool(u.any())) for u in reference.split(used)])
    assert_close(sqrt.T @ sqrt, ggn[rows][:, rows], msg=f"{message}: SqrtGGN")


@pytest.mark.parametrize(
    "first",
    range(0, len(SEEDS), SEEDS_PER_TEST),
    ids=lambda s: f"seeds{s}-{s + SEEDS_PER_TEST - 1}",
)
def test_random_models(first: int):
    for seed in range(first, first + SEEDS_PER_TEST):
        check_seed(seed)
