"""A one-time measurement of how this host runs two per-sample weight-VJP routes.

The convolution kernel's weight gradient with the samples as groups (the ``kernel``
route) and the higher-order convolution (``higher_conv``, Rochette et al., 2019) both
run on oneDNN, and which of them is faster was not a property of the layer alone: on
two VMs of one kind (2 cores, AMD EPYC family 25 model 17, torch 2.14.1), the kernel
route of a 96x16x16 -> 192 3x3 layer at N = 4 took 0.98 ms on one and 1.9-2.0 ms on
the other, where the higher-order convolution took 1.8 ms and was the faster route
on every unstrided many-channel 3x3 layer of the benchmark networks from 2 samples
on. So the first ``auto`` decision between them times both routes once, on a probe
layer, and keeps the ratio for the process (about 40 ms on 2 cores, first calls
included).
:func:`backpack_tn.set_host_probe`, or the environment variable
``BACKPACK_TN_HOST_PROBE=0``, turns the probe off (``auto`` then keeps the
``kernel`` route); :func:`backpack_tn.set_host_probe` can also pin its result.
"""

from __future__ import annotations

import os
from functools import partial

import torch
from torch import Tensor, nn

from backpack_tn._timing import fastest_times
from backpack_tn.derivatives.implementations import IMPLEMENTATIONS
from backpack_tn.expressions.layer_spec import LayerSpec, spec_of

#: The probe layer: ``Conv2d(C, C, 3, padding=1)`` on ``[N, C, S, S]`` inputs.
PROBE_CHANNELS = 64
PROBE_SIZE = 32
PROBE_SAMPLES = 4
#: Timed rounds per route (the fastest counts), after one untimed call each.
PROBE_ROUNDS = 5

#: Environment variable that turns the probe off when set to ``0``.
PROBE_VARIABLE = "BACKPACK_TN_HOST_PROBE"

_STATE: dict[str, float | bool | None] = {
    "enabled": os.environ.get(PROBE_VARIABLE, "1") != "0",
    "speedup": None,
}


def configure(enabled: bool, speedup: float | None = None):
    """Turn the probe on or off, or pin its result (see ``choice.set_host_probe``).

    Args:
        enabled: Whether the probe may run.
        speedup: A result to use instead of measuring.
    """
    _STATE["enabled"] = bool(enabled)
    _STATE["speedup"] = speedup


def higher_conv_speedup() -> float:
    """How many times faster the higher-order convolution ran than the kernel route.

    Measured once per process on the probe layer with one vector (CPU, float32,
    the current number of threads), unless the probe is off or pinned.

    Returns:
        The kernel route's time divided by the higher-order convolution's.
    """
    if _STATE["speedup"] is None:
        _STATE["speedup"] = _measure() if _STATE["enabled"] else 1.0
    return float(_STATE["speedup"])


def _measure() -> float:
    """Time both routes on the probe layer, interleaved; keep each one's fastest.

    The global random state is left as it was (the probe runs inside the user's
    backward pass, and the layer's initialisation would draw from it).

    Returns:
        The ratio of the fastest kernel-route time to the fastest higher-order one.
    """
    with torch.random.fork_rng(devices=[]), torch.no_grad():
        torch.manual_seed(0)
        layer = nn.Conv2d(PROBE_CHANNELS, PROBE_CHANNELS, 3, padding=1)
        shape = (PROBE_SAMPLES, PROBE_CHANNELS, PROBE_SIZE, PROBE_SIZE)
        x, mat = torch.randn(shape), torch.randn((1, *shape))
        layer.input0, layer.output = x, layer(x)
        spec = spec_of(layer)
        return _fastest_ratio(layer, spec, x, mat)


def _fastest_ratio(layer: nn.Conv2d, spec: LayerSpec, x: Tensor, mat: Tensor) -> float:
    """Interleaved timings of both routes on the probe layer.

    Args:
        layer: The probe layer, with ``input0`` and ``output`` set.
        spec: Its description.
        x: Its input of shape ``[N, C, S, S]``.
        mat: One vector of shape ``[1, N, C, S, S]``.

    Returns:
        The fastest kernel-route time divided by the fastest higher-order one.
    """
    routes = IMPLEMENTATIONS["weight_jac_t_mat_prod"]
    best = fastest_times(
        {
            name: partial(routes[name], layer, spec, name, x, mat, False)
            for name in ("kernel", "higher_conv")
        },
        PROBE_ROUNDS,
    )
    return best["kernel"] / best["higher_conv"]
