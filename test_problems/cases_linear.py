"""Cases for ``torch.nn.Linear``: inputs ``[N, in]`` and ``[N, *, in]``.

See :mod:`test_problems.cases` for the keys of a case.
"""

from torch import randn
from torch.nn import Linear

from test_problems.cases import expand_cases

LINEAR_BASE_CASES = [
    # input [N, in]
    {
        "seed": 0,
        "module_fn": lambda: Linear(5, 4),
        "input_fn": lambda: randn(3, 5),
    },
    {
        "seed": 1,
        "module_fn": lambda: Linear(5, 4, bias=False),
        "input_fn": lambda: randn(3, 5),
    },
    # batch size 1
    {
        "seed": 2,
        "module_fn": lambda: Linear(6, 3),
        "input_fn": lambda: randn(1, 6),
    },
    # a single input and output feature
    {
        "seed": 3,
        "module_fn": lambda: Linear(1, 1),
        "input_fn": lambda: randn(4, 1),
    },
    # input [N, *, in] with additional axes
    {
        "seed": 4,
        "module_fn": lambda: Linear(6, 3),
        "input_fn": lambda: randn(3, 4, 5, 6),
    },
    {
        "seed": 5,
        "module_fn": lambda: Linear(4, 5),
        "input_fn": lambda: randn(2, 3, 4),
    },
    {
        "seed": 6,
        "module_fn": lambda: Linear(4, 2, bias=False),
        "input_fn": lambda: randn(2, 3, 2, 4),
    },
    {
        "seed": 7,
        "module_fn": lambda: Linear(3, 2),
        "input_fn": lambda: randn(1, 2, 3),
    },
]
"""Linear cases before expansion over devices and dtypes."""

LINEAR_CASES, LINEAR_IDS = expand_cases(LINEAR_BASE_CASES)
