"""Repeated backward passes with every extension must not accumulate memory.

A training loop runs the same shapes again and again: after a few warm-up passes,
the live tensors, the Python heap and backpack_tn's caches must stop growing.
"""

import gc
import importlib
import tracemalloc
from types import ModuleType
from typing import Any

import torch
from backpack import backpack, extend
from pytest import mark

from test_problems.networks import NETWORK_CASES, build_network, stock_limit
from tests.extensions.utils import EXTENSION_SETTINGS, make_extension, tn_unsupported

pytestmark = mark.filterwarnings(
    "ignore:The Kronecker factors stored in the weight parameters of transpose "
    "convolutions:UserWarning"
)

MEMORY_NETWORKS = ("conv1d-relu-conv1d-reflect-linear-ce-mean",)
"""Networks (ids without device and dtype) run repeatedly, on the CPU. Every
extension runs its tensor networks on them (stock BackPACK has no GGNMP, HMP and
PCHMP for Conv1d)."""

WARMUP_PASSES = 3
REPEATED_PASSES = 20
MAX_HEAP_GROWTH_BYTES = 256 * 1024
"""Python heap growth allowed over the repeated passes (interpreter noise)."""

CACHE_MODULES = ("backpack_tn.engine.index_pattern", "backpack_tn.engine.contract")
"""Modules whose ``functools.lru_cache`` functions must stay bounded."""

MEMORY_CASES = [
    case
    for case in NETWORK_CASES
    if case["device"] == "cpu" and case["case_id"].split("-dev=")[0] in MEMORY_NETWORKS
]


def _lru_caches(module: ModuleType) -> dict[str, Any]:
    """The ``functools.lru_cache`` functions defined in a module.

    Args:
        module: Python module.

    Returns:
        Cached functions, keyed by qualified name.
    """
    return {
        f"{module.__name__}.{name}": value
        for name, value in vars(module).items()
        if hasattr(value, "cache_info") and hasattr(value, "cache_clear")
    }


def _cache_sizes() -> dict[str, int]:
    """Current sizes of backpack_tn's caches, checked against their bounds.

    Returns:
        ``currsize`` of every cache, keyed by qualified name.

    Raises:
        AssertionError: If a cache is unbounded or holds more than its bound.
    """
    sizes = {}
    for module_name in CACHE_MODULES:
        for name, cached in _lru_caches(importlib.import_module(module_name)).items():
            info = cached.cache_info()
            if info.maxsize is None:
                raise AssertionError(f"{name} is an unbounded cache.")
            if info.currsize > info.maxsize:
                raise AssertionError(
                    f"{name} holds {info.currsize} entries, more than its bound "
                    f"{info.maxsize}."
                )
            sizes[name] = info.currsize
    return sizes


def _live_tensors() -> tuple[int, int]:
    """Count the tensors reachable by the garbage collector and their storage.

    Returns:
        Number of tensors and bytes of their distinct storages (tensors without an
        accessible storage are counted, their bytes are not).
    """
    gc.collect()
    count, storages = 0, {}
    for obj in gc.get_objects():
        if issubclass(type(obj), torch.Tensor):  # isinstance may trigger getattr
            count += 1
            try:
                storage = obj.untyped_storage()
            except (NotImplementedError, RuntimeError):  # e.g. functorch wrappers
                continue
            storages[storage.data_ptr()] = storage.nbytes()
    return count, sum(storages.values())


@mark.parametrize("case", MEMORY_CASES, ids=[c["case_id"] for c in MEMORY_CASES])
def test_repeated_backward_does_not_grow(case: dict[str, Any]):
    """Twenty backward passes with all extensions leave memory and caches as they were.

    Args:
        case: Expanded network case.
    """
    net = build_network(case)
    settings = {
        setting["name"]: setting
        for setting in EXTENSION_SETTINGS
        if tn_unsupported(case, setting["name"]) is None
        and stock_limit(
            net.model, net.loss_func, net.x, setting["name"], inherited_only=True
        )
        is None
    }
    model, loss_func = extend(net.model), extend(net.loss_func)

    def backward_pass():
        extensions = [make_extension(s, "tn") for s in settings.values()]
        with backpack(*extensions):
            loss = loss_func(model(net.x), net.y)
            loss.backward()
        for param in model.parameters():
            param.grad = None
            for extension in extensions:
                delattr(param, extension.savefield)

    for _ in range(WARMUP_PASSES):
        backward_pass()
    caches_before = _cache_sizes()
    tensors_before = _live_tensors()
    tracemalloc.start()
    try:
        heap_before = tracemalloc.get_traced_memory()[0]
        for _ in range(REPEATED_PASSES):
            backward_pass()
        gc.collect()
        heap_growth = tracemalloc.get_traced_memory()[0] - heap_before
    finally:
        tracemalloc.stop()
    tensors_after = _live_tensors()
    caches_after = _cache_sizes()

    assert tensors_after == tensors_before, (
        f"Live tensors (count, bytes) grew from {tensors_before} to {tensors_after} "
        f"over {REPEATED_PASSES} backward passes."
    )
    assert heap_growth <= MAX_HEAP_GROWTH_BYTES, (
        f"The Python heap grew by {heap_growth} bytes over {REPEATED_PASSES} "
        f"backward passes (allowed: {MAX_HEAP_GROWTH_BYTES})."
    )
    assert caches_after == caches_before, (
        f"Caches grew from {caches_before} to {caches_after} over "
        f"{REPEATED_PASSES} backward passes with the same shapes."
    )
