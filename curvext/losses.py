r"""Loss functions: normalisation, Hessian square roots and MC samples.

For a loss :math:`L = c \sum_n \ell(f_n, y_n)` with :math:`c` what PyTorch
divides by (``reduction="mean"``) or 1 (``"sum"``), a *column* is a tensor
``s`` shaped like the loss input with :math:`\sum_k s_k s_k^\top = c\,\nabla^2_f
\sum_n \ell` (exact) or equal to it in expectation (MC, ``M`` samples, each
column scaled by :math:`1/\sqrt{M}`). Every column already carries
:math:`\sqrt{c}`.

Per-position losses (``CrossEntropyLoss`` on ``[N, C, d1, ...]``, ``MSELoss``
and ``BCEWithLogitsLoss`` on any shape) have a Hessian that is block-diagonal
over positions, so the exact square root has one column per output entry of
a sample (``C·d1·...`` for cross-entropy). Columns are generated lazily,
``exact_columns(start, stop)``, so they can be pushed through the network in
chunks.
"""

from __future__ import annotations

import math
from typing import Optional

import torch
from torch import Generator, Tensor, nn

SUPPORTED_LOSSES = (nn.MSELoss, nn.CrossEntropyLoss, nn.BCEWithLogitsLoss)


class LossRule:
    """Square roots and samples of one call of a loss module.

    Args:
        module: The loss module.
        loss_input: Model prediction ``[N, ...]`` (detached).
        target: The target passed to the loss.
    """

    def __init__(self, module: nn.Module, loss_input: Tensor, target: Tensor):
        self.module = module
        self.input = loss_input
        self.target = target
        self.name = type(module).__name__
        if module.reduction not in ("mean", "sum"):
            raise ValueError(
                f"{self.name}(reduction={module.reduction!r}) is not supported by "
                "curvext: curvature needs a scalar loss. Use reduction='mean' or "
                "'sum' and scale the loss yourself if you need another weighting."
            )
        if loss_input.dim() < 1 or (
            isinstance(module, nn.CrossEntropyLoss) and loss_input.dim() < 2
        ):
            raise ValueError(
                f"{self.name} got an input of shape {tuple(loss_input.shape)} "
                "without a batch dimension. curvext needs inputs shaped [N, ...]; "
                "add one with input.unsqueeze(0)."
            )
        if loss_input.shape[0] == 0:
            raise ValueError(
                f"{self.name} got an empty batch (input of shape "
                f"{tuple(loss_input.shape)}); curvature of zero samples is not "
                "defined. Skip empty batches before the forward pass."
            )
        if (
            isinstance(target, Tensor)
            and target.is_floating_point()
            and not bool(torch.isfinite(target).all())
        ):
            raise ValueError(
                f"The target of {self.name} contains NaN or Inf values; the loss "
                "Hessian (and so every curvature) would be NaN. Clean the targets, "
                "or mask those entries out of the batch."
            )
        # one sum is finite if every entry is (it can overflow only for
        # logits near the dtype's largest value: then the entries are checked)
        if not math.isfinite(loss_input.sum()) and not torch.isfinite(loss_input).all():
            raise ValueError(
                f"The input of {self.name} contains NaN or Inf values; curvext "
                "cannot compute curvature from it. Check the model output "
                "(learning rate, initialisation, data) before the loss."
            )

    @property
    def batch_size(self) -> int:
        return self.input.shape[0]

    @property
    def num_exact_columns(self) -> int:
        """Number of columns of the exact square root (per sample)."""
        raise NotImplementedError

    def exact_columns(self, start: int, stop: int) -> Tensor:
        """Columns ``start:stop`` of the exact square root, ``[k, *input.shape]``."""
        raise NotImplementedError

    def mc_columns(self, mc_samples: int, generator: Generator) -> Tensor:
        """``mc_samples`` MC columns ``[M, *input.shape]`` (scaled by ``1/√M``)."""
        raise NotImplementedError

    @property
    def normalization(self) -> float:
        """The factor ``c`` that PyTorch multiplies the summed loss with."""
        raise NotImplementedError


