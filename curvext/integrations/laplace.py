r"""laplace-torch curvature backends computed by curvext's engine.

:class:`CurvextGGN` and :class:`CurvextEF` plug into laplace-torch like its
own ``BackPackGGN``/``BackPackEF``, with one argument::

    from laplace import Laplace
    from curvext.integrations.laplace import CurvextGGN

    la = Laplace(model, "classification", subset_of_weights="all",
                 hessian_structure="kron", backend=CurvextGGN)
    la.fit(train_loader)
    la.optimize_prior_precision()

They return the numbers ``BackPackGGN``/``BackPackEF`` return, but work on
every model curvext's engine supports: residual connections, attention
written with tensor ops, normalisation layers in eval mode, any
``torch.nn.functional`` code.

**Conventions (laplace-torch's).** The loss is laplace's ``lossfunc``
(``CrossEntropyLoss`` or ``MSELoss`` with ``reduction="sum"``) times
``factor`` (1 for classification, :math:`\tfrac12` for regression, so that the
curvature is that of the Gaussian log-likelihood :math:`\mathcal{N}(f, 1)`).
Per batch ``(X, y)`` of ``M`` samples from a data set of ``N``:

- ``diag`` returns ``(factor · loss, factor · d)`` with ``d`` the GGN diagonal
  (``GGNDiag``; ``stochastic=True``: ``GGNDiag(mc_samples=num_samples)``) or,
  for :class:`CurvextEF`, :math:`\sum_n \nabla\ell_n \odot \nabla\ell_n`
  (``SumGradSquared``); parameters flattened and concatenated in the order of
  ``model.parameters()``.
- ``kron`` returns ``(factor · loss, factor · Kron)``, a
  ``laplace.utils.matrix.Kron`` with one entry per trainable parameter:
  ``[G, A]`` for weights (``torch.kron(G, A)`` is the block of
  ``p.flatten()``, as ``p.kfac`` in curvext and ``p.kflr`` in BackPACK),
  ``[G]`` for biases and one full block for parameters without Kronecker
  structure (normalisation layers). Weight and bias of a layer are separate
  entries, as in ``Kron.init_from_model``. The output-side factor :math:`G`
  is a sum over the batch; the input-side factor :math:`A` (an average over
  the batch) is multiplied by :math:`M/N`, so that laplace's factor-wise sum
  over the batches gives :math:`(\sum_n G_n) \otimes (\tfrac1N \sum_n A_n)`,
  BackPACK's normalisation. ``KFAC(fisher_type="type-2")`` for the GGN,
  ``"mc"`` with ``num_samples`` samples when ``stochastic=True``,
  ``"empirical"`` for :class:`CurvextEF` (BackPACK has no EF-KFAC).
- ``full`` returns the dense ``[P, P]`` GGN from ``SqrtGGN`` (:math:`V^\top V`),
  or the EF from the individual gradients.
- ``gradients`` returns the individual gradients ``[M, P]`` (``BatchGrad``)
  and the summed loss; ``jacobians`` is laplace's ``torch.func`` one, run
  with curvext's recording switched off.

``subnetwork_indices`` selects entries of ``diag``/``full``/``gradients``
as in laplace-torch. The model and ``lossfunc`` are extended with
:func:`curvext.extend` in place; parameters' ``.grad`` are left as they were.
Inputs must be tensors (dict-like inputs are refused, as by BackPACK's
backend).
"""

from __future__ import annotations

from collections.abc import MutableMapping
from typing import Any, Iterable, List, Tuple

import torch
from torch import Tensor, nn

try:
    from laplace.curvature import EFInterface, GGNInterface
    from laplace.utils import Kron
except ImportError as error:  # pragma: no cover - exercised without the extra
    raise ImportError(
        "curvext.integrations.laplace needs laplace-torch, which is not "
        "installed: pip install laplace-torch (curvext's 'laplace' extra; it may "
        "bring another torch: install it with the torch you use)."
    ) from error

from curvext.context import backpack, disable
from curvext.extend import extend
from curvext.extensions import BatchGrad, GGNDiag, SqrtGGN, SumGradSquared
from curvext.extensions.base import Extension
from curvext.extensions.data_pass import KFACForData
from curvext.kronecker import as_matrix
from curvext.operators.passes import kept_state


