r"""Matrix-free Jacobian of a model's predictions over a whole data set, and its transpose.

For a model :math:`f(\mathbf{x}, \boldsymbol\theta)` with per-sample output
shape ``S`` (``C`` entries) and a data set of ``N`` samples given in batches,
the Jacobian is the ``[N·C, P]`` matrix

.. math::
    [\mathbf{J}]_{(n, c),\, d}
    = \frac{\partial [f(\mathbf{x}_n, \boldsymbol\theta)]_c}{\partial \theta_d},

rows ordered by sample (in the order ``data`` yields them), then by the
entries of the sample's output flattened row-major; columns ordered as
``params``, each flattened row-major (``p.flatten()``). This is curvlinops'
``JacobianLinearOperator`` order: its output list ``[(N, *S)]`` flattened.

:class:`JacobianOperator` multiplies by :math:`\mathbf{J}` with ``jvp`` and
:class:`TransposedJacobianOperator` by :math:`\mathbf{J}^\top` with ``vjp``,
both ``vmap``-ed over the ``M`` columns of the operand, so a product is one
pass over ``data`` whatever ``M``; no Jacobian matrix is formed and no graph
outlives its batch. ``J.T`` and ``J.T.T`` switch between the two without
another pass over ``data``.

**Determinism.** ``J.T @ W`` hands batch ``b`` the rows of ``W`` that belong
to its samples, so every pass must yield the same batches in the same order
and ``model`` must be the same function of the parameters each time. With
``check_deterministic=True`` (default) the constructor multiplies a random
``[P, 2]`` matrix twice, in two passes over ``data``, and raises if the
results (or the batch sizes) differ. Otherwise one forward pass counts the
samples (only the first batch is evaluated if ``num_data`` is given).
"""

from __future__ import annotations

import math
from typing import Callable, Iterable, List, Mapping, Optional, Sequence, Tuple, Union

import torch
from torch import Tensor, nn
from torch.func import functional_call, jvp, vjp, vmap

from curvext.linear import LinearOperator
from curvext.operators.base import Operand, operand_like, operand_matrix
from curvext.operators.matrix_free import padding_rows, parameter_names, zero_padding_rows
from curvext.operators.passes import DataPass, check_deterministic
from curvext.torch_quirks import load_forward_ad_quietly

#: An ``nn.Module`` (``model(X)``) or a function ``(params_dict, X) -> prediction``.
Model = Union[nn.Module, Callable[[Mapping[str, Tensor], object], Tensor]]
#: The parameters: tensors of ``model.parameters()``, or a dict ``name -> tensor``.
Params = Union[Sequence[Tensor], Mapping[str, Tensor]]


def _named_params(model: Model, params: Params, owner: str) -> Tuple[List[str], List[Tensor]]:
    """The names under which ``model`` takes the ``params``, and the tensors.

    Raises:
        ValueError: If ``params`` is empty or holds a non-tensor, a listed
            tensor is not a parameter of the ``nn.Module``, a dict key is not
            one of its parameter names (or has another shape), or a function
            model was given a list instead of a dict.
        TypeError: If ``model`` is neither an ``nn.Module`` nor callable.
    """
    if not isinstance(model, nn.Module) and not callable(model):
        raise TypeError(
            f"{owner}: model must be an nn.Module or a function (params_dict, X) -> "
            f"prediction, got {type(model).__name__}."
        )
    if isinstance(params, Mapping):
        names, tensors = list(params.keys()), list(params.values())
    else:
        names, tensors = None, list(params)
    if not tensors or not all(isinstance(t, Tensor) for t in tensors):
        raise ValueError(
            f"{owner}: params must be a non-empty list of tensors (parameters of "
            f"model), e.g. list(model.parameters()), or a dict name -> tensor."
        )
    if not isinstance(model, nn.Module):
        if names is None:
            raise ValueError(
                f"{owner}: a function model is called as model(params_dict, X), so "
                f"params must be a dict name -> tensor, got a "
                f"{type(params).__name__}."
            )
        return names, tensors
    own = dict(model.named_parameters())
    if names is not None:
        wrong = [
            name
            for name, tensor in zip(names, tensors)
            if name not in own or own[name].shape != tensor.shape
        ]
        if wrong:
            raise ValueError(
                f"{owner}: params keys {wrong} are not parameters of model (or have "
                f"another shape); the keys must be names from "
                f"model.named_parameters(), e.g. {list(own)[:3]}."
            )
        return names, tensors
    return parameter_names(model, tensors, owner), tensors


