"""Tests of ``backpack_tn.use_tn``: converting stock and user-written extensions."""

import importlib
from typing import Any

from backpack import extensions as stock_extensions
from backpack.extensions.firstorder.batch_grad.conv1d import BatchGradConv1d
from pytest import FixtureRequest, fixture, mark, raises
from torch.nn import Conv1d

from test_problems.cases import with_device_marks
from test_problems.networks import NETWORK_CASES
from tests.extensions.utils import (
    EXTENSION_SETTINGS,
    assert_attributes_match,
    make_extension,
    network_reference,
    prepare_tn_test,
    run_extension,
    setting_id,
)

pytestmark = mark.filterwarnings(
    "ignore:The Kronecker factors stored in the weight parameters of transpose "
    "convolutions:UserWarning"
)

USE_TN_NETWORKS = (
    "conv1d-relu-conv1d-reflect-linear-ce-mean",
    "linear-ntd-relu-flatten-linear-ce-mean",
)
"""Networks (ids without device and dtype) on which stock BackPACK fails."""

USE_TN_CASES = [
    case
    for case in NETWORK_CASES
    if case["case_id"].split("-dev=")[0] in USE_TN_NETWORKS
]
USE_TN_IDS = [case["case_id"] for case in USE_TN_CASES]

STOCK_CONSTRUCTED = [
    setting
    for setting in EXTENSION_SETTINGS
    if setting.get("tn_kwargs", {}).get("kfac_approx", "expand") == "expand"
]
"""Settings a stock constructor can express (KFAC's default is expand)."""


def use_tn(*args, **kwargs):
    """Call ``backpack_tn.use_tn``, imported when a test runs.

    Args:
        *args: Positional arguments of ``use_tn``.
        **kwargs: Keyword arguments of ``use_tn``.

    Returns:
        What ``use_tn`` returns.
    """
    return importlib.import_module("backpack_tn").use_tn(*args, **kwargs)


@fixture(params=with_device_marks(USE_TN_CASES), ids=USE_TN_IDS)
def use_tn_case(request: FixtureRequest) -> dict[str, Any]:
    """An expanded network case on which stock BackPACK is wrong or raises.

    Args:
        request: Pytest request; ``request.param`` is an expanded network case.

    Returns:
        The expanded network case.
    """
    return request.param


@mark.parametrize(
    "setting", STOCK_CONSTRUCTED, ids=[setting_id(s) for s in STOCK_CONSTRUCTED]
)
def test_use_tn_matches_tn_class(
    request: FixtureRequest, use_tn_case: dict[str, Any], setting: dict[str, Any]
):
    """``use_tn`` on a stock instance gives what ``backpack_tn.extensions`` gives.

    Args:
        request: Pytest request.
        use_tn_case: Expanded network case.
        setting: Extension setting.
    """
    prepare_tn_test(request, use_tn_case, setting["name"])
    converted = use_tn(make_extension(setting, "stock"))
    actual = run_extension(use_tn_case, converted)
    expected = run_extension(use_tn_case, make_extension(setting, "tn"))
    ref = network_reference(use_tn_case)
    assert_attributes_match(actual, expected, setting, ref.params, {})


def test_use_tn_returns_the_instance():
    """``use_tn`` converts in place and returns the instance it got."""
    extension = stock_extensions.DiagGGNExact()
    converted = use_tn(extension)
    assert converted is extension
    assert type(converted) is stock_extensions.DiagGGNExact
    assert converted.savefield == "diag_ggn_exact"


class DoubledBatchGradConv1d(BatchGradConv1d):
    """A user-written module extension: twice the per-sample gradients."""

    def __init__(self):
        """Wrap the parameter functions of stock BackPACK's module extension."""
        super().__init__()
        for param in ("weight", "bias"):
            setattr(self, param, self._doubled(getattr(self, param)))

    @staticmethod
    def _doubled(function):
        def doubled(ext, module, g_inp, g_out, backproped):
            return 2 * function(ext, module, g_inp, g_out, backproped)

        return doubled


class UserBatchGrad(stock_extensions.BatchGrad):
    """A user-written extension with its own savefield and Conv1d module extension."""

    def __init__(self):
        """Change the savefield and register the user's Conv1d module extension."""
        super().__init__()
        self.savefield = "user_grad_batch"
        self.set_module_extension(Conv1d, DoubledBatchGradConv1d(), overwrite=True)


def test_use_tn_keeps_user_extension(use_tn_case: dict[str, Any]):
    """A user-written extension keeps its savefield and its own module extension.

    The user's Conv1d module extension must run on tensor-network derivatives: on a
    reflect-padded convolution stock BackPACK's derivatives are wrong, so only then
    it returns exactly twice the reference.

    Args:
        use_tn_case: Expanded network case.
    """
    ref = network_reference(use_tn_case)
    actual = run_extension(use_tn_case, use_tn(UserBatchGrad()))
    expected = {
        name: 2 * grad if ref.param_layers[name][1].__class__ is Conv1d else grad
        for name, grad in ref.grad_batch.items()
    }
    assert_attributes_match(actual, expected, {"name": "UserBatchGrad"}, ref.params, {})


@mark.parametrize("name", ["KFAC", "KFLR", "KFRA"])
def test_unknown_kfac_approx_raises(name: str):
    """An unknown ``kfac_approx`` is rejected with the value and the choices.

    Args:
        name: Extension name.
    """
    extensions = importlib.import_module("backpack_tn.extensions")
    with raises(ValueError, match=r"kfac_approx 'bogus'.*expand.*reduce"):
        getattr(extensions, name)(kfac_approx="bogus")


def test_use_tn_rejects_non_extension():
    """``use_tn`` names the type it got when that is not a BackPACK extension."""
    with raises(TypeError, match=r"BackPACK extension.*object"):
        use_tn(object())


def test_use_tn_rejects_unknown_strategy():
    """``use_tn`` rejects an unknown strategy and lists the supported ones."""
    with raises(ValueError, match=r"strategy 'bogus'.*auto"):
        use_tn(stock_extensions.BatchGrad(), strategy="bogus")
