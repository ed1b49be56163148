r"""Dense float64 references, built with ``torch.func`` only (never curvext).

For a loss :math:`L(f(\theta))` with model output :math:`f \in \mathbb{R}^F`
(the whole batch, flattened), the GGN is

.. math::  G = J^\top H J, \qquad J = \partial f / \partial \theta,
           \qquad H = \nabla^2_f L,

where ``H`` is the Hessian of the *actual PyTorch loss* on the whole batch, so
the normalisation (``1/N'`` for ``reduction="mean"``, class weights,
``ignore_index``, ...) is PyTorch's own. All losses in the suite are sums over
samples, so ``H`` is block-diagonal over samples (asserted below) and the
per-sample GGN is :math:`G_n = J_n^\top H_{nn} J_n`, the per-sample gradient
:math:`J_n^\top \nabla_{f_n} L`: both keep PyTorch's batch normalisation.

Kronecker-factor references follow the conventions in the curvext brief
(curvlinops'): for a layer with inputs :math:`a_{n,t}` and output
:math:`z_{n,t}` (``t`` runs over shared positions),

* expand: :math:`A = \sum_{n,t} a a^\top / (N T)`,
  :math:`G = \sum_{n,t} [\,\mathrm{GGN}_z\,]_{(n,t),(n,t)}`,
* reduce: :math:`A = \sum_n \bar a \bar a^\top / N` with :math:`\bar a` the
  mean over ``t``, :math:`G = \sum_n \sum_{t,t'} [\,\mathrm{GGN}_z\,]_{(n,t),(n,t')}`,

where :math:`\mathrm{GGN}_z = J_z^\top H J_z` is the exact GGN w.r.t. the
layer output (type-2). The empirical Fisher replaces it by
:math:`g g^\top` with :math:`g = \nabla_z L / \sqrt{c}`, ``c`` the loss
scaling, computed as ``L_mean / L_sum`` from PyTorch itself.
"""

from __future__ import annotations

import copy
import math

import torch
from torch import Tensor, nn
from torch.func import functional_call, grad, hessian, jacrev

CONV_TYPES = (nn.Conv1d, nn.Conv2d, nn.Conv3d)
CONV_TRANSPOSE_TYPES = (nn.ConvTranspose1d, nn.ConvTranspose2d, nn.ConvTranspose3d)


def trainable_params(model: nn.Module) -> dict[str, Tensor]:
    """Detached trainable parameters, in ``named_parameters`` order."""
    return {name: param.detach() for name, param in model.named_parameters() if param.requires_grad}


class DenseReference:
    """Dense GGN, per-sample GGN and per-sample gradients of one batch.

    Args:
        model: an un-extended model; ``model(X)`` is the loss input.
        loss_fn: an un-extended PyTorch loss.
        X: inputs ``[N, ...]``.
        y: targets.
    """

    def __init__(self, model: nn.Module, loss_fn: nn.Module, X: Tensor, y: Tensor):
        self.params = trainable_params(model)
        self.names = list(self.params)

        def forward(params: dict[str, Tensor]) -> Tensor:
            return functional_call(model, params, (X,))

        output = forward(self.params).detach()
        self.output = output
        self.N = output.shape[0]
        num_outputs = output.numel()
        self.outputs_per_sample = num_outputs // self.N
        jacobians = jacrev(forward)(self.params)
        self.jacobians = {name: jacobians[name].reshape(num_outputs, -1) for name in self.names}

        def loss_of_output(out: Tensor) -> Tensor:
            return loss_fn(out, y)

        self.loss = loss_of_output(output).detach()
        self.loss_grad = grad(loss_of_output)(output).reshape(num_outputs)
        self.loss_hessian = hessian(loss_of_output)(output).reshape(num_outputs, num_outputs)
        blocks = self.loss_hessian.reshape(
            self.N, self.outputs_per_sample, self.N, self.outputs_per_sample
        )
        off_diagonal = blocks.clone()
        for n in range(self.N):
            off_diagonal[n, :, n, :] = 0
        assert off_diagonal.abs().max() <= 1e-12 * (1 + blocks.abs().max()), (
            "loss Hessian is not block-diagonal over samples"
        )
        self._hessian_blocks = blocks

    # full GGN --------------------------------------------------------------
    def jacobian(self, names: list[str] | None = None) -> Tensor:
        """``[F, P]`` Jacobian of the flattened output w.r.t. the named params."""
        names = self.names if names is None else names
        return torch.cat([self.jacobians[name] for name in names], dim=1)

    def ggn(self, names: list[str] | None = None) -> Tensor:
        """``[P, P]`` GGN w.r.t. the concatenated flattened params ``names``."""
        J = self.jacobian(names)
        return J.T @ self.loss_hessian @ J

    def block(self, name: str) -> Tensor:
        """``[P_i, P_i]`` GGN block of one parameter (row-major flattening)."""
        return self.ggn([name])

    def diag(self, name: str) -> Tensor:
        """GGN diagonal of one parameter, shaped like the parameter."""
        return self.block(name).diagonal().reshape(self.params[name].shape)

    # per sample ------------------------------------------------------------
    def _per_sample_jacobian(self, names: list[str] | None = None) -> Tensor:
        return self.jacobian(names).reshape(self.N, self.outputs_per_sample, -1)

    def per_sample_ggn(self, names: list[str] | None = None) -> Tensor:
        """``[N, P, P]``: ``G_n = J_n^T H_nn J_n``, summing to :meth:`ggn`."""
        Jn = self._per_sample_jacobian(names)
        return torch.stack(
            [Jn[n].T @ self._hessian_blocks[n, :, n, :] @ Jn[n] for n in range(self.N)]
        )

    def per_sample_blocks(self, name: str) -> Tensor:
        """``[N, P_i, P_i]`` per-sample GGN blocks of one parameter."""
        return self.per_sample_ggn([name])

    def per_sample_diag(self, name: str) -> Tensor:
        """``[N, *p.shape]`` per-sample GGN diagonals."""
        blocks = self.per_sample_blocks(name)
        return blocks.diagonal(dim1=1, dim2=2).reshape(self.N, *self.params[name].shape)

    def per_sample_grads(self, name: str) -> Tensor:
        """``[N, *p.shape]``: ``J_n^T ∇_{f_n} L`` (loss scaling included)."""
        Jn = self._per_sample_jacobian([name])
        grad_n = self.loss_grad.reshape(self.N, self.outputs_per_sample)
        per_sample = torch.einsum("nfp,nf->np", Jn, grad_n)
        return per_sample.reshape(self.N, *self.params[name].shape)

    def gradient(self, name: str) -> Tensor:
        return self.per_sample_grads(name).sum(0)


