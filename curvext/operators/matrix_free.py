r"""Matrix-free Hessian, GGN (or MC Fisher) and empirical Fisher of a whole data set.

These operators store nothing but references to ``model``, ``loss_fn``,
``params`` and ``data``: every product ``A @ V`` is one pass over ``data``,
one batch at a time, so all ``M`` columns of ``V`` ``[P, M]`` share each
batch's pass. The Hessian is reverse-over-reverse with :mod:`torch.autograd`
(the batch gradient with its graph, then its vector-Jacobian product with
the columns, batched). The GGN ``Jᵀ H J V`` is :mod:`torch.func` ``jvp`` and
``vjp`` ``vmap``-ed over the columns, pulled back in chunks of
:data:`_PULLBACK_CHUNK_COLUMNS`, with the loss Hessian applied in output
space through the loss rule's square root; one column at a time (a single
vector, or every column of a model with convolutions, chunks of
:data:`_CONV_CHUNK_COLUMNS`) it takes ``J v`` and the graph for ``Jᵀ`` from
one dual-number forward pass. No graph outlives its batch.

**Normalisation.** A loss with ``reduction="mean"`` is :math:`L = c\sum_n
\ell_n` with :math:`c = 1/d`, :math:`d` its denominator (the number of
entries for ``MSELoss``/``BCEWithLogitsLoss``, the summed class weights of the
non-ignored targets for ``CrossEntropyLoss``), ``"sum"`` has :math:`c = 1`.
The loss of batch :math:`b` carries its own :math:`c_b = 1/d_b`, so a batch
product :math:`A_b V` (the curvature of the batch loss) is :math:`c_b` times
a sum over the batch. Over the whole set, with :math:`d = \sum_b d_b`,

.. math::
    A V = c \sum_b \frac{A_b V}{c_b}
        = \frac{\sum_b d_b\, A_b V}{\sum_b d_b}\quad(\text{mean}),\qquad
    A V = \sum_b A_b V\quad(\text{sum}),

i.e. each batch is rescaled by its own denominator and the sum divided by the
data set's: the result is that of one batch holding the whole data set, for
any batch sizes (a plain mean over batches would be wrong for unequal ones).
A batch whose targets are all ignored has :math:`d_b = 0` and contributes
nothing. Batch products are computed with ``loss_fn`` as given; :math:`d_b`
comes from :func:`curvext.losses.loss_rule` (``MSELoss``,
``CrossEntropyLoss``, ``BCEWithLogitsLoss``).

**Determinism.** The products are those of *one* matrix only if every pass
over ``data`` sees the same function of the parameters. With
``check_deterministic=True`` (default) the constructor multiplies a random
``[P, 2]`` matrix twice, in two passes over ``data``, and raises if the results
differ (dropout or other randomness in ``model``, BatchNorm in train mode
with changing batches, random augmentation or a different number of batches
per pass). This also catches an empty ``data`` and a one-shot generator.

**Sharded data.** Inside an initialised :mod:`torch.distributed` process
group (``distributed=None``, the default, or ``True``/a group), ``data`` is
this rank's shard of the data set: each rank sums :math:`d_b A_b V`,
:math:`\sum_b d_b` and its counts over its own batches, and one
``all_reduce`` per product adds them up, so every rank gets the product over
the whole data set (``num_data`` is then the whole set's size; a rank may
have no batch at all). The matrix multiplied and the parameters must be the
same on every rank, which the same collective checks (:mod:`curvext.distributed`);
estimators built on the operator therefore need the same probes on every
rank: seed every rank alike.
"""

from __future__ import annotations

import copy
from functools import reduce
from typing import Iterable, List, Optional, Sequence, Tuple

import torch
from torch import Tensor, nn
from torch.autograd import forward_ad
from torch.func import functional_call, grad, jvp, vjp, vmap

from curvext.distributed import resolve_ranks
from curvext.losses import LossRule, loss_rule
from curvext.operators.base import CurvatureOperator, check_damping
from curvext.operators.passes import DataPass, check_deterministic
from curvext.rules import constant_rows, is_convolution, updates_state
from curvext.torch_quirks import load_forward_ad_quietly