class _DataJacobian:
    """What a Jacobian and its transpose share: the model, the data and the passes."""

    def __init__(
        self,
        model: Model,
        params: Params,
        data: Iterable,
        check_deterministic: bool,
        num_data: Optional[int],
        progressbar: bool,
        owner: str,
    ):
        load_forward_ad_quietly()
        self.names, self.params = _named_params(model, params, owner)
        if num_data is not None and (
            isinstance(num_data, bool) or not isinstance(num_data, int) or num_data < 1
        ):
            raise ValueError(f"{owner}: num_data must be a positive int, got {num_data!r}.")
        self.model, self.data, self.owner = model, data, owner
        self.num_data, self.progressbar = num_data, progressbar
        self.dtype = self.params[0].dtype
        self.device = torch.device(self.params[0].device)
        self.param_shapes = [tuple(p.shape) for p in self.params]
        self.numels = [p.numel() for p in self.params]
        self.constant_rows = padding_rows(model, self.params)
        # the batch structure, set by the first pass
        self.sample_shape: Optional[Tuple[int, ...]] = None
        self.num_samples, self.batch_sizes = 0, None
        if check_deterministic:
            self._check_deterministic()
        else:
            self._count()
        self.output_dim = math.prod(self.sample_shape)
        self.rows = self.num_samples * self.output_dim

    # ---- one batch ----------------------------------------------------------

    def _output_of(self, X) -> Callable[..., Tensor]:
        """``θ ↦ f(X, θ)`` with the operator's parameters replaced by ``θ``."""
        if isinstance(self.model, nn.Module):

            def output_of(*theta):
                return functional_call(self.model, dict(zip(self.names, theta)), (X,))

        else:

            def output_of(*theta):
                return self.model(dict(zip(self.names, theta)), X)

        return output_of

    def _pass(self, label: str, pass_index: int = 0, num_data: Optional[int] = None) -> DataPass:
        """A pass over ``data`` (batching, progress bar, the count checks)."""
        return DataPass(
            self.data,
            self.owner,
            label=label,
            progressbar=self.progressbar,
            num_data=num_data,
            pass_index=pass_index,
        )

    def _record(self, index: int, output, sizes: List[int], shapes: set) -> None:
        """Check batch ``index``'s prediction and note its size and sample shape."""
        if not isinstance(output, Tensor) or output.ndim < 1:
            kind = "a 0-d tensor" if isinstance(output, Tensor) else type(output).__name__
            raise ValueError(
                f"{self.owner}: model's prediction on batch {index} is {kind}; "
                f"it must be a tensor [N_b, *S] with the batch's samples along the "
                f"first axis."
            )
        sizes.append(output.shape[0])
        shapes.add(tuple(output.shape[1:]))
        if len(shapes) > 1:
            raise ValueError(
                f"{self.owner}: model's predictions have per-sample shapes "
                f"{sorted(shapes)} in different batches; the Jacobian needs the "
                f"same output shape S for every sample."
            )

    def _finish_pass(self, sizes: List[int], shapes: set, complete: bool = True) -> None:
        """Check a pass's batch structure against the earlier ones (store the first).

        ``complete=False``: ``sizes`` holds only the total, not the batches.
        """
        if self.sample_shape is None:  # the first pass
            (self.sample_shape,), self.num_samples = shapes, sum(sizes)
            self.batch_sizes = sizes if complete else None
            return
        changed = (
            shapes != {self.sample_shape}
            or sum(sizes) != self.num_samples
            or (self.batch_sizes is not None and sizes != self.batch_sizes)
        )
        if changed:
            before = self.batch_sizes or f"{self.num_samples} samples in all"
            raise ValueError(
                f"{self.owner}: a pass over `data` gave batches of sizes {sizes} with "
                f"per-sample predictions of shape {sorted(shapes)}, an earlier one "
                f"{before} with {self.sample_shape}; `data` must yield the same "
                f"batches in the same order on every pass (no shuffling, no random "
                f"augmentation)."
            )
        self.batch_sizes = sizes

    # ---- passes over the data -------------------------------------------------

    def jvp_pass(self, matrix: Tensor, pass_index: int = 0, label: str = "J @ V") -> Tensor:
        """``J @ matrix`` ``[N·C, M]`` for ``matrix`` ``[P, M]``, in one pass over ``data``."""
        tangents = tuple(
            block.T.reshape(-1, *shape)
            for block, shape in zip(matrix.detach().split(self.numels), self.param_shapes)
        )
        # as PyTorch's backward: padding rows are constants
        tangents = zero_padding_rows(tangents, self.constant_rows)
        primals = tuple(p.detach() for p in self.params)
        sizes, shapes = [], set()

        def local(data_pass: DataPass):
            products = []
            for index, X, _ in data_pass:
                output_of = self._output_of(X)

                def push_forward(*tangent):
                    return jvp(output_of, primals, tangent)

                output, output_tangents = vmap(push_forward, out_dims=(None, 0), randomness="same")(
                    *tangents
                )  # [N_b, *S], [M, N_b, *S]
                self._record(index, output, sizes, shapes)
                data_pass.add_batch(output.shape[0])
                products.append((0, output_tangents.reshape(output_tangents.shape[0], -1).T))
            return products

        products = self._pass(label, pass_index, self.num_data).run(local)
        self._finish_pass(sizes, shapes)
        return torch.cat([product for _, product in products]).to(self.dtype)

    def vjp_pass(self, matrix: Tensor) -> Tensor:
        """``J^T @ matrix`` ``[P, M]`` for ``matrix`` ``[N·C, M]``: one pass over ``data``."""
        primals = tuple(p.detach() for p in self.params)
        sizes, shapes = [], set()

        def local(data_pass: DataPass):
            total, start = None, 0
            for index, X, _ in data_pass:
                output, pullback = vjp(self._output_of(X), *primals)
                self._record(index, output, sizes, shapes)
                data_pass.add_batch(output.shape[0])
                stop = start + output.numel()
                if stop > matrix.shape[0]:
                    raise ValueError(
                        f"{self.owner}: `data` now yields more than the "
                        f"{self.num_samples} samples it had at construction (batch "
                        f"{index}); `data` must yield the same batches on every pass."
                    )
                cotangents = matrix[start:stop].detach().T.reshape(-1, *output.shape)
                blocks = vmap(pullback)(cotangents.to(output.dtype))  # [M, *p.shape] each
                product = torch.cat([block.reshape(len(block), -1) for block in blocks], 1)
                total = product if total is None else total + product
                start = stop
            return [] if total is None else [(0, total)]

        ((_, total),) = self._pass("J^T @ W", num_data=self.num_data).run(local)
        self._finish_pass(sizes, shapes)
        return total.T.to(self.dtype)

    def _count(self) -> None:
        """Learn the batch structure from predictions alone (no derivatives)."""
        sizes, shapes = [], set()

        def local(data_pass: DataPass):
            primals = tuple(p.detach() for p in self.params)
            for index, X, _ in data_pass:
                output = self._output_of(X)(*primals)
                self._record(index, output, sizes, shapes)
                data_pass.add_batch(output.shape[0])
                if self.num_data is not None:  # the sample shape is all we need
                    sizes[:] = [self.num_data]
                    break
            return []

        with torch.no_grad():
            self._pass("counting samples").run(local)
        self._finish_pass(sizes, shapes, complete=self.num_data is None)

    def _check_deterministic(self) -> None:
        check_deterministic(self.jvp_pass, sum(self.numels), self.dtype, self.device, self.owner)


