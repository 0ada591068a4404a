"""Fixtures of the extension tests: one per network case."""

from typing import Any

from pytest import FixtureRequest, fixture

from test_problems.cases import with_device_marks
from test_problems.networks import NETWORK_CASES, NETWORK_IDS


@fixture(params=with_device_marks(NETWORK_CASES), ids=NETWORK_IDS)
def network_case(request: FixtureRequest) -> dict[str, Any]:
    """An expanded network case; tests build it with ``build_network``.

    Args:
        request: Pytest request; ``request.param`` is an expanded network case.

    Returns:
        The expanded network case.
    """
    return request.param