#: Columns per ``vmap`` of the GGN's pull-back ``J^T``: the batch product of
#: all ``M`` columns is as large as the result; in chunks of 4 only a quarter of
#: it is alive (MLP of the benchmarks, ``[P, 16]``: 22 -> 12 MB per batch, no
#: slower on CPU).
_PULLBACK_CHUNK_COLUMNS = 4
#: Columns per ``vmap`` of the whole GGN batch product for models with
#: convolutions: ``vmap`` over many columns of a convolution's ``jvp``/``vjp``
#: is slower than one column at a time, and holds the batch's activation
#: tangents of every column (CNN of the benchmarks, CPU, one batch of 128: 16
#: columns at once about 810-920 ms, in chunks of 4 375-460 ms, one at a time
#: 490-500 ms; peak over 3 batches 184 MB in chunks of 4, 58 MB one at a time;
#: 2 columns: 248 ms and 97 MB at once, 222 ms and 64 MB one at a time).
_CONV_CHUNK_COLUMNS = 1
#: Largest ``K · N · D`` (loss-Hessian square-root columns times output
#: entries) for which the exact GGN applies the loss Hessian in output space
#: through the loss rule's square root ``S`` (``H u = S (Sᵀ u)``, two small
#: products) rather than ``vmap(grad(jvp))`` of the loss, whose transform
#: overhead was 1.0 ms per product on a ``[128, 10]`` cross-entropy output
#: against 0.04 ms (CPU), a quarter of the benchmark MLP's batch product.
#: Larger square roots (sequence outputs, wide MSE outputs) go through
#: ``torch.func``, which needs no ``[K, N, D]`` tensor.
_LOSS_ROOT_ELEMENTS = 2**22


def padding_rows(model, params: Sequence[Tensor]) -> List[Tuple[int, int]]:
    """``(index in params, row)`` of every ``Embedding(padding_idx=...)`` row.

    PyTorch's backward treats that row as a constant (its gradient is zero
    whatever the input), but forward-mode AD differentiates the lookup like
    any other row, so ``J v`` would see a tangent that ``Jᵀ`` never returns.
    The data-set operators and the Jacobian operators follow the backward's
    convention, as the engine's extensions do: the row's entries of every
    vector are zeroed before a product (:func:`zero_padding_rows`) and of
    every result after it (zero rows and columns).
    """
    if not isinstance(model, nn.Module):  # a function of (params, X): nothing to know
        return []
    index_of = {id(p): index for index, p in enumerate(params)}
    return [
        (index_of[id(param)], row)
        for module in model.modules()
        for param, row in constant_rows(module)
        if id(param) in index_of
    ]


def zero_padding_rows(
    tangents: Tuple[Tensor, ...], rows: List[Tuple[int, int]]
) -> Tuple[Tensor, ...]:
    """``tangents`` (one ``[M, *p.shape]`` per parameter) with the rows of
    :func:`padding_rows` zeroed, in copies of the tensors concerned (never the
    caller's)."""
    if not rows:
        return tangents
    tangents = list(tangents)
    for index, row in rows:
        tangents[index] = tangents[index].clone()
        tangents[index][:, row] = 0
    return tuple(tangents)


def parameter_names(model: nn.Module, params: Sequence[Tensor], owner: str) -> List[str]:
    """The names of ``params`` in ``model.named_parameters()``; a tensor that
    is not a parameter of ``model`` is refused, naming its position and shape."""
    name_of = {id(p): name for name, p in model.named_parameters()}
    missing = [i for i, p in enumerate(params) if id(p) not in name_of]
    if missing:
        raise ValueError(
            f"{owner}: params {missing} (shapes "
            f"{[tuple(params[i].shape) for i in missing]}) are not parameters of "
            f"model; pass tensors from model.parameters()."
        )
    return [name_of[id(p)] for p in params]