def _unit_columns(scale: Tensor, start: int, stop: int) -> Tensor:
    """Columns ``start:stop`` of ``diag(scale)`` per sample, for ``scale [N, D]``.

    Returns ``[stop - start, N, D]`` where column ``j`` is ``scale[:, j] e_j``.
    """
    num_cols = stop - start
    columns = scale.new_zeros(num_cols, *scale.shape)
    cols = torch.arange(start, stop, device=scale.device)
    columns[torch.arange(num_cols, device=scale.device), :, cols] = scale[:, cols].T
    return columns


def sample_categorical(prob: Tensor, num_samples: int, generator: Generator) -> Tensor:
    r"""``num_samples`` labels per row of ``prob [R, C]`` (rows of class
    probabilities), ``[num_samples, R]``, by inverse transform: the first class
    whose cumulative probability exceeds :math:`u \sum_c p_c`,
    :math:`u \sim U[0, 1)` (at least float32, also under autocast). Classes of
    probability 0 are never drawn (up to rounding at the last boundary, as in
    any sampler), and only the first ``C - 1`` boundaries are searched, so a
    label is always a class. One uniform draw and a binary search per label:
    on CPU about 7 µs for ``[128, 10]``, where ``torch.multinomial`` takes 50.
    """
    dtype = torch.promote_types(prob.dtype, torch.float32)
    cumulative = prob.to(dtype).cumsum(-1)  # [R, C]
    uniform = torch.rand(
        prob.shape[0], num_samples, generator=generator, dtype=dtype, device=prob.device
    )
    uniform.mul_(cumulative[:, -1:])
    return torch.searchsorted(cumulative[:, :-1].contiguous(), uniform, right=True).T


class _EntrywiseLossRule(LossRule):
    """A loss that is a sum over entries of the input, each with its own
    scalar Hessian: one exact column per entry of a sample."""

    def __init__(self, module, loss_input, target):
        super().__init__(module, loss_input, target)
        if target.shape != loss_input.shape:
            raise ValueError(
                f"{self.name} got input {tuple(loss_input.shape)} and target "
                f"{tuple(target.shape)}. curvext needs equal shapes (PyTorch would "
                "broadcast); expand the target to the input's shape."
            )

    @property
    def normalization(self) -> float:
        return 1.0 / self.input.numel() if self.module.reduction == "mean" else 1.0

    @property
    def num_exact_columns(self) -> int:
        return self.input[0].numel()

    def entry_hessian(self) -> Tensor:
        """Hessian of the summed loss w.r.t. each input entry, shaped like it."""
        raise NotImplementedError

    def exact_columns(self, start, stop):
        # [N, entries per sample]; a 1-D input [N] has one entry per sample
        scale = (self.normalization * self.entry_hessian()).reshape(self.batch_size, -1).sqrt()
        return _unit_columns(scale, start, stop).reshape(-1, *self.input.shape)


class MSELossRule(_EntrywiseLossRule):
    r""":math:`\ell = \sum_d (f_d - y_d)^2`, Hessian :math:`2I`."""

    def entry_hessian(self):
        return torch.full_like(self.input, 2.0)

    def mc_columns(self, mc_samples, generator):
        noise = torch.randn(
            mc_samples,
            *self.input.shape,
            generator=generator,
            device=self.input.device,
            dtype=self.input.dtype,
        )
        return noise.mul_(math.sqrt(2 * self.normalization / mc_samples))


class BCEWithLogitsLossRule(_EntrywiseLossRule):
    r""":math:`\ell = -w[p_w y \log\sigma(f) + (1-y)\log(1-\sigma(f))]` per entry.

    Hessian per entry :math:`w (p_w y + 1 - y)\,\sigma(1-\sigma)` (``w`` the
    ``weight``, :math:`p_w` the ``pos_weight``, both default 1).
    """

    def __init__(self, module, loss_input, target, weight: Optional[Tensor] = None):
        super().__init__(module, loss_input, target)
        target = target.to(loss_input.dtype)
        # ``weight``: the module's weight, or one broadcast already (see
        # SequenceLossRule: a per-row weight of a flattened input)
        weight = module.weight if weight is None else weight
        self.label_weight = torch.ones_like(loss_input)
        if weight is not None:
            self.label_weight = self.label_weight * weight
        if module.pos_weight is not None:
            self.label_weight = self.label_weight * (module.pos_weight * target + 1 - target)
        self.prob = torch.sigmoid(loss_input)

    def entry_hessian(self):
        return self.label_weight * self.prob * (1 - self.prob)

    def mc_columns(self, mc_samples, generator):
        probs = self.prob.expand(mc_samples, *self.prob.shape)
        labels = torch.bernoulli(probs, generator=generator)
        scale = (self.normalization * self.label_weight / mc_samples).sqrt()
        return (probs - labels).mul_(scale)


