"""Run extensions on network cases and compare them with references or each other.

Extension settings are dicts with ``name`` (the class name in ``backpack.extensions``
and ``backpack_tn.extensions``), ``kwargs`` (passed to both) and ``tn_kwargs``
(passed only to ``backpack_tn``'s class).
"""

from __future__ import annotations

import importlib
from typing import Any

import torch
from backpack import backpack, extend
from backpack import extensions as stock_extensions
from backpack.extensions.backprop_extension import FAIL_ERROR, BackpropExtension
from pytest import FixtureRequest, mark, skip
from torch import Tensor
from torch.nn import Module

from test_problems.compare import assert_allclose_report
from test_problems.extension_references import (
    NetworkReference,
    curvature_matrix_product,
    exact_loss_sqrt,
    sampled_loss_sqrt,
)
from test_problems.networks import (
    CURVATURE_PRODUCTS,
    KRONECKER,
    PARAM_LAYER_TYPES,
    build_network,
    module_inputs,
    stock_limit,
)

MC_SEED = 7
"""Seed set right before every backward pass and before drawing reference samples."""

MC_SAMPLES = 3
"""MC samples of the exact (same-seed) Monte Carlo tests."""

NUM_VECTORS = 2
"""Vectors multiplied by the curvature-matrix products."""

EXTENSION_SETTINGS: list[dict[str, Any]] = [
    {"name": "BatchGrad"},
    {"name": "BatchL2Grad"},
    {"name": "SumGradSquared"},
    {"name": "Variance"},
    {"name": "DiagGGNExact"},
    {"name": "BatchDiagGGNExact"},
    {"name": "DiagGGNMC", "kwargs": {"mc_samples": MC_SAMPLES}},
    {"name": "BatchDiagGGNMC", "kwargs": {"mc_samples": MC_SAMPLES}},
    {"name": "DiagHessian"},
    {"name": "BatchDiagHessian"},
    {"name": "SqrtGGNExact"},
    {"name": "SqrtGGNMC", "kwargs": {"mc_samples": MC_SAMPLES}},
    *[
        {"name": name, "kwargs": kwargs, "tn_kwargs": {"kfac_approx": approx}}
        for name, kwargs in (
            ("KFAC", {"mc_samples": MC_SAMPLES}),
            ("KFLR", {}),
            ("KFRA", {}),
        )
        for approx in ("expand", "reduce")
    ],
    {"name": "GGNMP"},
    {"name": "HMP"},
    {"name": "PCHMP", "kwargs": {"modify": "clip"}},
    {"name": "PCHMP", "kwargs": {"modify": "abs"}},
]
"""Every extension, with the arguments it is tested with."""


def setting_id(setting: dict[str, Any]) -> str:
    """Id of an extension setting, e.g. ``KFAC-mc_samples=3-kfac_approx=reduce``.

    Args:
        setting: Extension setting.

    Returns:
        The id, without spaces.
    """
    kwargs = {**setting.get("kwargs", {}), **setting.get("tn_kwargs", {})}
    return "-".join([setting["name"], *(f"{k}={v}" for k, v in kwargs.items())])


EXTENSION_IDS = [setting_id(setting) for setting in EXTENSION_SETTINGS]


def make_extension(setting: dict[str, Any], implementation: str) -> BackpropExtension:
    """Instantiate the extension of a setting.

    Args:
        setting: Extension setting.
        implementation: ``'tn'`` (``backpack_tn.extensions``) or ``'stock'``
            (``backpack.extensions``).

    Returns:
        The extension instance.

    Raises:
        ValueError: If ``implementation`` is unknown.
    """
    kwargs = dict(setting.get("kwargs", {}))
    if implementation == "tn":
        module = importlib.import_module("backpack_tn.extensions")
        kwargs.update(setting.get("tn_kwargs", {}))
    elif implementation == "stock":
        module = stock_extensions
    else:
        raise ValueError(
            f"Unknown implementation {implementation!r}. Supported: ('tn', 'stock')."
        )
    return getattr(module, setting["name"])(**kwargs)


def stock_module_types(name: str) -> set[type] | None:
    """Module types that stock BackPACK's extension needs module extensions for.

    Args:
        name: Extension name.

    Returns:
        The module classes it has module extensions for, or ``None`` if it only
        needs them for modules with parameters (it does not fail on others).
    """
    extension = getattr(stock_extensions, name)()
    if extension._fail_mode != FAIL_ERROR:
        return None
    return set(extension._BackpropExtension__module_extensions)


