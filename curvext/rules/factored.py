r"""Rules for layers whose per-sample vectors are sums of outer products.

For ``Linear``, ``ConvNd`` and ``ConvTransposeNd`` the per-sample vector of the
weight is, per group,

.. math:: v_{nk} = \sum_t G_{k,n,:,t} A_{n,:,t}^\top

over positions ``t`` (tokens, spatial locations, and the calls of a tied
module, which act as extra positions), with ``G`` built from the
backpropagated columns and ``A`` from the layer input. The bias has
:math:`v_{nk} = \sum_t G_{k,n,:,t}`.

Layout: positions come last, ``G [K, N, groups, d_grad, T]`` and
``A [N, groups, d_in, T]``, which is how convolutions store them, so the
per-sample vectors are one batched matrix product and the Kronecker factors
batched Gram matrices, without copying to another layout. Diagonals never
form ``v`` when there is one position.
"""

from __future__ import annotations

from typing import List, Optional, Tuple

import torch
from torch import Tensor

from curvext.recording import ModuleCall
from curvext.rules.base import ModuleRule

KFAC_APPROXIMATIONS = ("expand", "reduce")


def _cat(parts: List[Tensor], dim: int) -> Tensor:
    return parts[0] if len(parts) == 1 else torch.cat(parts, dim)


#: Entries of ``columns`` up to which :func:`sum_of_squares` squares and sums
#: in two operations; above, it accumulates column by column (no temporary
#: as large as ``columns``, one pass over memory).
SMALL_COLUMNS = 2**18


def sum_of_squares(columns: Tensor) -> Tensor:
    r""":math:`\sum_k x_k^2` over the leading axis, in ``columns``' dtype;
    half-precision columns are added up in float32 (a running sum of
    thousands of bfloat16 squares would lose most of its digits)."""
    if columns.numel() <= SMALL_COLUMNS:
        return (columns * columns).sum(0)
    accumulate = torch.promote_types(columns.dtype, torch.float32)
    total = columns[0].to(accumulate).square()
    for column in columns[1:]:
        total.addcmul_(column, column)
    return total.to(columns.dtype)


def gram(matrices: Tensor, out: Optional[Tensor] = None, alpha: float = 1.0) -> Tensor:
    r""":math:`\alpha \sum_b M_b M_b^\top` of ``matrices [B, d, T]``, ``[d, d]``,
    added to ``out`` in place if given (a running sum without a copy per call).

    With ``d > T`` (the patches of a convolution with many input channels)
    the products are accumulated into the result (``addbmm``), as the batched
    products ``[B, d, d]`` would be larger than ``matrices``; otherwise one
    batched product and a sum is faster.

    Example:
        >>> M = torch.randn(4, 3, 2)
        >>> torch.allclose(gram(M), sum(m @ m.T for m in M), atol=1e-5)
        True
        >>> total = torch.eye(3)
        >>> torch.allclose(gram(M, out=total, alpha=0.5), torch.eye(3) + 0.5 * gram(M), atol=1e-5)
        True
    """
    batch, dim, positions = matrices.shape
    if out is None:
        out, alpha, beta = matrices.new_empty(dim, dim), alpha, 0.0
    else:
        beta = 1.0
    if positions == 1:
        flat = matrices[..., 0]
        return out.addmm_(flat.T, flat, beta=beta, alpha=alpha)
    if dim > positions:
        return out.addbmm_(matrices, matrices.mT, beta=beta, alpha=alpha)
    products = torch.bmm(matrices, matrices.mT).sum(0)
    if beta:
        return out.add_(products, alpha=alpha)
    return products if alpha == 1.0 else products.mul_(alpha)