class _JacobianSide(LinearOperator):
    """The interface both orientations share; a subclass says which pass it runs."""

    _what_in = ""

    def __init__(
        self,
        model: Model,
        params: Params,
        data: Iterable,
        check_deterministic: bool = True,
        num_data: Optional[int] = None,
        progressbar: bool = False,
    ):
        core = _DataJacobian(
            model,
            params,
            data,
            check_deterministic,
            num_data,
            progressbar,
            type(self).__name__,
        )
        self._attach(core)

    def _attach(self, core: _DataJacobian) -> None:
        self._core, self._partner = core, None
        super().__init__(self._orient(core.rows, sum(core.numels)), core.dtype, core.device)
        self.model, self.data, self.params = core.model, core.data, core.params
        self.num_data, self.progressbar = core.num_data, core.progressbar
        #: The per-sample output shape ``S`` and the number of samples ``N``.
        self.output_shape, self.num_samples = core.sample_shape, core.num_samples
        self._output_shapes = [(core.num_samples, *core.sample_shape)]

    # ---- orientation (subclasses) ------------------------------------------

    def _orient(self, rows: int, columns: int) -> Tuple[int, int]:
        raise NotImplementedError

    def _matmat(self, matrix: Tensor) -> Tensor:
        raise NotImplementedError

    @property
    def _in_shapes(self) -> List[Tuple[int, ...]]:
        raise NotImplementedError

    @property
    def _out_shapes(self) -> List[Tuple[int, ...]]:
        raise NotImplementedError

    # ---- shared ---------------------------------------------------------------

    @property
    def T(self) -> "_JacobianSide":
        """The transpose, over the same model, parameters and data (no new pass)."""
        if self._partner is None:
            partner_type = (
                TransposedJacobianOperator
                if isinstance(self, JacobianOperator)
                else JacobianOperator
            )
            partner = partner_type.__new__(partner_type)
            partner._attach(self._core)
            partner._partner, self._partner = self, partner
        return self._partner

    def _parse_operand(self, other: Operand):
        """``[C]``, ``[C, M]`` or a list of tensors shaped like the input side
        (:func:`~curvext.operators.base.operand_matrix`; its message names the
        expected shapes); ``None`` for anything else."""
        return operand_matrix(other, self._in_shapes, type(self).__name__, self._what_in)

    def _format_result(self, product: Tensor, form: str) -> Operand:
        """The product in the form of the operand."""
        return operand_like(product, form, self._out_shapes)

    def to_dense(self) -> Tensor:
        """The matrix, ``self.shape``: from ``min(N·C, P)`` columns of the identity in one pass.

        Expensive (that many products per batch); for small problems and tests.
        """
        rows, columns = self._core.rows, sum(self._core.numels)
        if columns <= rows:
            eye = torch.eye(columns, dtype=self.dtype, device=self.device)
            jacobian = self._core.jvp_pass(eye)
        else:
            eye = torch.eye(rows, dtype=self.dtype, device=self.device)
            jacobian = self._core.vjp_pass(eye).T
        return jacobian if isinstance(self, JacobianOperator) else jacobian.T

    def __repr__(self) -> str:
        return (
            f"{type(self).__name__}(shape={self.shape}, params={len(self.params)}, "
            f"num_samples={self.num_samples}, output_shape={self.output_shape}, "
            f"dtype={self.dtype}, device={self.device})"
        )