def _missing_module(modules: list[Module], name: str, skip_params: bool) -> str | None:
    """Name a module the stock extension fails on for lack of a module extension.

    Args:
        modules: Modules of a network, loss included.
        name: Extension name.
        skip_params: Ignore parameter layers (backpack_tn brings their extensions).

    Returns:
        A reason naming the module, or ``None``.
    """
    supported = stock_module_types(name)
    if supported is None:  # stock has all parameter layers of the networks
        return None
    for module in modules:
        if skip_params and isinstance(module, PARAM_LAYER_TYPES):
            continue
        if type(module) not in supported:
            return f"stock {name} has no module extension for {type(module).__name__}"
    return None


def tn_unsupported(case: dict[str, Any], name: str) -> str | None:
    """Why ``backpack_tn`` cannot run an extension on a network, if it cannot.

    ``backpack_tn`` covers the parameter layers and keeps stock BackPACK's module
    extensions for all other modules (activations, pooling, flatten, losses).

    Args:
        case: Expanded network case.
        name: Extension name.

    Returns:
        A reason naming the unsupported module, or ``None``.
    """
    net = build_network(case)
    return _missing_module([*net.model, net.loss_func], name, skip_params=True)


def stock_unsupported(case: dict[str, Any], name: str) -> str | None:
    """Why stock BackPACK's result cannot be trusted on a network, if so.

    Args:
        case: Expanded network case.
        name: Extension name.

    Returns:
        A reason, or ``None`` if stock BackPACK is expected to be right.
    """
    net = build_network(case)
    modules = [*net.model, net.loss_func]
    return _missing_module(modules, name, skip_params=False) or stock_limit(
        net.model, net.loss_func, net.x, name
    )


def prepare_tn_test(request: FixtureRequest, case: dict[str, Any], name: str) -> None:
    """Skip or mark a test of ``backpack_tn`` by what the network needs.

    Skips if ``backpack_tn`` has no module extension for some module of the network.
    Marks the test as a strict expected failure if backpack_tn inherits a stock
    defect of a module it keeps (see ``STOCK_LIMITS``), so that a fix shows up.

    Args:
        request: Pytest request of the test.
        case: Expanded network case.
        name: Extension name.
    """
    reason = tn_unsupported(case, name)
    if reason is not None:
        skip(reason)
    net = build_network(case)
    inherited = stock_limit(net.model, net.loss_func, net.x, name, inherited_only=True)
    if inherited is not None:
        request.applymarker(mark.xfail(reason=inherited, strict=True))


def run_extension(case: dict[str, Any], extension: BackpropExtension) -> dict[str, Any]:
    """Run one forward and backward pass of a fresh network with an extension.

    The random state is seeded with ``MC_SEED`` right before ``backward()``.

    Args:
        case: Expanded network case.
        extension: Extension instance.

    Returns:
        The extension's attribute of every parameter, keyed by parameter name.
    """
    net = build_network(case)
    model, loss_func = extend(net.model), extend(net.loss_func)
    with backpack(extension):
        loss = loss_func(model(net.x), net.y)
        torch.manual_seed(MC_SEED)
        loss.backward()
    return {
        name: getattr(param, extension.savefield)
        for name, param in model.named_parameters()
    }


_REFERENCES: dict[str, NetworkReference] = {}


def network_reference(case: dict[str, Any]) -> NetworkReference:
    """The brute-force reference of a network case, built once per session.

    Args:
        case: Expanded network case.

    Returns:
        The reference; its quantities are computed on first access and kept.
    """
    case_id = case["case_id"]
    if case_id not in _REFERENCES:
        net = build_network(case)
        _REFERENCES[case_id] = NetworkReference(net.model, net.loss_func, net.x, net.y)
    return _REFERENCES[case_id]


def sampled_sqrt(ref: NetworkReference, mc_samples: int) -> Tensor:
    """The MC loss Hessian square root that a backward pass seeded by ``MC_SEED`` uses.

    Args:
        ref: Network reference.
        mc_samples: Number of MC samples ``V``.

    Returns:
        ``[V, N, C]``.
    """
    with torch.random.fork_rng(devices=[ref.x.device] if ref.x.is_cuda else []):
        torch.manual_seed(MC_SEED)
        return sampled_loss_sqrt(ref.loss_func, ref.output, ref.y, mc_samples)


