"""Tests of the main job, `python -m backpack_tn` (`network_run`)."""

import subprocess
import sys

import pytest

from backpack_tn.benchmark.network_run import EXTENSIONS, format_table, run_network


@pytest.mark.filterwarnings("ignore:Full backward hook is firing")
def test_run_network_agrees_with_stock():
    """Every extension agrees with stock BackPACK (or says stock cannot run)."""
    rows = run_network("2c2d", batch_size=2, dtype="float64")
    assert [row["extension"] for row in rows] == list(EXTENSIONS)
    for row in rows:
        assert row["agree"].startswith(("yes", "stock cannot run")), row
    table = format_table(rows)
    assert table.count("\n") == len(rows) + 1
    assert "KFAC-reduce" in table and "stock cannot run" in table


@pytest.mark.filterwarnings("ignore:Full backward hook is firing")
def test_resnet_with_converter_agrees_with_stock():
    """A residual network (BackPACK's converter) gives stock's one-pass results."""
    rows = run_network(
        "resnet18_nobn",
        batch_size=2,
        extensions=["BatchGrad+DiagGGNExact+KFAC"],
        dtype="float64",
    )
    assert len(rows) == 1 and rows[0]["agree"].startswith("yes"), rows


@pytest.mark.parametrize(
    "args, message",
    [
        (["--batch-size", "0"], "must be a positive integer, got 0"),
        (["--model", "vgg"], "invalid choice: 'vgg'"),
        (["run", "--extensions", "Nope"], "invalid choice: 'Nope'"),
    ],
)
def test_main_job_option_errors(args, message):
    """Bad options give one line naming the problem and exit code 2."""
    result = subprocess.run(
        [sys.executable, "-m", "backpack_tn", *args],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert result.returncode == 2
    assert message in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1