class JacobianOperator(_JacobianSide):
    r"""The Jacobian :math:`\mathbf{J}` ``[N·C, P]`` of ``model``'s predictions over ``data``
    (matrix-free).

    Rows: samples in the order ``data`` yields them, then the ``C`` entries of
    each sample's prediction (shape ``S``) flattened row-major; columns: the
    entries of ``params`` in order, each flattened row-major (module
    docstring). ``J @ V`` is ``jvp`` ``vmap``-ed over the ``M`` columns of
    ``V``, one pass over ``data``.

    ``@`` takes ``[P]`` (gives ``[N·C]``), ``[P, M]`` (gives ``[N·C, M]``)
    or a list of tensors shaped like ``params`` (gives a one-tensor list
    ``[J v]`` shaped ``[N, *S]``, curvlinops' list format).

    Args:
        model: An ``nn.Module`` (``model(X)`` is the prediction ``[N_b, *S]``)
            or a function ``model(params_dict, X)`` of a dict ``name -> tensor``.
        params: The parameters, in the order of the columns: tensors of
            ``model.parameters()``, or a dict ``name -> tensor`` (names from
            ``model.named_parameters()`` for a module, any names for a
            function; the Jacobian is taken at these values). The others stay fixed.
        data: A re-iterable of ``(X, y)`` batches (list, ``DataLoader``) in a
            fixed order; ``y`` is not used. ``X`` must already be on the
            parameters' device.
        check_deterministic: Multiply twice at construction and raise if the
            passes disagree (default ``True``).
        num_data: The number of samples in ``data``, checked on every pass
            (default ``None``: counted at construction).
        progressbar: Show a ``tqdm`` bar over the batches of each pass.

    Attributes:
        shape: ``(N·C, P)``.
        output_shape: ``S``, the per-sample prediction shape.
        num_samples: ``N``.
        dtype, device: Those of the first parameter.

    Raises:
        ValueError: If ``data`` is empty or changes between passes, ``params``
            are not parameters of ``model``, predictions have different
            per-sample shapes, or the determinism check fails.

    Example:
        >>> torch.manual_seed(0)  # doctest: +ELLIPSIS
        <torch._C.Generator object at ...>
        >>> model = torch.nn.Linear(3, 2)
        >>> data = [(torch.randn(4, 3), None), (torch.randn(1, 3), None)]
        >>> J = JacobianOperator(model, list(model.parameters()), data)
        >>> J.shape, J.T.shape, (J @ torch.ones(8, 5)).shape
        ((10, 8), (8, 10), torch.Size([10, 5]))
        >>> X = torch.cat([X for X, _ in data])
        >>> (J @ [torch.eye(2, 3), torch.zeros(2)])[0].shape  # [N, *S]
        torch.Size([5, 2])
        >>> bool(torch.allclose((J @ [torch.eye(2, 3), torch.zeros(2)])[0], X[:, :2]))
        True
    """

    _what_in = "the parameters"

    def _orient(self, rows, columns):
        return rows, columns

    def _matmat(self, matrix: Tensor) -> Tensor:
        return self._core.jvp_pass(matrix)

    @property
    def _in_shapes(self):
        return self._core.param_shapes

    @property
    def _out_shapes(self):
        return self._output_shapes


