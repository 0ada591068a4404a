"""A KFAC-reduce preconditioned optimiser on a small CNN with a grouped convolution.

KFAC approximates the curvature of a layer's weight by a Kronecker product
``kron(B, A)`` of an output factor ``B`` and an input factor ``A``, so that the
preconditioned gradient of a weight matrix ``G`` is ``B⁻¹ G A⁻¹``. With
``kfac_approx="reduce"`` (Eschenhagen et al., NeurIPS 2023) the input factor averages
the unfolded input over the output positions before taking the outer product; the
tensor network does the averaging before it touches the channels, so the unfolded
input is never formed.

Stock BackPACK's KFAC refuses convolutions with ``groups > 1``. backpack_tn stores one
Kronecker factor pair per group: with ``G`` groups, ``B`` has shape
``[G, C_out // G, C_out // G]``, ``A`` has shape ``[G, C_in // G * prod(K)] * 2`` and
block ``g`` approximates the curvature of ``weight.reshape(G, C_out // G, -1)[g]``.
With ``G = 1`` the group axis is dropped, as in stock BackPACK. The bias is
preconditioned by ``B`` alone. See the KFAC conventions page for the details.
"""

import torch
from backpack import backpack, extend
from torch import Tensor, nn

from backpack_tn.extensions import KFAC

torch.manual_seed(0)

N, CLASSES, STEPS, LR, DAMPING = 128, 4, 15, 0.1, 1e-2

X = torch.randn(N, 3, 8, 8)
y = torch.randint(0, CLASSES, (N,))


def make_model() -> nn.Sequential:
    """A small CNN whose middle layer is a grouped convolution.

    Returns:
        The (not yet extended) model; every call returns the same initial weights.
    """
    torch.manual_seed(1)
    return nn.Sequential(
        nn.Conv2d(3, 8, kernel_size=3, padding=1),
        nn.ReLU(),
        nn.Conv2d(8, 8, kernel_size=3, stride=2, padding=1, groups=4),
        nn.ReLU(),
        nn.Flatten(),
        nn.Linear(8 * 4 * 4, CLASSES),
    )


def damped_inverse(factor: Tensor, damping: float) -> Tensor:
    """Invert a batch of symmetric positive semi-definite matrices after damping.

    Args:
        factor: Kronecker factors of shape ``[G, D, D]``.
        damping: Added to the diagonal before inverting.

    Returns:
        The inverses, shape ``[G, D, D]``.
    """
    eye = torch.eye(factor.shape[-1], dtype=factor.dtype)
    return torch.linalg.inv(factor + damping * eye)


def precondition(param: nn.Parameter, groups: int) -> Tensor:
    """KFAC-preconditioned gradient of one parameter, in the parameter's shape.

    Args:
        param: A weight or bias with ``grad`` and ``kfac`` set.
        groups: ``G``, the layer's number of groups (1 for Linear).

    Returns:
        ``B⁻¹ G A⁻¹`` per group for a weight, ``B⁻¹ g`` per group for a bias.
    """
    # add the group axis that is dropped for G = 1
    factors = [f.reshape(groups, *f.shape[-2:]) for f in param.kfac]
    inverses = [damped_inverse(f, DAMPING**0.5) for f in factors]
    grad = param.grad.reshape(groups, param.shape[0] // groups, -1)  # [G, a, b*K]
    if param.dim() == 1:  # bias: [G, a, 1]
        (b_inv,) = inverses
        return (b_inv @ grad).reshape(param.shape)
    b_inv, a_inv = inverses
    return (b_inv @ grad @ a_inv).reshape(param.shape)


def train(preconditioned: bool) -> list[float]:
    """Take full-batch steps with KFAC-reduce or with plain gradient descent.

    Args:
        preconditioned: Use the KFAC-reduce preconditioned gradient.

    Returns:
        The loss before every step and after the last one.
    """
    model = extend(make_model())
    loss_func = extend(nn.CrossEntropyLoss())
    layers = [m for m in model if isinstance(m, (nn.Conv2d, nn.Linear))]
    losses = []
    for _ in range(STEPS):
        loss = loss_func(model(X), y)
        losses.append(loss.item())
        model.zero_grad()
        with backpack(KFAC(kfac_approx="reduce")):
            loss.backward()
        with torch.no_grad():
            for layer in layers:
                groups = getattr(layer, "groups", 1)
                for param in (layer.weight, layer.bias):
                    step = precondition(param, groups) if preconditioned else param.grad
                    param.sub_(LR * step)
    losses.append(loss_func(model(X), y).item())
    return losses


# Kronecker factors of every parameter: note the leading group axis of the
# grouped convolution (G = 4)
model, loss_func = extend(make_model()), extend(nn.CrossEntropyLoss())
with backpack(KFAC(kfac_approx="reduce")):
    loss_func(model(X), y).backward()
for name, param in model.named_parameters():
    shapes = ", ".join(str(list(f.shape)) for f in param.kfac)
    print(f"{name:9s} {str(list(param.shape)):15s} kfac: {shapes}")

# check the input factor of the grouped convolution against its definition,
# A[g] = 1/N Σ_n ū_n ū_n^T with ū_n the unfolded input of group g averaged over
# the output positions (nn.functional.unfold orders the rows channel by channel)
conv = model[2]
with torch.no_grad():
    unfolded = nn.functional.unfold(model[1](model[0](X)), 3, padding=1, stride=2)
    mean = unfolded.mean(2).reshape(N, conv.groups, -1)  # [N, G, C_in // G * 9]
    expected = torch.einsum("ngi,ngj->gij", mean, mean) / N
torch.testing.assert_close(conv.weight.kfac[1], expected)
print("grouped input factor A matches its definition")

sgd, kfac = train(preconditioned=False), train(preconditioned=True)
print(f"\n{'step':>4s}  {'gradient descent':>16s}  {'KFAC-reduce':>11s}")
for step in range(0, STEPS + 1, 5):
    print(f"{step:4d}  {sgd[step]:16.4f}  {kfac[step]:11.4f}")
assert kfac[-1] < sgd[-1]