class _DataSetOperator(CurvatureOperator):
    """A curvature matrix of ``loss_fn(model(X), y)`` summed over ``data`` (see module docstring).

    Subclasses implement :meth:`_batch_product`. Arithmetic (``op + δ``,
    ``c * op``, ``op1 + op2`` over the same parameters) is kept lazily: a
    product evaluates every summand.
    """

    def __init__(
        self,
        model: nn.Module,
        loss_fn: nn.Module,
        params: Sequence[Tensor],
        data: Iterable,
        check_deterministic: bool = True,
        num_data: Optional[int] = None,
        progressbar: bool = False,
        distributed=None,
    ):
        owner = type(self).__name__
        params = list(params)
        if not params or not all(isinstance(p, Tensor) for p in params):
            raise ValueError(
                f"{owner}: params must be a non-empty list of tensors (parameters "
                f"of model), e.g. list(model.parameters())."
            )
        names = parameter_names(model, params, owner)
        reduction = getattr(loss_fn, "reduction", None)
        if reduction not in ("mean", "sum"):
            raise ValueError(
                f"{owner}: loss_fn={type(loss_fn).__name__}(reduction={reduction!r}); "
                f"curvature over a data set needs reduction='mean' or 'sum'."
            )
        if num_data is not None and (
            isinstance(num_data, bool) or not isinstance(num_data, int) or num_data < 1
        ):
            raise ValueError(f"{owner}: num_data must be a positive int, got {num_data!r}.")
        super().__init__(params, params[0].dtype, params[0].device)
        self.model, self.loss_fn, self.data = model, loss_fn, data
        self.num_data, self.progressbar = num_data, progressbar
        resolve_ranks(distributed, owner)  # reject a wrong value here, not in a product
        self.distributed = distributed
        self._names = names
        self._constant_rows = padding_rows(model, params)
        # with a convolution the Hessian and the GGN take the columns one at a
        # time (or in chunks of _CONV_CHUNK_COLUMNS): see the constants
        self._convolutional = any(is_convolution(m) for m in model.modules())
        self._factor, self._shift, self._summands = 1.0, 0.0, ()
        load_forward_ad_quietly()
        self._check_independent_samples()
        if check_deterministic:
            self._check_deterministic()

    def _check_independent_samples(self) -> None:
        """Refuse BatchNorm that updates running statistics (train mode): every
        product would change them. (A BatchNorm without running statistics
        couples the samples of a batch too, but changes nothing, and the
        curvature of the batched loss is still defined.)"""
        for module in self.model.modules():
            if updates_state(module):
                raise ValueError(
                    f"{type(self).__name__}: {module} is in train mode, so every product "
                    "would update its running statistics (and normalise with batch "
                    "statistics, coupling the samples). Call model.eval() (BatchNorm "
                    "then uses its running statistics) or replace BatchNorm with "
                    "GroupNorm/LayerNorm."
                )

    # ---- one batch, one pass ------------------------------------------------

    def _batch_product(
        self, X: Tensor, y: Tensor, tangents: Tuple[Tensor, ...], pass_state: dict
    ) -> Tuple[Iterable[Tuple[int, Tuple[Tensor, ...]]], LossRule]:
        """``(chunks, rule)``: the batch loss's curvature times ``V``, in column chunks.

        ``tangents`` holds one ``[M, *p.shape]`` tensor per parameter.
        ``chunks`` yields ``(first_column, product)`` with ``product`` one
        ``[m, *p.shape]`` tensor per parameter: columns ``first_column`` to
        ``first_column + m`` of ``A_b V`` (a generator may compute each chunk
        only when asked, so that only one chunk is alive at a time).
        ``rule`` is the :class:`~curvext.losses.LossRule` of the batch's loss
        call (on ``model(X)``, detached), from which its normalisation and
        size are read: built once per batch.
        """
        raise NotImplementedError

    def _output_of(self, X: Tensor):
        """``θ ↦ model(X)`` with the operator's parameters replaced by ``θ``."""

        def output_of(*theta):
            return functional_call(self.model, dict(zip(self._names, theta)), (X,))

        return output_of

    def _start_pass(self, ranks=None) -> dict:
        """Per-pass state (e.g. a freshly seeded generator); none by default.

        ``ranks``: the process group of the pass (:mod:`curvext.distributed`),
        or ``None``.
        """
        return {}

    def _data_product(self, matrix: Tensor, pass_index: int = 0, purpose: str = "") -> Tensor:
        """``A @ matrix`` for ``matrix`` ``[P, M]``: one pass over ``data``.

        ``purpose`` labels the progress bar (default: the product's shape).
        Over a process group (:mod:`curvext.distributed`), one pass over this
        rank's shard and one ``all_reduce`` of the weighted sum, ``Σ_b d_b``,
        the batch and sample counts and the fingerprints of ``matrix`` and the
        parameters.
        """
        self._check_independent_samples()  # the model may be in train mode by now
        owner = type(self).__name__
        # contiguous [M, *p.shape] once per pass: the reshape of block.T is a
        # strided view, which forward-mode AD would copy in every batch's jvp
        tangents = tuple(
            block.T.reshape(-1, *p.shape).to(p.dtype).contiguous()
            for block, p in zip(matrix.detach().split(self._numels), self.params)
        )
        tangents = zero_padding_rows(tangents, self._constant_rows)
        data_pass = DataPass(
            self.data,
            owner,
            label=purpose or f"A @ V, V [{matrix.shape[0]}, {matrix.shape[1]}]",
            progressbar=self.progressbar,
            ranks=resolve_ranks(self.distributed, owner),
            reduction=self.loss_fn.reduction,
            num_data=self.num_data,
            pass_index=pass_index,
            same_on_ranks={"matrix": [matrix], "params": self.params},
        )
        ((_, total),) = data_pass.run(
            lambda data_pass: self._local_pass(tangents, data_pass),
            zeros=lambda: [(0, self._new_accumulator(matrix.shape[1]))],
            device=self.device,
        )
        total.div_(data_pass.loss_denominator)  # the pass's own accumulator (or sum)
        for index, row in self._constant_rows:
            start = sum(self._numels[:index])
            width = self.params[index].shape[1]
            total[:, start + row * width : start + (row + 1) * width] = 0
        return total.T.to(self.dtype)

    def _new_accumulator(self, num_columns: int) -> Tensor:
        """Zeros ``[M, P]`` in the parameters' common dtype, for ``Σ_b d_b A_b V``."""
        dtype = reduce(torch.promote_types, [p.dtype for p in self.params])
        return torch.zeros(num_columns, self.shape[0], dtype=dtype, device=self.device)

    def _local_pass(self, tangents, data_pass: DataPass):
        """This process's ``[(0, Σ_b d_b A_b V)]`` over its ``data`` (``[]`` without batches).

        The sum ``[M, P]`` is allocated once, at the first batch, and every
        batch's product is added into it in place, one column chunk and one
        parameter block at a time (no concatenated or rescaled copy per batch).
        """
        pass_state = self._start_pass(data_pass.ranks)
        total = None
        for _, X, y in data_pass:
            chunks, rule = self._batch_product(X, y, tangents, pass_state)
            weight = data_pass.add_batch(rule.batch_size, rule.normalization)
            if total is None:
                total = self._new_accumulator(tangents[0].shape[0])
            for first_column, product in chunks:
                rows, start = total.narrow(0, first_column, product[0].shape[0]), 0
                for block in product:  # narrow, not split: split's views refuse add_
                    destination = rows.narrow(1, start, block[0].numel())
                    destination.view(block.shape).add_(block, alpha=weight)
                    start += block[0].numel()
                del product
        return [] if total is None else [(0, total)]

    def _check_deterministic(self) -> None:
        check_deterministic(
            self._data_product, self.shape[0], self.dtype, self.device, type(self).__name__
        )

    # ---- the operator interface -----------------------------------------------

    def _matmat(self, matrix: Tensor) -> Tensor:
        if self._factor == 0.0:
            product = self._shift * matrix
        else:
            # the pass's own result: scaled and shifted in place, no copies
            product = self._data_product(matrix)
            # the dtype of factor * product + shift * matrix (a no-op if they agree)
            product = product.to(torch.promote_types(product.dtype, matrix.dtype))
            if self._factor != 1.0:
                product.mul_(self._factor)
            if self._shift != 0.0:
                product.add_(matrix, alpha=self._shift)
        for summand in self._summands:
            product.add_(summand._matmat(matrix))
        return product

    def to_dense(self) -> Tensor:
        """The matrix ``[P, P]``: ``self @ I``, all ``P`` columns in one pass.

        Expensive: ``P`` products per batch and ``P`` times the per-vector
        memory; for small models and tests.
        """
        return self @ torch.eye(self.shape[0], dtype=self.dtype, device=self.device)

    def diag(self) -> Tensor:
        """The diagonal ``[P]``, from :meth:`to_dense` (expensive; for large
        models estimate it with :func:`curvext.linalg.hutchinson_diag`)."""
        return self.to_dense().diagonal()

    def _slogdet(self):
        return torch.linalg.slogdet(self.to_dense())

    def frobenius_norm(self) -> Tensor:
        """``||A||_F`` from :meth:`to_dense` (expensive; for large models use
        :func:`curvext.linalg.hutchinson_squared_fro`)."""
        return torch.linalg.matrix_norm(self.to_dense())

    def _copy(self, factor: float, shift: float, summands) -> "_DataSetOperator":
        result = copy.copy(self)
        result._factor, result._shift, result._summands = factor, shift, tuple(summands)
        return result

    def _add_scalar(self, value: float) -> "_DataSetOperator":
        return self._copy(self._factor, self._shift + value, self._summands)

    def _scale(self, value: float) -> "_DataSetOperator":
        return self._copy(
            self._factor * value,
            self._shift * value,
            [summand._scale(value) for summand in self._summands],
        )

    def _add_same(self, other: "_DataSetOperator") -> "_DataSetOperator":
        return self._copy(self._factor, self._shift, [*self._summands, other])

    def inverse(self, damping: float = 0.0, **cg_options):
        """``(A + damping I)^{-1}`` applied by conjugate gradients.

        Returns a :class:`curvext.linalg.CGInverse` (``@`` works as for the
        operator; ``cg_options`` such as ``tol`` and ``max_iter`` go to it).
        """
        from curvext.linalg import CGInverse

        damping = check_damping(damping)
        return CGInverse(self + damping if damping else self, **cg_options)