# ---------------------------------------------------------------------------
# Layer-level quantities for Kronecker-factor references
# ---------------------------------------------------------------------------
def loss_scaling(loss_fn: nn.Module, output: Tensor, y: Tensor) -> float:
    """``c`` in ``L = c Σ ℓ``, measured from PyTorch (``L_mean / L_sum``)."""
    if loss_fn.reduction == "sum":
        return 1.0
    summed = copy.deepcopy(loss_fn)
    summed.reduction = "sum"
    value_sum = summed(output, y)
    assert value_sum.abs() > 1e-8, "cannot measure the loss scaling"
    return (loss_fn(output, y) / value_sum).item()


def module_call(model: nn.Module, X: Tensor, module: nn.Module) -> tuple[Tensor, Tensor]:
    """Input and output of the single call of ``module`` in ``model(X)``."""
    calls = []
    handle = module.register_forward_hook(
        lambda mod, args, out: calls.append((args[0].detach(), out.detach()))
    )
    try:
        with torch.no_grad():
            model(X)
    finally:
        handle.remove()
    assert len(calls) == 1, f"{module} is called {len(calls)} times"
    return calls[0]


def output_jacobian_wrt_module_output(
    model: nn.Module, X: Tensor, module: nn.Module, output_shape: torch.Size
) -> Tensor:
    """``[F, *z.shape]``: Jacobian of the model output w.r.t. ``module``'s output.

    The module output is perturbed by an additive ``delta`` through a forward
    hook; the Jacobian w.r.t. ``delta`` at zero is the one w.r.t. the output,
    and anything after the module (in-place ops included) acts on it.
    """
    state = {}

    def perturb(mod, args, out):
        return out + state["delta"]

    def forward(delta: Tensor) -> Tensor:
        state["delta"] = delta
        return model(X).flatten()

    handle = module.register_forward_hook(perturb)
    try:
        J = jacrev(forward)(torch.zeros(output_shape))
    finally:
        handle.remove()
    return J.detach()


def _positions_last_index(channels_first: bool, shape) -> Tensor:
    """Index reordering a flattened tensor of ``shape`` into ``[N, T, D]``."""
    index = torch.arange(math.prod(shape)).reshape(shape)
    if channels_first:
        index = index.flatten(2).transpose(1, 2)  # [N, T, C]
    return index.reshape(shape[0], -1, index.shape[-1])