def reference_values(
    ref: NetworkReference, setting: dict[str, Any], stock_convention: bool = False
) -> dict[str, Any]:
    """The reference of an extension's attribute, for every parameter.

    Args:
        ref: Network reference.
        setting: Extension setting.
        stock_convention: For KFAC/KFLR/KFRA, return stock BackPACK's factors (the
            expand input factor ``A`` whatever ``kfac_approx`` says).

    Returns:
        Tensors (lists of tensors for Kronecker factors) of the attribute's shape;
        for curvature-matrix products, the ``[P, P]`` curvature block.

    Raises:
        ValueError: If the extension name is unknown.
    """
    name = setting["name"]
    kwargs = setting.get("kwargs", {})
    simple = {
        "BatchGrad": lambda: ref.grad_batch,
        "BatchL2Grad": lambda: ref.batch_l2,
        "SumGradSquared": lambda: ref.sum_grad_squared,
        "Variance": lambda: ref.variance,
        "DiagGGNExact": lambda: ref.diag_ggn_exact,
        "BatchDiagGGNExact": lambda: ref.diag_ggn_exact_batch,
        "DiagHessian": lambda: ref.diag_h,
        "BatchDiagHessian": lambda: ref.diag_h_batch,
        "SqrtGGNExact": lambda: ref.sqrt_ggn(
            exact_loss_sqrt(ref.loss_func, ref.output, ref.y)
        ),
        "GGNMP": lambda: ref.ggn_blocks,
        "HMP": lambda: ref.hessian_blocks,
        "PCHMP": lambda: ref.curvature_blocks(kwargs.get("modify", "clip")),
    }
    if name in simple:
        return simple[name]()
    if name in ("DiagGGNMC", "BatchDiagGGNMC", "SqrtGGNMC"):
        sqrt = sampled_sqrt(ref, kwargs.get("mc_samples", 1))
        if name == "SqrtGGNMC":
            return ref.sqrt_ggn(sqrt)
        return ref.diag_ggn_from_sqrt(sqrt, sum_batch=name == "DiagGGNMC")
    if name in KRONECKER:
        approx = "expand" if stock_convention else setting["tn_kwargs"]["kfac_approx"]
        sqrt = (
            sampled_sqrt(ref, kwargs.get("mc_samples", 1)) if name == "KFAC" else None
        )
        return ref.kronecker_factors(name, approx, loss_sqrt=sqrt)
    raise ValueError(f"Unknown extension {name!r}.")


def _random_vectors(param: Tensor) -> Tensor:
    """Fixed random vectors ``[NUM_VECTORS, *param.shape]`` for curvature products.

    Args:
        param: Parameter (or a tensor of its shape, dtype and device).

    Returns:
        The vectors, on the parameter's device and in its dtype.
    """
    generator = torch.Generator().manual_seed(0)
    mat = torch.randn(NUM_VECTORS, *param.shape, generator=generator)
    return mat.to(dtype=param.dtype, device=param.device)


def output_positions(case: dict[str, Any]) -> dict[str, int]:
    """Number of output positions ``R`` of the layer of every parameter.

    Args:
        case: Expanded network case.

    Returns:
        ``R`` keyed by parameter name.
    """
    net = build_network(case)
    positions = {}
    for index, (module, x) in enumerate(module_inputs(net.model, net.x)):
        if not isinstance(module, PARAM_LAYER_TYPES):
            continue
        with torch.no_grad():
            out = module(x)
        channels = getattr(module, "out_features", None) or module.out_channels
        for param, _ in module.named_parameters():
            positions[f"{index}.{param}"] = out[0].numel() // channels
    return positions


def assert_attributes_match(
    actual: dict[str, Any],
    expected: dict[str, Any],
    setting: dict[str, Any],
    params: dict[str, Tensor],
    tols: dict[str, float],
    compare: dict[str, tuple[int, ...]] | None = None,
) -> None:
    """Compare extension attributes parameter by parameter.

    Curvature-matrix products (functions) are applied to the same fixed random
    vectors on both sides; an expected ``[P, P]`` tensor is multiplied instead.

    Args:
        actual: Attributes of an extension run, keyed by parameter name.
        expected: Reference values or attributes of another run.
        setting: Extension setting.
        params: Parameters, keyed by name, for the shape, dtype and device of the
            vectors of curvature-matrix products.
        tols: Tolerance overrides.
        compare: For Kronecker factors, the indices of the factors to compare per
            parameter. ``None`` compares all factors.

    Raises:
        AssertionError: If the parameters or any value differ.
    """
    name = setting["name"]
    if actual.keys() != expected.keys():
        raise AssertionError(
            f"{name}: parameters differ: actual {sorted(actual)}, expected "
            f"{sorted(expected)}."
        )
    for param, value in actual.items():
        label = f"{setting_id(setting)}: {param}"
        reference = expected[param]
        if name in CURVATURE_PRODUCTS:
            if not callable(value):
                raise AssertionError(f"{label}: expected a function, got {value!r}.")
            mat = _random_vectors(params[param])
            target = (
                reference(mat)
                if callable(reference)
                else curvature_matrix_product(reference, mat)
            )
            assert_allclose_report(value(mat), target, name=label, **tols)
        elif compare is not None:
            indices = compare[param]
            assert_allclose_report(
                [value[i] for i in indices],
                [reference[i] for i in indices],
                name=label,
                **tols,
            )
        else:
            assert_allclose_report(value, reference, name=label, **tols)