class HessianOperator(_DataSetOperator):
    r"""The Hessian :math:`\nabla^2_\theta L` of the data-set loss (matrix-free).

    :math:`L = c \sum_n \ell(f(x_n; \theta), y_n)` over every sample of
    ``data``, with the loss's own normalisation :math:`c` (``"mean"``: over the
    whole data set; see the module docstring). Products by reverse-over-reverse
    differentiation with :mod:`torch.autograd`: per batch one forward pass, the
    gradient with its graph (``create_graph``), then :math:`H V` as the
    vector-Jacobian product of the gradient with the columns of ``V`` (``H`` is
    symmetric), all columns in one batched backward (``is_grads_batched``), one
    at a time for models with convolutions (PyTorch's batched backward has no
    batching rule for the convolution's double backward). Measured against
    forward-over-reverse (``jvp`` of ``torch.func.grad``), the order used
    before: 1.6× faster on the benchmark MLP, as fast on the CNN (one batch of
    128, CPU).

    Args:
        model: The model; ``model(X)`` is the loss input.
        loss_fn: ``MSELoss``, ``CrossEntropyLoss`` or ``BCEWithLogitsLoss``
            with ``reduction="mean"`` or ``"sum"``.
        params: The parameters (tensors of ``model.parameters()``), in the
            order of the rows; the others stay fixed.
        data: A re-iterable of ``(X, y)`` batches (list, ``DataLoader``).
        check_deterministic: Multiply twice at construction and raise if the
            passes disagree (default ``True``).
        num_data: The number of samples in ``data``, checked on every pass
            (default ``None``: not checked).
        progressbar: Show a ``tqdm`` bar over the batches of each pass (on
            rank 0 only, over a process group).
        distributed: ``None`` (default): if a :mod:`torch.distributed` process
            group is initialised, ``data`` is this rank's shard and every
            product is summed over the ranks (one ``all_reduce``); ``False``:
            this rank's ``data`` only; ``True`` or a ``ProcessGroup``: as
            ``None``, over that group (see :mod:`curvext.distributed`).

    Raises:
        ValueError: If ``data`` is empty (on every rank), ``params`` are not
            parameters of ``model``, the reduction is neither ``"mean"`` nor
            ``"sum"``, the determinism check fails, or, over a process group,
            the ranks hold different parameters or multiply different
            matrices (e.g. probes drawn with different seeds).
        RuntimeError: Over a process group, on every rank if another rank's
            pass over its shard raised.

    Example:
        >>> torch.manual_seed(0)  # doctest: +ELLIPSIS
        <torch._C.Generator object at ...>
        >>> model = torch.nn.Linear(2, 1)
        >>> data = [(torch.randn(4, 2), torch.randn(4, 1)) for _ in range(2)]
        >>> H = HessianOperator(model, torch.nn.MSELoss(), list(model.parameters()), data)
        >>> H.shape, (H @ torch.ones(3, 5)).shape
        ((3, 3), torch.Size([3, 5]))
    """

    def _batch_product(self, X, y, tangents, pass_state):
        output_of = self._output_of(X)
        theta = tuple(p.detach().requires_grad_() for p in self.params)
        with torch.enable_grad():
            output = output_of(*theta)
            gradient = torch.autograd.grad(
                self.loss_fn(output, y), theta, create_graph=True, allow_unused=True
            )
        # a parameter the loss does not use, or a gradient entry without a
        # graph (constant), has zero Hessian rows
        differentiable = [
            index for index, g in enumerate(gradient) if g is not None and g.requires_grad
        ]
        num_columns = tangents[0].shape[0]
        batched = num_columns > 1 and not self._convolutional

        def hessian_times(first: int, last: int) -> Tuple[Tensor, ...]:
            """Columns ``first:last`` of ``H_b V``: the vector-Jacobian product of
            the gradient (``H`` is symmetric), all columns in one batched
            backward, or one column at a time for convolutions."""
            part = [tangents[index][first:last] for index in differentiable]
            if not differentiable:
                products = [None] * len(theta)
            elif batched:
                products = torch.autograd.grad(
                    [gradient[index] for index in differentiable],
                    theta,
                    part,
                    retain_graph=True,
                    allow_unused=True,
                    is_grads_batched=True,
                )
            else:
                products = torch.autograd.grad(
                    [gradient[index] for index in differentiable],
                    theta,
                    [column[0] for column in part],
                    retain_graph=True,
                    allow_unused=True,
                )
                products = [None if g is None else g.unsqueeze(0) for g in products]
            return tuple(
                torch.zeros_like(tangent[first:last]) if g is None else g
                for g, tangent in zip(products, tangents)
            )

        width = num_columns if batched else 1

        def chunks():
            for first in range(0, num_columns, width):
                yield first, hessian_times(first, first + width)

        return chunks(), loss_rule(self.loss_fn, output.detach(), y)


