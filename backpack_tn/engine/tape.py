"""Record the torch calls of one evaluation and replay them as straight-line code.

An evaluation (build a network, simplify it, pick GEMM layouts, contract) spends
tens of microseconds in Python around a handful of torch calls, and more when the
CPU caches are cold, as they are in a backward pass that visits many layers. Every
decision it takes depends only on its inputs' shapes, strides, storage offsets,
dtypes and devices. :func:`capture` runs it once under a
``torch.overrides.TorchFunctionMode`` that records each top-level torch call
with its arguments, and compiles the record into a function that makes the same
calls on new inputs of the same layout, and nothing else.

A record is refused (the evaluation stays eager) when it could not be replayed
exactly: a call reads a tensor that is neither an input, nor the result of an
earlier call, nor a marked constant (see :func:`mark_constant`); a call's
non-tensor result depends on tensor values (``item``, ``__bool__``, ...); a
tensor is wrapped by a ``torch.func`` transform or is a subclass; or an argument
is an object the code generator does not know.
"""

from __future__ import annotations

import math
import weakref
from collections.abc import Callable, Sequence
from functools import lru_cache, wraps

import torch
from torch import Tensor
from torch.overrides import TorchFunctionMode, resolve_name

#: Calls whose non-tensor results depend only on shapes, strides, dtypes, devices
#: and on which tensors share memory (and ``torch.device``'s constructor); they
#: are not replayed.
QUERIES = frozenset(
    f"torch.Tensor.{name}"
    for name in (
        "size",
        "stride",
        "storage_offset",
        "dim",
        "ndimension",
        "numel",
        "nelement",
        "is_contiguous",
        "data_ptr",
        "element_size",
        "get_device",
        "__len__",
        "is_floating_point",
        "is_complex",
        *(
            f"{attribute}.__get__"
            for attribute in (
                "shape",
                "dtype",
                "device",
                "ndim",
                "layout",
                "is_cuda",
                "is_meta",
                "requires_grad",
            )
        ),
    )
) | {"torch.device"}

#: Calls that return ``None`` and modify a tensor in place; they are replayed.
MUTATIONS = frozenset({"torch.Tensor.__setitem__"})

#: Calls that return a view of their first argument (or, for ``reshape``, a
#: copy), have no side effects and read no other tensor. A view is replayed as one
#: ``torch.as_strided`` of the tensor that its chain of views starts from, and a
#: call whose result nobody reads is dropped.
VIEWS = frozenset(
    f"torch.Tensor.{name}"
    for name in (
        "view",
        "reshape",
        "unflatten",
        "flatten",
        "permute",
        "transpose",
        "swapaxes",
        "swapdims",
        "movedim",
        "moveaxis",
        "squeeze",
        "unsqueeze",
        "expand",
        "narrow",
        "select",
        "unfold",
        "as_strided",
        "diagonal",
        "t",
        "__getitem__",
        "T.__get__",
        "mT.__get__",
    )
) | frozenset(
    f"torch.{name}"
    for name in (
        "reshape",
        "flatten",
        "permute",
        "transpose",
        "swapaxes",
        "movedim",
        "squeeze",
        "unsqueeze",
        "narrow",
        "select",
        "as_strided",
        "diagonal",
        "t",
    )
)

#: Records longer than this many calls are refused (loops over many blocks).
MAX_CALLS = 512

#: Argument types the generated code binds as constants.
_CONSTANT_TYPES = (
    torch.dtype,
    torch.device,
    torch.layout,
    torch.memory_format,
    torch.Size,
    slice,
    type(Ellipsis),
)

#: Marked constants by ``id``; an entry leaves when its tensor is freed.
_CONSTANTS: dict[int, weakref.ref] = {}


