"""The zoo of models, losses and data every test file parametrizes over.

Every model returns the loss input directly (``loss_fn(model(X), y)``), is
small (dense ``[P, P]`` references stay cheap), float64, and exercises one or
more of the engine's known traps: in-place ops after a layer, residual
adds, weight tying, positions (``[N, T, D]`` inputs, convolutions, ``[N, C, T]``
cross-entropy), eval-mode normalisation, parameter-free code between layers.
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass, field
from typing import Callable

import torch
from torch import Tensor, nn

from tests.references import CONV_TRANSPOSE_TYPES, CONV_TYPES, DenseReference

NORM_TYPES = (
    nn.BatchNorm1d,
    nn.BatchNorm2d,
    nn.BatchNorm3d,
    nn.LayerNorm,
    nn.GroupNorm,
)
KRONECKER_TYPES = (nn.Linear, nn.Embedding) + CONV_TYPES + CONV_TRANSPOSE_TYPES

ATTRIBUTES = (
    "ggn_diag",
    "batch_ggn_diag",
    "sqrt_ggn",
    "kfac",
    "grad_batch",
    "batch_l2",
    "sum_grad_squared",
    "variance",
)


# ---------------------------------------------------------------------------
# Models
# ---------------------------------------------------------------------------
class ResidualCNN(nn.Module):
    """Conv2d (stride, groups) + BatchNorm2d (eval) + in-place ReLU + residual."""

    def __init__(self, classes: int = 3):
        super().__init__()
        self.stem = nn.Conv2d(3, 4, 3, padding=1)
        self.bn = nn.BatchNorm2d(4)
        self.block = nn.Conv2d(4, 4, 3, padding=1, groups=2)
        self.down = nn.Conv2d(4, 6, 3, stride=2)
        self.pool = nn.MaxPool2d(2)
        self.gap = nn.AdaptiveAvgPool2d(1)
        self.head = nn.Linear(6, classes)
        self.relu = nn.ReLU(inplace=True)

    def forward(self, x: Tensor) -> Tensor:
        h = self.relu(self.bn(self.stem(x)))
        h = h + torch.tanh(self.block(h))
        h = self.relu(self.down(h))  # in-place directly on a conv output
        h = self.gap(self.pool(h)).flatten(1)
        return self.head(h)


class SequenceModel(nn.Module):
    """Embedding → Linear on [N, T, D] → LayerNorm → Linear → [N, C, T]."""

    def __init__(self, vocab: int = 7, dim: int = 5, hidden: int = 6, classes: int = 4):
        super().__init__()
        self.embed = nn.Embedding(vocab, dim)
        self.proj = nn.Linear(dim, hidden)
        self.norm = nn.LayerNorm(hidden)
        self.out = nn.Linear(hidden, classes)

    def forward(self, x: Tensor) -> Tensor:
        h = torch.tanh(self.proj(self.embed(x)))
        return self.out(self.norm(h)).permute(0, 2, 1)


class TiedMLP(nn.Module):
    """The same Linear is called twice per forward."""

    def __init__(self):
        super().__init__()
        self.inp = nn.Linear(5, 4)
        self.shared = nn.Linear(4, 4)
        self.out = nn.Linear(4, 3)

    def forward(self, x: Tensor) -> Tensor:
        h = torch.tanh(self.inp(x))
        h = torch.tanh(self.shared(h))
        h = torch.sigmoid(self.shared(h))
        return self.out(h)


class ScaleShift(nn.Module):
    """A module curvext has no dedicated rule for (generic rule)."""

    def __init__(self, dim: int):
        super().__init__()
        self.scale = nn.Parameter(torch.randn(dim))
        self.shift = nn.Parameter(torch.randn(dim))
        self.temperature = nn.Parameter(torch.tensor(1.3))

    def forward(self, x: Tensor) -> Tensor:
        return torch.tanh(x * self.scale + self.shift) / self.temperature


class VectorScaleShift(nn.Module):
    """Like :class:`ScaleShift` without the 0-dim parameter."""

    def __init__(self, dim: int):
        super().__init__()
        self.scale = nn.Parameter(torch.randn(dim))
        self.shift = nn.Parameter(torch.randn(1, dim))

    def forward(self, x: Tensor) -> Tensor:
        return torch.tanh(x * self.scale + self.shift)


class AttentionBlock(nn.Module):
    """Single-head self-attention written with tensor ops, then a classifier."""

    def __init__(self, dim: int = 4, classes: int = 3):
        super().__init__()
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)
        self.norm = nn.LayerNorm(dim)
        self.head = nn.Linear(dim, classes)

    def forward(self, x: Tensor) -> Tensor:
        q, k, v = self.qkv(x).chunk(3, dim=-1)
        weights = torch.softmax(q @ k.transpose(-2, -1) / math.sqrt(q.shape[-1]), -1)
        h = x + self.proj(weights @ v)
        return self.head(self.norm(h).mean(1))


def randomize_norms(model: nn.Module) -> nn.Module:
    """Non-trivial affine parameters and running statistics, eval mode."""
    for module in model.modules():
        if isinstance(module, NORM_TYPES):
            if getattr(module, "weight", None) is not None:
                with torch.no_grad():
                    module.weight.copy_(1 + 0.5 * torch.randn_like(module.weight))
                    module.bias.copy_(0.5 * torch.randn_like(module.bias))
            if getattr(module, "running_mean", None) is not None:
                module.running_mean.copy_(0.3 * torch.randn_like(module.running_mean))
                module.running_var.copy_(0.5 + torch.rand_like(module.running_var))
    return model.eval()


# ---------------------------------------------------------------------------
# Cases
# ---------------------------------------------------------------------------
@dataclass(frozen=True)
class Case:
    """One model, loss and batch.

    Attributes:
        name: test id.
        make_model: builds the model (called under a fixed seed).
        make_loss: builds the loss function.
        make_data: ``batch_size -> (X, y)`` (called under a fixed seed).
        batch_size: default batch size.
        kfac_exact_n1: every parametrized layer is a Linear without shared
            positions, so type-2 KFAC is exact for a batch of one.
        tags: free-form labels (``"positions"``, ``"tied"``, ...).
        option: for a loss option curvext may refuse instead of supporting,
            a regex the refusal's message must match (the option's name).
    """

    name: str
    make_model: Callable[[], nn.Module]
    make_loss: Callable[[], nn.Module]
    make_data: Callable[[int], tuple[Tensor, Tensor]]
    batch_size: int = 4
    kfac_exact_n1: bool = False
    tags: frozenset = field(default_factory=frozenset)
    seed: int = 0
    option: str | None = None

    def build(self, batch_size: int | None = None):
        """Fresh ``(model, loss_fn, X, y)``, identical on every call.

        The global RNG state is left untouched.
        """
        batch_size = self.batch_size if batch_size is None else batch_size
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(self.seed)
            model = self.make_model()
            loss_fn = self.make_loss()
            torch.manual_seed(self.seed + 1000 + batch_size)
            X, y = self.make_data(batch_size)
        return model, loss_fn, X, y

    def __repr__(self) -> str:
        return self.name


def classification(shape, classes):
    def make(N):
        return torch.randn(N, *shape), torch.randint(0, classes, (N,))

    return make


def regression(in_shape, out_shape):
    def make(N):
        return torch.randn(N, *in_shape), torch.randn(N, *out_shape)

    return make


def binary(in_shape, out_shape):
    def make(N):
        return torch.randn(N, *in_shape), torch.randint(0, 2, (N, *out_shape)).double()

    return make


def mlp(out: int = 3) -> nn.Module:
    return nn.Sequential(
        nn.Linear(5, 6),
        nn.Sigmoid(),
        nn.Linear(6, 5),
        nn.Tanh(),
        nn.Linear(5, 4),
        nn.GELU(),
        nn.Linear(4, out),
    )


def sequence_data(N, T=5, vocab=7, classes=4):
    return torch.randint(0, vocab, (N, T)), torch.randint(0, classes, (N, T))


def conv1d_model():
    return randomize_norms(
        nn.Sequential(
            nn.Conv1d(2, 3, 3, padding="same", dilation=2, padding_mode="reflect"),
            nn.BatchNorm1d(3),
            nn.ReLU(),
            nn.Conv1d(3, 3, 2, stride=2, padding="valid"),
            nn.Tanh(),
            nn.Conv1d(3, 2, 3, padding=1, padding_mode="circular"),
            nn.Flatten(),
            nn.Linear(10, 3),
        )
    )


def conv3d_model():
    return randomize_norms(
        nn.Sequential(
            nn.Conv3d(2, 3, 3, padding="same", dilation=(1, 2, 1), padding_mode="replicate"),
            nn.BatchNorm3d(3),
            nn.ReLU(inplace=True),
            nn.Conv3d(3, 2, 2, stride=2, bias=False),
            nn.Flatten(),
            nn.Linear(24, 3),
        )
    )


def frozen_mlp():
    model = nn.Sequential(
        nn.Linear(5, 6),
        nn.Tanh(),
        nn.Linear(6, 4),
        nn.Sigmoid(),
        nn.Linear(4, 3),
    )
    model[0].requires_grad_(False)
    model[2].bias.requires_grad_(False)
    return model


CASES = [
    Case(
        "mlp_ce",
        mlp,
        nn.CrossEntropyLoss,
        classification((5,), 3),
        kfac_exact_n1=True,
    ),
    Case(
        "mlp_mse_sum",
        lambda: mlp(out=2),
        lambda: nn.MSELoss(reduction="sum"),
        regression((5,), (2,)),
        kfac_exact_n1=True,
    ),
    Case(
        "mlp_bce",
        mlp,
        nn.BCEWithLogitsLoss,
        binary((5,), (3,)),
        kfac_exact_n1=True,
    ),
    Case(
        "mlp_bce_pos_weight",
        mlp,
        lambda: nn.BCEWithLogitsLoss(pos_weight=torch.tensor([0.5, 2.0, 3.0])),
        binary((5,), (3,)),
        kfac_exact_n1=True,
        tags=frozenset({"pos_weight"}),
    ),
    Case(
        "mse_multidim",
        lambda: nn.Sequential(nn.Linear(4, 5), nn.Tanh(), nn.Linear(5, 2)),
        nn.MSELoss,
        regression((3, 4), (3, 2)),
        tags=frozenset({"positions"}),
    ),
    Case(
        "residual_cnn",
        lambda: randomize_norms(ResidualCNN()),
        nn.CrossEntropyLoss,
        classification((3, 9, 9), 3),
        batch_size=3,
        tags=frozenset({"positions", "inplace"}),
    ),
    Case(
        "sequence",
        lambda: randomize_norms(SequenceModel()),
        nn.CrossEntropyLoss,
        sequence_data,
        batch_size=3,
        tags=frozenset({"positions"}),
    ),
    Case(
        "tied",
        TiedMLP,
        nn.CrossEntropyLoss,
        classification((5,), 3),
        tags=frozenset({"tied"}),
    ),
    Case(
        "conv_transpose1d",
        lambda: nn.Sequential(
            nn.ConvTranspose1d(2, 3, 3, stride=2, padding=1, output_padding=1),
            nn.Tanh(),
            nn.Flatten(),
            nn.Linear(24, 3),
        ),
        nn.CrossEntropyLoss,
        classification((2, 4), 3),
        batch_size=3,
        tags=frozenset({"positions"}),
    ),
    Case(
        "conv_transpose2d",
        lambda: nn.Sequential(
            nn.ConvTranspose2d(4, 2, 3, stride=2, groups=2, dilation=1),
            nn.Sigmoid(),
            nn.Flatten(),
            nn.Linear(98, 2),
        ),
        nn.MSELoss,
        regression((4, 3, 3), (2,)),
        batch_size=3,
        tags=frozenset({"positions"}),
    ),
    Case(
        "conv_transpose3d",
        lambda: nn.Sequential(
            nn.ConvTranspose3d(2, 2, 2, stride=1, dilation=2, bias=True),
            nn.Sigmoid(),
        ),
        nn.MSELoss,
        regression((2, 2, 2, 2), (2, 4, 4, 4)),
        batch_size=2,
        tags=frozenset({"positions"}),
    ),
    Case(
        # one input position, four output positions: the weight's sides have
        # one position, the bias's (the output's) four
        "conv_transpose2d_one_input_position",
        lambda: nn.Sequential(
            nn.ConvTranspose2d(3, 2, 2),
            nn.Tanh(),
            nn.Flatten(),
            nn.Linear(8, 3),
        ),
        nn.CrossEntropyLoss,
        classification((3, 1, 1), 3),
        batch_size=5,
        tags=frozenset({"positions"}),
    ),
    Case(
        "conv1d_strings_reflect_circular",
        conv1d_model,
        nn.CrossEntropyLoss,
        classification((2, 10), 3),
        batch_size=3,
        tags=frozenset({"positions"}),
    ),
    Case(
        "conv3d_same_replicate",
        conv3d_model,
        nn.CrossEntropyLoss,
        classification((2, 4, 6, 4), 3),
        batch_size=2,
        tags=frozenset({"positions", "inplace"}),
    ),
    Case(
        "groupnorm_conv2d_same_reflect",
        lambda: randomize_norms(
            nn.Sequential(
                nn.Conv2d(2, 4, 3, padding="same", dilation=2, padding_mode="reflect"),
                nn.GroupNorm(2, 4),
                nn.ReLU(),
                nn.Conv2d(4, 2, 2, stride=2, padding="valid"),
                nn.Flatten(),
                nn.Linear(8, 3),
            )
        ),
        nn.CrossEntropyLoss,
        classification((2, 4, 4), 3),
        batch_size=3,
        tags=frozenset({"positions"}),
    ),
    Case(
        "linear_4d_input",
        lambda: nn.Sequential(nn.Linear(4, 3), nn.Tanh(), nn.Linear(3, 2)),
        lambda: nn.MSELoss(reduction="sum"),
        regression((2, 3, 4), (2, 3, 2)),
        batch_size=3,
        tags=frozenset({"positions"}),
    ),
    Case(
        "embedding_padding_idx",
        lambda: nn.Sequential(nn.Embedding(6, 3, padding_idx=0), nn.Flatten(), nn.Linear(12, 3)),
        nn.CrossEntropyLoss,
        lambda N: (
            torch.randint(0, 6, (N, 4)).index_fill_(1, torch.tensor([0]), 0),
            torch.randint(0, 3, (N,)),
        ),
        batch_size=3,
        tags=frozenset({"positions"}),
    ),
    Case(
        "batchnorm1d",
        lambda: randomize_norms(
            nn.Sequential(nn.Linear(5, 6), nn.BatchNorm1d(6), nn.Tanh(), nn.Linear(6, 3))
        ),
        lambda: nn.MSELoss(reduction="sum"),
        regression((5,), (3,)),
    ),
    Case(
        "custom_param",
        lambda: nn.Sequential(nn.Linear(5, 4), ScaleShift(4), nn.Linear(4, 3)),
        nn.CrossEntropyLoss,
        classification((5,), 3),
    ),
    Case(
        "custom_param_vectors",
        lambda: nn.Sequential(nn.Linear(5, 4), VectorScaleShift(4), nn.Linear(4, 3)),
        nn.CrossEntropyLoss,
        classification((5,), 3),
    ),
    Case(
        "frozen",
        frozen_mlp,
        nn.CrossEntropyLoss,
        classification((5,), 3),
        kfac_exact_n1=True,
        tags=frozenset({"frozen"}),
    ),
    Case(
        "attention",
        AttentionBlock,
        lambda: nn.CrossEntropyLoss(reduction="sum"),
        classification((3, 4), 3),
        batch_size=3,
        tags=frozenset({"positions"}),
    ),
]

# Convolutions whose every weight entry acts at a single position: with one
# sample, type-2 KFAC is exact for them (as for plain Linear layers).
SINGLE_POSITION_CASES = [
    Case(
        "single_position_convs",
        lambda: nn.Sequential(
            nn.Conv1d(2, 3, 3, padding="same", padding_mode="circular"),
            nn.Tanh(),
            nn.Unflatten(2, (1, 1, 1)),
            nn.Conv3d(3, 2, (1, 1, 3), padding=(0, 0, 1), padding_mode="replicate"),
            nn.Sigmoid(),
            nn.Flatten(),
            nn.Unflatten(1, (1, 2, 1)),
            nn.Conv2d(1, 3, (2, 1), padding=0),
            nn.Flatten(),
            nn.Linear(3, 3),
        ),
        nn.CrossEntropyLoss,
        classification((2, 1), 3),
        batch_size=1,
    ),
    Case(
        "single_pixel_conv_transpose",
        lambda: nn.Sequential(
            nn.ConvTranspose2d(2, 3, (2, 3), bias=False),
            nn.Tanh(),
            nn.Flatten(),
            nn.Linear(18, 3),
        ),
        lambda: nn.MSELoss(reduction="sum"),
        regression((2, 1, 1), (3,)),
        batch_size=1,
    ),
]


# ---------------------------------------------------------------------------
# Losses and their options, on small models
# ---------------------------------------------------------------------------
def logits_model(classes: int = 3) -> nn.Module:
    return nn.Sequential(nn.Linear(4, 5), nn.Tanh(), nn.Linear(5, classes))


def spatial_logits_model(classes: int = 3) -> nn.Module:
    """``[N, 2, H, W] -> [N, C, H, W]`` (segmentation-style cross-entropy)."""
    return nn.Sequential(nn.Conv2d(2, 4, 1), nn.Tanh(), nn.Conv2d(4, classes, 1))


def soft_targets(shape, class_dim: int = 1):
    def make(N):
        X = torch.randn(N, *shape[0])
        y = torch.softmax(2 * torch.randn(N, *shape[1]), dim=class_dim)
        return X, y

    return make


def with_ignored(make_data, ignore_index: int):
    """Targets that hit ``ignore_index`` at a few (not all) entries."""

    def make(N):
        X, y = make_data(N)
        y[y == ignore_index] = 2  # accidental hits become a valid class
        y.view(-1)[::3] = ignore_index
        return X, y

    return make


def spatial_classification(N, classes: int = 3):
    return torch.randn(N, 2, 2, 3), torch.randint(0, classes, (N, 2, 3))


def bce_soft(in_shape, out_shape):
    def make(N):
        return torch.randn(N, *in_shape), torch.rand(N, *out_shape)

    return make


CLASS_WEIGHT = (0.5, 2.0, 1.2)
PROBABILITIES = r"(?i)probabilit|soft|target"
LOSS_CASES = [
    Case("ce_mean", logits_model, nn.CrossEntropyLoss, classification((4,), 3), 5),
    Case(
        "ce_sum",
        logits_model,
        lambda: nn.CrossEntropyLoss(reduction="sum"),
        classification((4,), 3),
        5,
    ),
    Case(
        "ce_spatial_mean",
        spatial_logits_model,
        nn.CrossEntropyLoss,
        spatial_classification,
        3,
    ),
    Case(
        "ce_spatial_sum",
        spatial_logits_model,
        lambda: nn.CrossEntropyLoss(reduction="sum"),
        spatial_classification,
        3,
    ),
    Case(
        "ce_probability_targets",
        logits_model,
        nn.CrossEntropyLoss,
        soft_targets(((4,), (3,))),
        5,
        option=PROBABILITIES,
    ),
    Case(
        "ce_spatial_probability_targets",
        spatial_logits_model,
        lambda: nn.CrossEntropyLoss(reduction="sum"),
        soft_targets(((2, 2, 3), (3, 2, 3))),
        3,
        option=PROBABILITIES,
    ),
    Case(
        "ce_ignore_index_mean",
        logits_model,
        lambda: nn.CrossEntropyLoss(ignore_index=1),
        with_ignored(classification((4,), 3), 1),
        5,
        option="ignore_index",
    ),
    Case(
        "ce_spatial_ignore_index_sum",
        spatial_logits_model,
        lambda: nn.CrossEntropyLoss(ignore_index=-100, reduction="sum"),
        with_ignored(spatial_classification, -100),
        3,
        option="ignore_index",
    ),
    Case(
        "ce_label_smoothing",
        logits_model,
        lambda: nn.CrossEntropyLoss(label_smoothing=0.1),
        classification((4,), 3),
        5,
        option="label_smoothing",
    ),
    Case(
        "ce_class_weight_mean",
        logits_model,
        lambda: nn.CrossEntropyLoss(weight=torch.tensor(CLASS_WEIGHT)),
        classification((4,), 3),
        5,
        option="weight",
    ),
    Case(
        "ce_spatial_class_weight_mean",
        spatial_logits_model,
        lambda: nn.CrossEntropyLoss(weight=torch.tensor(CLASS_WEIGHT)),
        spatial_classification,
        3,
        option="weight",
    ),
    Case(
        "ce_class_weight_ignore_index",
        logits_model,
        lambda: nn.CrossEntropyLoss(weight=torch.tensor(CLASS_WEIGHT), ignore_index=0),
        with_ignored(classification((4,), 3), 0),
        5,
        option="weight|ignore_index",
    ),
    Case("mse_mean", lambda: logits_model(2), nn.MSELoss, regression((4,), (2,)), 5),
    Case(
        "mse_sum",
        lambda: logits_model(2),
        lambda: nn.MSELoss(reduction="sum"),
        regression((4,), (2,)),
        5,
    ),
    Case(
        "mse_spatial_mean",
        lambda: spatial_logits_model(2),
        nn.MSELoss,
        regression((2, 2, 3), (2, 2, 3)),
        3,
    ),
    Case("bce_mean", logits_model, nn.BCEWithLogitsLoss, binary((4,), (3,)), 5),
    Case(
        "bce_sum",
        logits_model,
        lambda: nn.BCEWithLogitsLoss(reduction="sum"),
        binary((4,), (3,)),
        5,
    ),
    Case(
        "bce_soft_targets",
        logits_model,
        nn.BCEWithLogitsLoss,
        bce_soft((4,), (3,)),
        5,
        option=PROBABILITIES,
    ),
    Case(
        "bce_pos_weight_mean",
        logits_model,
        lambda: nn.BCEWithLogitsLoss(pos_weight=torch.tensor([0.5, 2.0, 3.0])),
        binary((4,), (3,)),
        5,
        option="pos_weight",
    ),
    Case(
        "bce_pos_weight_spatial_sum",
        spatial_logits_model,
        lambda: nn.BCEWithLogitsLoss(
            pos_weight=torch.tensor([0.5, 2.0, 3.0]).reshape(3, 1, 1), reduction="sum"
        ),
        binary((2, 2, 3), (3, 2, 3)),
        3,
        option="pos_weight",
    ),
    Case(
        "bce_weight",
        logits_model,
        lambda: nn.BCEWithLogitsLoss(weight=torch.tensor([0.5, 2.0, 1.0])),
        binary((4,), (3,)),
        5,
        option="weight",
    ),
]
CASES_BY_NAME = {case.name: case for case in CASES + SINGLE_POSITION_CASES + LOSS_CASES}


# ---------------------------------------------------------------------------
# Running curvext and the references
# ---------------------------------------------------------------------------
def run_curvext(model, loss_fn, X, y, *extensions):
    """Extend, forward, ``backward`` under ``backpack(*extensions)``.

    Returns the extended model (the parameters carry the results).
    """
    from curvext import backpack, extend

    model, loss_fn = extend(model), extend(loss_fn)
    loss = loss_fn(model(X), y)
    with backpack(*extensions):
        loss.backward()
    return model


def run_case(case: Case, *extensions, batch_size: int | None = None):
    model, loss_fn, X, y = case.build(batch_size)
    return run_curvext(model, loss_fn, X, y, *extensions)


@functools.cache
def dense_reference(case_name: str, batch_size: int | None = None) -> DenseReference:
    """Dense reference of a zoo case (cached; never touches curvext)."""
    model, loss_fn, X, y = CASES_BY_NAME[case_name].build(batch_size)
    return DenseReference(model, loss_fn, X, y)


def trainable(model: nn.Module) -> dict[str, nn.Parameter]:
    return {n: p for n, p in model.named_parameters() if p.requires_grad}


def layer_groups(model):
    """One group per module that owns trainable parameters."""
    groups = []
    for module in model.modules():
        own = [p for p in module.parameters(recurse=False) if p.requires_grad]
        if own:
            groups.append({"params": own})
    return groups


def assert_close(actual: Tensor, expected: Tensor, rtol: float = 1e-7, atol: float = 1e-10, msg=""):
    """``torch.testing.assert_close`` with an ``atol`` relative to the scale."""
    assert actual.shape == expected.shape, (
        f"{msg}: shape {tuple(actual.shape)} != expected {tuple(expected.shape)}"
    )
    scale = expected.abs().max().item() if expected.numel() else 0.0
    torch.testing.assert_close(
        actual.to(expected.dtype),
        expected,
        rtol=rtol,
        atol=atol * max(1.0, scale),
        msg=lambda m: f"{msg}\n{m}",
    )


def calls_per_module(model: nn.Module, X: Tensor) -> dict[nn.Module, int]:
    """How often each submodule is called in ``model(X)``."""
    counts = {}

    def count(module, *_):
        counts[module] = counts.get(module, 0) + 1

    handles = [m.register_forward_hook(count) for m in model.modules()]
    try:
        with torch.no_grad():
            model(X)
    finally:
        for handle in handles:
            handle.remove()
    return counts


def kronecker_modules(case: Case) -> list[str]:
    """Modules with a Kronecker-factor reference: Linear, Conv, ConvTranspose
    (groups=1) and Embedding, called once, with a trainable parameter."""
    model, _, X, _ = case.build()
    counts = calls_per_module(model, X)
    names = []
    for name, module in model.named_modules():
        if not isinstance(module, KRONECKER_TYPES) or counts.get(module, 0) != 1:
            continue
        if getattr(module, "groups", 1) != 1:
            continue
        if getattr(module, "padding_idx", None) is not None:
            continue  # no agreed convention for padding positions (test_kfac)
        if not any(p.requires_grad for p in module.parameters(recurse=False)):
            continue
        names.append(name)
    return names
