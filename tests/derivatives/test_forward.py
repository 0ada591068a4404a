"""The layer's forward pass through every evaluation matches PyTorch's."""

import pytest

from backpack_tn.derivatives import DERIVATIVES, STRATEGIES
from test_problems.cases import Problem
from test_problems.compare import assert_allclose_report


@pytest.mark.parametrize("strategy", STRATEGIES)
def test_forward(layer_problem: Problem, strategy: str):
    """``forward`` (network or kernel, with bias) equals the module's output."""
    module, x = layer_problem.module, layer_problem.x
    derivatives = DERIVATIVES[type(module)](strategy=strategy)
    assert_allclose_report(
        derivatives.forward(module, x),
        module.output,
        name=f"forward ({strategy})",
        **layer_problem.tols,
    )
