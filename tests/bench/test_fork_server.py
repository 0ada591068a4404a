"""Tests of the fork server that starts the memory workers."""

from __future__ import annotations

import os
import signal
import time

import pytest

from backpack_tn.benchmark.fork_server import ForkServer

#: Module-level state that a job changes; a fresh child must not see the change.
STATE = {"calls": 0}
TARGETS = f"{__name__}"


def count_call() -> dict:
    """Count a call in this process's module state.

    Returns:
        The count after the call and the process id.
    """
    STATE["calls"] += 1
    return {"calls": STATE["calls"], "pid": os.getpid()}


def sleep(seconds: float) -> dict:
    """Sleep.

    Args:
        seconds: How long.

    Returns:
        ``{"status": "ok"}``.
    """
    time.sleep(seconds)
    return {"status": "ok"}


def raise_error(message: str) -> dict:
    """Raise.

    Args:
        message: The message.

    Raises:
        ValueError: Always.
    """
    raise ValueError(message)


def kill_self() -> dict:
    """Die by SIGKILL, as the kernel's out-of-memory killer does.

    Returns:
        Nothing; the process dies first.
    """
    os.kill(os.getpid(), signal.SIGKILL)
    return {}


def read_environment(name: str) -> dict:
    """A variable of the process's environment.

    Args:
        name: Its name.

    Returns:
        ``{"value": value or None}``.
    """
    return {"value": os.environ.get(name)}


#: (target, kwargs, timeout, expected result, or the keys and values it must have)
FAILURES = [
    pytest.param("sleep", {"seconds": 30}, 1.0, {"status": "timeout"}, id="timeout"),
    pytest.param(
        "raise_error",
        {"message": "bad layer"},
        30.0,
        {"status": "error", "message": "ValueError: bad layer"},
        id="error",
    ),
    pytest.param(
        "kill_self",
        {},
        30.0,
        {"status": "oom", "message": f"worker killed by signal {signal.SIGKILL}"},
        id="killed",
    ),
]


@pytest.fixture(scope="module")
def server():
    """One fork server for this module's tests, with one variable set for it.

    Yields:
        The client.
    """
    client = ForkServer([__name__], {"BACKPACK_TN_FORK_TEST": "1"})
    yield client
    client.close()


def test_jobs_run_in_fresh_children(server: ForkServer):
    """Each job runs in a new process that does not see the jobs before it.

    Args:
        server: The client.
    """
    first = server.run(f"{TARGETS}:count_call", {}, timeout=30)
    second = server.run(f"{TARGETS}:count_call", {}, timeout=30)
    assert first["calls"] == second["calls"] == 1, (first, second)
    assert len({first["pid"], second["pid"], os.getpid()}) == 3, (first, second)


def test_server_has_its_environment(server: ForkServer):
    """The server's variables reach its children and not this process.

    Args:
        server: The client.
    """
    result = server.run(
        f"{TARGETS}:read_environment", {"name": "BACKPACK_TN_FORK_TEST"}, 30
    )
    assert result == {"value": "1"}
    assert "BACKPACK_TN_FORK_TEST" not in os.environ


@pytest.mark.parametrize("target, kwargs, timeout, expected", FAILURES)
def test_failures_are_reported(
    server: ForkServer, target: str, kwargs: dict, timeout: float, expected: dict
):
    """A child that runs too long, raises or dies gives a status, and the next job runs.

    Args:
        server: The client.
        target: Function of this module.
        kwargs: Its arguments.
        timeout: Seconds.
        expected: The result.
    """
    result = server.run(f"{TARGETS}:{target}", kwargs, timeout)
    assert {key: result.get(key) for key in expected} == expected, result
    assert server.run(f"{TARGETS}:count_call", {}, 30)["calls"] == 1


def test_server_restarts_after_it_died(server: ForkServer):
    """A server that died is started again for the next job.

    Args:
        server: The client.
    """
    server.run(f"{TARGETS}:count_call", {}, 30)
    server._process.kill()
    server._process.wait()
    assert server.run(f"{TARGETS}:count_call", {}, 30)["calls"] == 1
