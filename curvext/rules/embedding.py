r"""Rule for ``torch.nn.Embedding``.

The weight ``[V, D]`` is looked up at indices ``i_{nt}``, so
:math:`v_{nk} = \sum_t e_{i_{nt}} \otimes g_{nkt}`: the columns of a sample
are summed over the positions that share an index (a *segment*). Reductions
work on these segment sums and scatter them into ``[V, D]``; no one-hot
matrix is formed.
"""

from __future__ import annotations

from typing import Tuple

import torch
from torch import Tensor

from curvext.rules.base import ModuleRule, check_dense_factor


class EmbeddingRule(ModuleRule):
    """``y[n, t] = W[i[n, t]]``; the samples may sit on any index axis."""

    flexible_batch_axis = True

    def check(self):
        if self.module.scale_grad_by_freq:
            raise NotImplementedError(
                f"{self.module} uses scale_grad_by_freq=True: its gradient is not "
                "the derivative of the output, so curvext cannot compute "
                "curvature for it. Set scale_grad_by_freq=False."
            )

    def _indices(self, call) -> Tensor:
        """Indices of one call, ``[N, T]``."""
        indices = self.batch_first(call, call.args[0])
        return indices.reshape(indices.shape[0], -1)

    def _indices_and_grads(self, grads) -> Tuple[Tensor, Tensor]:
        """Indices ``[N, T]`` and columns ``[K, N, T, D]`` of all calls."""
        index_parts, grad_parts = [], []
        for call, call_grads in zip(self.calls, grads):
            indices = self._indices(call)
            call_grads = self.batch_first(call, call_grads, offset=1)
            call_grads = call_grads.reshape(*call_grads.shape[:2], -1, call_grads.shape[-1])
            if self.module.padding_idx is not None:
                keep = (indices != self.module.padding_idx).to(call_grads.dtype)
                call_grads = call_grads * keep[None, :, :, None]
            index_parts.append(indices)
            grad_parts.append(call_grads)
        return torch.cat(index_parts, 1), torch.cat(grad_parts, 2)

    def _segments(self, grads) -> Tuple[Tensor, Tensor]:
        """Keys ``n·V + i`` of each segment ``[S]`` and its column sums ``[K, S, D]``."""
        indices, grads = self._indices_and_grads(grads)
        num_rows = self.module.num_embeddings
        sample = torch.arange(indices.shape[0], device=indices.device)[:, None]
        keys, segment = torch.unique((sample * num_rows + indices).flatten(), return_inverse=True)
        sums = grads.new_zeros(grads.shape[0], keys.numel(), grads.shape[-1])
        sums.index_add_(1, segment, grads.flatten(1, 2))
        return keys, sums

    def per_sample(self, name, grads):
        indices, grads = self._indices_and_grads(grads)
        num_cols, batch = grads.shape[:2]
        result = grads.new_zeros(num_cols, batch, *self.module.weight.shape)
        scatter_index = indices[None, :, :, None].expand_as(grads)
        return result.scatter_add_(2, scatter_index, grads)

    def diag(self, name, grads):
        keys, sums = self._segments(grads)
        result = sums.new_zeros(self.module.weight.shape)
        return result.index_add_(0, keys % self.module.num_embeddings, sums.square().sum(0))

    def batch_diag(self, name, grads):
        keys, sums = self._segments(grads)
        rows, dim = self.module.weight.shape
        result = sums.new_zeros(self.batch_size * rows, dim)
        result.index_add_(0, keys, sums.square().sum(0))
        return result.reshape(self.batch_size, rows, dim)

    def batch_l2(self, name, grads):
        keys, sums = self._segments(grads)
        result = sums.new_zeros(self.batch_size)
        sample = keys // self.module.num_embeddings
        return result.index_add_(0, sample, sums.square().sum((0, 2)))

    def sample_sum(self, name, grads):
        indices, grads = self._indices_and_grads(grads)
        result = grads.new_zeros(grads.shape[0], *self.module.weight.shape)
        return result.index_add_(1, indices.flatten(), grads.flatten(1, 2))

    def kfac_grad_factor(self, name, grads, approx):
        _, grads = self._indices_and_grads(grads)
        if approx == "reduce":
            grads = grads.sum(2, keepdim=True)
        flat = grads.flatten(0, 2)
        return flat.T @ flat

    def kfac_grad_dim(self, name):
        return self.module.embedding_dim

    def kfac_input_factor(self, name, approx):
        indices = torch.cat([self._indices(c) for c in self.calls], 1)
        rows = self.module.num_embeddings
        weight = self.module.weight
        # padding positions have no input: PyTorch never updates that row
        present = torch.ones_like(indices, dtype=weight.dtype)
        if self.module.padding_idx is not None:
            present = present * (indices != self.module.padding_idx)
        if approx == "expand":
            # the covariance of one-hot rows is diagonal: the token frequencies,
            # stored as a 1-D factor (a diagonal; never the V x V matrix)
            counts = torch.zeros(rows, dtype=weight.dtype, device=weight.device)
            counts.index_add_(0, indices.flatten(), present.flatten())
            return counts / indices.numel()
        check_dense_factor(
            self.module,
            name,
            rows,
            weight.dtype,
            "a reduce input factor over the vocabulary (means of one-hot rows)",
        )
        one_hot = torch.nn.functional.one_hot(indices, rows).to(weight.dtype)
        mean_one_hot = (one_hot * present.unsqueeze(-1)).mean(1)
        return (mean_one_hot.T @ mean_one_hot) / indices.shape[0]

    def kfac_factors(self, name, grad_factor, approx):
        return [self.kfac_input_factor(name, approx), grad_factor]
