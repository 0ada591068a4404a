"""Per-layer benchmark of backpack_tn against stock BackPACK and PyTorch references.

Command line: ``python -m backpack_tn bench --help``. Python::

    from backpack_tn.benchmark import run_benchmark

    rows = run_benchmark(layers=["conv2d in=64x56x56 out=128 k=3 s=2 p=1 n=32"],
                         ops="per_sample_weight_grad", out="bench_results")

Modules: :mod:`~backpack_tn.benchmark.models` (networks),
:mod:`~backpack_tn.benchmark.layers` (layer specs, enumeration, de-duplication),
:mod:`~backpack_tn.benchmark.ops` (ops and methods),
:mod:`~backpack_tn.benchmark.timing`, :mod:`~backpack_tn.benchmark.memory`,
:mod:`~backpack_tn.benchmark.report` and :mod:`~backpack_tn.benchmark.runner`.
"""

from backpack_tn.benchmark.layers import (
    LayerEntry,
    LayerSpec,
    deduplicate,
    enumerate_layers,
    enumerate_net,
    parse_layer_spec,
)
from backpack_tn.benchmark.models import NETS
from backpack_tn.benchmark.ops import OP_NAMES, REFERENCE_METHODS, op_registry
from backpack_tn.benchmark.runner import collect_layers, run_benchmark

__all__ = [
    "NETS",
    "OP_NAMES",
    "REFERENCE_METHODS",
    "LayerEntry",
    "LayerSpec",
    "collect_layers",
    "deduplicate",
    "enumerate_layers",
    "enumerate_net",
    "op_registry",
    "parse_layer_spec",
    "run_benchmark",
]
