"""Layer configurations: parse, build, and enumerate them from networks.

A :class:`LayerSpec` describes one ``Linear``, ``Conv{1,2,3}d`` or
``ConvTranspose{1,2,3}d`` layer together with the shape of its input, so that the
benchmark can rebuild the layer in isolation. Specs are written on the command
line as ``KIND key=value ...``, for example::

    conv2d in=64x56x56 out=128 k=3 s=2 p=1 g=1 n=32
    convtranspose2d in=16x8x8 out=8 k=4 s=2 p=1 op=0 n=8
    linear in=512 out=10 n=32
    linear in=56x56x128 out=512 n=8

``in`` is the shape of one sample as PyTorch sees it: ``C_in x I0 x I1 ...`` for
convolutions, ``... x in_features`` for ``Linear`` (leading entries are extra
dimensions shared by the weight, as in ConvNeXt's channels-last blocks).
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field, fields, replace

import torch
from torch import Tensor, nn

#: Supported layer kinds and their PyTorch classes.
KINDS: dict[str, type[nn.Module]] = {
    "linear": nn.Linear,
    "conv1d": nn.Conv1d,
    "conv2d": nn.Conv2d,
    "conv3d": nn.Conv3d,
    "convtranspose1d": nn.ConvTranspose1d,
    "convtranspose2d": nn.ConvTranspose2d,
    "convtranspose3d": nn.ConvTranspose3d,
}

#: Spec keys and the :class:`LayerSpec` field each one sets (long names as aliases).
_KEYS: dict[str, str] = {
    "in": "in",
    "out": "out_channels",
    "k": "kernel_size",
    "kernel": "kernel_size",
    "s": "stride",
    "stride": "stride",
    "p": "padding",
    "padding": "padding",
    "d": "dilation",
    "dilation": "dilation",
    "g": "groups",
    "groups": "groups",
    "op": "output_padding",
    "output_padding": "output_padding",
    "bias": "bias",
    "pm": "padding_mode",
    "padding_mode": "padding_mode",
    "n": "batch_size",
    "batch": "batch_size",
}
_CONV_ONLY = {
    "kernel_size",
    "stride",
    "padding",
    "dilation",
    "groups",
    "output_padding",
    "padding_mode",
}
_PADDING_MODES = ("zeros", "reflect", "replicate", "circular")
_EXAMPLE = "'conv2d in=64x56x56 out=128 k=3 s=2 p=1 n=32' or 'linear in=512 out=10'"


@dataclass(frozen=True)
class LayerSpec:
    """One layer configuration plus the shape of its input.

    Attributes:
        kind: Layer kind, a key of :data:`KINDS`, e.g. ``"conv2d"``.
        in_channels: ``C_in`` of a convolution, ``in_features`` of ``Linear``.
        out_channels: ``C_out`` of a convolution, ``out_features`` of ``Linear``.
        input_size: Spatial input size ``(I0, I1, ...)`` of a convolution; the
            extra leading dimensions of a ``Linear`` input (usually ``()``).
        kernel_size: Kernel size ``(K0, K1, ...)``; ``()`` for ``Linear``.
        stride: Stride per spatial dimension; ``()`` for ``Linear``.
        padding: Padding per spatial dimension, or ``"same"`` where no symmetric
            integer padding is equivalent; ``()`` for ``Linear``.
        dilation: Dilation per spatial dimension; ``()`` for ``Linear``.
        groups: Number of channel groups ``G``.
        output_padding: Output padding of a transposed convolution, else zeros.
        bias: Whether the layer has a bias.
        padding_mode: PyTorch's ``padding_mode`` of a convolution.
        batch_size: Batch size ``N`` of the input.
    """

    kind: str
    in_channels: int
    out_channels: int
    input_size: tuple[int, ...] = ()
    kernel_size: tuple[int, ...] = ()
    stride: tuple[int, ...] = ()
    padding: tuple[int, ...] | str = ()
    dilation: tuple[int, ...] = ()
    groups: int = 1
    output_padding: tuple[int, ...] = ()
    bias: bool = True
    padding_mode: str = "zeros"
    batch_size: int = field(default=32)

    def __post_init__(self):
        """Validate the configuration.

        Raises:
            ValueError: If the configuration is not a valid layer.
        """
        _validate(self)

    # ------------------------------------------------------------------ shapes
    @property
    def spatial_dims(self) -> int:
        """Number of spatial dimensions; ``0`` for ``Linear``."""
        return 0 if self.kind == "linear" else int(self.kind[-2])

    @property
    def is_transpose(self) -> bool:
        """Whether the layer is a transposed convolution."""
        return self.kind.startswith("convtranspose")

    @property
    def sample_shape(self) -> tuple[int, ...]:
        """Shape of one input sample, ``[C_in, *I]`` or ``[*extra, in_features]``."""
        if self.kind == "linear":
            return (*self.input_size, self.in_channels)
        return (self.in_channels, *self.input_size)

    @property
    def input_shape(self) -> tuple[int, ...]:
        """Shape of the batched input, ``[N, *sample_shape]``."""
        return (self.batch_size, *self.sample_shape)

    @property
    def output_size(self) -> tuple[int, ...]:
        """Spatial output size ``(O0, O1, ...)`` (extra dims for ``Linear``)."""
        if self.kind == "linear":
            return self.input_size
        return _conv_output_size(self)

    @property
    def output_shape(self) -> tuple[int, ...]:
        """Shape of the batched output."""
        if self.kind == "linear":
            return (self.batch_size, *self.input_size, self.out_channels)
        return (self.batch_size, self.out_channels, *self.output_size)

    # ---------------------------------------------------------------- build
    def module_kwargs(self) -> dict:
        """Keyword arguments for the PyTorch constructor of this layer.

        Returns:
            Arguments of ``KINDS[kind](...)``.
        """
        if self.kind == "linear":
            return {
                "in_features": self.in_channels,
                "out_features": self.out_channels,
                "bias": self.bias,
            }
        kwargs = {
            "in_channels": self.in_channels,
            "out_channels": self.out_channels,
            "kernel_size": self.kernel_size,
            "stride": self.stride,
            "padding": self.padding,
            "dilation": self.dilation,
            "groups": self.groups,
            "bias": self.bias,
            "padding_mode": self.padding_mode,
        }
        if self.is_transpose:
            kwargs["output_padding"] = self.output_padding
        return kwargs

    def build(
        self,
        device: str | torch.device = "cpu",
        dtype: torch.dtype = torch.float32,
        seed: int = 0,
    ) -> tuple[nn.Module, Tensor]:
        """Create the layer and a random input batch.

        Args:
            device: Device of the layer and input.
            dtype: Floating point type of the layer and input.
            seed: Seed for the layer's initialization and the input.

        Returns:
            The layer and an input of shape ``[N, *sample_shape]``.
        """
        gen = torch.Generator().manual_seed(seed)
        module = KINDS[self.kind](**self.module_kwargs())
        with torch.no_grad():
            for param in module.parameters():
                param.copy_(torch.randn(param.shape, generator=gen) / 3)
        module = module.to(device=device, dtype=dtype)
        x = torch.randn(self.input_shape, generator=gen).to(device=device, dtype=dtype)
        return module, x

    # ------------------------------------------------------------- strings
    def to_string(self) -> str:
        """Canonical spec string; :func:`parse_layer_spec` inverts it.

        Returns:
            A string like ``"conv2d in=64x56x56 out=128 k=3 s=2 p=1 d=1 g=1 n=32"``.
        """
        shape = "x".join(str(s) for s in self.sample_shape)
        parts = [self.kind, f"in={shape}", f"out={self.out_channels}"]
        if self.kind != "linear":
            parts += [
                f"k={_fmt(self.kernel_size)}",
                f"s={_fmt(self.stride)}",
                f"p={_fmt(self.padding)}",
                f"d={_fmt(self.dilation)}",
                f"g={self.groups}",
            ]
            if self.is_transpose and any(self.output_padding):
                parts.append(f"op={_fmt(self.output_padding)}")
            if self.padding_mode != "zeros":
                parts.append(f"pm={self.padding_mode}")
        if not self.bias:
            parts.append("bias=0")
        parts.append(f"n={self.batch_size}")
        return " ".join(parts)

    def __str__(self) -> str:
        """Return the canonical spec string.

        Returns:
            See :meth:`to_string`.
        """
        return self.to_string()

    @classmethod
    def from_module(
        cls, module: nn.Module, sample_shape: Sequence[int], batch_size: int = 32
    ) -> LayerSpec:
        """Describe a PyTorch layer that receives inputs of a given shape.

        Args:
            module: A ``Linear``, ``Conv{1,2,3}d`` or ``ConvTranspose{1,2,3}d``.
            sample_shape: Shape of one input sample (without the batch axis).
            batch_size: Batch size ``N`` to record in the spec.

        Returns:
            The layer's spec.

        Raises:
            NotImplementedError: If the module type is not supported.
        """
        kind = next((k for k, c in KINDS.items() if type(module) is c), None)
        if kind is None:
            raise NotImplementedError(
                f"Unsupported layer {type(module).__name__}. "
                f"Supported: {tuple(c.__name__ for c in KINDS.values())}."
            )
        sample_shape = tuple(int(s) for s in sample_shape)
        bias = module.bias is not None
        if kind == "linear":
            return cls(
                kind,
                module.in_features,
                module.out_features,
                input_size=sample_shape[:-1],
                bias=bias,
                batch_size=batch_size,
            )
        return cls(
            kind,
            module.in_channels,
            module.out_channels,
            input_size=sample_shape[1:],
            kernel_size=tuple(module.kernel_size),
            stride=tuple(module.stride),
            padding=_normalize_padding(
                module.padding, module.kernel_size, module.stride, module.dilation
            ),
            dilation=tuple(module.dilation),
            groups=module.groups,
            output_padding=tuple(getattr(module, "output_padding", ()))
            or (0,) * len(module.kernel_size),
            bias=bias,
            padding_mode=module.padding_mode,
            batch_size=batch_size,
        )


def _fmt(value: tuple[int, ...] | str) -> str:
    """Write a tuple as ``3`` if all entries agree, else as ``3x5``.

    Args:
        value: A tuple of integers, or a padding string.

    Returns:
        The compact text.
    """
    if isinstance(value, str):
        return value
    if len(set(value)) == 1:
        return str(value[0])
    return "x".join(str(v) for v in value)


def _normalize_padding(
    padding: str | Sequence[int],
    kernel_size: Sequence[int],
    stride: Sequence[int],
    dilation: Sequence[int],
) -> tuple[int, ...] | str:
    """Turn ``"valid"``/``"same"`` into integers where that is equivalent.

    Args:
        padding: PyTorch padding argument.
        kernel_size: Kernel size per spatial dimension.
        stride: Stride per spatial dimension.
        dilation: Dilation per spatial dimension.

    Returns:
        Integer padding per dimension, or ``"same"`` if it needs asymmetric padding.
    """
    if padding == "valid":
        return (0,) * len(kernel_size)
    if padding == "same":
        span = [d * (k - 1) for k, d in zip(kernel_size, dilation, strict=True)]
        if all(s == 1 for s in stride) and all(t % 2 == 0 for t in span):
            return tuple(t // 2 for t in span)
        return "same"
    return tuple(int(p) for p in padding)


def _conv_output_size(spec: LayerSpec) -> tuple[int, ...]:
    """Spatial output size of a (transposed) convolution.

    Args:
        spec: A convolution spec.

    Returns:
        ``(O0, O1, ...)``; entries may be non-positive for invalid specs.
    """
    if spec.padding == "same":
        return spec.input_size
    out = []
    for i, k, s, p, d, op in zip(
        spec.input_size,
        spec.kernel_size,
        spec.stride,
        spec.padding,
        spec.dilation,
        spec.output_padding,
        strict=True,
    ):
        if spec.is_transpose:
            out.append((i - 1) * s - 2 * p + d * (k - 1) + op + 1)
        else:
            out.append((i + 2 * p - d * (k - 1) - 1) // s + 1)
    return tuple(out)


def _validate(spec: LayerSpec):
    """Check a spec for consistency.

    Args:
        spec: The spec to check.

    Raises:
        ValueError: If the spec is not a valid layer configuration.
    """
    if spec.kind not in KINDS:
        raise ValueError(
            f"Unknown layer kind {spec.kind!r}. Supported: {tuple(KINDS)}."
        )
    for name in ("in_channels", "out_channels", "groups", "batch_size"):
        value = getattr(spec, name)
        if not isinstance(value, int) or isinstance(value, bool) or value < 1:
            raise ValueError(f"{name} must be a positive integer, got {value!r}.")
    if any(not isinstance(v, int) or v < 1 for v in spec.input_size):
        raise ValueError(
            f"Input sizes must be positive integers, got {spec.input_size!r}."
        )
    if spec.kind == "linear":
        conv_fields = [
            f.name
            for f in fields(spec)
            if f.name in _CONV_ONLY and getattr(spec, f.name) != f.default
        ]
        if conv_fields:
            raise ValueError(
                f"Convolution settings {conv_fields} are not allowed for linear."
            )
        return
    dims = spec.spatial_dims
    if len(spec.input_size) != dims:
        raise ValueError(
            f"A {spec.kind} needs {dims + 1} input dimensions (C x {dims} spatial), "
            f"got {len(spec.sample_shape)}."
        )
    for name in ("kernel_size", "stride", "dilation", "output_padding"):
        value = getattr(spec, name)
        low = 0 if name == "output_padding" else 1
        if len(value) != dims or any(not isinstance(v, int) or v < low for v in value):
            raise ValueError(
                f"{name} of a {spec.kind} needs {dims} integers >= {low}, "
                f"got {value!r}."
            )
    if isinstance(spec.padding, str):
        if spec.padding != "same" or spec.is_transpose:
            raise ValueError(
                f"Unsupported padding {spec.padding!r} for {spec.kind}. "
                "Allowed: integers, or 'same'/'valid' for non-transposed convolutions."
            )
        if any(s != 1 for s in spec.stride):
            raise ValueError(
                f"padding='same' needs stride 1, got stride={spec.stride!r}."
            )
    elif len(spec.padding) != dims or any(
        not isinstance(v, int) or v < 0 for v in spec.padding
    ):
        raise ValueError(
            f"padding of a {spec.kind} needs {dims} integers >= 0, "
            f"got {spec.padding!r}."
        )
    if spec.in_channels % spec.groups or spec.out_channels % spec.groups:
        raise ValueError(
            f"groups={spec.groups} must divide in={spec.in_channels} and "
            f"out={spec.out_channels}."
        )
    if spec.padding_mode not in _PADDING_MODES:
        raise ValueError(
            f"Unsupported padding_mode {spec.padding_mode!r}. "
            f"Supported: {_PADDING_MODES}."
        )
    if spec.is_transpose and spec.padding_mode != "zeros":
        raise ValueError(
            f"A {spec.kind} only supports padding_mode 'zeros', "
            f"got {spec.padding_mode!r}."
        )
    if spec.is_transpose and any(
        op >= max(s, d)
        for op, s, d in zip(
            spec.output_padding, spec.stride, spec.dilation, strict=True
        )
    ):
        raise ValueError(
            f"output_padding {spec.output_padding!r} must be smaller than stride "
            f"{spec.stride!r} or dilation {spec.dilation!r}."
        )
    if any(o < 1 for o in _conv_output_size(spec)):
        raise ValueError(
            f"The output of {spec.kind} with input {spec.sample_shape} and "
            f"kernel {_fmt(spec.kernel_size)} would be empty."
        )


# --------------------------------------------------------------------- parsing
def _parse_ints(key: str, value: str, text: str, low: int = 0) -> tuple[int, ...]:
    """Parse ``"3"`` or ``"3x5"`` into a tuple of integers.

    Args:
        key: Spec key, for the error message.
        value: Text after ``key=``.
        text: Whole spec, for the error message.
        low: Smallest allowed value.

    Returns:
        The integers.

    Raises:
        ValueError: If ``value`` is not integers joined by ``x``.
    """
    try:
        ints = tuple(int(v) for v in value.lower().split("x"))
    except ValueError:
        ints = ()
    if not ints or any(v < low for v in ints):
        raise ValueError(
            f"Invalid value {value!r} for {key!r} in layer spec {text!r}; expected "
            f"integers >= {low} joined by 'x', e.g. '3' or '3x5'."
        )
    return ints


def parse_layer_spec(text: str, batch_size: int = 32) -> LayerSpec:
    """Parse a layer spec string.

    Args:
        text: Spec like ``"conv2d in=64x56x56 out=128 k=3 s=2 p=1 g=1 n=32"``.
            Keys: ``in``, ``out``, ``k``, ``s``, ``p`` (integers or ``same``/
            ``valid``), ``d``, ``g``, ``op`` (output padding), ``bias`` (0/1),
            ``pm`` (padding mode), ``n`` (batch size). Tuples are written
            ``3x5``; a single integer is used for every spatial dimension.
        batch_size: Batch size to use when the spec has no ``n=``.

    Returns:
        The parsed spec.

    Raises:
        ValueError: If the text is not a valid spec; the message is one line.
    """
    tokens = text.split()
    if not tokens:
        raise ValueError(f"Empty layer spec; expected e.g. {_EXAMPLE}.")
    kind = tokens[0].lower().replace("_", "").replace("-", "")
    if kind not in KINDS:
        raise ValueError(
            f"Unknown layer kind {tokens[0]!r} in layer spec {text!r}. "
            f"Supported: {tuple(KINDS)}."
        )
    raw: dict[str, str] = {}
    for token in tokens[1:]:
        key, sep, value = token.partition("=")
        key = key.lower()
        if not sep or not key or not value:
            raise ValueError(
                f"Malformed token {token!r} in layer spec {text!r}; "
                f"expected key=value, e.g. {_EXAMPLE}."
            )
        if key not in _KEYS:
            raise ValueError(
                f"Unknown key {key!r} in layer spec {text!r}. "
                f"Supported: {tuple(k for k in _KEYS if len(k) <= 4)}."
            )
        target = _KEYS[key]
        if target in raw:
            raise ValueError(f"Key {key!r} is given twice in layer spec {text!r}.")
        raw[target] = value
    for required in ("in", "out_channels") + (
        () if kind == "linear" else ("kernel_size",)
    ):
        if required not in raw:
            key = {"in": "in", "out_channels": "out", "kernel_size": "k"}[required]
            raise ValueError(
                f"Layer spec {text!r} lacks {key}=...; expected e.g. {_EXAMPLE}."
            )
    if kind == "linear":
        extra = sorted(set(raw) & _CONV_ONLY)
        if extra:
            keys = [k for k, v in _KEYS.items() if v in extra and len(k) <= 2]
            raise ValueError(
                f"Keys {keys} are not allowed for linear in layer spec {text!r}."
            )

    shape = _parse_ints("in", raw.pop("in"), text, low=1)
    kwargs: dict = {
        "out_channels": _parse_ints("out", raw.pop("out_channels"), text, 1)[0],
        "batch_size": batch_size,
    }
    if "batch_size" in raw:
        kwargs["batch_size"] = _parse_ints("n", raw.pop("batch_size"), text, 1)[0]
    if "bias" in raw:
        flag = raw.pop("bias").lower()
        if flag not in ("0", "1", "true", "false"):
            raise ValueError(
                f"Invalid value {flag!r} for 'bias' in layer spec {text!r}; "
                "expected 0 or 1."
            )
        kwargs["bias"] = flag in ("1", "true")
    if kind == "linear":
        kwargs.update(in_channels=shape[-1], input_size=shape[:-1])
        return _make(kind, kwargs, text)

    dims = int(kind[-2])
    if len(shape) != dims + 1:
        raise ValueError(
            f"'in' of a {kind} needs {dims + 1} entries (C x {dims} spatial) in "
            f"layer spec {text!r}, got {len(shape)}."
        )
    kwargs.update(in_channels=shape[0], input_size=shape[1:])

    def ints(name: str, default: int, low: int) -> tuple[int, ...]:
        key = next(k for k, v in _KEYS.items() if v == name)
        values = _parse_ints(key, raw.pop(name, str(default)), text, low)
        if len(values) == 1:
            values = values * dims
        if len(values) != dims:
            raise ValueError(
                f"{key!r} of a {kind} needs 1 or {dims} entries in layer spec "
                f"{text!r}, got {len(values)}."
            )
        return values

    kwargs["kernel_size"] = ints("kernel_size", 1, 1)
    kwargs["stride"] = ints("stride", 1, 1)
    kwargs["dilation"] = ints("dilation", 1, 1)
    kwargs["output_padding"] = ints("output_padding", 0, 0)
    kwargs["groups"] = _parse_ints("g", raw.pop("groups", "1"), text, 1)[0]
    kwargs["padding_mode"] = raw.pop("padding_mode", "zeros").lower()
    padding = raw.get("padding", "0").lower()
    if padding in ("same", "valid"):
        raw.pop("padding")
        kwargs["padding"] = _normalize_padding(
            padding, kwargs["kernel_size"], kwargs["stride"], kwargs["dilation"]
        )
    else:
        kwargs["padding"] = ints("padding", 0, 0)
    return _make(kind, kwargs, text)


def _make(kind: str, kwargs: dict, text: str) -> LayerSpec:
    """Create a spec and name the spec text in validation errors.

    Args:
        kind: Layer kind.
        kwargs: Remaining fields.
        text: Whole spec, for the error message.

    Returns:
        The spec.

    Raises:
        ValueError: If the fields are inconsistent.
    """
    try:
        return LayerSpec(kind, **kwargs)
    except ValueError as error:
        raise ValueError(f"Invalid layer spec {text!r}: {error}") from None


# ----------------------------------------------------------------- enumeration
def enumerate_layers(
    model: nn.Module, sample_shape: Sequence[int], batch_size: int = 32
) -> list[LayerSpec]:
    """List the supported layers of a model in call order.

    Runs one forward pass with a single-sample batch on the model's device (use
    the ``meta`` device to avoid any computation) and records, with forward
    pre-hooks, the input shape of every ``Linear``/``Conv*``/``ConvTranspose*``
    call. A layer that is called twice appears twice.

    Args:
        model: The network, in evaluation mode or not.
        sample_shape: Shape of one input sample, e.g. ``(3, 224, 224)``.
        batch_size: Batch size ``N`` to record in the specs.

    Returns:
        One spec per layer call.
    """
    specs: list[LayerSpec] = []

    def hook(module: nn.Module, inputs: tuple[Tensor, ...]):
        specs.append(LayerSpec.from_module(module, inputs[0].shape[1:], batch_size))

    handles = [
        m.register_forward_pre_hook(hook)
        for m in model.modules()
        if type(m) in KINDS.values()
    ]
    param = next(model.parameters(), None)
    device = param.device if param is not None else torch.device("cpu")
    dtype = param.dtype if param is not None else torch.float32
    was_training = model.training
    try:
        model.eval()
        with torch.no_grad():
            model(torch.zeros(1, *sample_shape, device=device, dtype=dtype))
    finally:
        model.train(was_training)
        for handle in handles:
            handle.remove()
    return specs


@dataclass(frozen=True)
class LayerEntry:
    """A de-duplicated layer configuration and where it occurs.

    Attributes:
        spec: The configuration.
        count: How often it occurs in total.
        nets: Occurrences per network, in first-seen order, as ``(name, count)``.
    """

    spec: LayerSpec
    count: int
    nets: tuple[tuple[str, int], ...]

    @property
    def origin(self) -> str:
        """Where the layer occurs, e.g. ``"resnet18x4 resnext101_32x8dx1"``."""
        return " ".join(f"{name}×{count}" for name, count in self.nets)


def deduplicate(
    layers: Iterable[tuple[str, LayerSpec]] | dict[str, Sequence[LayerSpec]],
) -> list[LayerEntry]:
    """Merge equal configurations within and across networks.

    Args:
        layers: ``{net: [spec, ...]}`` or an iterable of ``(net, spec)`` pairs.

    Returns:
        One entry per distinct spec, in first-seen order, with multiplicities.
    """
    if isinstance(layers, dict):
        layers = [(net, spec) for net, specs in layers.items() for spec in specs]
    counts: dict[LayerSpec, dict[str, int]] = {}
    for net, spec in layers:
        per_net = counts.setdefault(spec, {})
        per_net[net] = per_net.get(net, 0) + 1
    return [
        LayerEntry(spec, sum(per_net.values()), tuple(per_net.items()))
        for spec, per_net in counts.items()
    ]


def with_batch_size(spec: LayerSpec, batch_size: int) -> LayerSpec:
    """Return a copy of a spec with another batch size.

    Args:
        spec: The spec.
        batch_size: New batch size ``N``.

    Returns:
        The modified spec.
    """
    return replace(spec, batch_size=batch_size)


def enumerate_net(
    name: str, batch_size: int = 32, sample_shape: Sequence[int] | None = None
) -> list[LayerSpec]:
    """List the supported layers of a benchmark network in call order.

    The network is built and run on the ``meta`` device, so this is fast and
    allocates no memory even for large models.

    Args:
        name: Network name, see :data:`backpack_tn.benchmark.models.NETS`.
        batch_size: Batch size ``N`` to record in the specs.
        sample_shape: Shape of one input sample; default: the network's own.

    Returns:
        One spec per layer call.
    """
    from backpack_tn.benchmark.models import NETS, resolve_net

    net = NETS[resolve_net(name)]
    with torch.device("meta"):
        model = net.constructor()
    return enumerate_layers(model, sample_shape or net.input_shape, batch_size)
