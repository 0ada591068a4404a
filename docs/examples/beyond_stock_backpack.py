"""Curvature of convolutions that stock BackPACK gets wrong or refuses.

Stock BackPACK derives convolution quantities from an unfolded input that assumes
zero padding, symmetric integer padding and ``groups = 1`` in several places.
backpack_tn describes every layer by index patterns, which encode padding modes,
``padding="same"``, ``output_padding`` and groups exactly, so the same extensions
work for these layers too. Each case below runs stock BackPACK and backpack_tn on one
layer and compares both with a reference computed by ``torch.func``:

1. ``padding_mode="reflect"``: stock BackPACK's GGN diagonal is silently wrong.
2. A depthwise convolution (``groups = C_in``): stock BackPACK's per-sample gradient
   norms are silently wrong.
3. A transposed convolution with ``output_padding``: stock BackPACK's per-sample
   gradients raise.
4. A grouped transposed convolution: stock BackPACK's Kronecker factors raise;
   backpack_tn's output factor ``B`` equals the exact GGN of the bias, block by
   block.

The loss is ``sum((f(x) - t)²)``, whose Hessian with respect to ``f(x)`` is ``2 I``.
"""

import backpack.extensions as stock
import torch
from backpack import backpack, extend
from torch import Tensor, nn
from torch.func import functional_call, grad, jacrev, vmap

import backpack_tn.extensions as tn

torch.manual_seed(0)


def run(extension, layer: nn.Module, x: Tensor) -> nn.Module:
    """Run one backward pass of ``sum((layer(x) - t)²)`` with an extension.

    Args:
        extension: A stock or backpack_tn extension instance.
        layer: The layer; it is extended in place.
        x: Input of shape ``[N, C_in, *I]``.

    Returns:
        The layer, with the extension's quantities on its parameters.
    """
    model = extend(nn.Sequential(layer, nn.Flatten()))
    out = model(x)
    loss = extend(nn.MSELoss(reduction="sum"))(out, TARGETS[out.shape[1:]])
    layer.zero_grad()
    with backpack(extension):
        loss.backward()
    return layer


class Targets(dict):
    """Fixed random regression targets, one per output shape."""

    def __missing__(self, shape: torch.Size) -> Tensor:
        """Draw the targets for a new output shape.

        Args:
            shape: Shape of one flattened output sample.

        Returns:
            Targets of shape ``[N, *shape]``.
        """
        self[shape] = torch.randn(N, *shape)
        return self[shape]


N = 4
TARGETS = Targets()


def sample_loss(layer: nn.Module):
    """Loss of one sample as a function of the parameters, for ``torch.func``.

    Args:
        layer: The layer.

    Returns:
        ``f(params, x_n, t_n) = sum((layer(x_n) - t_n)²)``.
    """

    def f(params: dict, x_n: Tensor, t_n: Tensor) -> Tensor:
        out = functional_call(layer, params, (x_n.unsqueeze(0),)).flatten()
        return (out - t_n).square().sum()

    return f


def reference_grad_batch(layer: nn.Module, x: Tensor) -> dict:
    """Per-sample gradients by ``vmap(grad)``.

    Args:
        layer: The layer.
        x: Input of shape ``[N, C_in, *I]``.

    Returns:
        Parameter name -> per-sample gradients ``[N, *param.shape]``.
    """
    params = {k: v.detach() for k, v in layer.named_parameters()}
    targets = TARGETS[layer(x).flatten(1).shape[1:]]
    return vmap(grad(sample_loss(layer)), in_dims=(None, 0, 0))(params, x, targets)


def reference_ggn(layer: nn.Module, x: Tensor, name: str) -> Tensor:
    """Exact GGN ``2 Σ_n J_nᵀ J_n`` of one parameter, by ``jacrev``.

    Args:
        layer: The layer.
        x: Input of shape ``[N, C_in, *I]``.
        name: ``'weight'`` or ``'bias'``.

    Returns:
        The GGN, shape ``[P, P]`` with ``P = param.numel()``.
    """
    params = {k: v.detach() for k, v in layer.named_parameters()}

    def outputs(param: Tensor) -> Tensor:
        return functional_call(layer, {**params, name: param}, (x,)).flatten(1)

    jac = jacrev(outputs)(params[name]).flatten(2)  # [N, F, P]
    return 2 * torch.einsum("nfp,nfq->pq", jac, jac)