class GGNOperator(_DataSetOperator):
    r"""The generalised Gauss-Newton :math:`G = c\sum_n J_n^\top H_n J_n` (matrix-free).

    :math:`J_n = \partial f(x_n;\theta)/\partial\theta` and :math:`H_n` the
    Hessian of the sample's loss w.r.t. the model output; normalisation as in
    the module docstring. A product is ``J V`` by ``jvp``, then the loss
    Hessian w.r.t. the output by ``grad`` of ``jvp`` (reverse-over-forward), then
    :math:`J^\top` by ``vjp`` — never a Jacobian matrix.

    With ``mc_samples > 0`` it is the Monte-Carlo Fisher instead: :math:`H_n`
    replaced by :math:`\frac1S\sum_s g_{ns} g_{ns}^\top` with :math:`g_{ns}`
    the output-gradient of the loss at a target drawn from the model's
    predictive distribution (:meth:`curvext.losses.LossRule.mc_columns`);
    unbiased for :math:`G`. Every pass re-seeds its generator with ``seed``,
    so the operator is one fixed matrix.

    Args:
        model, loss_fn, params, data, check_deterministic, num_data,
            progressbar, distributed: As for :class:`HessianOperator`.
        mc_samples: ``0`` (default): the exact GGN; ``S > 0``: MC Fisher with
            ``S`` samples per data point.
        seed: Seed of the MC samples (default 2147483647); unused if exact.
            Over a process group rank ``r`` uses ``seed + r``, so the shards'
            samples are independent (the operator is then an MC Fisher as
            good as a single process's, but not the same draw).

    Example:
        >>> torch.manual_seed(0)  # doctest: +ELLIPSIS
        <torch._C.Generator object at ...>
        >>> model = torch.nn.Linear(2, 3)
        >>> data = [(torch.randn(4, 2), torch.randint(0, 3, (4,)))]
        >>> G = GGNOperator(model, torch.nn.CrossEntropyLoss(), list(model.parameters()), data)
        >>> bool(torch.linalg.eigvalsh(G.to_dense()).min() > -1e-6)
        True
    """

    def __init__(
        self,
        model: nn.Module,
        loss_fn: nn.Module,
        params: Sequence[Tensor],
        data: Iterable,
        mc_samples: int = 0,
        check_deterministic: bool = True,
        num_data: Optional[int] = None,
        progressbar: bool = False,
        seed: int = 2147483647,
        distributed=None,
    ):
        if isinstance(mc_samples, bool) or not isinstance(mc_samples, int) or mc_samples < 0:
            raise ValueError(
                f"GGNOperator: mc_samples must be an int >= 0 (0: exact GGN), got {mc_samples!r}."
            )
        self.mc_samples, self.seed = mc_samples, seed
        super().__init__(
            model,
            loss_fn,
            params,
            data,
            check_deterministic,
            num_data,
            progressbar,
            distributed,
        )

    def _start_pass(self, ranks=None) -> dict:
        if self.mc_samples == 0:
            return {}
        # independent samples on every rank's shard, the same in every pass
        seed = self.seed + (0 if ranks is None else ranks.rank)
        return {"generator": torch.Generator(self.device).manual_seed(seed)}

    def _batch_product(self, X, y, tangents, pass_state):
        output_of = self._output_of(X)
        primals = tuple(p.detach() for p in self.params)
        num_columns = tangents[0].shape[0]
        forward_columns = _CONV_CHUNK_COLUMNS if self._convolutional else num_columns

        def push_forward(*tangent):
            output, output_tangent = jvp(output_of, primals, tangent)
            return output_tangent, output

        def forward(first: int):
            part = tuple(tangent[first : first + forward_columns] for tangent in tangents)
            return vmap(push_forward, randomness="same")(*part)  # [m, *out] twice

        if forward_columns == 1:
            # one column per forward: J v and the graph for Jᵀ from one forward
            # pass with dual numbers (forward-mode AD) on parameters that
            # require grad, instead of a jvp and a separate vjp pass
            pending = [self._dual_forward(output_of, primals, tangents, 0)]
            output = pending[0][0].detach()
        else:
            # the first chunk's push-forward before the vjp's graph exists: the
            # two forward passes' activations are then not alive at the same time
            first_tangents, outputs = forward(0)
            output = outputs[0].detach()
            pending = [first_tangents]
            del first_tangents, outputs

        rule = loss_rule(self.loss_fn, output, y)
        if self.mc_samples > 0:
            columns = rule.mc_columns(self.mc_samples, pass_state["generator"])
        elif rule.num_exact_columns * output.numel() <= _LOSS_ROOT_ELEMENTS:
            columns = rule.exact_columns(0, rule.num_exact_columns)
        else:
            columns = None
        if columns is not None:
            # [K, N, *out], each carrying sqrt(c_b w): the batch loss's Hessian
            # w.r.t. the output is sum_k s_k s_k^T per sample (MC: its estimate)
            num_samples = output.shape[0]
            columns = columns.reshape(columns.shape[0], num_samples, -1)

            def output_hessian_product(output_tangents):
                flat_tangents = output_tangents.reshape(-1, num_samples, columns.shape[-1])
                coefficients = torch.einsum("snk,mnk->msn", columns, flat_tangents)
                output_products = torch.einsum("msn,snk->mnk", coefficients, columns)
                return output_products.reshape(output_tangents.shape)

        else:

            def loss_hvp(output_tangent):
                # reverse-over-forward: grad of the loss's directional derivative
                def directional_derivative(out):
                    return jvp(lambda o: self.loss_fn(o, y), (out,), (output_tangent,))[1]

                return grad(directional_derivative)(output)

            output_hessian_product = vmap(loss_hvp)

        if forward_columns == 1:
            return self._column_products(
                output_of, primals, tangents, output_hessian_product, pending
            ), rule

        def chunks():
            pullback = vjp(output_of, *primals)[1]
            for first in range(0, num_columns, forward_columns):
                output_tangents = pending.pop() if first == 0 else forward(first)[0]
                output_products = output_hessian_product(output_tangents)
                del output_tangents
                for start in range(0, output_products.shape[0], _PULLBACK_CHUNK_COLUMNS):
                    end = start + _PULLBACK_CHUNK_COLUMNS
                    yield first + start, vmap(pullback)(output_products[start:end])

        return chunks(), rule

    @staticmethod
    def _dual_forward(output_of, primals, tangents, column: int):
        """``(output, J v, theta)`` for column ``column`` of ``tangents``, from one
        forward pass: ``output`` ``[*out]`` keeps its graph to ``theta``, fresh
        leaves of ``primals`` (for ``Jᵀ``); ``J v`` ``[*out]`` is detached."""
        theta = tuple(p.detach().requires_grad_() for p in primals)
        with torch.enable_grad(), forward_ad.dual_level():
            duals = [forward_ad.make_dual(p, t[column]) for p, t in zip(theta, tangents)]
            output, output_tangent = forward_ad.unpack_dual(output_of(*duals))
        if output_tangent is None:  # the output does not depend on the parameters
            output_tangent = torch.zeros_like(output)
        return output, output_tangent.detach(), theta

    def _column_products(self, output_of, primals, tangents, output_hessian_product, pending):
        """The chunks of :meth:`_batch_product`, one column at a time through :meth:`_dual_forward`
        and a plain backward pass each (measured: benchmark MLP, one column,
        0.72× the time of ``jvp`` + ``vjp``; CNN 0.83×)."""

        def chunks():
            for column in range(tangents[0].shape[0]):
                graph_output, output_tangent, theta = (
                    pending.pop()
                    if column == 0
                    else self._dual_forward(output_of, primals, tangents, column)
                )
                output_product = output_hessian_product(output_tangent[None])[0]
                if not graph_output.requires_grad:
                    products = [None] * len(theta)
                else:
                    products = torch.autograd.grad(
                        graph_output, theta, output_product, allow_unused=True
                    )
                del graph_output, output_tangent, output_product
                yield (
                    column,
                    tuple(
                        torch.zeros_like(p)[None] if g is None else g[None]
                        for g, p in zip(products, primals)
                    ),
                )

        return chunks()


