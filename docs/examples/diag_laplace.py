"""A diagonal Laplace approximation from the GGN diagonal.

The Laplace approximation replaces the posterior over the weights of a trained
network by a Gaussian at the trained weights ``θ*`` whose precision is the Hessian of
the negative log joint. With the generalized Gauss-Newton (GGN) for the Hessian of
the data term and a Gaussian prior ``N(0, 1/δ · I)``, its diagonal version is

    precision = diag(GGN) + δ,        variance = 1 / precision.

``DiagGGNExact`` computes ``diag(GGN)`` in one backward pass; the loss must use
``reduction="sum"`` so that it is the negative log likelihood of the whole data set.
The prior precision ``δ`` is chosen post hoc by maximising the Laplace estimate of
the log marginal likelihood, and the predictive averages the softmax over weights
sampled from the posterior.

The first layer uses ``padding="same"``, for which stock BackPACK's GGN diagonal is
wrong; backpack_tn computes it exactly.
"""

import math

import torch
from backpack import backpack, extend
from torch import nn
from torch.func import functional_call

from backpack_tn.extensions import DiagGGNExact

torch.manual_seed(0)

N_TRAIN, N_TEST, CLASSES, SAMPLES, STEPS = 256, 500, 3, 100, 150


def make_data(n: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Noisy two-channel 1d signals, labelled by which of three sums is largest.

    Args:
        n: Number of samples.

    Returns:
        Inputs of shape ``[n, 2, 16]`` and labels of shape ``[n]``.
    """
    x = torch.randn(n, 2, 16)
    logits = torch.stack(
        [x[:, 0, :8].sum(1), x[:, 1, 8:].sum(1), x[:, :, 4:12].mean((1, 2))], 1
    )
    labels = (logits + 0.5 * torch.randn_like(logits)).argmax(1)
    return x, labels


X, y = make_data(N_TRAIN)
X_test, y_test = make_data(N_TEST)

model = nn.Sequential(
    nn.Conv1d(2, 4, kernel_size=5, padding="same"),
    nn.ReLU(),
    nn.Conv1d(4, 4, kernel_size=2, stride=2),
    nn.ReLU(),
    nn.Flatten(),
    nn.Linear(4 * 8, CLASSES),
)
loss_func = nn.CrossEntropyLoss(reduction="sum")
names = [name for name, _ in model.named_parameters()]

# maximum a posteriori estimate: train long enough to be over-confident
optimizer = torch.optim.Adam(model.parameters(), lr=2e-2)
for _ in range(STEPS):
    optimizer.zero_grad()
    weight_decay = sum(p.square().sum() for p in model.parameters())
    loss = loss_func(model(X), y) + 1e-3 / 2 * weight_decay
    loss.backward()
    optimizer.step()

# GGN diagonal of the negative log likelihood, in one backward pass of the
# trained model (extend works on any model, trained or not)
model, loss_func = extend(model), extend(loss_func)
model.zero_grad()
nll = loss_func(model(X), y)
with backpack(DiagGGNExact()):
    nll.backward()
theta = torch.cat([p.detach().flatten() for p in model.parameters()])
ggn = torch.cat([p.diag_ggn_exact.flatten() for p in model.parameters()])
print(f"{theta.numel()} parameters, GGN diagonal in [{ggn.min():.1e}, {ggn.max():.1e}]")


def log_evidence(delta: float) -> float:
    """Laplace estimate of the log marginal likelihood (up to a constant).

    Args:
        delta: Prior precision.

    Returns:
        ``-NLL - δ/2 |θ*|² + P/2 log δ - 1/2 Σ log(diag(GGN) + δ)``.
    """
    log_det_ratio = theta.numel() * math.log(delta) - (ggn + delta).log().sum()
    return (-nll - delta / 2 * theta.square().sum() + log_det_ratio / 2).item()


deltas = torch.logspace(-3, 3, 25).tolist()
delta = max(deltas, key=log_evidence)
variance = 1.0 / (ggn + delta)
print(f"prior precision δ = {delta:.3g} (log evidence {log_evidence(delta):.1f})")


def predict(flat_params: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """Class probabilities of the network with the given parameters.

    Args:
        flat_params: All parameters, flattened and concatenated (``[P]``).
        x: Inputs of shape ``[n, 2, 16]``.

    Returns:
        Probabilities of shape ``[n, CLASSES]``.
    """
    chunks = flat_params.split([p.numel() for p in model.parameters()])
    params = {
        name: chunk.view_as(p)
        for name, chunk, p in zip(names, chunks, model.parameters(), strict=True)
    }
    return functional_call(model, params, (x,)).softmax(-1)


with torch.no_grad():
    map_probs = predict(theta, X_test)
    samples = theta + variance.sqrt() * torch.randn(SAMPLES, theta.numel())
    laplace_probs = torch.stack([predict(s, X_test) for s in samples]).mean(0)

print(f"\n{'test set':8s}  {'accuracy':>8s}  {'NLL':>6s}  {'confidence':>10s}")
for label, probs in (("MAP", map_probs), ("Laplace", laplace_probs)):
    accuracy = (probs.argmax(1) == y_test).float().mean().item()
    test_nll = nn.functional.nll_loss(probs.log(), y_test).item()
    confidence = probs.max(1).values.mean().item()
    print(f"{label:8s}  {accuracy:8.3f}  {test_nll:6.3f}  {confidence:10.3f}")
