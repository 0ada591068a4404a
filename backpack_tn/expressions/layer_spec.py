"""One description of Linear, ConvNd and ConvTransposeNd layers as tensor networks.

Every layer is the bilinear map

    y[n, g, a, *O] = Σ x[n, g, b, *I] W[g, a, b, *K] Π_1[k1, o1, i1] ... Π_N[kN, oN, iN]

(index table in :mod:`backpack_tn`). The layers differ only in which side of the
index patterns their input and output sit on, and in their memory layouts:

- ``conv``: input on the ``i`` side, output on the ``o`` side, weight
  ``[C_out, C_in // G, *K]``.
- ``conv_transpose``: input on the ``o`` side, output on the ``i`` side (it is the
  adjoint of the convolution with the same patterns), weight ``[C_in, C_out // G, *K]``.
- ``linear``: no patterns; the extra dimensions ``*`` of an input ``[N, *, C_in]``
  are shared legs ``s1, s2, ...`` that input and output have in common (weight
  sharing), weight ``[C_out, C_in]``.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import astuple, dataclass
from math import prod
from operator import attrgetter

from torch import Tensor
from torch.nn import (
    Conv1d,
    Conv2d,
    Conv3d,
    ConvTranspose1d,
    ConvTranspose2d,
    ConvTranspose3d,
    Linear,
    Module,
)

from backpack_tn.engine.index_pattern import IndexPattern

#: Kinds of layers a :class:`LayerSpec` describes.
KINDS = ("linear", "conv", "conv_transpose")


@dataclass(frozen=True)
class LayerSpec:
    """Hyper-parameters and sizes of a layer, as needed by the tensor networks.

    Attributes:
        kind: One of ``KINDS``.
        batch_size: ``N``.
        in_channels: ``C_in`` (``in_features`` for Linear).
        out_channels: ``C_out`` (``out_features`` for Linear).
        groups: ``G``.
        patterns: One index pattern per spatial dimension (empty for Linear).
        shared: Sizes of a Linear layer's extra input dimensions ``*``.
    """

    kind: str
    batch_size: int
    in_channels: int
    out_channels: int
    groups: int = 1
    patterns: tuple[IndexPattern, ...] = ()
    shared: tuple[int, ...] = ()

    def __hash__(self) -> int:
        """Hash the fields once: specs are part of the key of every product call.

        Returns:
            The hash of the fields.
        """
        cached = self.__dict__.get("_hash")
        if cached is None:
            cached = hash(astuple(self, tuple_factory=tuple))
            object.__setattr__(self, "_hash", cached)
        return cached

    def __getstate__(self) -> dict:
        """Pickle the fields without the cached hash (string hashes vary per process).

        Returns:
            The instance dictionary without the hash.
        """
        state = dict(self.__dict__)
        state.pop("_hash", None)
        return state

    @property
    def num_spatial(self) -> int:
        """Number of spatial (or shared) dimensions."""
        return len(self.shared) if self.kind == "linear" else len(self.patterns)

    @property
    def kernel_size(self) -> tuple[int, ...]:
        """Kernel size ``K`` per spatial dimension (empty for Linear)."""
        return tuple(p.kernel_size for p in self.patterns)

    @property
    def input_spatial(self) -> tuple[int, ...]:
        """Spatial sizes of the layer input."""
        if self.kind == "linear":
            return self.shared
        if self.kind == "conv":
            return tuple(p.input_size for p in self.patterns)
        return tuple(p.output_size for p in self.patterns)

    @property
    def output_spatial(self) -> tuple[int, ...]:
        """Spatial sizes of the layer output."""
        if self.kind == "linear":
            return self.shared
        if self.kind == "conv":
            return tuple(p.output_size for p in self.patterns)
        return tuple(p.input_size for p in self.patterns)

    @property
    def num_positions(self) -> int:
        """Number of output positions ``R`` sharing the weight (``1`` for none)."""
        return prod(self.output_spatial)

    @property
    def weight_shape(self) -> tuple[int, ...]:
        """Shape of the layer's weight."""
        if self.kind == "linear":
            return (self.out_channels, self.in_channels)
        if self.kind == "conv":
            first, second = self.out_channels, self.in_channels // self.groups
        else:
            first, second = self.in_channels, self.out_channels // self.groups
        return (first, second, *self.kernel_size)

    def input_shape(self, batch_size: int | None = None) -> tuple[int, ...]:
        """Shape of the layer input.

        Args:
            batch_size: Batch size to use instead of ``self.batch_size``.

        Returns:
            ``[N, C_in, *I]`` (conv) or ``[N, *, C_in]`` (Linear).
        """
        return self._shape(batch_size, self.in_channels, self.input_spatial)

    def output_shape(self, batch_size: int | None = None) -> tuple[int, ...]:
        """Shape of the layer output.

        Args:
            batch_size: Batch size to use instead of ``self.batch_size``.

        Returns:
            ``[N, C_out, *O]`` (conv) or ``[N, *, C_out]`` (Linear).
        """
        return self._shape(batch_size, self.out_channels, self.output_spatial)

    def _shape(self, batch_size, channels, spatial) -> tuple[int, ...]:
        n = self.batch_size if batch_size is None else batch_size
        if self.kind == "linear":
            return (n, *spatial, channels)
        return (n, channels, *spatial)

    # legs

    def pattern_legs(self) -> list[tuple[str, str, str]]:
        """Legs ``(k, o, i)`` of every index pattern.

        Returns:
            One leg triple per spatial dimension.
        """
        return [(f"k{d}", f"o{d}", f"i{d}") for d in range(len(self.patterns))]

    def kernel_legs(self, suffix: str = "") -> tuple[str, ...]:
        """Kernel legs ``k0, k1, ...``.

        Args:
            suffix: Appended to every leg name (to make a second copy).

        Returns:
            One leg per spatial dimension (none for Linear).
        """
        return tuple(f"k{d}{suffix}" for d in range(len(self.patterns)))

    def spatial_legs(self, side: str, suffix: str = "") -> tuple[str, ...]:
        """Spatial legs of the layer's input or output.

        Args:
            side: ``'in'`` or ``'out'``.
            suffix: Appended to every leg name (to make a second copy).

        Returns:
            One leg per spatial dimension.
        """
        if self.kind == "linear":
            return tuple(f"s{d}{suffix}" for d in range(len(self.shared)))
        on_i_side = (side == "in") == (self.kind == "conv")
        return tuple(
            f"{'i' if on_i_side else 'o'}{d}{suffix}" for d in range(len(self.patterns))
        )

    def feature_legs(self, side: str, channel: str, suffix: str = "") -> tuple:
        """Legs of one sample of the layer's input or output, in memory order.

        Args:
            side: ``'in'`` or ``'out'``.
            channel: Name of the within-group channel leg.
            suffix: Appended to the spatial legs' names.

        Returns:
            ``(g, channel, *spatial)`` for convolutions, ``(*spatial, g, channel)``
            for Linear.
        """
        spatial = self.spatial_legs(side, suffix)
        if self.kind == "linear":
            return (*spatial, "g", channel)
        return ("g", channel, *spatial)

    def weight_legs(self, suffix: str = "") -> tuple[str, ...]:
        """Legs of the weight split into groups, in memory order.

        Args:
            suffix: Appended to the channel and kernel legs' names.

        Returns:
            ``(g, a, b, *k)`` or, for transposed convolution, ``(g, b, a, *k)``.
        """
        a, b = f"a{suffix}", f"b{suffix}"
        channels = (b, a) if self.kind == "conv_transpose" else (a, b)
        return ("g", *channels, *self.kernel_legs(suffix))

    def pattern_operands(self, suffix: str = "") -> tuple[list, list]:
        """Index patterns and their legs.

        Args:
            suffix: Appended to every leg name (to make a second copy).

        Returns:
            The patterns and their ``(k, o, i)`` legs.
        """
        legs = [
            tuple(f"{leg}{suffix}" for leg in triple) for triple in self.pattern_legs()
        ]
        return list(self.patterns), legs

    # views

    def split_features(self, tensor: Tensor, prefix: int) -> Tensor:
        """View the channel dimension of an input- or output-like tensor as groups.

        Args:
            tensor: Tensor of shape ``[*P, N, C, *S]`` (conv) or ``[*P, N, *S, C]``
                (Linear) with ``len(P) = prefix``.
            prefix: Number of leading dimensions before the batch dimension.

        Returns:
            View of shape ``[*P, N, G, C // G, *S]`` or ``[*P, N, *S, G, C // G]``.
        """
        dim = tensor.dim() - 1 if self.kind == "linear" else prefix + 1
        return tensor.unflatten(dim, (self.groups, -1))

    def split_weight(self, tensor: Tensor, prefix: int = 0) -> Tensor:
        """View a weight-like tensor with separate group dimension.

        Args:
            tensor: Tensor of shape ``[*P, *weight_shape]`` with ``len(P) = prefix``.
            prefix: Number of leading dimensions.

        Returns:
            View of shape ``[*P, G, ...]`` matching ``weight_legs``.
        """
        return tensor.unflatten(prefix, (self.groups, -1))

    # construction

    @classmethod
    def from_module(
        cls,
        module: Module,
        input_shape: Sequence[int],
        output_shape: Sequence[int] | None = None,
    ) -> LayerSpec:
        """Describe a layer from its module and input (and output) shape.

        Args:
            module: ``Linear``, ``Conv{1,2,3}d`` or ``ConvTranspose{1,2,3}d``.
            input_shape: Shape of the layer input.
            output_shape: Shape of the layer output. Needed for transposed
                convolutions called with an explicit ``output_size``.

        Returns:
            The layer description.

        Raises:
            NotImplementedError: If the module type is not supported.
        """
        builder = _BUILDERS.get(type(module))
        if builder is None:
            raise NotImplementedError(
                f"backpack_tn has no tensor network for {type(module).__name__}."
                f" Supported: {tuple(c.__name__ for c in _BUILDERS)}."
            )
        return builder(module, tuple(input_shape), output_shape)


