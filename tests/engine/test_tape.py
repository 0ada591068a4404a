"""Tests for ``backpack_tn.engine.tape``: records replay the same torch calls."""

import pytest
import torch
from torch.func import vmap

from backpack_tn.engine import tape
from backpack_tn.engine.tape import capture, constant_cache, mark_constant
from test_problems.compare import assert_allclose_report


# Views, padding, an einsum, in-place updates and item assignment.
def _views_and_products(x, w):
    padded = torch.nn.functional.pad(x, (1, 1))
    patches = padded.unfold(1, 3, 2).flatten(2)
    result = torch.einsum("npk,ok->nop", patches, w)
    result.mul_(2.0)
    result[:, 0] = result[:, 1]
    return result.transpose(1, 2) / x.shape[1]


# A call that returns several tensors, one of them unused.
def _pieces(x, w):
    first, second, _ = x.unbind(0)
    return (first * second).unsqueeze(0) @ w.T


# A call whose results are tensors and ``None`` (a weight-only gradient).
def _weight_gradient(x, w):
    weight = w.new_zeros(()).expand(2, 3, 3)
    _, gradient, _ = torch.ops.aten.convolution_backward(
        w.T[:2].unsqueeze(0),
        x.unsqueeze(0),
        weight,
        None,
        (1,),
        (0,),
        (1,),
        False,
        (0,),
        1,
        (False, True, False),
    )
    return gradient


# In-place updates through views, a view nobody reads, an index that is a tensor.
def _updates_through_views(x, w):
    y = x.clone()
    y[1].mul_(2.0)
    y.t()[0].add_(1.0)
    unused = y.view(-1)  # noqa: F841
    picked = y[torch.tensor([0, 2])]
    return picked.unflatten(1, (7, 1)).transpose(0, 1).squeeze(-1) @ w[:2, :2]


# Control flow on tensor values: not replayable.
def _reads_values(x, w):
    return x * 2 if x.sum().item() > 0 else x * 3


# Reads a tensor that is no input.
def _reads_unknown_tensor(x, w):
    return x + OUTSIDE


# The result is no tensor.
def _returns_a_tuple(x, w):
    return x, w


OUTSIDE = torch.ones(3, 7)

#: (name, function of x [3, 7] and w [5, 3]) whose records replay exactly.
REPLAYABLE = [
    ("views_and_products", _views_and_products),
    ("weight_gradient", _weight_gradient),
    ("updates_through_views", _updates_through_views),
]
#: (name, function, part of the refusal's reason).
REFUSED = [
    ("reads_values", _reads_values, "item returned"),
    ("reads_unknown_tensor", _reads_unknown_tensor, "no input, no earlier result"),
    ("returns_a_tuple", _returns_a_tuple, "result is a tuple"),
]