class TransposedJacobianOperator(_JacobianSide):
    r"""The transposed Jacobian :math:`\mathbf{J}^\top` ``[P, N·C]`` (matrix-free).

    The transpose of :class:`JacobianOperator` (same arguments and order of
    rows and columns, swapped). ``J.T @ W`` is ``vjp`` ``vmap``-ed over the
    ``M`` columns of ``W``; each batch receives the rows of ``W`` of its own
    samples, and the batch products add up. One pass over ``data``.

    ``@`` takes ``[N·C]`` (gives ``[P]``), ``[N·C, M]`` (gives ``[P, M]``) or
    a one-tensor list ``[w]`` with ``w`` ``[N, *S]`` (gives a list of tensors
    shaped like ``params``).

    Args:
        model, params, data, check_deterministic, num_data, progressbar: As
            for :class:`JacobianOperator`.

    Attributes:
        shape: ``(P, N·C)``.

    Example:
        >>> model = torch.nn.Linear(3, 2)
        >>> data = [(torch.ones(2, 3), None)]
        >>> JT = TransposedJacobianOperator(model, list(model.parameters()), data)
        >>> [g.tolist() for g in JT @ [torch.tensor([[1.0, 0.0], [1.0, 0.0]])]]
        [[[2.0, 2.0, 2.0], [0.0, 0.0, 0.0]], [2.0, 0.0]]
    """

    _what_in = "the predictions over `data`"

    def _orient(self, rows, columns):
        return columns, rows

    def _matmat(self, matrix: Tensor) -> Tensor:
        return self._core.vjp_pass(matrix)

    @property
    def _in_shapes(self):
        return self._output_shapes

    @property
    def _out_shapes(self):
        return self._core.param_shapes


__all__ = ["JacobianOperator", "TransposedJacobianOperator"]
