"""Fixtures for the derivative tests."""

from collections.abc import Iterator

import torch
from pytest import fixture


@fixture(autouse=True, scope="module")
def single_thread() -> Iterator[None]:
    """Run on one thread, since the layers in these tests are tiny.

    Synchronizing threads would cost more than the arithmetic, by orders of magnitude
    when other processes keep the cores busy.

    Yields:
        Nothing; restores the number of threads afterwards.
    """
    num_threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(num_threads)