class EFOperator(_DataSetOperator):
    r"""The empirical Fisher
    :math:`E = c \sum_n \nabla_\theta\ell_n \nabla_\theta\ell_n^\top` (matrix-free).

    :math:`\ell_n` is sample ``n``'s term of the summed loss (``loss_fn`` with
    ``reduction="none"``, summed over the sample's entries; class weights
    included) and :math:`c` the loss's normalisation over the whole data set
    (module docstring): for ``CrossEntropyLoss(reduction="mean")`` without
    weights :math:`\frac1N\sum_n g_n g_n^\top`. Products without per-sample
    gradients: :math:`a = (g_n^\top v)_n` by ``jvp`` of the per-sample losses,
    then :math:`\sum_n a_n g_n` by ``vjp``.

    Args:
        model, loss_fn, params, data, check_deterministic, num_data,
            progressbar, distributed: As for :class:`HessianOperator`.

    Example:
        >>> torch.manual_seed(0)  # doctest: +ELLIPSIS
        <torch._C.Generator object at ...>
        >>> model = torch.nn.Linear(2, 3)
        >>> data = [(torch.randn(4, 2), torch.randint(0, 3, (4,)))]
        >>> E = EFOperator(model, torch.nn.CrossEntropyLoss(), list(model.parameters()), data)
        >>> E.shape
        (9, 9)
    """

    def _batch_product(self, X, y, tangents, pass_state):
        output_of = self._output_of(X)
        primals = tuple(p.detach() for p in self.params)
        unreduced = copy.copy(self.loss_fn)
        unreduced.reduction = "none"

        def sample_losses(*theta):
            output = output_of(*theta)
            losses = unreduced(output, y)
            return losses.reshape(losses.shape[0], -1).sum(1), output.detach()

        losses, pullback, output = vjp(sample_losses, *primals, has_aux=True)

        def directional(*tangent):
            return jvp(sample_losses, primals, tangent, has_aux=True)[1]

        coefficients = vmap(directional, randomness="same")(*tangents)  # [M, N]
        rule = loss_rule(self.loss_fn, output, y)
        product = vmap(pullback)(coefficients * rule.normalization)
        return [(0, product)], rule


__all__ = ["HessianOperator", "GGNOperator", "EFOperator"]