def mark_constant(tensor: Tensor) -> Tensor:
    """Let records read a tensor that never changes (a cached index map).

    Args:
        tensor: A tensor that nobody modifies in place.

    Returns:
        ``tensor``.
    """
    key = id(tensor)
    _CONSTANTS[key] = weakref.ref(tensor, lambda _: _CONSTANTS.pop(key, None))
    return tensor


def constant_cache(maxsize: int) -> Callable[[Callable], Callable]:
    """``functools.lru_cache`` for functions that build constant tensors.

    A miss is computed outside any record, and the result is marked constant, so
    a record reads the cached tensor instead of rebuilding it on every replay.

    Args:
        maxsize: Number of cached results.

    Returns:
        The decorator. The decorated function has ``cache_clear``.
    """

    def decorate(build: Callable) -> Callable:
        cached = lru_cache(maxsize=maxsize)(build)

        @wraps(build)
        def constant(*args):
            with torch._C.DisableTorchFunction():
                return mark_constant(cached(*args))

        constant.cache_clear = cached.cache_clear
        return constant

    return decorate


#: Tensor types a record may take (subclasses may override torch functions).
PLAIN_TYPES = (Tensor, torch.nn.Parameter)


def replayable(tensor: Tensor) -> bool:
    """Whether a tensor may enter a record or a replay.

    Returns:
        ``True`` for plain tensors and parameters outside ``torch.func``
        transforms.
    """
    return type(tensor) in PLAIN_TYPES and not (
        torch._C._functorch.is_functorch_wrapped_tensor(tensor)
    )


def input_problem(inputs: Sequence[Tensor]) -> str | None:
    """Why a record or a replay cannot take these inputs.

    Args:
        inputs: The tensors of an evaluation.

    Returns:
        The reason, or ``None`` if they can be recorded and replayed.
    """
    if not all(replayable(t) for t in inputs):
        return "an input is wrapped or a tensor subclass"
    if len({id(t) for t in inputs}) != len(inputs):
        return "the same tensor is passed twice"
    return None


class UnrecordableError(Exception):
    """A call that a record cannot replay exactly."""