class CrossEntropyLossRule(LossRule):
    r"""Softmax cross-entropy over dim 1 of ``[N, C, d1, ...]``.

    At every position the Hessian is :math:`\beta (\mathrm{diag}(p) - pp^\top)`
    with :math:`p` the softmax and :math:`\beta` the weight of that position:
    the class weight of the target (0 at ``ignore_index``), mixed with the
    mean class weight under label smoothing, or
    :math:`\sum_c w_c y'_c` for probability targets :math:`y'` (smoothed).
    Exact square root per position: ``C - 1`` columns (see :meth:`_root_values`).
    """

    def __init__(self, module, loss_input, target):
        super().__init__(module, loss_input, target)
        num_classes = loss_input.shape[1]
        smoothing = module.label_smoothing
        weight = module.weight
        if target.is_floating_point():
            if target.shape != loss_input.shape:
                raise ValueError(
                    f"CrossEntropyLoss got probability targets of shape "
                    f"{tuple(target.shape)} for input {tuple(loss_input.shape)}; "
                    "they must have the input's shape."
                )
            target = target.to(loss_input.dtype)
            if smoothing > 0:
                target = (1 - smoothing) * target + smoothing / num_classes
            shape = [1, num_classes] + [1] * (loss_input.dim() - 2)
            weighted = target if weight is None else target * weight.view(shape)
            self._position_weight = weighted.sum(1)
            self.denominator = float(target.shape[0] * target[0, 0].numel())
        else:
            expected = (loss_input.shape[0],) + tuple(loss_input.shape[2:])
            if tuple(target.shape) != expected:
                raise ValueError(
                    f"CrossEntropyLoss got class-index targets of shape "
                    f"{tuple(target.shape)} for input {tuple(loss_input.shape)}; "
                    f"expected {expected}."
                )
            valid = target != module.ignore_index
            if weight is None:
                # every class weighs 1: the mask is the weight, and its count
                # (a sum of booleans, exact in any dtype) the denominator
                self.denominator = float(valid.sum())
                if self.denominator < valid.numel():
                    self._position_weight = valid.to(loss_input.dtype)
                # else every position weighs 1, with or without smoothing
                # (1 - s + s * mean(w) = 1): no weight tensor at all
            else:
                target_weight = weight[torch.where(valid, target, 0)] * valid
                # summed in float32 or wider: under autocast the weights may be
                # bfloat16, whose sum of 967 ones is 968
                self.denominator = float(
                    target_weight.sum(dtype=torch.promote_types(target_weight.dtype, torch.float32))
                )
                if smoothing > 0:
                    # the smoothing term sum_c w_c (-log p_c) / C has Hessian
                    # mean(w) (diag(p) - pp^T) at every non-ignored position
                    smoothed = smoothing * weight.mean() * valid
                    target_weight = (1 - smoothing) * target_weight + smoothed
                self._position_weight = target_weight
        self.prob = loss_input.softmax(1)

    #: :attr:`position_weight` when some position weighs other than 1 (else
    #: ``None``: the common case, scaled by a number instead of a tensor).
    _position_weight: Optional[Tensor] = None

    @property
    def position_weight(self) -> Tensor:
        r""":math:`\beta` of every position, ``[N, d1, ...]``."""
        if self._position_weight is None:
            return self.input.new_ones(self.input.shape[0], *self.input.shape[2:])
        return self._position_weight

    @property
    def normalization(self) -> float:
        if self.module.reduction == "sum":
            return 1.0
        return 1.0 / self.denominator if self.denominator > 0 else 0.0

    @property
    def num_exact_columns(self) -> int:
        return self._roots_per_position * self.input[0, 0].numel()

    @property
    def _roots_per_position(self) -> int:
        r"""``C - 1``: :math:`\mathrm{diag}(p) - pp^\top` has rank ``C - 1``."""
        return max(self.input.shape[1] - 1, 1)

    def _root_values(self, prob: Tensor, classes: Tensor) -> Tensor:
        r"""Columns ``classes`` of a rank-``(C-1)`` root of
        :math:`\mathrm{diag}(p) - pp^\top`, for ``prob [k, N, C]``.

        The ``C`` columns :math:`s_c = \sqrt{p_c}(e_c - p)` are linearly
        dependent (:math:`\sum_c \sqrt{p_c} s_c = 0`). Reflecting them with
        the Householder matrix that maps :math:`\sqrt{p}` to :math:`-e_C`
        makes the last one zero; the others are
        :math:`\sqrt{p_j}\,(e_j - p - \alpha (e_C - p))`,
        :math:`\alpha = \sqrt{p_C} / (1 + \sqrt{p_C})`, ``j < C``. One column
        fewer per position means one backward column fewer.
        """
        num_classes = prob.shape[-1]
        root_prob = prob.gather(2, classes.view(-1, 1, 1).expand(-1, prob.shape[1], 1)).sqrt()
        if num_classes == 1:
            return prob - 1  # the Hessian is zero
        root_last = prob[..., -1:].sqrt()
        alpha = root_last / (1 + root_last)
        unit = torch.nn.functional.one_hot(classes, num_classes).to(prob.dtype)[:, None, :]
        values = unit + (alpha - 1) * prob
        values[..., -1:] -= alpha
        return values * root_prob

    def exact_columns(self, start, stop):
        roots = self._roots_per_position
        prob = self.prob.reshape(*self.prob.shape[:2], -1)  # [N, C, T]
        if prob.shape[-1] == 1 and prob.shape[1] > 1:
            if self._position_weight is None:
                scale = math.sqrt(self.normalization)
            else:
                scale = (self.normalization * self._position_weight.reshape(-1, 1)).sqrt()
            return self._single_position_columns(prob[..., 0], scale, start, stop)
        scale = (self.normalization * self.position_weight.reshape(prob.shape[0], -1)).sqrt()
        index = torch.arange(start, stop, device=prob.device)
        positions, classes = index // roots, index % roots
        values = self._root_values(prob[:, :, positions].permute(2, 0, 1), classes)
        values = values * scale[:, positions].T[:, :, None]
        if prob.shape[-1] == 1:
            return values.reshape(-1, *self.input.shape)
        columns = prob.new_zeros(stop - start, *prob.shape)
        # values may be wider than prob (float32 class weights, bfloat16 logits)
        columns[torch.arange(stop - start, device=prob.device), :, :, positions] = values.to(
            prob.dtype
        )
        return columns.reshape(-1, *self.input.shape)

    def _single_position_columns(self, prob: Tensor, scale, start: int, stop: int):
        """:meth:`exact_columns` for inputs ``[N, C]``, ``C > 1``: the columns
        of :meth:`_root_values` straight from ``prob [N, C]`` (a fifth of the
        general path's time on a ``[128, 10]`` input: no position indexing)."""
        root_last = prob[:, -1:].sqrt()
        alpha = root_last / (1 + root_last)  # [N, 1]
        shared = (alpha - 1) * prob  # e_j - p - α(e_C - p) without its e_j
        shared[:, -1:] -= alpha
        unit = torch.eye(prob.shape[1], dtype=prob.dtype, device=prob.device)[start:stop]
        values = shared + unit[:, None, :]  # [k, N, C]
        # scale: a number, or [N, 1] when positions weigh differently
        values.mul_((prob[:, start:stop].sqrt() * scale).T[:, :, None])
        return values.reshape(-1, *self.input.shape)

    def mc_columns(self, mc_samples, generator):
        num_classes = self.input.shape[1]
        prob = self.prob.movedim(1, -1).reshape(-1, num_classes)
        labels = sample_categorical(prob, mc_samples, generator)
        # p - e_label per sample: p copied (an explicit clone: contiguous() of
        # the expanded p is p itself for M = 1), then 1 taken at the drawn class
        columns = prob.expand(mc_samples, *prob.shape).clone(memory_format=torch.contiguous_format)
        columns.scatter_(2, labels.unsqueeze(-1), -1.0, reduce="add")  # [M, N*T, C]
        scale = self.normalization / mc_samples
        if self._position_weight is None:
            columns.mul_(math.sqrt(scale))
        else:
            columns.mul_((scale * self._position_weight.reshape(-1, 1)).sqrt())
        moved_shape = (mc_samples, self.input.shape[0], *self.input.shape[2:], num_classes)
        return columns.reshape(moved_shape).movedim(-1, 2)