class _CurvextInterface:
    """What both backends share: run curvext's engine on laplace's loss.

    A mixin placed before laplace's ``GGNInterface``/``EFInterface``; it
    extends the model (or its last layer) and ``lossfunc`` and overrides the
    methods whose laplace defaults would go through ``torch.func``.
    """

    def _extend(self) -> None:
        extend(self._model)
        extend(self.lossfunc)

    def _run(
        self, x: Tensor, y: Tensor, *extensions: Extension
    ) -> Tuple[Tensor, List[nn.Parameter]]:
        """Summed loss of ``(x, y)`` with ``extensions`` computed in its backward.

        Returns the detached loss (without ``factor``) and the parameters
        read; their ``.grad`` are restored to what they were before.
        """
        if isinstance(x, MutableMapping):
            raise ValueError(
                f"{type(self).__name__}: dict-like inputs are not supported; pass "
                f"a tensor batch (as for laplace-torch's BackPACK backends)."
            )
        params = self.params
        with kept_state(params):
            if self.last_layer:
                # only the last layer's curvature is needed: no graph through
                # the (unextended) feature extractor
                with torch.no_grad(), disable():
                    _, features = self.model.forward_with_features(x)
                f = self._model(features)
            else:
                f = self.model(x)
            # laplace's convention: the last axis of f holds the outputs
            if self.likelihood != "regression":
                f, y = f.reshape(-1, f.size(-1)), y.reshape(-1)
            loss = self.lossfunc(f, y)
            with backpack(*extensions):
                loss.backward()
        return loss.detach(), params

    @staticmethod
    def _take(params: Iterable[nn.Parameter], savefield: str) -> List[Any]:
        """``p.<savefield>`` of every parameter, removed from the parameters."""
        values = []
        for p in params:
            if savefield not in p.__dict__:
                raise RuntimeError(
                    f"The trainable parameter of shape {tuple(p.shape)} has no "
                    f"`{savefield}` after the backward pass: the forward pass did "
                    f"not use it, or used it outside the extended model."
                )
            values.append(p.__dict__.pop(savefield))
        return values

    def _select(self, flat: Tensor) -> Tensor:
        """Entries of the last axis that ``subnetwork_indices`` selects."""
        if self.subnetwork_indices is None:
            return flat
        return flat[..., self.subnetwork_indices]

    def _kron_from_kfac(
        self, x: Tensor, y: Tensor, N: int, extension: KFACForData
    ) -> Tuple[Tensor, Kron]:
        loss, params = self._run(x, y, extension)
        factors = self._take(params, extension.savefield)
        kfacs = []
        scale = x.shape[0] / N
        for p, blocks in zip(params, factors):
            expected = 1 if p.ndim == 1 else 2
            if len(blocks) != expected:
                raise ValueError(
                    f"{type(self).__name__}.kron: the parameter of shape "
                    f"{tuple(p.shape)} has {len(blocks)} Kronecker factor(s), but "
                    f"laplace-torch's Kron expects {expected} for a "
                    f"{p.ndim}-dimensional parameter (its module has no Kronecker "
                    f"rule in curvext). Use hessian_structure='diag' or 'full'."
                )
            flags = extension.loss_scaled[id(p)]
            # the input-side factor is a batch average: weight it by M/N so
            # that laplace's factor-wise sum over batches averages over the set
            # laplace-torch's Kron takes matrices: a diagonal (1-D) factor is
            # made dense here
            kfacs.append(
                [
                    as_matrix(b.detach()) * (1.0 if scaled else scale)
                    for b, scaled in zip(blocks, flags)
                ]
            )
        return self.factor * loss, self.factor * Kron(kfacs)

    def gradients(self, x: Tensor, y: Tensor) -> Tuple[Tensor, Tensor]:
        """Individual gradients ``[M, P]`` of the summed loss (``BatchGrad``), and the loss."""
        loss, params = self._run(x, y, BatchGrad())
        grads = self._take(params, BatchGrad.savefield)
        Gs = torch.cat([g.detach().flatten(start_dim=1) for g in grads], dim=1)
        return self._select(Gs), loss

    def jacobians(self, x, enable_backprop: bool = False) -> Tuple[Tensor, Tensor]:
        """laplace's ``torch.func`` Jacobians ``[M, C, P]`` and outputs, without recording."""
        with disable():
            return super().jacobians(x, enable_backprop=enable_backprop)

    functorch_jacobians = jacobians

    def selected_output_jacobians(self, x, outputs: Tensor, enable_backprop: bool = False):
        with disable():
            return super().selected_output_jacobians(x, outputs, enable_backprop=enable_backprop)