class _Recorder(TorchFunctionMode):
    """Torch-function mode that writes each top-level call as one line of code."""

    def __init__(self, inputs: Sequence[Tensor]):
        super().__init__()
        self.lines: list[tuple[str, tuple[str, ...], tuple[str, ...], bool]] = []
        self.roots: dict[str, str] = {}
        self.namespace: dict[str, object] = {}
        self.names: dict[int, tuple[weakref.ref, str]] = {}
        self.used: list[str] = []
        self.count = 0
        self.inputs = [f"i{j}" for j in range(len(inputs))]
        for tensor, name in zip(inputs, self.inputs, strict=True):
            self._bind(tensor, name)
        self.refusal: str | None = None

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        result = func(*args, **kwargs)
        if self.refusal is None:
            try:
                self._record(func, args, kwargs, result)
            except UnrecordableError as error:
                self.refusal = str(error)
        return result

    # names

    def _bind(self, tensor: Tensor, name: str):
        self.names[id(tensor)] = (weakref.ref(tensor), name)

    def name_of(self, tensor: Tensor) -> str:
        """The variable that holds ``tensor`` in the generated code.

        Returns:
            A variable or constant name.

        Raises:
            UnrecordableError: If the tensor is unknown or wrapped.
        """
        if not replayable(tensor):
            raise UnrecordableError(f"a {type(tensor).__name__} or transformed tensor")
        entry = self.names.get(id(tensor))
        if entry is not None and entry[0]() is tensor:
            if not entry[1].startswith("c"):
                self.used.append(entry[1])
            return entry[1]
        marked = _CONSTANTS.get(id(tensor))
        if marked is not None and marked() is tensor:
            name = self._constant(tensor)
            self._bind(tensor, name)
            return name
        raise UnrecordableError(
            f"a tensor of shape {tuple(tensor.shape)} that is no input, no earlier"
            " result and no marked constant"
        )

    def _constant(self, value: object) -> str:
        name = f"c{len(self.namespace)}"
        self.namespace[name] = value
        return name

    def expression(self, value: object) -> str:
        """Source code that evaluates to ``value`` in the generated function.

        Returns:
            A Python expression.

        Raises:
            UnrecordableError: If ``value`` contains an object of an unknown type.
        """
        if isinstance(value, Tensor):
            return self.name_of(value)
        if isinstance(value, torch.Size) or isinstance(value, _CONSTANT_TYPES):
            return self._constant(value)
        if isinstance(value, tuple | list):
            items = ", ".join(self.expression(v) for v in value)
            if isinstance(value, list):
                return f"[{items}]"
            return f"({items},)" if value else "()"
        if value is None or isinstance(value, bool | int | str):
            return repr(value)
        if isinstance(value, float):
            return repr(value) if math.isfinite(value) else self._constant(value)
        raise UnrecordableError(f"an argument of type {type(value).__name__}")

    # calls

    def _record(self, func: Callable, args: tuple, kwargs: dict, result: object):
        name = resolve_name(func) or getattr(func, "__name__", repr(func))
        if isinstance(result, Tensor):
            outputs = [result]
        elif (
            isinstance(result, tuple | list)
            and not isinstance(result, torch.Size)
            and any(isinstance(r, Tensor) for r in result)
            and all(isinstance(r, Tensor) or r is None for r in result)
        ):  # e.g. convolution_backward's (None, grad_weight, None)
            outputs = [r for r in result if r is not None]
        elif name in QUERIES:
            for value in (*args, *kwargs.values()):
                if isinstance(value, Tensor):
                    self.name_of(value)  # a query on an unknown tensor is refused
            return
        elif result is None and name in MUTATIONS:
            outputs = []
        else:
            raise UnrecordableError(f"{name} returned a {type(result).__name__}")
        if len(self.lines) >= MAX_CALLS:
            raise UnrecordableError(f"more than {MAX_CALLS} calls")
        self.used = []
        root = self._view_root(name, args, kwargs, result)
        if root is None:
            call = ", ".join(
                [self.expression(a) for a in args]
                + [f"{k}={self.expression(v)}" for k, v in kwargs.items()]
            )
            code = f"{self._constant(func)}({call})"
        else:
            geometry = (tuple(result.shape), result.stride(), result.storage_offset())
            call = ", ".join([root, *map(repr, geometry)])
            code = f"{self._constant(torch.as_strided)}({call})"
        used = tuple(self.used)
        targets = tuple(f"t{self.count + j}" for j in range(len(outputs)))
        self.count += len(outputs)
        for tensor, target in zip(outputs, targets, strict=True):
            if not replayable(tensor):
                raise UnrecordableError(f"{name} returned a wrapped tensor")
            self._bind(tensor, target)
            if root is not None:
                self.roots[target] = root
        if isinstance(result, Tensor):
            code = f"{targets[0]} = {code}"
        elif outputs:
            names = iter(targets)
            unpacked = ", ".join("_" if r is None else next(names) for r in result)
            code = f"{unpacked}, = {code}"
        self.lines.append((code, used, targets, name in VIEWS))

    def _view_root(
        self, name: str, args: tuple, kwargs: dict, result: object
    ) -> str | None:
        """The variable a view's chain starts from, if the call is such a view.

        Returns:
            The name of the tensor that ``result`` views (marked as read), or
            ``None`` if the call is no view of its first argument alone.
        """
        if name not in VIEWS or not isinstance(result, Tensor) or not args:
            return None
        source = args[0]
        if not isinstance(source, Tensor) or _holds_tensor((args[1:], kwargs)):
            return None
        if not _is_view_of(result, source):
            return None
        source_name = self.name_of(source)
        root = self.roots.get(source_name, source_name)
        self.used = [] if root.startswith("c") else [root]
        return root