class SequenceLossRule(LossRule):
    """A loss on rows ``[N·T, ...]`` that are the ``T`` positions of each of
    ``N`` samples, flattened sample-major (``logits.view(-1, V)``).

    The rows of one sample are one sample, as positions are for
    ``CrossEntropyLoss`` on ``[N, C, T]``: the rule of the loss runs on the
    unflattened input (``[N, C, ..., T]`` for cross-entropy, whose classes
    stay on axis 1; ``[N, T, ...]`` for entrywise losses), whose Hessian is
    block-diagonal over positions, and its columns are flattened back. The
    normalisation is PyTorch's on the flattened call (the same sum).

    Args:
        rule_class: The rule of the loss module.
        module: The loss module.
        loss_input: The flattened prediction ``[N·T, ...]``.
        target: The flattened target.
        num_samples: ``N``.
    """

    def __init__(self, rule_class, module, loss_input, target, num_samples: int):
        self.module, self.name = module, type(module).__name__
        self.input, self.target = loss_input, target
        self.num_samples = num_samples
        self._classes_first = isinstance(module, nn.CrossEntropyLoss)
        options = {}
        if isinstance(module, nn.BCEWithLogitsLoss) and module.weight is not None:
            # a weight may broadcast over the flattened rows ([N·T, 1]): expand
            # it there, then unflatten it with the input
            options["weight"] = self._unflatten(torch.ones_like(loss_input) * module.weight)
        self.inner = rule_class(
            module, self._unflatten(loss_input), self._unflatten(target), **options
        )

    def _unflatten(self, tensor: Tensor) -> Tensor:
        """``[N·T, ...]`` → ``[N, T, ...]``, or ``[N, ..., T]`` for cross-entropy."""
        tensor = tensor.reshape(self.num_samples, -1, *tensor.shape[1:])
        return tensor.movedim(1, -1) if self._classes_first else tensor

    def _flatten(self, columns: Tensor) -> Tensor:
        """Columns ``[K, *unflattened]`` → ``[K, *loss_input.shape]``."""
        if self._classes_first:
            columns = columns.movedim(-1, 2)
        return columns.reshape(columns.shape[0], *self.input.shape)

    @property
    def batch_size(self) -> int:
        return self.num_samples

    @property
    def normalization(self) -> float:
        return self.inner.normalization

    @property
    def num_exact_columns(self) -> int:
        return self.inner.num_exact_columns

    def exact_columns(self, start, stop):
        return self._flatten(self.inner.exact_columns(start, stop))

    def mc_columns(self, mc_samples, generator):
        return self._flatten(self.inner.mc_columns(mc_samples, generator))


_RULES = {
    nn.MSELoss: MSELossRule,
    nn.CrossEntropyLoss: CrossEntropyLossRule,
    nn.BCEWithLogitsLoss: BCEWithLogitsLossRule,
}


def loss_rule(
    module: nn.Module,
    loss_input: Tensor,
    target: Optional[Tensor],
    num_samples: Optional[int] = None,
) -> LossRule:
    """The :class:`LossRule` for one call of ``module``.

    ``num_samples``: for a loss input whose rows are the positions of that
    many samples, flattened sample-major (:class:`SequenceLossRule`).
    """
    rule_class = _RULES.get(type(module))
    if rule_class is None:
        supported = ", ".join(cls.__name__ for cls in SUPPORTED_LOSSES)
        raise NotImplementedError(
            f"curvext does not support the loss {type(module).__name__}. Supported: {supported}."
        )
    if num_samples is not None:
        return SequenceLossRule(rule_class, module, loss_input, target, num_samples)
    return rule_class(module, loss_input, target)