class FactoredRule(ModuleRule):
    """Per-sample vectors as ``Σ_t G Aᵀ`` (see module docstring).

    Subclasses provide :meth:`input_side`, :meth:`grad_side` and
    :meth:`bias_side`.

    Attributes:
        grad_first: Whether the leading axis of the weight belongs to the
            output side (``[out, in, ...]``: Linear, Conv) or to the input
            side (``[in, out, ...]``: ConvTranspose).
        entry_grad_side: Whether :meth:`grad_side` only rearranges the
            output's entries (Linear, Conv), each becoming one entry of ``G``;
            not ConvTranspose, whose ``G`` holds patches of the output.
    """

    grad_first = True
    entry_grad_side = True

    def input_side(self, call: ModuleCall) -> Tensor:
        """``A [N, groups, d_in, T]`` of the weight."""
        raise NotImplementedError

    def grad_side(self, call: ModuleCall, grads: Tensor) -> Tensor:
        """``G [K, N, groups, d_grad, T]`` of the weight."""
        raise NotImplementedError

    def bias_side(self, call: ModuleCall, grads: Tensor) -> Tensor:
        """``G [K, N, 1, out, T]`` of the bias."""
        raise NotImplementedError

    def inputs(self) -> Tensor:
        """``A`` of all calls, concatenated along positions (computed once)."""
        if getattr(self, "_inputs", None) is None:
            inputs = _cat([self.input_side(c) for c in self.calls], dim=-1)
            # under autocast the recorded inputs may be half precision
            dtype = self.module.weight.dtype
            self._inputs = inputs if inputs.dtype == dtype else inputs.to(dtype)
        return self._inputs

    def replace_inputs(self, inputs: Tensor) -> None:
        """Replace the cached ``A`` by ``inputs`` of the same shape (``A``
        transformed, e.g. rotated into an eigenbasis), so that a pass reading
        only the transformed inputs holds one copy of them; every later
        reduction of this rule in this backward pass reads the replacement."""
        if inputs.shape != self.inputs().shape:
            raise ValueError(
                f"{type(self).__name__}.replace_inputs: got shape {tuple(inputs.shape)}, "
                f"expected the shape of A, {tuple(self.inputs().shape)}."
            )
        self._inputs = inputs
        self._input_squares = self._input_gram = None

    def grad_factor(self, name: str, grads: List[Tensor]) -> Tensor:
        """``G`` of all calls (weight or bias)."""
        side = self.bias_side if name == "bias" else self.grad_side
        return _cat([side(c, g) for c, g in zip(self.calls, grads)], dim=-1)

    def single_position(self, name: str = "weight") -> bool:
        """Whether ``T = 1`` in ``G`` of ``name`` (no weight sharing, one call).

        The weight's ``G`` and ``A`` share their positions; so does the bias's
        ``G`` where :attr:`entry_grad_side` holds. ConvTranspose's bias spans
        the output's positions, not the input's: a ``1 × 1`` input has one
        input position and several output positions.
        """
        if name == "bias" and not self.entry_grad_side:
            return sum(call.output_shapes[0][2:].numel() for call in self.calls) == 1
        return self.inputs().shape[-1] == 1

    def squares(self, name: str, grads: List[Tensor]) -> Tuple[Tensor, Optional[Tensor]]:
        r"""For ``T = 1``: :math:`\sum_k G^2` ``[N, groups, d_grad]`` and
        :math:`A^2` ``[N, groups, d_in]`` (``None`` for the bias).

        The first is shared by the weight and the bias of a layer whose bias
        sees the same columns (one pass over the columns for both).
        """
        squared = self._shared(
            "squares",
            name,
            grads,
            lambda: sum_of_squares(self.grad_factor(name, grads)[..., 0]),
        )
        return squared, (None if name == "bias" else self._squared_inputs())

    def _squared_inputs(self) -> Tensor:
        """:math:`A^2` ``[N, groups, d_in]`` for ``T = 1``, computed once."""
        if getattr(self, "_input_squares", None) is None:
            self._input_squares = self.inputs()[..., 0].square()
        return self._input_squares

    def _shared(self, what: str, name: str, grads: List[Tensor], compute):
        """``compute()``, reused by weight and bias when their columns coincide.

        For Linear and Conv the bias sees the same ``G`` as the weight, so the
        squares and the KFAC gradient factor of one chunk are computed once.
        Only the last result is kept, and :meth:`release` drops it after each
        chunk.
        """
        side = self.bias_side if name == "bias" else self.grad_side
        # the output-side KFAC factor of the weight of Linear/Conv equals the
        # bias's whatever the layout, so it is keyed without the side
        side_key = None if what.startswith("kfac") else side.__func__
        key = (what, side_key, tuple(map(id, grads)))
        last = getattr(self, "_last", None)
        if last is None or last[0] != key:
            last = (key, grads, compute())  # grads kept alive: their ids are the key
            self._last = last
        return last[2]

    def release(self):
        self._last = None

    def _to_param(self, name: str, vectors: Tensor, num_lead: int) -> Tensor:
        return vectors.reshape(*vectors.shape[:num_lead], *self.param(name).shape)

    def outer_product_vectors(self, name: str) -> bool:
        return name != "bias"

    def compact_diag(self, name):
        return self.single_position(name)

    def diag_weights(self, name, grads):
        return self.squares(name, grads)[0]

    def curvature_weights(self, name, curvature):
        if not self.output_curvature_diag_applies():
            return None
        return self._curvature_side(name, curvature)[..., 0]  # [N, groups, d_grad]

    def diag_from_weights(self, name, weights, per_sample):
        lead = "n" if per_sample else ""
        if name == "bias":
            return self._to_param(name, weights if per_sample else weights.sum(0), len(lead))
        inputs = self._squared_inputs()
        if not per_sample and weights.shape[1] == 1:  # one group: a plain matrix product
            left, right = weights[:, 0], inputs[:, 0]
            diag = left.T @ right if self.grad_first else right.T @ left
        else:
            layout = "goi" if self.grad_first else "gio"
            diag = torch.einsum(f"ngo,ngi->{lead}{layout}", weights, inputs)
        return self._to_param(name, diag, len(lead))

    def _curvature_side(self, name: str, curvature: Tensor) -> Tensor:
        """A diagonal curvature ``[N, *output]`` of the only call's output in
        ``G``'s layout, ``[N, groups, d_grad, T]``."""
        side = self.bias_side if name == "bias" else self.grad_side
        return side(self.calls[0], curvature.unsqueeze(0))[0]

    def output_curvature_diag_applies(self) -> bool:
        """Whether :meth:`output_curvature_diag` has its shortcut."""
        return len(self.calls) == 1 and len(self.calls[0].edges) == 1 and self.entry_grad_side

    def dense_grad_factor(self, name: str, matrix: Tensor) -> Tensor:
        """The output-side factor of a dense curvature ``matrix`` ``[D, D]``
        w.r.t. the output of the rule's only call (``D`` entries per sample):
        both sides in ``G``'s layout, summed over positions (KFRA)."""
        (call,) = self.calls
        shape = call.output_shapes[0][1:]
        side = self.bias_side if name == "bias" else self.grad_side

        def reduce_rows(rows: Tensor) -> Tensor:
            mapped = side(call, rows.reshape(rows.shape[0], 1, *shape))  # [R, 1, g, d, T]
            return mapped.sum(-1).reshape(rows.shape[0], -1)

        return reduce_rows(reduce_rows(matrix).T.contiguous())

    def output_curvature_diag(self, name, curvature, per_sample):
        # each output entry is one entry of G (not for ConvTranspose's patches),
        # so J^T e_f is outer(e_(o, t), A[:, t]) and its square is e_o ⊗ A[:, t]^2
        if not self.output_curvature_diag_applies():
            return None
        weights = self._curvature_side(name, curvature)  # [N, groups, d_grad, T]
        lead = "n" if per_sample else ""
        if name == "bias":
            diag = weights.sum(-1) if per_sample else weights.sum((0, -1))
            return self._to_param(name, diag, len(lead))
        layout = "goi" if self.grad_first else "gio"
        diag = torch.einsum(f"ngot,ngit->{lead}{layout}", weights, self.inputs().square())
        return self._to_param(name, diag, len(lead))

    def outer(self, grad_side: Tensor, input_side: Tensor) -> Tensor:
        """Per-sample vectors ``[K, N, groups, ., .]`` in the weight's order."""
        if self.grad_first:
            return torch.matmul(grad_side, input_side.mT)
        return torch.matmul(input_side, grad_side.mT)

    def per_sample(self, name, grads):
        grad_side = self.grad_factor(name, grads)
        if name == "bias":
            return self._to_param(name, grad_side.sum(-1), 2)
        return self._to_param(name, self.outer(grad_side, self.inputs()), 2)

    def diag(self, name, grads):
        if self.single_position(name):
            return self.diag_from_weights(name, self.diag_weights(name, grads), False)
        if name == "bias":
            return self._to_param(
                name, sum_of_squares(self.grad_factor(name, grads).sum(-1)).sum(0), 0
            )
        return self._to_param(name, self._column_loop(name, grads).sum(0), 0)

    def batch_diag(self, name, grads):
        if self.single_position(name):
            return self.diag_from_weights(name, self.diag_weights(name, grads), True)
        if name == "bias":
            return self._to_param(name, sum_of_squares(self.grad_factor(name, grads).sum(-1)), 1)
        return self._to_param(name, self._column_loop(name, grads), 1)

    def batch_l2(self, name, grads):
        if self.single_position(name):
            grad_squares, input_squares = self.squares(name, grads)
            if input_squares is None:
                return grad_squares.sum((1, 2))
            return (grad_squares.sum(-1) * input_squares.sum(-1)).sum(-1)
        if name == "bias":
            return sum_of_squares(self.grad_factor(name, grads).sum(-1)).sum((1, 2))
        return self._column_loop(name, grads).flatten(1).sum(1)

    def _column_loop(self, name: str, grads: List[Tensor]) -> Tensor:
        r""":math:`\sum_k v_{nk}^2` ``[N, groups, ., .]`` for ``T > 1``, one column
        at a time: one batched matrix product per column and an in-place
        accumulation, so neither ``[K, N, *p.shape]`` nor a broadcast copy of
        ``A`` is formed."""
        grad_side, input_side = self.grad_factor(name, grads), self.inputs()
        total = None
        for column in grad_side:
            vectors = self.outer(column, input_side)
            if total is None:
                total = vectors.square_()
            else:
                total.addcmul_(vectors, vectors)
        return total

    def sum_norm_sq(self, name, grads):
        # ||sum_n g_n a_n^T||^2 = sum_nm (g_n . g_m)(a_n . a_m): N^2 (d_grad + d_in)
        # operations instead of N d_grad d_in, for one position and one group
        if name == "bias" or not self._factored_gram(name):
            return super().sum_norm_sq(name, grads)
        grad_side = self.grad_factor(name, grads)[:, :, 0, :, 0]  # [K, N, d_grad]
        batch, d_grad = grad_side.shape[1:]
        d_in = self.inputs().shape[2]
        dtype = torch.promote_types(grad_side.dtype, torch.float64)
        if batch * (d_grad + d_in) >= d_grad * d_in:
            # the sums themselves, one product [K, d_grad, d_in] (no einsum)
            sums = grad_side.mT @ self.inputs()[:, 0, :, 0]
            return torch.linalg.vector_norm(sums.flatten(1), dim=1, dtype=dtype).square()
        grad_gram = grad_side @ grad_side.mT
        return (grad_gram * self.input_gram()).sum((1, 2), dtype=dtype)

    def input_gram(self) -> Tensor:
        """:math:`A A^\top` ``[N, N]`` for one position and one group (computed once)."""
        if getattr(self, "_input_gram", None) is None:
            input_side = self.inputs()[:, 0, :, 0]
            self._input_gram = input_side @ input_side.T
        return self._input_gram

    def sample_sum(self, name, grads):
        grad_side = self.grad_factor(name, grads)
        if name == "bias":
            return self._to_param(name, grad_side.sum((1, -1)), 1)
        input_side = self.inputs()
        pattern = "kngot,ngit->kgoi" if self.grad_first else "kngot,ngit->kgio"
        return self._to_param(name, torch.einsum(pattern, grad_side, input_side), 1)

    # Gram blocks (GGN eigenpairs). With one position the weight's Gram
    # factor is G [K, N, groups, d_grad] alone, the inputs A being the
    # rule's: v_nk . v_n'k' = sum over groups of (g_nk . g_n'k') (a_n . a_n'),
    # and no per-sample vector is formed. Only for one group: the factored
    # form costs groups * (NK)^2 memory, more than the per-sample vectors of
    # a depthwise convolution. The bias (v_nk = g_nk; in add_gram it joins
    # the weight's block), several positions and several groups use the
    # per-sample vectors (ModuleRule's defaults).
    def _factored_gram(self, name: str) -> bool:
        return name != "bias" and self.single_position() and self.inputs().shape[1] == 1

    def gram_factor(self, name, grads):
        if not self._factored_gram(name):
            return super().gram_factor(name, grads)
        return self.grad_factor(name, grads)[..., 0]

    def add_gram(self, factors, out):
        # (G Gᵀ) ⊙ (A Aᵀ) for the weight; with one position and one group the
        # bias of Linear/Conv (grad_first) has v_nk = g_nk, the weight's G, so
        # the layer's block is (G Gᵀ) ⊙ (A Aᵀ + 1): one product G Gᵀ for both
        factors = dict(factors)
        weight = None
        if "weight" in factors and self._factored_gram("weight"):
            weight = factors.pop("weight")
        if weight is not None:
            bias = factors.pop("bias", None) if self.grad_first else None
            num_cols, batch = weight.shape[:2]
            grad_side = weight.flatten(0, 1)[:, 0]  # [K N, d_grad], rows k * N + n
            input_gram = self.input_gram()
            if bias is not None:
                input_gram = input_gram + 1
            shape = (num_cols, batch, num_cols, batch)
            block = (grad_side @ grad_side.T).view(shape)
            out.view(shape).addcmul_(block, input_gram[:, None, :])
        return super().add_gram(factors, out)

    def gram_dots(self, name, factor, matrix):
        if not self._factored_gram(name):
            return super().gram_dots(name, factor, matrix)
        grad_side, input_side = factor[:, :, 0], self.inputs()[:, 0, :, 0]  # one group
        num = matrix.shape[0]
        # v_nk . m_j = g_nk^T M_j a_n in the weight's layout, without v_nk
        if self.grad_first:
            matrices = matrix.reshape(num, grad_side.shape[-1], input_side.shape[-1])
            right = torch.einsum("jdi,ni->njd", matrices.to(grad_side.dtype), input_side)
        else:
            matrices = matrix.reshape(num, input_side.shape[-1], grad_side.shape[-1])
            right = torch.einsum("jid,ni->njd", matrices.to(grad_side.dtype), input_side)
        return torch.einsum("knd,njd->knj", grad_side, right).flatten(0, 1)

    def gram_vectors(self, name, factor, coefficients):
        if not self._factored_gram(name):
            return super().gram_vectors(name, factor, coefficients)
        num_cols, batch = factor.shape[:2]
        coefficients = coefficients.to(factor.dtype).reshape(num_cols, batch, -1)
        grad_side, input_side = factor[:, :, 0], self.inputs()[:, 0, :, 0]  # one group
        # sum_n (sum_k c_nk,j g_nk) a_n^T: one matrix product with N inner,
        # written straight into the weight's layout
        weighted = torch.einsum("knj,knd->jdn", coefficients, grad_side)  # [J, d_grad, N]
        if self.grad_first:
            vectors = weighted @ input_side  # [J, d_grad, d_in]
        else:
            vectors = (weighted @ input_side).mT  # [J, d_in, d_grad]
        return self._to_param(name, vectors, 1)

    # KFAC. The factor over the weight's leading axis spans all groups; the
    # other one is shared by the groups (summed for gradients, averaged for
    # inputs), so that kron(*factors) matches p.flatten().
    def kfac_grad_factor(self, name, grads, approx):
        outer = self.grad_first or name == "bias"
        return self._shared(
            f"kfac-{approx}-{outer}",
            name,
            grads,
            lambda: self._grad_gram(self.grad_factor(name, grads), approx, outer),
        )

    @staticmethod
    def _grad_gram(grad_side: Tensor, approx: str, outer: bool) -> Tensor:
        if approx == "reduce":
            grad_side = grad_side.sum(-1, keepdim=True)
        num_cols, batch, groups, dim, positions = grad_side.shape
        if outer:
            return gram(grad_side.reshape(num_cols * batch, groups * dim, positions))
        return gram(grad_side.reshape(num_cols * batch * groups, dim, positions))

    def kfac_grad_dim(self, name):
        shape = self.param(name).shape
        if self.grad_first or name == "bias":
            return shape[0]
        return shape[1:].numel()

    def kfac_input_factor(self, name, approx, out=None, weight=1.0):
        """``A`` of the weight, or, with ``out``, ``out + weight · A`` in place
        (a running sum over batches without a copy of ``A`` per batch)."""
        if name == "bias":
            return None
        input_side = self.inputs()
        if approx == "reduce":
            input_side = input_side.mean(-1, keepdim=True)
        batch, groups, dim, positions = input_side.shape
        if self.grad_first:
            flat = input_side.reshape(batch * groups, dim, positions)
            count = batch * groups * positions
        else:
            flat = input_side.reshape(batch, groups * dim, positions)
            count = batch * positions
        return gram(flat, out=out, alpha=weight / count)

    def kfac_factors(self, name, grad_factor, approx, input_sum=None, weight=1.0):
        """The factors in the weight's order; ``input_sum`` and ``weight`` as
        ``out`` and ``weight`` of :meth:`kfac_input_factor`."""
        input_factor = self.kfac_input_factor(name, approx, out=input_sum, weight=weight)
        if input_factor is None:
            return [grad_factor]
        if self.grad_first:
            return [grad_factor, input_factor]
        return [input_factor, grad_factor]
