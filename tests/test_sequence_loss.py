"""The language-model loss: ``loss_fn(logits.view(-1, V), targets.view(-1))``.

The rows of one sequence are one sample (as positions are for cross-entropy
on ``[N, C, T]``). Every extension is compared with
:class:`tests.references.GraphReference` on the unflattened logits
``[N, T, V]`` with the flattened PyTorch loss as a function of them, so the
reference's per-sample quantities are per sequence; KFAC (expand) is
compared with curvlinops, which flattens ``[N, C, T]`` outputs the same way
internally; the operators with the dense GGN. A flatten whose rows are not
grouped by sequence (time-major) is refused.
"""

from __future__ import annotations

import copy

import pytest
import torch
from torch import Tensor, nn

from curvext import backpack, extend
from curvext.extensions import KFAC, BatchGGNDiag, BatchGrad, GGNDiag, GGNEigen, SqrtGGN
from curvext.operators import DiagonalOperator, GGNOperator, KronOperator
from tests.cases import assert_close
from tests.references import GraphReference, kfac_reference

V, D, T, N = 7, 4, 5, 3


class TinyLM(nn.Module):
    """Embedding, a residual pre-norm MLP block, causal attention, a head."""

    def __init__(self, linear_only: bool = False, attention: bool = True):
        super().__init__()
        self.attention = attention
        self.embed = nn.Embedding(V, D)
        self.norm = nn.LayerNorm(D)
        for frozen in (self.embed, self.norm) if linear_only else ():
            frozen.requires_grad_(False)
        self.mlp = nn.Linear(D, D)
        self.qkv = nn.Linear(D, 3 * D)
        self.head = nn.Linear(D, V)

    def forward(self, tokens: Tensor) -> Tensor:
        h = self.embed(tokens)
        h = h + torch.tanh(self.mlp(self.norm(h)))
        q, k, v = self.qkv(h).chunk(3, dim=-1)
        mask = torch.ones(T, T, dtype=torch.bool).tril()[: h.shape[1], : h.shape[1]]
        scores = (q @ k.transpose(1, 2)).masked_fill(~mask, float("-inf")).softmax(-1)
        return self.head(h + scores @ v if self.attention else h + v)  # [N, T, V]


def flat(logits: Tensor, y: Tensor):
    return logits.view(-1, V), y.reshape(-1)


def shifted(logits: Tensor, y: Tensor):
    return logits[:, :-1].contiguous().view(-1, V), y[:, 1:].reshape(-1)


def flat_dense(logits: Tensor, y: Tensor):
    return logits.reshape(-1, V), y.reshape(-1, V)


def time_major(logits: Tensor, y: Tensor):
    return logits.transpose(0, 1).reshape(-1, V), y.T.reshape(-1)


PATTERNS = {
    "cross_entropy_view": (flat, nn.CrossEntropyLoss, "classes"),
    "cross_entropy_shifted": (shifted, nn.CrossEntropyLoss, "classes"),
    "cross_entropy_sum_label_smoothing": (
        flat,
        lambda: nn.CrossEntropyLoss(reduction="sum", label_smoothing=0.1),
        "classes",
    ),
    "cross_entropy_ignore_index": (flat, lambda: nn.CrossEntropyLoss(ignore_index=2), "classes"),
    "mse": (flat_dense, nn.MSELoss, "real"),
    "bce": (flat_dense, nn.BCEWithLogitsLoss, "binary"),
    "bce_weight_per_row": (
        flat_dense,
        lambda: nn.BCEWithLogitsLoss(weight=torch.rand(N * T, 1), pos_weight=torch.rand(V) + 0.5),
        "binary",
    ),
}


def data(kind: str):
    tokens = torch.randint(0, V, (N, T))
    if kind == "classes":
        return tokens, torch.randint(0, V, (N, T))
    if kind == "real":
        return tokens, torch.randn(N, T, V)
    return tokens, torch.randint(0, 2, (N, T, V)).to(torch.get_default_dtype())