def relative_error(actual: Tensor, expected: Tensor) -> float:
    """Largest deviation relative to the largest reference entry.

    Args:
        actual: Computed tensor.
        expected: Reference tensor of the same shape.

    Returns:
        ``max |actual - expected| / max |expected|``.
    """
    return ((actual - expected).abs().max() / expected.abs().max()).item()


def compare(title: str, compute, reference: Tensor) -> float:
    """Print how stock BackPACK and backpack_tn compare with the reference.

    Args:
        title: Description of the case.
        compute: ``compute(extensions_module) -> Tensor`` runs one backward pass.
        reference: The ``torch.func`` result.

    Returns:
        backpack_tn's relative error.
    """
    print(title)
    try:
        result = f"relative error {relative_error(compute(stock), reference):.1e}"
    except (NotImplementedError, RuntimeError) as exc:
        result = f"raises {type(exc).__name__}: {str(exc).splitlines()[0][:70]}"
    print(f"  stock BackPACK  {result}")
    error = relative_error(compute(tn), reference)
    print(f"  backpack_tn     relative error {error:.1e}")
    return error


# 1. GGN diagonal of a convolution with reflection padding
conv = nn.Conv2d(3, 4, kernel_size=3, padding=1, padding_mode="reflect")
x = torch.randn(N, 3, 6, 6)
expected = reference_ggn(conv, x, "weight").diagonal().reshape(conv.weight.shape)
error = compare(
    "1. Conv2d(padding_mode='reflect'), DiagGGNExact",
    lambda ext: run(ext.DiagGGNExact(), conv, x).weight.diag_ggn_exact,
    expected,
)
assert error < 1e-5

# 2. per-sample gradient norms of a depthwise convolution
conv = nn.Conv2d(4, 4, kernel_size=3, stride=2, groups=4)
x = torch.randn(N, 4, 7, 7)
expected = reference_grad_batch(conv, x)["weight"].flatten(1).square().sum(1)
error = compare(
    "2. depthwise Conv2d(groups=4), BatchL2Grad",
    lambda ext: run(ext.BatchL2Grad(), conv, x).weight.batch_l2,
    expected,
)
assert error < 1e-5

# 3. per-sample gradients of a transposed convolution with output_padding
conv = nn.ConvTranspose2d(4, 2, kernel_size=3, stride=2, output_padding=1)
x = torch.randn(N, 4, 5, 5)
expected = reference_grad_batch(conv, x)["weight"]
error = compare(
    "3. ConvTranspose2d(output_padding=1), BatchGrad",
    lambda ext: run(ext.BatchGrad(), conv, x).weight.grad_batch,
    expected,
)
assert error < 1e-5


def kflr(ext):
    """KFLR, with the KFAC-reduce input factor for backpack_tn.

    Args:
        ext: ``backpack.extensions`` or ``backpack_tn.extensions``.

    Returns:
        The extension instance (stock BackPACK's has no ``kfac_approx``).
    """
    return ext.KFLR(kfac_approx="reduce") if ext is tn else ext.KFLR()


# 4. Kronecker factors of a grouped transposed convolution: the output factor B of
# KFLR is the exact GGN of the bias, one [C_out // G, C_out // G] block per group
conv = nn.ConvTranspose2d(4, 6, kernel_size=3, stride=2, groups=2)
x = torch.randn(N, 4, 4, 4)
groups, per_group = conv.groups, conv.out_channels // conv.groups
ggn = reference_ggn(conv, x, "bias").reshape(groups, per_group, groups, per_group)
expected = ggn.diagonal(dim1=0, dim2=2).permute(2, 0, 1)  # [G, a, a]
error = compare(
    "4. ConvTranspose2d(groups=2), KFLR(kfac_approx='reduce'): B",
    lambda ext: run(kflr(ext), conv, x).weight.kflr[0],
    expected,
)
assert error < 1e-5
B, A = conv.weight.kflr
print(f"  weight factors: B {list(B.shape)}, A {list(A.shape)} (one block per group)")