def _holds_tensor(value: object) -> bool:
    """Whether an argument is or contains a tensor.

    Returns:
        ``True`` for tensors and tuples, lists or dicts that hold one.
    """
    if isinstance(value, Tensor):
        return True
    if isinstance(value, dict):
        value = tuple(value.values())
    return isinstance(value, tuple | list) and any(map(_holds_tensor, value))


def _is_view_of(result: Tensor, source: Tensor) -> bool:
    """Whether ``result`` reads ``source`` 's memory as plain strided elements.

    Returns:
        ``True`` if both share storage, dtype, device and the strided layout, and
        ``result`` carries no lazy conjugation or negation.
    """
    if not (
        result.layout == torch.strided
        and source.layout == torch.strided
        and result.dtype == source.dtype
        and result.device == source.device
        and not result.is_conj()
        and not result.is_neg()
        and not result.is_nested
    ):
        return False
    try:
        return (
            result.untyped_storage().data_ptr() == source.untyped_storage().data_ptr()
        )
    except (RuntimeError, NotImplementedError):  # tensors without a plain storage
        return False


def _compile(recorder: _Recorder, output: str) -> Callable[..., Tensor]:
    """Generate the replay function; each variable is deleted after its last use.

    Views whose results no later call reads (nor the output) are dropped first.

    Returns:
        ``replay(*inputs) -> Tensor``.
    """
    live, lines = {output}, []
    for code, used, targets, pure in reversed(recorder.lines):
        if pure and live.isdisjoint(targets):
            continue  # a view nobody reads
        live.update(used)
        lines.append((code, used, targets))
    lines.reverse()
    last_use: dict[str, int] = {}
    for j, (_, used, _) in enumerate(lines):
        for name in used:
            last_use[name] = j
    body = []
    for j, (code, _, targets) in enumerate(lines):
        body.append(code)
        dead = [
            name
            for name, last in last_use.items()
            if last == j and name != output and name not in targets
        ]
        dead += [t for t in targets if t not in last_use and t != output]
        if dead:
            body.append(f"del {', '.join(sorted(dead))}")
    body.append(f"return {output}")
    source = "\n".join(
        [f"def replay({', '.join(recorder.inputs)}):"] + [f"    {b}" for b in body]
    )
    namespace = dict(recorder.namespace)
    exec(compile(source, "<backpack_tn.engine.tape>", "exec"), namespace)
    replay = namespace["replay"]
    replay.source = source
    return replay


_RECORDING = {"depth": 0}


def recording() -> bool:
    """Whether an evaluation is being recorded now.

    Code that only issues torch calls costs nothing but those calls in a replay,
    so an evaluation may prefer such code while it is recorded.

    Returns:
        ``True`` inside :func:`capture`.
    """
    return _RECORDING["depth"] > 0


def capture(
    evaluation: Callable[[], Tensor], inputs: Sequence[Tensor]
) -> tuple[Tensor, Callable[..., Tensor] | None, str | None]:
    """Run an evaluation once and record its torch calls.

    Args:
        evaluation: Computes a tensor from ``inputs`` (and from nothing else that
            changes between calls).
        inputs: The tensors the evaluation reads.

    Returns:
        The evaluation's result, the replay function ``replay(*inputs)`` (or
        ``None``) and, without a replay function, the reason.
    """
    problem = input_problem(inputs)
    if problem is not None:
        return evaluation(), None, problem
    recorder = _Recorder(inputs)
    _RECORDING["depth"] += 1
    try:
        with recorder:
            result = evaluation()
    finally:
        _RECORDING["depth"] -= 1
    if recorder.refusal is None and not isinstance(result, Tensor):
        recorder.refusal = f"the result is a {type(result).__name__}"
    if recorder.refusal is None:
        try:
            output = recorder.name_of(result)
        except UnrecordableError as error:
            recorder.refusal = str(error)
    if recorder.refusal is not None:
        return result, None, recorder.refusal
    return result, _compile(recorder, output), None