def _inputs(seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    torch.manual_seed(seed)
    return torch.randn(3, 7, dtype=torch.float64), torch.randn(5, 3).double()


@pytest.mark.parametrize(
    "fn", [f for _, f in REPLAYABLE], ids=[n for n, _ in REPLAYABLE]
)
def test_replay_on_new_inputs(fn):
    """A record computes the eager result on other inputs of the same layout."""
    x, w = _inputs(0)
    result, replay, refusal = capture(lambda: fn(x, w), [x, w])
    assert refusal is None and replay is not None
    assert_allclose_report(result, fn(x, w))
    x, w = _inputs(1)
    assert_allclose_report(replay(x, w), fn(x, w))
    assert "einsum" not in replay.source  # functions are bound as constants


def test_replay_of_several_results():
    """Calls with several results bind each; unused ones are deleted at once."""
    x = torch.randn(3, 4, dtype=torch.float64)
    w = torch.randn(2, 4, dtype=torch.float64)
    _, replay, refusal = capture(lambda: _pieces(x, w), [x, w])
    assert refusal is None
    unbind, deletion = replay.source.splitlines()[1:3]
    assert unbind.strip().startswith("t0, t1, t2, =")
    assert deletion.strip().startswith("del") and "t2" in deletion
    x = torch.randn(3, 4, dtype=torch.float64)
    assert_allclose_report(replay(x, w), _pieces(x, w))


def test_intermediates_are_deleted_after_last_use():
    """Every variable but the result is deleted once no later call reads it."""
    x, w = _inputs(0)
    _, replay, _ = capture(lambda: _views_and_products(x, w), [x, w])
    lines = replay.source.splitlines()
    assigned = {line.split(" = ")[0].strip() for line in lines if " = " in line}
    deleted = {
        name.strip()
        for line in lines
        if line.strip().startswith("del ")
        for name in line.strip()[4:].split(",")
    }
    result = lines[-1].split("return ")[1]
    assert assigned - {result} <= deleted


def test_view_chains_replay_as_one_strided_view():
    """A chain of views is one ``as_strided`` of its start; unread views are gone.

    ``_updates_through_views`` makes 14 calls: clone, two views updated in place
    (one a chain of two) and the two updates, an unread view, a tensor index and
    the tensor it is built from, a chain of three views of the result, one view of
    ``w`` and the product. The replay makes 10: one ``as_strided`` per updated
    view, per chain and for the view of ``w``.
    """
    x, w = _inputs(0)
    _, replay, _ = capture(lambda: _updates_through_views(x, w), [x, w])
    calls = [
        line.split(" = ")[1] for line in replay.source.splitlines() if " = " in line
    ]
    functions = [replay.__globals__[call.split("(")[0]] for call in calls]
    assert len(calls) == 10, replay.source
    assert sum(f is torch.as_strided for f in functions) == 4, replay.source
    x, w = _inputs(1)
    assert_allclose_report(replay(x, w), _updates_through_views(x, w))


@pytest.mark.parametrize(
    "fn, reason", [(f, r) for _, f, r in REFUSED], ids=[n for n, _, _ in REFUSED]
)
def test_refusals(fn, reason):
    """Records that could replay wrongly are refused, and the result stays eager."""
    x, w = _inputs(0)
    result, replay, refusal = capture(lambda: fn(x, w), [x, w])
    assert replay is None
    assert reason in refusal
    expected = fn(x, w)
    if isinstance(result, torch.Tensor):
        assert_allclose_report(result, expected)


def test_refuses_wrapped_and_repeated_inputs():
    """Tensors inside ``torch.func`` transforms and repeated inputs stay eager."""
    x, w = _inputs(0)

    def inside_vmap(row):
        _, replay, refusal = capture(lambda: row * 2, [row])
        assert replay is None and "wrapped" in refusal
        return row * 2

    vmap(inside_vmap)(x)
    _, replay, refusal = capture(lambda: x + x, [x, x])
    assert replay is None and "twice" in refusal


def test_refuses_long_records(monkeypatch):
    """Records longer than ``MAX_CALLS`` are refused."""
    monkeypatch.setattr(tape, "MAX_CALLS", 3)
    x, w = _inputs(0)
    _, replay, refusal = capture(lambda: x * 1 * 2 * 3 * 4, [x])
    assert replay is None and "more than 3 calls" in refusal


def test_marked_constants_are_read_not_rebuilt():
    """Constant caches are filled outside records and read by the replay."""
    built = []

    @constant_cache(maxsize=4)
    def table(size: int) -> torch.Tensor:
        built.append(size)
        return torch.arange(size, dtype=torch.float64)

    x = torch.randn(5, dtype=torch.float64)
    result, replay, refusal = capture(lambda: x * table(5), [x])
    assert refusal is None
    assert "arange" not in replay.source
    x = torch.randn(5, dtype=torch.float64)
    assert_allclose_report(replay(x), x * torch.arange(5))
    assert built == [5]
    table.cache_clear()
    table(5)
    assert built == [5, 5]
    mark_constant(OUTSIDE)
    _, replay, refusal = capture(lambda: x + OUTSIDE[0, :5], [x])
    assert refusal is None