@pytest.mark.parametrize("pattern", PATTERNS, ids=str)
def test_flattened_loss_every_extension(pattern):
    flatten, make_loss, kind = PATTERNS[pattern]
    model, reference_loss = TinyLM(), make_loss()
    X, y = data(kind)
    model, loss_fn = extend(model), extend(copy.deepcopy(reference_loss))
    params = [p for p in model.parameters() if p.requires_grad]
    logits = model(X)
    reference = GraphReference(logits, params, lambda f: reference_loss(*flatten(f, y)))
    with backpack(GGNDiag(), BatchGGNDiag(), SqrtGGN(), BatchGrad(), GGNEigen(top_k=4)):
        loss_fn(*flatten(logits, y)).backward()
    ggn = reference.ggn()
    for param, diag, batch_diag, grads in zip(
        params,
        reference.split(ggn.diagonal()),
        reference.split(reference.per_sample_ggn_diag()),
        reference.split(reference.per_sample_grads()),
    ):
        assert param.grad_batch.shape[0] == N
        assert_close(param.ggn_diag, diag, msg="ggn_diag")
        assert_close(param.batch_ggn_diag, batch_diag, msg="batch_ggn_diag")
        assert_close(param.grad_batch, grads, msg="grad_batch")
    sqrt = torch.cat([p.sqrt_ggn.flatten(0, 1).flatten(1) for p in params], dim=1)
    assert_close(sqrt.T @ sqrt, ggn, msg="SqrtGGN")
    assert_close(params[0].ggn_eigvals, torch.linalg.eigvalsh(ggn).flip(0)[:4], rtol=1e-6)


def test_flattened_loss_mc_is_unbiased_per_position():
    """One MC column per sample samples every position: the average over many
    backward passes approaches the exact GGN diagonal (fixed seed; the
    tolerance is several standard errors of 4000 draws)."""
    model, loss_fn = extend(TinyLM()), extend(nn.CrossEntropyLoss())
    X, y = data("classes")
    logits = model(X)
    params = [p for p in model.parameters() if p.requires_grad]
    with backpack(GGNDiag()):
        loss_fn(*flat(logits, y)).backward(retain_graph=True)
    exact = torch.cat([p.ggn_diag.flatten() for p in params])
    with backpack(GGNDiag(mc_samples=4000)):
        loss_fn(*flat(logits, y)).backward()
    estimate = torch.cat([p.ggn_diag.flatten() for p in params])
    assert_close(estimate, exact, rtol=0.1, atol=0.02)


def test_time_major_flatten_is_refused():
    model, loss_fn = extend(TinyLM()), extend(nn.CrossEntropyLoss())
    X, y = data("classes")
    loss = loss_fn(*time_major(model(X), y))
    with pytest.raises(ValueError, match=r"not grouped by sample.*x.reshape\(-1, V\)"):
        with backpack(GGNDiag()):
            loss.backward()


class Flattened(nn.Module):
    """A model returning flattened logits ``[N·T, V]`` (nanoGPT's head)."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def forward(self, tokens: Tensor) -> Tensor:
        return self.model(tokens).view(-1, V)


class ClassesFirst(nn.Module):
    """The same logits as ``[N, V, T]``, the layout curvlinops flattens."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def forward(self, tokens: Tensor) -> Tensor:
        return self.model(tokens).transpose(1, 2)


def batches():
    return [data("classes") for _ in range(2)]


@pytest.mark.parametrize(
    "fisher_type, attention",
    [("empirical", True), ("type-2", False)],
    ids=["empirical_attention", "type-2_positionwise"],
)
def test_kfac_expand_matches_curvlinops(fisher_type, attention):
    """curvlinops flattens ``[N, C, T]`` to rows and backpropagates ``C``
    type-2 columns that each span all positions, so on a model that mixes
    positions its type-2 factor ``G`` also holds products of the loss-Hessian
    roots of *different* positions, which are not part of the GGN (its Hessian
    is block-diagonal over positions; the MC columns, independent per
    position, average them away). curvext keeps the exact per-position
    columns, so the two agree on type-2 where positions are not mixed, and
    on the empirical Fisher everywhere."""
    curvlinops = pytest.importorskip("curvlinops")
    model = TinyLM(linear_only=True, attention=attention)  # curvlinops: Linear only
    params = [p for p in model.parameters() if p.requires_grad]
    data_set = batches()
    flat_data = [(X, y.reshape(-1)) for X, y in data_set]
    K = KronOperator.from_data(
        Flattened(model), nn.CrossEntropyLoss(), flat_data, fisher_type=fisher_type
    )
    reference = curvlinops.KFACLinearOperator(
        ClassesFirst(model),
        nn.CrossEntropyLoss(),
        params,
        data_set,
        fisher_type=fisher_type,
        kfac_approx="expand",
        separate_weight_and_bias=True,
        check_deterministic=False,
    )
    identity = torch.eye(K.shape[0])
    torch.testing.assert_close(K.to_dense(), reference @ identity, rtol=1e-9, atol=1e-12)