def layer_inputs(module: nn.Module, layer_input: Tensor) -> Tensor:
    """``[N, T, D_in]`` vectors ``a_{n,t}`` with ``z_{n,t} = W a_{n,t} (+ b)``.

    For a transposed convolution ``z`` is the pre-overlap-add output
    ``u_{n,s} = W^T x_{n,s}`` at every *input* position ``s``.
    """
    N = layer_input.shape[0]
    if isinstance(module, nn.Linear):
        return layer_input.reshape(N, -1, layer_input.shape[-1])
    if isinstance(module, nn.Embedding):
        one_hot = nn.functional.one_hot(layer_input, module.num_embeddings)
        return one_hot.to(torch.get_default_dtype()).reshape(N, -1, module.num_embeddings)
    if isinstance(module, CONV_TYPES):
        assert module.groups == 1, "reference only for groups=1"
        features = module.in_channels * math.prod(module.kernel_size)
        identity = torch.eye(features).reshape(features, module.in_channels, *module.kernel_size)
        # a convolution with identity filters (same stride, padding,
        # padding_mode, dilation) extracts the patches in weight.flatten(1) order
        patches = module._conv_forward(layer_input, identity, None)
        return patches.flatten(2).transpose(1, 2)
    if isinstance(module, CONV_TRANSPOSE_TYPES):
        assert module.groups == 1, "reference only for groups=1"
        return layer_input.flatten(2).transpose(1, 2)
    raise NotImplementedError(type(module))


def _overlap_add(module: nn.Module, pre_output: Tensor) -> Tensor:
    """The parameter-free part of a transposed convolution.

    ``ConvTranspose(x) = overlap_add(u) + b`` with ``u[(o, k), s] =
    Σ_i W[i, o, k] x[i, s]``; the overlap-add is itself a transposed
    convolution with identity filters.
    """
    features = module.out_channels * math.prod(module.kernel_size)
    identity = torch.eye(features).reshape(features, module.out_channels, *module.kernel_size)
    conv_transpose = {
        1: nn.functional.conv_transpose1d,
        2: nn.functional.conv_transpose2d,
        3: nn.functional.conv_transpose3d,
    }[len(module.kernel_size)]
    return conv_transpose(
        pre_output,
        identity,
        None,
        module.stride,
        module.padding,
        module.output_padding,
        1,
        module.dilation,
    )


def _output_side_factor(
    J_z: Tensor,
    shape: tuple[int, int, int],
    loss_hessian: Tensor,
    loss_grad: Tensor,
    scaling: float,
    fisher_type: str,
    kfac_approx: str,
) -> Tensor:
    """``G`` from the ``[F, N*T*D]`` Jacobian of the output w.r.t. ``z``."""
    N, T, D = shape
    if fisher_type == "forward-only":
        return torch.eye(D)
    if fisher_type in ("type-2", "mc"):
        ggn_z = (J_z.T @ loss_hessian @ J_z).reshape(N, T, D, N, T, D)
        if kfac_approx == "expand":
            return ggn_z.reshape(N * T, D, N * T, D).diagonal(dim1=0, dim2=2).sum(-1)
        return ggn_z.sum(dim=(1, 4)).diagonal(dim1=0, dim2=2).sum(-1)
    if fisher_type == "empirical":
        columns = (J_z.T @ loss_grad).reshape(N, T, D) / math.sqrt(scaling)
        if kfac_approx == "expand":
            return torch.einsum("ntd,nte->de", columns, columns)
        summed = columns.sum(1)
        return torch.einsum("nd,ne->de", summed, summed)
    raise ValueError(fisher_type)


def kfac_reference(
    model: nn.Module,
    loss_fn: nn.Module,
    X: Tensor,
    y: Tensor,
    module: nn.Module,
    fisher_type: str,
    kfac_approx: str,
) -> dict[str, list[Tensor]]:
    """Kronecker factors of ``module``'s parameters, keyed by parameter name.

    Linear/Conv: ``{"weight": [G, A], "bias": [G]}``; Embedding (weight
    ``[V, D]``) and transposed convolutions (weight ``[C_in, C_out, *k]``):
    ``{"weight": [A, G], ...}``, so that ``kron`` matches ``p.flatten()``.
    ``fisher_type="mc"`` has the type-2 factors as its expectation.
    """
    layer_input, layer_output = module_call(model, X, module)
    a = layer_inputs(module, layer_input)
    N, T, _ = a.shape
    if kfac_approx == "expand":
        A = torch.einsum("nti,ntj->ij", a, a) / (N * T)
    else:
        mean_a = a.mean(1)
        A = torch.einsum("ni,nj->ij", mean_a, mean_a) / N

    output = model(X).detach()
    F = output.numel()
    loss_hessian = hessian(lambda out: loss_fn(out, y))(output).reshape(F, F)
    loss_grad = grad(lambda out: loss_fn(out, y))(output).flatten()
    scaling = loss_scaling(loss_fn, output, y)
    J_out = output_jacobian_wrt_module_output(model, X, module, layer_output.shape).reshape(F, -1)
    channels_first = isinstance(module, CONV_TYPES + CONV_TRANSPOSE_TYPES)
    out_index = _positions_last_index(channels_first, layer_output.shape)

    def output_factor(J_z: Tensor, index: Tensor) -> Tensor:
        return _output_side_factor(
            J_z[:, index.flatten()],
            tuple(index.shape),
            loss_hessian,
            loss_grad,
            scaling,
            fisher_type,
            kfac_approx,
        )

    G_out = output_factor(J_out, out_index)
    factors = {}
    if isinstance(module, CONV_TRANSPOSE_TYPES):
        pre_shape = (
            N,
            G_out.shape[0] * math.prod(module.kernel_size),
            *layer_input.shape[2:],
        )
        J_pre = jacrev(lambda u: J_out @ _overlap_add(module, u).flatten())(
            torch.zeros(pre_shape)
        ).reshape(F, -1)
        G_pre = output_factor(J_pre, _positions_last_index(True, pre_shape))
        factors["weight"] = [A, G_pre]
    elif isinstance(module, nn.Embedding):
        factors["weight"] = [A, G_out]
    else:
        factors["weight"] = [G_out, A]
    if getattr(module, "bias", None) is not None:
        factors["bias"] = [G_out]
    return factors