class CurvextGGN(_CurvextInterface, GGNInterface):
    """laplace-torch GGN backend computed by curvext's engine.

    A drop-in for laplace-torch's ``BackPackGGN`` (same numbers) that also
    handles models BackPACK cannot extend.

    Args:
        model: The network (or laplace's ``FeatureExtractor``); extended with
            :func:`curvext.extend` in place.
        likelihood: ``"classification"`` or ``"regression"``.
        last_layer: Curvature of the last layer only (``model.last_layer``).
        subnetwork_indices: Indices of the flattened parameters to keep.
        dict_key_x, dict_key_y: laplace-torch's keys for dict-like batches
            (accepted for its API; such batches are refused).
        stochastic: Monte-Carlo Fisher instead of the exact GGN (curvext's
            ``mc_samples=num_samples``) for ``diag``, ``kron`` and ``full``.
        num_samples: Number of Monte-Carlo samples when ``stochastic=True``.

    Example:
        >>> import torch
        >>> from laplace import Laplace
        >>> from curvext.integrations.laplace import CurvextGGN
        >>> torch.manual_seed(0)  # doctest: +ELLIPSIS
        <torch._C.Generator object at ...>
        >>> model = torch.nn.Sequential(
        ...     torch.nn.Linear(4, 8), torch.nn.Tanh(), torch.nn.Linear(8, 3)
        ... )
        >>> data = torch.utils.data.TensorDataset(torch.randn(16, 4), torch.randint(0, 3, (16,)))
        >>> la = Laplace(model, "classification", subset_of_weights="all",
        ...              hessian_structure="kron", backend=CurvextGGN)
        >>> la.fit(torch.utils.data.DataLoader(data, batch_size=8))
        >>> bool(torch.isfinite(la.log_marginal_likelihood()))
        True
    """

    def __init__(
        self,
        model: nn.Module,
        likelihood: str,
        last_layer: bool = False,
        subnetwork_indices: torch.LongTensor | None = None,
        dict_key_x: str = "input_ids",
        dict_key_y: str = "labels",
        stochastic: bool = False,
        num_samples: int = 1,
    ) -> None:
        super().__init__(
            model,
            likelihood,
            last_layer,
            subnetwork_indices,
            dict_key_x,
            dict_key_y,
            stochastic=stochastic,
            num_samples=num_samples,
        )
        self._extend()

    @property
    def _mc_samples(self) -> int:
        return self.num_samples if self.stochastic else 0

    def diag(self, x: Tensor, y: Tensor, **kwargs: Any) -> Tuple[Tensor, Tensor]:
        """``(factor · loss, factor · GGN diagonal [P])`` of the batch."""
        extension = GGNDiag(mc_samples=self._mc_samples)
        loss, params = self._run(x, y, extension)
        diagonal = torch.cat(
            [d.detach().flatten() for d in self._take(params, extension.savefield)]
        )
        return self.factor * loss, self.factor * self._select(diagonal)

    def kron(self, x: Tensor, y: Tensor, N: int, **kwargs: Any) -> Tuple[Tensor, Kron]:
        """``(factor · loss, factor · Kron)``: type-2 (or MC) KFAC, ``A`` weighted by ``M/N``."""
        if self.stochastic:
            extension = KFACForData(fisher_type="mc", mc_samples=self.num_samples)
        else:
            extension = KFACForData(fisher_type="type-2")
        return self._kron_from_kfac(x, y, N, extension)

    def full(self, x: Tensor, y: Tensor, **kwargs: Any) -> Tuple[Tensor, Tensor]:
        """``(factor · loss, factor · GGN [P, P])`` of the batch, from ``SqrtGGN``."""
        extension = SqrtGGN(mc_samples=self._mc_samples)
        loss, params = self._run(x, y, extension)
        # [K, M, *p.shape] per parameter -> [K·M, P]
        columns = torch.cat(
            [s.detach().flatten(0, 1).flatten(1) for s in self._take(params, extension.savefield)],
            dim=1,
        )
        columns = self._select(columns)
        return self.factor * loss, self.factor * (columns.T @ columns)


class CurvextEF(_CurvextInterface, EFInterface):
    """laplace-torch empirical-Fisher backend computed by curvext's engine.

    A drop-in for laplace-torch's ``BackPackEF`` (same numbers) that also
    handles models BackPACK cannot extend, and offers ``kron`` (empirical
    KFAC, :math:`G = \\sum_n g_n g_n^\\top` of the output gradients), which
    ``BackPackEF`` does not.

    Args:
        model, likelihood, last_layer, subnetwork_indices, dict_key_x,
        dict_key_y: as for :class:`CurvextGGN`.
    """

    def __init__(
        self,
        model: nn.Module,
        likelihood: str,
        last_layer: bool = False,
        subnetwork_indices: torch.LongTensor | None = None,
        dict_key_x: str = "input_ids",
        dict_key_y: str = "labels",
    ) -> None:
        super().__init__(model, likelihood, last_layer, subnetwork_indices, dict_key_x, dict_key_y)
        self._extend()

    def diag(self, x: Tensor, y: Tensor, **kwargs: Any) -> Tuple[Tensor, Tensor]:
        """``(factor · loss, factor · Σ_n ∇ℓ_n ⊙ ∇ℓ_n [P])`` of the batch."""
        extension = SumGradSquared()
        loss, params = self._run(x, y, extension)
        diagonal = torch.cat(
            [d.detach().flatten() for d in self._take(params, extension.savefield)]
        )
        return self.factor * loss, self.factor * self._select(diagonal)

    def kron(self, x: Tensor, y: Tensor, N: int, **kwargs: Any) -> Tuple[Tensor, Kron]:
        """``(factor · loss, factor · Kron)``: empirical KFAC, ``A`` weighted by ``M/N``."""
        return self._kron_from_kfac(x, y, N, KFACForData(fisher_type="empirical"))


__all__ = ["CurvextGGN", "CurvextEF"]
