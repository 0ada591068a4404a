"""Per-sample gradient clipping for differentially private SGD (DP-SGD).

DP-SGD (Abadi et al., 2016) clips every sample's gradient to a norm of at most
``C``, sums the clipped gradients, adds Gaussian noise of standard deviation
``sigma * C`` and takes a step with the noisy average. It needs two per-sample
quantities, which one backward pass provides:

- ``BatchGrad`` stores the per-sample gradients ``grad_batch`` (``[N, *p.shape]``),
- ``BatchL2Grad`` stores their squared norms ``batch_l2`` (``[N]``) without forming
  them, which is all that "ghost clipping" needs to compute the clipping factors.

The only change from stock BackPACK is the import of the extensions. Use a loss with
``reduction="sum"``: with ``"mean"``, BackPACK's per-sample gradients carry a factor
``1 / N``.
"""

import torch
from backpack import backpack, extend
from torch import nn

from backpack_tn.extensions import BatchGrad, BatchL2Grad

torch.manual_seed(0)

N, STEPS, BATCH = 256, 30, 32
CLIP_NORM, NOISE_MULTIPLIER, LR = 1.0, 0.5, 0.5

# a linearly separable toy problem with 8x8 single-channel "images"
X = torch.randn(N, 1, 8, 8)
y = (X[:, 0, :4].sum((1, 2)) > X[:, 0, 4:].sum((1, 2))).long()

model = extend(
    nn.Sequential(
        nn.Conv2d(1, 4, kernel_size=3, padding="same"),  # stock BackPACK: wrong
        nn.ReLU(),
        nn.Conv2d(4, 4, kernel_size=2, stride=2),
        nn.ReLU(),
        nn.Flatten(),
        nn.Linear(4 * 4 * 4, 2),
    )
)
loss_func = extend(nn.CrossEntropyLoss(reduction="sum"))
params = [p for p in model.parameters() if p.requires_grad]


def accuracy() -> float:
    """Training accuracy of the current model.

    Returns:
        Fraction of correctly classified samples.
    """
    with torch.no_grad():
        return (model(X).argmax(1) == y).float().mean().item()


print(f"accuracy before training: {accuracy():.2f}")
for step in range(STEPS):
    idx = torch.randint(0, N, (BATCH,))
    loss = loss_func(model(X[idx]), y[idx])
    model.zero_grad()
    with backpack(BatchGrad(), BatchL2Grad()):
        loss.backward()

    # per-sample gradient norms, from BatchL2Grad ...
    norms = sum(p.batch_l2 for p in params).sqrt()
    if step == 0:
        # ... agree with the norms of the per-sample gradients from BatchGrad
        direct = sum(p.grad_batch.flatten(1).square().sum(1) for p in params).sqrt()
        error = ((norms - direct).abs() / direct).max().item()
        print(f"BatchL2Grad vs. |grad_batch|: max relative difference {error:.1e}")
        assert error < 1e-4
        # the per-sample gradients sum to the mini-batch gradient
        for p in params:
            torch.testing.assert_close(p.grad_batch.sum(0), p.grad)

    # clip, sum, add noise, average, step
    factors = (CLIP_NORM / (norms + 1e-6)).clamp(max=1.0)  # [N]
    with torch.no_grad():
        for p in params:
            clipped = torch.einsum("n,n...->...", factors, p.grad_batch)
            noise = NOISE_MULTIPLIER * CLIP_NORM * torch.randn_like(clipped)
            p.sub_(LR * (clipped + noise) / BATCH)

    if step % 10 == 0 or step == STEPS - 1:
        clipped_share = (factors < 1).float().mean().item()
        print(
            f"step {step:2d}: loss {loss.item() / BATCH:.3f},"
            f" median sample norm {norms.median().item():.2f},"
            f" clipped {100 * clipped_share:3.0f} % of the samples"
        )

print(f"accuracy after DP-SGD: {accuracy():.2f}")
