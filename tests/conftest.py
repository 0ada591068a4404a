"""Fixtures shared by the tests: one per case family."""

from collections.abc import Iterator

from pytest import FixtureRequest, MonkeyPatch, fixture

from backpack_tn import set_host_probe
from backpack_tn.derivatives import host
from backpack_tn.engine import contract
from test_problems.cases import Problem, build_problem, with_device_marks
from test_problems.cases_conv import CONV_CASES, CONV_IDS
from test_problems.cases_linear import LINEAR_CASES, LINEAR_IDS


@fixture(autouse=True)
def gemm_steps_at_any_size(monkeypatch: MonkeyPatch) -> Iterator[None]:
    """Run pairwise steps through the GEMM executor even on the tests' small shapes.

    Outside tests, steps on small operands go to ``torch.einsum``; the executor
    (views, copies, Gram products) is what needs the coverage.

    Args:
        monkeypatch: Pytest's monkeypatch fixture.

    Yields:
        Nothing; the threshold is restored afterwards.
    """
    monkeypatch.setattr(contract, "SMALL_STEP", 0)
    yield


@fixture(autouse=True)
def static_host_rules() -> Iterator[None]:
    """Keep ``auto``'s host probe off, so that its choices do not depend on the host.

    Tests of the probe pin its result themselves.

    Yields:
        Nothing; the probe's setting is restored afterwards.
    """
    state = host.configuration()
    set_host_probe(False)
    yield
    set_host_probe(**state)


@fixture(params=with_device_marks(LINEAR_CASES), ids=LINEAR_IDS)
def linear_problem(request: FixtureRequest) -> Iterator[Problem]:
    """Seed, build a ``Linear`` layer and its input, and run the forward pass.

    Args:
        request: Pytest request; ``request.param`` is an expanded linear case.

    Yields:
        The layer with ``input0``/``output`` stored, its input and tolerances.
    """
    yield build_problem(request.param)


@fixture(params=with_device_marks(CONV_CASES), ids=CONV_IDS)
def conv_problem(request: FixtureRequest) -> Iterator[Problem]:
    """Seed, build a (transpose) convolution and its input, and run the forward pass.

    Args:
        request: Pytest request; ``request.param`` is an expanded convolution case.

    Yields:
        The layer with ``input0``/``output`` stored, its input and tolerances.
    """
    yield build_problem(request.param)


@fixture(params=with_device_marks(LINEAR_CASES + CONV_CASES), ids=LINEAR_IDS + CONV_IDS)
def layer_problem(request: FixtureRequest) -> Iterator[Problem]:
    """Seed, build any layer of the linear and convolution families, run forward.

    Args:
        request: Pytest request; ``request.param`` is an expanded case.

    Yields:
        The layer with ``input0``/``output`` stored, its input and tolerances.
    """
    yield build_problem(request.param)