@pytest.mark.parametrize("kfac_approx", ["expand", "reduce"])
@pytest.mark.parametrize("fisher_type", ["type-2", "empirical"])
def test_kfac_factors_match_the_dense_definition(fisher_type, kfac_approx):
    """With attention (positions mixed), every Linear layer's factors against
    the dense definition of tests/references.py (per-position loss Hessian)."""
    model = TinyLM()
    X, y = data("classes")
    extended, loss_fn = extend(Flattened(copy.deepcopy(model))), extend(nn.CrossEntropyLoss())
    with backpack(KFAC(fisher_type=fisher_type, kfac_approx=kfac_approx)):
        loss_fn(extended(X), y.reshape(-1)).backward()
    for name in ("mlp", "qkv", "head"):
        expected = kfac_reference(
            Flattened(model),
            nn.CrossEntropyLoss(),
            X,
            y.reshape(-1),
            getattr(model, name),
            fisher_type,
            kfac_approx,
        )
        layer = getattr(extended.model, name)
        for param_name, factors in expected.items():
            actual = getattr(layer, param_name).kfac
            for got, want in zip(actual, factors, strict=True):
                assert_close(got, want, msg=f"{name}.{param_name}")


def test_operators_on_the_flattened_loss():
    model = TinyLM()
    params = [p for p in model.parameters() if p.requires_grad]
    data_set = batches()
    flat_data = [(X, y.reshape(-1)) for X, y in data_set]
    dense = 0
    for X, y in data_set:
        logits = model(X)
        reference = GraphReference(
            logits, params, lambda f, y=y: nn.CrossEntropyLoss(reduction="sum")(*flat(f, y))
        )
        dense = dense + reference.ggn()
    dense = dense / (len(data_set) * N * T)  # "mean" over every token of the data set
    loss_fn = nn.CrossEntropyLoss()
    ggn = GGNOperator(Flattened(model), loss_fn, params, flat_data)
    assert_close(ggn @ torch.eye(dense.shape[0]), dense, rtol=1e-9)
    diagonal = DiagonalOperator.from_data(Flattened(model), loss_fn, flat_data)
    assert_close(diagonal.diag(), dense.diagonal(), rtol=1e-9)


class TimeMajorLM(nn.Module):
    """PyTorch's word_language_model layout: tokens ``[T, N]``, an LSTM with
    ``batch_first=False``, logits ``[T, N, V]`` flattened with ``view``."""

    def __init__(self):
        super().__init__()
        self.embed = nn.Embedding(V, D)
        self.rnn = nn.LSTM(D, D)
        self.decoder = nn.Linear(D, V)

    def forward(self, tokens: Tensor) -> Tensor:
        return self.decoder(self.rnn(self.embed(tokens))[0])


@pytest.mark.parametrize("steps", [N, N + 1], ids=["T_equals_N", "T_differs"])
def test_time_major_model_flattened_is_refused(steps):
    model, loss_fn = extend(TimeMajorLM()), extend(nn.CrossEntropyLoss())
    tokens, targets = torch.randint(0, V, (steps, N)), torch.randint(0, V, (steps, N))
    loss = loss_fn(model(tokens).view(-1, V), targets.view(-1))
    with pytest.raises(ValueError, match=r"LSTM\(batch_first=False\).*time-major"):
        with backpack(GGNDiag()):
            loss.backward()