def dense_factor(factor: Tensor) -> Tensor:
    """A KFAC factor as a matrix: curvext stores a diagonal factor (an
    embedding's input factor) as its diagonal, 1-D."""
    return torch.diag(factor) if factor.dim() == 1 else factor


def kron(factors: list[Tensor]) -> Tensor:
    """Kronecker product of a list of factors (a single factor is itself)."""
    result = dense_factor(factors[0])
    for factor in factors[1:]:
        result = torch.kron(result, dense_factor(factor))
    return result


class GraphReference:
    r"""GGN, per-sample GGN and per-sample gradients of *one* forward pass.

    The Jacobian :math:`J = \partial f / \partial \theta` is taken by reverse
    mode through the autograd graph of the very forward pass whose loss
    curvext backpropagates (one ``torch.autograd.grad`` per output entry,
    before that backward), so random draws (dropout masks), hooks,
    parametrizations and compiled regions are those curvext saw. The loss
    Hessian :math:`H = \nabla^2_f L` is PyTorch's own loss differentiated by
    ``torch.autograd.functional.hessian``. Never touches curvext.

    Args:
        output: The model output ``[N, ...]`` (in the graph, float64).
        params: The parameters to differentiate.
        loss_of_output: ``f -> L`` (the un-extended loss on ``f``).
    """

    def __init__(self, output: Tensor, params: list[Tensor], loss_of_output):
        self.params = params
        self.N = output.shape[0]
        flat = output.reshape(-1)
        rows = []
        for unit in torch.eye(flat.numel(), dtype=flat.dtype):  # no vmap: any op
            parts = torch.autograd.grad(flat, params, unit, retain_graph=True, allow_unused=True)
            rows.append(
                torch.cat(
                    [
                        torch.zeros(p.numel()) if part is None else part.reshape(-1)
                        for part, p in zip(parts, params)
                    ]
                )
            )
        self.J = torch.stack(rows)
        point = output.detach()

        def loss_of_flat(f: Tensor) -> Tensor:
            return loss_of_output(f.reshape(point.shape))

        self.H = torch.autograd.functional.hessian(loss_of_flat, point.reshape(-1))
        self.g = torch.autograd.functional.jacobian(loss_of_flat, point.reshape(-1))
        per = flat.numel() // self.N
        off_block = self.H.reshape(self.N, per, self.N, per).clone()
        off_block[range(self.N), :, range(self.N)] = 0
        assert off_block.abs().max() <= 1e-12 * max(1.0, self.H.abs().max().item())
        self.Jn = self.J.reshape(self.N, per, -1)
        self.Hn = self.H.reshape(self.N, per, self.N, per)[range(self.N), :, range(self.N)]

    def ggn(self) -> Tensor:
        return self.J.T @ self.H @ self.J

    def per_sample_ggn_diag(self) -> Tensor:
        """``[N, P]``."""
        return torch.einsum("npi,npq,nqi->ni", self.Jn, self.Hn, self.Jn)

    def per_sample_grads(self) -> Tensor:
        """``[N, P]``."""
        return torch.einsum("npi,np->ni", self.Jn, self.g.reshape(self.N, -1))

    def split(self, flat: Tensor) -> list[Tensor]:
        """``[..., P]`` into one ``[..., *p.shape]`` per parameter."""
        sizes = [p.numel() for p in self.params]
        return [
            part.reshape(tuple(flat.shape[:-1]) + tuple(p.shape))
            for part, p in zip(flat.split(sizes, dim=-1), self.params)
        ]
