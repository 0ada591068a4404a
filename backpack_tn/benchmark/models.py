"""Networks whose layers the benchmark measures.

``3c3d``, ``2c2d`` and ``all_cnn_c`` are the small CNNs of the DeepOBS test problems
(``cifar10_3c3d``, ``fmnist_2c2d``, ``cifar100_allcnnc`` with 10 outputs); the rest
are torchvision architectures built without pre-trained weights. Only the layer
shapes matter for the benchmark, so all networks are built randomly initialized,
and :func:`backpack_tn.benchmark.layers.enumerate_layers` can run them on the
``meta`` device.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import NamedTuple

from torch import nn


def net_3c3d(num_outputs: int = 10) -> nn.Sequential:
    """DeepOBS ``3c3d``: three convolutions and three linear layers (CIFAR-10).

    Args:
        num_outputs: Number of classes.

    Returns:
        The network; it maps ``[N, 3, 32, 32]`` to ``[N, num_outputs]``.
    """
    return nn.Sequential(
        nn.Conv2d(3, 64, 5, padding=0),
        nn.ReLU(),
        nn.MaxPool2d(3, stride=2, padding=1),
        nn.Conv2d(64, 96, 3, padding=0),
        nn.ReLU(),
        nn.MaxPool2d(3, stride=2, padding=1),
        nn.Conv2d(96, 128, 3, padding=1),
        nn.ReLU(),
        nn.MaxPool2d(3, stride=2, padding=1),
        nn.Flatten(),
        nn.Linear(3 * 3 * 128, 512),
        nn.ReLU(),
        nn.Linear(512, 256),
        nn.ReLU(),
        nn.Linear(256, num_outputs),
    )


def net_2c2d(num_outputs: int = 10) -> nn.Sequential:
    """DeepOBS ``2c2d``: two convolutions and two linear layers (Fashion-MNIST).

    Args:
        num_outputs: Number of classes.

    Returns:
        The network; it maps ``[N, 1, 28, 28]`` to ``[N, num_outputs]``.
    """
    return nn.Sequential(
        nn.Conv2d(1, 32, 5, padding=2),
        nn.ReLU(),
        nn.MaxPool2d(2, stride=2),
        nn.Conv2d(32, 64, 5, padding=2),
        nn.ReLU(),
        nn.MaxPool2d(2, stride=2),
        nn.Flatten(),
        nn.Linear(7 * 7 * 64, 1024),
        nn.ReLU(),
        nn.Linear(1024, num_outputs),
    )


def net_all_cnn_c(num_outputs: int = 10) -> nn.Sequential:
    """All-CNN-C (Springenberg et al., 2015), as in DeepOBS.

    Args:
        num_outputs: Number of classes.

    Returns:
        The network; it maps ``[N, 3, 32, 32]`` to ``[N, num_outputs]``.
    """

    def conv(c_in: int, c_out: int, k: int, s: int = 1, p: int = 1) -> list:
        return [nn.Conv2d(c_in, c_out, k, stride=s, padding=p), nn.ReLU()]

    return nn.Sequential(
        nn.Dropout(0.2),
        *conv(3, 96, 3),
        *conv(96, 96, 3),
        *conv(96, 96, 3, s=2),
        nn.Dropout(0.5),
        *conv(96, 192, 3),
        *conv(192, 192, 3),
        *conv(192, 192, 3, s=2),
        nn.Dropout(0.5),
        *conv(192, 192, 3, p=0),
        *conv(192, 192, 1, p=0),
        *conv(192, num_outputs, 1, p=0),
        nn.AvgPool2d(6),  # global average over the 6x6 maps of a 32x32 input
        nn.Flatten(),
    )


def net_resnet18_nobn(num_outputs: int = 10) -> nn.Module:
    """ResNet18 for ``32x32`` inputs as stock BackPACK's KFAC can run it.

    torchvision's ``resnet18`` with identities in place of its BatchNorm layers
    and of its ``AdaptiveAvgPool2d``, which averages the final ``1x1`` maps of a
    ``32x32`` input: stock KFAC supports neither of the replaced modules.
    BackPACK extends it with ``use_converter=True`` (residual connections).

    Args:
        num_outputs: Number of classes.

    Returns:
        The network; it maps ``[N, 3, 32, 32]`` to ``[N, num_outputs]``.
    """
    import torchvision

    model = torchvision.models.resnet18(
        weights=None, num_classes=num_outputs, norm_layer=_identity
    )
    model.avgpool = nn.Identity()
    return model


def _identity(num_features: int) -> nn.Module:
    return nn.Identity()


def _torchvision(name: str, **kwargs) -> Callable[[], nn.Module]:
    """Constructor of a torchvision model without pre-trained weights.

    Args:
        name: Name in ``torchvision.models``.
        **kwargs: Further constructor arguments.

    Returns:
        A function without arguments that builds the model.
    """

    def build() -> nn.Module:
        import torchvision

        return getattr(torchvision.models, name)(weights=None, **kwargs)

    build.__name__ = name
    build.__doc__ = f"``torchvision.models.{name}(weights=None)``."
    return build


class Net(NamedTuple):
    """A benchmark network: constructor and the shape of one input sample."""

    constructor: Callable[[], nn.Module]
    input_shape: tuple[int, ...]


#: Benchmark networks: name -> (constructor, default input shape of one sample).
NETS: dict[str, Net] = {
    "3c3d": Net(net_3c3d, (3, 32, 32)),
    "2c2d": Net(net_2c2d, (1, 28, 28)),
    "all_cnn_c": Net(net_all_cnn_c, (3, 32, 32)),
    "alexnet": Net(_torchvision("alexnet"), (3, 224, 224)),
    "resnet18": Net(_torchvision("resnet18"), (3, 224, 224)),
    "resnext101_32x8d": Net(_torchvision("resnext101_32x8d"), (3, 224, 224)),
    "convnext_base": Net(_torchvision("convnext_base"), (3, 224, 224)),
    "inception_v3": Net(
        _torchvision("inception_v3", aux_logits=False, init_weights=False),
        (3, 299, 299),
    ),
    "mobilenet_v2": Net(_torchvision("mobilenet_v2"), (3, 224, 224)),
}


def resolve_net(name: str) -> str:
    """Map a user-given network name to a key of :data:`NETS`.

    Case, ``-`` and ``_`` are ignored, so ``All-CNN-C`` finds ``all_cnn_c``.

    Args:
        name: Network name.

    Returns:
        The key in :data:`NETS`.

    Raises:
        ValueError: If no network has that name.
    """

    def key(text: str) -> str:
        return text.lower().replace("-", "").replace("_", "")

    matches = [net for net in NETS if key(net) == key(name)]
    if not matches:
        raise ValueError(f"Unknown network {name!r}. Supported: {tuple(NETS)}.")
    return matches[0]
