"""Tests of the main job, `python -m backpack_tn` (`network_run`)."""

import subprocess
import sys

import pytest
import torch

from backpack_tn.benchmark.memory import can_measure_cpu
from backpack_tn.benchmark.network_run import (
    EXTENSIONS,
    _measured_pass,
    format_table,
    peak_in_fresh_process,
    run_network,
)
from backpack_tn.benchmark.timing import steady_allocator


@pytest.mark.filterwarnings("ignore:Full backward hook is firing")
def test_run_network_agrees_with_stock():
    """Every extension agrees with stock BackPACK (or says stock cannot run)."""
    rows = run_network("2c2d", batch_size=2, dtype="float64", memory=False)
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
        memory=False,
    )
    assert len(rows) == 1 and rows[0]["agree"].startswith("yes"), rows


@pytest.mark.skipif(not can_measure_cpu(), reason="needs Linux /proc/self/clear_refs")
def test_measured_pass_counts_memory_freed_before():
    """A pass that reuses memory freed by an earlier one still shows its peak."""
    steady_allocator()  # freed blocks below 32 MiB stay resident for reuse
    size = 16 * 2**20
    earlier = [torch.ones(size // 4) for _ in range(4)]
    del earlier

    def one_pass():
        return torch.ones(size // 4).sum()

    peak = _measured_pass(one_pass, torch.device("cpu"))
    assert peak >= 0.9 * size / 2**20, f"peak {peak:.2f} MiB of a 16 MiB pass"


@pytest.mark.skipif(not can_measure_cpu(), reason="needs Linux /proc/self/clear_refs")
@pytest.mark.filterwarnings("ignore:Full backward hook is firing")
def test_memory_comes_from_fresh_processes():
    """Peaks do not depend on the extensions run before, and the table shows them."""
    alone = peak_in_fresh_process("2c2d", 4, "BatchGrad", "tn")
    rows = run_network("2c2d", batch_size=4, extensions=["DiagGGNExact", "BatchGrad"])
    after = rows[1]["tn"].peak_mib
    # BatchGrad's result alone: 4 samples x 3.3M parameters x 4 bytes
    assert alone > 40 and after > 40, (alone, after)
    assert abs(after - alone) < 0.1 * alone, (alone, after)
    for row in rows:
        assert row["stock"].peak_mib > 0, row
    assert "n/a" not in format_table(rows)


def test_main_job_without_memory():
    """--no-memory leaves the memory columns n/a, and the run still agrees."""
    result = subprocess.run(
        [sys.executable, "-m", "backpack_tn", "--model", "2c2d", "--batch-size", "2"]
        + ["--extensions", "BatchGrad", "--repeats", "1", "--no-memory"],
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    assert result.returncode == 0, result.stderr
    row = result.stdout.strip().splitlines()[-1]
    assert row.count("n/a") == 3 and "yes" in row, row


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