def _check_input(module: Module, input_shape: tuple, dims: int):
    if len(input_shape) != dims:
        raise ValueError(
            f"{type(module).__name__} expects an input with {dims} dimensions"
            f" [N, C_in, *spatial], got shape {list(input_shape)}."
        )
    if input_shape[1] != module.in_channels:
        raise ValueError(
            f"{type(module).__name__} has in_channels={module.in_channels}, but the"
            f" input has shape {list(input_shape)}."
        )


def _from_linear(module: Linear, input_shape: tuple, output_shape) -> LayerSpec:
    if len(input_shape) < 2 or input_shape[-1] != module.in_features:
        raise ValueError(
            f"Linear has in_features={module.in_features}; expected an input of"
            f" shape [N, *, {module.in_features}], got {list(input_shape)}."
        )
    return LayerSpec(
        "linear",
        input_shape[0],
        module.in_features,
        module.out_features,
        shared=tuple(input_shape[1:-1]),
    )


def conv_padding(module: Module, input_spatial: Sequence[int]) -> list[tuple[int, int]]:
    """Left and right padding per spatial dimension, resolving ``'same'/'valid'``.

    For ``'same'``, the total padding ``D * (K - 1)`` is split as PyTorch does:
    ``total // 2`` on the left and the rest on the right.

    Args:
        module: Convolution layer.
        input_spatial: Spatial input sizes.

    Returns:
        ``(left, right)`` for every spatial dimension.
    """
    padding = module.padding
    dims = len(input_spatial)
    if padding == "valid":
        return [(0, 0)] * dims
    if padding == "same":
        result = []
        for k, d in zip(module.kernel_size, module.dilation, strict=False):
            total = d * (k - 1)
            result.append((total // 2, total - total // 2))
        return result
    return [(p, p) for p in padding]


def _from_conv(module: Module, input_shape: tuple, output_shape) -> LayerSpec:
    dims = len(module.kernel_size)
    _check_input(module, input_shape, dims + 2)
    spatial = input_shape[2:]
    patterns = tuple(
        IndexPattern(i, k, s, p, d, module.padding_mode)
        for i, k, s, p, d in zip(
            spatial,
            module.kernel_size,
            module.stride,
            conv_padding(module, spatial),
            module.dilation,
            strict=False,
        )
    )
    return LayerSpec(
        "conv",
        input_shape[0],
        module.in_channels,
        module.out_channels,
        module.groups,
        patterns,
    )


def _from_conv_transpose(module: Module, input_shape: tuple, output_shape) -> LayerSpec:
    dims = len(module.kernel_size)
    _check_input(module, input_shape, dims + 2)
    if module.padding_mode != "zeros":
        raise NotImplementedError(
            f"{type(module).__name__} supports only padding_mode 'zeros', got"
            f" {module.padding_mode!r}."
        )
    if output_shape is None:
        output_spatial = [
            (i - 1) * s - 2 * p + d * (k - 1) + op + 1
            for i, s, p, d, k, op in zip(
                input_shape[2:],
                module.stride,
                module.padding,
                module.dilation,
                module.kernel_size,
                module.output_padding,
                strict=False,
            )
        ]
    else:
        output_spatial = list(output_shape[2:])
    patterns = tuple(
        IndexPattern(o, k, s, (p, p), d, num_outputs=i)
        for i, o, k, s, p, d in zip(
            input_shape[2:],
            output_spatial,
            module.kernel_size,
            module.stride,
            module.padding,
            module.dilation,
            strict=False,
        )
    )
    spec = LayerSpec(
        "conv_transpose",
        input_shape[0],
        module.in_channels,
        module.out_channels,
        module.groups,
        patterns,
    )
    if spec.input_spatial != tuple(input_shape[2:]):
        raise ValueError(
            f"{type(module).__name__} output size {output_spatial} does not match"
            f" input size {list(input_shape[2:])}."
        )
    return spec


_BUILDERS = {
    Linear: _from_linear,
    Conv1d: _from_conv,
    Conv2d: _from_conv,
    Conv3d: _from_conv,
    ConvTranspose1d: _from_conv_transpose,
    ConvTranspose2d: _from_conv_transpose,
    ConvTranspose3d: _from_conv_transpose,
}

#: Layer types with a tensor network.
SUPPORTED_MODULES = tuple(_BUILDERS)


#: Module attributes that, with the shapes, determine a layer's description.
HYPERPARAMETERS = (
    "in_features",
    "out_features",
    "in_channels",
    "out_channels",
    "kernel_size",
    "stride",
    "padding",
    "dilation",
    "groups",
    "padding_mode",
    "output_padding",
)
#: Bound on the number of cached layer descriptions.
MAX_CACHED_SPECS = 1024
_SPECS: dict[tuple, LayerSpec] = {}
#: Per layer type, a getter of the ``HYPERPARAMETERS`` it has.
_KEY_GETTERS: dict[type, Callable[[Module], object]] = {}


def _no_hyperparameters(module: Module) -> tuple:
    """Key part of a layer type without any of the ``HYPERPARAMETERS``.

    Returns:
        An empty tuple.
    """
    return ()


def _as_tuple(shape: Sequence[int]) -> tuple[int, ...]:
    """A hashable shape (``torch.Size`` is a tuple already).

    Returns:
        ``shape`` as a tuple.
    """
    return shape if isinstance(shape, tuple) else tuple(shape)


def spec_of(
    module: Module,
    input_shape: Sequence[int] | None = None,
    output_shape: Sequence[int] | None = None,
) -> LayerSpec:
    """Describe a layer from its hyper-parameters and shapes (cached).

    Args:
        module: A layer. Without shapes, ``input0`` and ``output`` set by
            BackPACK's hooks give them.
        input_shape: Shape of the layer input.
        output_shape: Shape of the layer output (see ``LayerSpec.from_module``).

    Returns:
        The layer description.
    """
    if input_shape is None:
        input_shape, output_shape = module.input0.shape, module.output.shape
    hyperparameters = _KEY_GETTERS.get(type(module))
    if hyperparameters is None:  # missing attributes cost an AttributeError each
        names = [name for name in HYPERPARAMETERS if hasattr(module, name)]
        hyperparameters = attrgetter(*names) if names else _no_hyperparameters
        _KEY_GETTERS[type(module)] = hyperparameters
    key = (
        type(module),
        hyperparameters(module),
        _as_tuple(input_shape),
        None if output_shape is None else _as_tuple(output_shape),
    )
    spec = _SPECS.get(key)
    if spec is None:
        if len(_SPECS) >= MAX_CACHED_SPECS:
            _SPECS.clear()
        spec = LayerSpec.from_module(module, input_shape, output_shape)
        _SPECS[key] = spec
    return spec
