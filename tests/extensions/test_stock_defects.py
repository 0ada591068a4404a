"""Stock BackPACK is wrong or raises on these networks; backpack_tn matches autograd.

Each entry of ``test_problems.networks.STOCK_DEFECTS`` is checked twice: stock
BackPACK's answer differs from the brute-force reference (or it raises the listed
error), and backpack_tn's answer equals the reference.
"""

from typing import Any

from pytest import FixtureRequest, fixture, mark, raises

from test_problems.cases import with_device_marks
from test_problems.networks import NETWORK_CASES, STOCK_DEFECTS
from tests.extensions.utils import (
    EXTENSION_SETTINGS,
    assert_attributes_match,
    make_extension,
    network_reference,
    prepare_tn_test,
    reference_values,
    run_extension,
)

pytestmark = mark.filterwarnings(
    "ignore:The Kronecker factors stored in the weight parameters of transpose "
    "convolutions:UserWarning"
)


def _setting(name: str) -> dict[str, Any]:
    """The first extension setting of an extension.

    Args:
        name: Extension name.

    Returns:
        The setting (KFAC-expand for the Kronecker extensions).
    """
    return next(s for s in EXTENSION_SETTINGS if s["name"] == name)


DEFECT_CASES = [
    {
        **defect,
        "case": case,
        "device": case["device"],
        "setting": _setting(defect["extension"]),
    }
    for defect in STOCK_DEFECTS
    for case in NETWORK_CASES
    if case["case_id"].split("-dev=")[0] == defect["network"]
]
DEFECT_IDS = [f"{d['extension']}-{d['case']['case_id']}" for d in DEFECT_CASES]


@fixture(params=with_device_marks(DEFECT_CASES), ids=DEFECT_IDS)
def defect(request: FixtureRequest) -> dict[str, Any]:
    """A stock BackPACK defect with its expanded network case and setting.

    Args:
        request: Pytest request; ``request.param`` is a defect.

    Returns:
        The defect.
    """
    return request.param


def test_defects_name_known_networks():
    """Every defect refers to a network case."""
    named = {d["network"] for d in STOCK_DEFECTS}
    found = {d["network"] for d in DEFECT_CASES}
    assert named == found, f"Unknown networks: {sorted(named - found)}."


def test_stock_is_wrong(defect: dict[str, Any]):
    """Stock BackPACK's answer differs from the reference, or stock BackPACK raises.

    Args:
        defect: Defect with its case and setting.
    """
    case, setting = defect["case"], defect["setting"]
    stock = make_extension(setting, "stock")
    if defect["stock"] != "wrong":
        with raises(defect["stock"], match=defect["match"]):
            run_extension(case, stock)
        return
    ref = network_reference(case)
    actual = run_extension(case, stock)
    expected = reference_values(ref, setting, stock_convention=True)
    with raises(AssertionError, match="differ"):
        assert_attributes_match(actual, expected, setting, ref.params, {})


def test_tn_is_right(request: FixtureRequest, defect: dict[str, Any]):
    """backpack_tn's answer equals the reference.

    Args:
        request: Pytest request.
        defect: Defect with its case and setting.
    """
    case, setting = defect["case"], defect["setting"]
    prepare_tn_test(request, case, setting["name"])
    ref = network_reference(case)
    actual = run_extension(case, make_extension(setting, "tn"))
    expected = reference_values(ref, setting)
    assert_attributes_match(actual, expected, setting, ref.params, case["tols"] or {})
