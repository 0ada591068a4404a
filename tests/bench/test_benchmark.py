"""Tests for ``backpack_tn.benchmark`` and ``python -m backpack_tn bench``.

No test asserts anything about timings: they check parsing, layer enumeration,
that the reference methods agree, and that runs write their reports.
"""

import csv
import ctypes.util
import faulthandler
import json
import math
import signal
import subprocess
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import torch
from pytest import CaptureFixture, MonkeyPatch, approx, mark, raises

from backpack_tn.__main__ import main
from backpack_tn.benchmark import (
    LayerSpec,
    collect_layers,
    deduplicate,
    enumerate_net,
    parse_layer_spec,
    run_benchmark,
    runner,
    timing,
)
from backpack_tn.benchmark.memory import MemoryResult, measure_in_subprocess
from backpack_tn.benchmark.ops import OP_NAMES, REFERENCES, prepare
from backpack_tn.benchmark.timing import (
    MAX_BLOCK_CALLS,
    LoadGate,
    block_calls,
    calibrate_block,
    time_interleaved,
)
from test_problems.compare import assert_allclose_report

ROOT = Path(__file__).resolve().parents[2]

# ----------------------------------------------------------------- parsing
GOOD_SPECS = [
    (
        "conv2d in=64x56x56 out=128 k=3 s=2 p=1 g=1 n=32",
        {
            "kind": "conv2d",
            "in_channels": 64,
            "out_channels": 128,
            "input_size": (56, 56),
            "kernel_size": (3, 3),
            "stride": (2, 2),
            "padding": (1, 1),
            "dilation": (1, 1),
            "batch_size": 32,
        },
    ),
    (
        "conv1d in=8x100 out=4 k=5 d=2 g=4 bias=0",
        {"kernel_size": (5,), "dilation": (2,), "groups": 4, "bias": False},
    ),
    ("Conv3d in=2x4x5x6 out=4 k=3x1x2 p=1x0x1", {"padding": (1, 0, 1)}),
    ("conv2d in=3x8x8 out=4 k=5 p=same", {"padding": (2, 2)}),
    ("conv2d in=3x8x8 out=4 k=4 p=same", {"padding": "same"}),
    ("conv2d in=3x8x8 out=4 k=3 p=valid", {"padding": (0, 0)}),
    ("conv_transpose2d in=16x8x8 out=8 k=4 s=2 p=1 op=1", {"output_padding": (1, 1)}),
    ("conv2d in=3x8x8 out=6 k=3 pm=reflect", {"padding_mode": "reflect"}),
    ("linear in=512 out=10 n=32", {"in_channels": 512, "input_size": ()}),
    ("linear in=7x7x512 out=10", {"input_size": (7, 7), "batch_size": 5}),
]
GOOD_IDS = [text.replace(" ", "-") for text, _ in GOOD_SPECS]


@mark.parametrize("text, expected", GOOD_SPECS, ids=GOOD_IDS)
def test_parse_layer_spec(text: str, expected: dict):
    """Spec strings set the named fields and survive a round trip.

    Args:
        text: Spec string.
        expected: Expected field values.
    """
    spec = parse_layer_spec(text, batch_size=5)
    for name, value in expected.items():
        assert getattr(spec, name) == value, name
    assert parse_layer_spec(spec.to_string()) == spec
    module, x = spec.build(dtype=torch.float64)
    assert module(x).shape == spec.output_shape


BAD_SPECS = [
    ("", "Empty layer spec"),
    ("conv4d in=3x8 out=4 k=3", "Unknown layer kind 'conv4d'"),
    ("conv2d in=3x8x8 out=4 k=3 foo=1", "Unknown key 'foo'"),
    ("conv2d in=3x8x8 out=4 k", "Malformed token 'k'"),
    ("conv2d in=3x8x8 out=4 k=3 k=5", "given twice"),
    ("conv2d in=3x8x8 out=4", "lacks k="),
    ("conv2d out=4 k=3", "lacks in="),
    ("conv2d in=3x8 out=4 k=3", "needs 3 entries"),
    ("conv2d in=3x8x8 out=4 k=3x3x3", "needs 1 or 2 entries"),
    ("conv2d in=3x8x8 out=4 k=three", "Invalid value 'three' for 'k'"),
    ("conv2d in=3x8x8 out=4 k=0", "Invalid value '0' for 'k'"),
    ("conv2d in=3x8x8 out=4 k=3 g=2", "groups=2 must divide"),
    ("conv2d in=3x4x4 out=4 k=7", "would be empty"),
    ("conv2d in=3x8x8 out=4 k=3 s=2 p=same", "needs stride 1"),
    ("conv2d in=3x8x8 out=4 k=3 pm=mirror", "Unsupported padding_mode 'mirror'"),
    ("convtranspose2d in=4x5x5 out=2 k=3 s=2 op=2", "must be smaller than stride"),
    ("linear in=512 out=10 k=3", "not allowed for linear"),
    ("linear in=512 out=10 bias=maybe", "Invalid value 'maybe' for 'bias'"),
]
BAD_IDS = [text.replace(" ", "-") or "empty" for text, _ in BAD_SPECS]


@mark.parametrize("text, match", BAD_SPECS, ids=BAD_IDS)
def test_parse_layer_spec_errors(text: str, match: str):
    """Invalid spec strings raise a one-line ``ValueError`` that says why.

    Args:
        text: Spec string.
        match: Expected part of the message.
    """
    with raises(ValueError, match=match) as info:
        parse_layer_spec(text)
    assert "\n" not in str(info.value)


def test_layer_spec_from_module_errors():
    """Unsupported modules are rejected with ``NotImplementedError``."""
    with raises(NotImplementedError, match="Unsupported layer ReLU"):
        LayerSpec.from_module(torch.nn.ReLU(), (3,))


# ------------------------------------------------------------ enumeration
def test_enumerate_3c3d():
    """3c3d has three convolutions and three linear layers, all distinct."""
    specs = enumerate_net("3c3d", batch_size=4)
    assert [str(s) for s in specs] == [
        "conv2d in=3x32x32 out=64 k=5 s=1 p=0 d=1 g=1 n=4",
        "conv2d in=64x14x14 out=96 k=3 s=1 p=0 d=1 g=1 n=4",
        "conv2d in=96x6x6 out=128 k=3 s=1 p=1 d=1 g=1 n=4",
        "linear in=1152 out=512 n=4",
        "linear in=512 out=256 n=4",
        "linear in=256 out=10 n=4",
    ]
    entries = deduplicate({"3c3d": specs})
    assert [e.count for e in entries] == [1] * 6


def test_enumerate_all_cnn_c_and_deduplicate():
    """All-CNN-C's nine convolutions; duplicates merge within and across nets."""
    specs = enumerate_net("All-CNN-C", batch_size=4)
    assert len(specs) == 9
    assert all(s.kind == "conv2d" for s in specs)
    assert [s.input_size for s in specs] == [(32, 32)] * 3 + [(16, 16)] * 3 + [
        (8, 8),
        (6, 6),
        (6, 6),
    ]
    assert specs[2].stride == (2, 2) and specs[6].padding == (0, 0)

    entries = deduplicate({"a": specs, "b": specs[:2] + specs[:1]})
    assert len(entries) == 9
    assert entries[0].count == 3 and entries[0].nets == (("a", 1), ("b", 2))
    assert entries[1].count == 2 and entries[1].origin == "a×1 b×1"
    assert entries[2].count == 1


def test_collect_layers_quick_and_user():
    """The quick preset has ResNet18 layers with true multiplicities; user specs."""
    entries = collect_layers(None, quick=True, batch_size=2)
    by_origin = [e for e in entries if e.origin == "resnet18×4"]
    assert len(by_origin) == 1 and by_origin[0].spec.input_size == (56, 56)
    entries = collect_layers(None, ["linear in=4 out=2"], batch_size=2)
    assert [str(e.spec) for e in entries] == ["linear in=4 out=2 n=2"]
    with raises(ValueError, match="Unknown network 'lenet'"):
        collect_layers("lenet")


# ------------------------------------------------------------- references
TINY_SPECS = [
    "linear in=7 out=5 n=3",
    "linear in=2x3x7 out=5 n=3",
    "conv1d in=4x9 out=6 k=3 s=2 p=1 g=2 n=3",
    "conv2d in=4x7x6 out=6 k=3x2 s=2x1 p=1x0 d=1x2 g=2 n=3",
    "conv2d in=3x6x6 out=4 k=3 p=1 n=2",
    "conv3d in=2x5x5x4 out=4 k=2 p=1 n=2",
    "convtranspose1d in=4x5 out=2 k=3 s=2 p=1 op=1 n=2",
    "convtranspose2d in=4x5x5 out=6 k=3 s=2 p=1 g=2 n=2",
    "convtranspose3d in=2x3x3x3 out=2 k=2 s=2 n=2",
]
TINY_IDS = [f"{text.replace(' ', '-')}-dev=cpu-dtype=float64" for text in TINY_SPECS]


@mark.parametrize("text", TINY_SPECS, ids=TINY_IDS)
@mark.parametrize("op", OP_NAMES)
def test_references_agree(op: str, text: str):
    """Every reference method that supports a layer gives the same result.

    Args:
        op: Op name.
        text: Layer spec.
    """
    spec = parse_layer_spec(text)
    results = {}
    for method, fn in REFERENCES[op].items():
        module, x, extra = prepare(spec, op, dtype=torch.float64)
        try:
            with torch.no_grad():
                results[method] = fn(module, x, extra)
        except NotImplementedError:
            continue
    assert results, f"no reference supports {text}"
    if op in ("per_sample_weight_grad", "batch_l2", "ggn_diag", "input_vjp"):
        assert len(results) >= 2, f"only {list(results)} support {text}"
    expected_method, expected = next(iter(results.items()))
    for method, result in results.items():
        assert_allclose_report(result, expected, name=f"{method} vs {expected_method}")


def test_references_shapes():
    """Reference results have the documented shapes."""
    spec = parse_layer_spec("conv2d in=4x6x6 out=6 k=3 g=2 n=3")
    weight = (6, 2, 3, 3)
    shapes = {
        "forward": (3, 6, 4, 4),
        "input_vjp": (1, 3, 4, 6, 6),
        "per_sample_weight_grad": (3, *weight),
        "batch_l2": (3,),
        "ggn_diag": weight,
        "kfac_expand": (2, 18, 18),
        "kfac_reduce": (2, 18, 18),
    }
    for op, shape in shapes.items():
        module, x, extra = prepare(spec, op, dtype=torch.float64)
        with torch.no_grad():
            result = next(iter(REFERENCES[op].values()))(module, x, extra)
        assert tuple(result.shape) == shape, op


def test_padding_mode_only_torch_references():
    """BackPACK and unfold ignore ``padding_mode``, so they refuse such layers."""
    spec = parse_layer_spec("conv2d in=3x6x6 out=4 k=3 p=1 pm=reflect n=2")
    for op in ("per_sample_weight_grad", "kfac_expand", "input_vjp"):
        module, x, extra = prepare(spec, op, dtype=torch.float64)
        for method, fn in REFERENCES[op].items():
            if method in ("bp_default", "bp_save_memory", "unfold"):
                with raises(NotImplementedError, match="ignores padding_mode"):
                    fn(module, x, extra)
    module, x, extra = prepare(spec, "input_vjp", dtype=torch.float64)
    with torch.no_grad():
        autograd = REFERENCES["input_vjp"]["autograd"](module, x, extra)
        torch_func = REFERENCES["input_vjp"]["torch_func"](module, x, extra)
    assert_allclose_report(torch_func, autograd)


def test_bp_save_memory_unsupported_for_conv3d():
    """BackPACK's save-memory route exists only for Conv1d/Conv2d."""
    spec = parse_layer_spec("conv3d in=2x4x4x4 out=2 k=2 n=2")
    module, x, extra = prepare(spec, "per_sample_weight_grad")
    method = REFERENCES["per_sample_weight_grad"]["bp_save_memory"]
    with raises(NotImplementedError, match="only for conv1d/conv2d"):
        method(module, x, extra)


# ------------------------------------------------------------ timing etc.
def test_time_interleaved_rounds_and_errors():
    """Each method runs once per round in shuffled order; failures are recorded."""
    calls = []

    def make(name):
        return lambda: calls.append(name)

    def failing():
        raise NotImplementedError("not for this layer")

    methods = {"a": make("a"), "b": make("b"), "c": failing}
    kept = {}
    result = time_interleaved(
        methods, repeats=3, warmup=1, keep_output=kept.__setitem__
    )
    assert isinstance(result.errors["c"], NotImplementedError)
    assert set(result.times) == {"a", "b"}
    assert all(len(t) == 3 for t in result.times.values())
    assert calls[:2] == ["a", "b"]  # warm-up in the given order
    rounds = [calls[i : i + 2] for i in range(2, len(calls), 2)]
    assert len(rounds) == 3 and all(sorted(r) == ["a", "b"] for r in rounds)
    assert set(kept) == {"a", "b"}
    assert not math.isnan(result.median("a")) and math.isnan(result.median("c"))


BLOCK_CASES = [
    # (seconds per call, min_block, calls)
    (1e-3, 0.0, 1),
    (1e-3, 5e-3, 5),
    (3e-3, 5e-3, 2),
    (5e-3, 5e-3, 1),
    (2e-2, 5e-3, 1),
    (1e-9, 5e-3, MAX_BLOCK_CALLS),
    (0.0, 5e-3, MAX_BLOCK_CALLS),
]


@mark.parametrize("seconds, min_block, calls", BLOCK_CASES)
def test_block_calls(seconds: float, min_block: float, calls: int):
    """A block holds enough calls to last ``min_block``, at least one, bounded.

    Args:
        seconds: Time of one call.
        min_block: Shortest block.
        calls: Expected calls per block.
    """
    assert block_calls(seconds, min_block) == calls


CALIBRATION_CASES = [
    # (seconds per call in successive timed blocks, min_block, timed block sizes)
    ([1e-3], 0.0, []),
    ([1e-2], 5e-3, [1]),
    ([1e-3, 1e-3], 5e-3, [1, 5]),
    ([2e-3, 1e-4, 1e-4], 5e-3, [1, 3, 50]),  # a cold first call
    ([1e-3, 1e-4, 1e-4], 5e-3, [1, 5, 50]),
    ([1e-3, 2e-3], 5e-3, [1, 5]),  # slower than the first call: block is long enough
    ([1e-9, 1e-9], 5e-3, [1, MAX_BLOCK_CALLS]),
]
CALIBRATION_IDS = [
    f"{'-'.join(map(str, times))}-min={block}" for times, block, _ in CALIBRATION_CASES
]


@mark.parametrize("times, min_block, blocks", CALIBRATION_CASES, ids=CALIBRATION_IDS)
def test_calibrate_block(times: list[float], min_block: float, blocks: list[int]):
    """Blocks grow until one holds as many calls as its own time per call asks for.

    Args:
        times: Seconds per call that the successive timed blocks report.
        min_block: Shortest block.
        blocks: Expected sizes of the timed blocks; the last one is the result.
    """
    timed = []

    def timer(fn, calls: int) -> float:
        timed.append(calls)
        return times[min(len(timed), len(times)) - 1]

    calls = calibrate_block(timer, lambda: None, min_block)
    assert timed == blocks
    assert calls == (blocks[-1] if blocks else 1)


@mark.parametrize("settle", [False, True], ids=["blocks", "blocks+settle"])
def test_time_interleaved_blocks(settle: bool):
    """Short methods run in blocks; settling adds one untimed call per round.

    Args:
        settle: Whether each block is preceded by an untimed call.
    """
    counts = {"short": 0, "long": 0}

    def short():
        counts["short"] += 1

    def long():
        counts["long"] += 1
        time.sleep(2e-3)

    repeats, warmup = 3, 2
    result = time_interleaved(
        {"short": short, "long": long},
        repeats=repeats,
        warmup=warmup,
        min_block=1e-3,
        settle=settle,
    )
    assert result.calls["long"] == 1 and 1 < result.calls["short"] <= MAX_BLOCK_CALLS
    for name, count in counts.items():
        rounds = repeats * (result.calls[name] + settle)
        assert len(result.times[name]) == repeats
        # calibration times one call, then (for short methods) at least one block
        calibration = count - warmup - rounds
        if name == "long":
            assert calibration == 1, (name, count)
        else:
            assert calibration >= 1 + result.calls[name], (name, count)
    assert result.median("long") >= 2e-3 > result.median("short")


def test_load_gate_measures_a_fraction():
    """The foreign load is a fraction of the machine."""
    gate = LoadGate(threshold=0.5, window=0.05)
    if not gate.available:
        return
    load = gate.foreign_load(gate.mark())
    assert 0.0 <= load
    waited, _ = LoadGate(threshold=0.99, window=0.05).wait_quiet()
    assert waited >= 0.0


class _FakeMachine:
    """Clock and CPU counters of a machine whose foreign load changes on demand."""

    def __init__(self, monkeypatch: MonkeyPatch):
        self.wall, self.busy, self.load, self.sleeps = 0.0, 0.0, 0.0, []
        clock = SimpleNamespace(perf_counter=lambda: self.wall, sleep=self.sleep)
        monkeypatch.setattr(timing, "time", clock)
        monkeypatch.setattr(timing, "_busy_cpu_seconds", lambda: self.busy)
        monkeypatch.setattr(timing, "_own_cpu_seconds", lambda: 0.0)

    def sleep(self, seconds: float):
        self.sleeps.append(seconds)
        self.run(seconds)

    def run(self, seconds: float):
        """Let time pass under the current foreign load (one CPU)."""
        self.wall += seconds
        self.busy += self.load * seconds


def test_load_gate_judges_rounds_over_a_trailing_window(monkeypatch):
    """Quiet rounds run back to back; a loaded one is discarded, then waits."""
    machine = _FakeMachine(monkeypatch)
    gate = LoadGate(threshold=0.1, window=1.0, cpus=1)
    assert gate.begin_round() == 1.0  # the first round waits for a quiet window
    for _ in range(5):  # quiet rounds of 0.3 s: no more waiting
        machine.run(0.3)
        assert not gate.disturbed()
        assert gate.begin_round() == 0.0
    assert machine.sleeps == [1.0]
    machine.load = 1.0  # a disturbed round: 0.3 s of load in a 1.2 s window
    machine.run(0.3)
    assert gate.disturbed()
    machine.load = 0.0
    assert gate.begin_round() == 1.0  # waits for a quiet window again
    machine.run(0.3)
    assert not gate.disturbed()  # judged over the quiet window, not the burst


def test_time_interleaved_discards_loaded_rounds(monkeypatch):
    """A round under foreign load is repeated; waiting is counted."""
    machine = _FakeMachine(monkeypatch)
    calls = []

    def method():
        calls.append(machine.wall)
        machine.load = 1.0 if len(calls) == 3 else 0.0  # warm-up, round 1, round 2
        machine.run(0.2)
        machine.load = 0.0

    gate = LoadGate(threshold=0.1, window=0.5, cpus=1)
    result = time_interleaved({"a": method}, repeats=3, gate=gate)
    assert result.discarded == 1 and len(result.times["a"]) == 3
    assert result.waited == 1.0  # before the first round and after the loaded one
    assert all(t == approx(0.2) for t in result.times["a"])


#: (reference peaks, our peak, expected memory ratio) in MiB.
MEMORY_RATIO_CASES = [
    ([8.0, 4.0], 5.0, 1.25),
    ([0.004, 0.06], 0.09, 1.0),  # all below the resolution
    ([0.004, 0.06], 1.0, 4.0),
    ([0.5], 0.1, 0.5),
]


@mark.parametrize("refs, ours, ratio", MEMORY_RATIO_CASES, ids=str)
def test_memory_ratios_have_a_resolution(refs: list[float], ours: float, ratio: float):
    """Peaks below the measurement's resolution count as the resolution."""
    rows = [
        {"family": "reference", "status": "ok", "method": f"r{j}", "mem_mib": peak}
        for j, peak in enumerate(refs)
    ]
    rows.append({"family": "ours", "status": "ok", "method": "o", "mem_mib": ours})
    runner._add_ratios(rows)
    assert rows[-1]["mem_ratio"] == approx(ratio)
    assert runner.MEMORY_RESOLUTION_MIB == 0.25


def test_memory_worker():
    """A fresh worker process measures a method's peak or reports n/a."""
    spec = parse_layer_spec("conv2d in=8x16x16 out=8 k=3 p=1 n=4")
    result = measure_in_subprocess(spec, "kfac_expand", "unfold", timeout=120)
    assert isinstance(result, MemoryResult)
    assert result.status == "ok" and result.peak >= 0, result.message
    missing = measure_in_subprocess(spec, "kfac_expand", "torch_func", timeout=120)
    assert missing.status == "n/a"


# ------------------------------------------------------------------ runs
def test_run_benchmark_writes_reports(tmp_path: Path):
    """A tiny run returns rows and writes CSV, markdown, settings and figure.

    Args:
        tmp_path: Temporary output directory.
    """
    rows = run_benchmark(
        layers=["conv2d in=3x8x8 out=4 k=3 n=4", "conv3d in=2x4x4x4 out=2 k=2 n=2"],
        ops="per_sample_weight_grad,kfac_reduce",
        methods="refs",
        repeats=2,
        memory=False,
        out=tmp_path,
    )
    assert {row["op"] for row in rows} == {"per_sample_weight_grad", "kfac_reduce"}
    ok = [row for row in rows if row["status"] == "ok"]
    assert all(row["ratio"] >= 1.0 and row["rel_err"] < 1e-4 for row in ok)
    assert all(row["calls"] >= 1 for row in ok)
    assert any(row["status"] == "n/a" for row in rows)  # bp_save_memory on conv3d
    with open(tmp_path / "results.csv") as file:
        assert len(list(csv.DictReader(file))) == len(rows)
    markdown = (tmp_path / "results.md").read_text()
    assert "## per_sample_weight_grad" in markdown and "n/a" in markdown
    assert (tmp_path / "settings.json").exists()
    assert (tmp_path / "ratios.png").stat().st_size > 0


def test_run_benchmark_keeps_the_finished_layers(
    tmp_path: Path, monkeypatch: MonkeyPatch
):
    """``results.csv`` holds every finished layer; an interrupted run writes reports.

    Args:
        tmp_path: Temporary output directory.
        monkeypatch: Pytest's monkeypatch fixture.
    """
    layers = ["linear in=4 out=3 n=2", "linear in=5 out=3 n=2"]
    run_cell = runner._run_cell
    seen = []

    def interrupt_second_layer(entry, *args, **kwargs):
        if str(entry.spec) == str(parse_layer_spec(layers[1])):
            with open(tmp_path / "results.csv") as file:
                seen.extend(csv.DictReader(file))
            raise KeyboardInterrupt
        return run_cell(entry, *args, **kwargs)

    monkeypatch.setattr(runner, "_run_cell", interrupt_second_layer)
    with raises(KeyboardInterrupt):
        run_benchmark(
            layers=layers,
            ops="forward",
            methods="refs",
            repeats=1,
            memory=False,
            out=tmp_path,
            figure=False,
        )
    assert [row["layer"] for row in seen] == [str(parse_layer_spec(layers[0]))]
    with open(tmp_path / "results.csv") as file:
        assert [row["layer"] for row in csv.DictReader(file)] == [seen[0]["layer"]]
    settings = json.loads((tmp_path / "settings.json").read_text())
    assert settings["interrupted"] == "KeyboardInterrupt after 1 of 2 layers"
    assert "interrupted" in (tmp_path / "results.md").read_text()


def test_run_benchmark_rejects_unknown_names():
    """Unknown ops and methods raise ``ValueError`` listing the allowed names."""
    with raises(ValueError, match=r"Unknown op\(s\) \['hessian'\]"):
        run_benchmark(layers=["linear in=3 out=2"], ops="hessian")
    with raises(ValueError, match="Unknown method 'fast'"):
        run_benchmark(layers=["linear in=3 out=2"], methods="fast")
    with raises(ValueError, match="Unsupported dtype 'int8'"):
        run_benchmark(layers=["linear in=3 out=2"], dtype="int8")
    with raises(ValueError, match="min_block_ms must be a non-negative number"):
        run_benchmark(layers=["linear in=3 out=2"], min_block_ms=-1.0)


# -------------------------------------------------------------------- CLI
def _cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "backpack_tn", *args],
        capture_output=True,
        text=True,
        cwd=ROOT,
        timeout=300,
        check=False,
    )


def test_cli_help():
    """``--help`` of the program and of ``bench`` lists commands and options."""
    top = _cli("--help")
    assert top.returncode == 0 and "bench" in top.stdout
    bench = _cli("bench", "--help")
    assert bench.returncode == 0
    for option in ("--nets", "--layer", "--ops", "--methods", "--quick", "--gate"):
        assert option in bench.stdout


def test_cli_bad_option_exit_code():
    """A bad option prints one line and exits with code 2."""
    proc = _cli("bench", "--bogus")
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines() == [
        "python -m backpack_tn: error: unrecognized arguments: --bogus "
        "(see python -m backpack_tn --help)"
    ]


@mark.parametrize(
    "args, match",
    [
        (["bench", "--repeats", "0"], "expected a positive integer"),
        (["bench", "--gate", "5"], "expected a load fraction"),
        (["bench", "--min-block-ms", "-1"], "expected a non-negative number"),
        (["bench", "--dtype", "int8"], "invalid choice: 'int8'"),
        (["bench", "--layer", "conv2d in=3x8 out=4 k=3"], "needs 3 entries"),
        (["bench", "--nets", "lenet", "--list"], "Unknown network 'lenet'"),
        (["bench", "--layer", "linear in=3 out=2", "--ops", "hessian"], "Unknown op"),
    ],
    ids=["repeats", "gate", "min-block", "dtype", "layer", "net", "op"],
)
def test_cli_errors(args: list[str], match: str, capsys: CaptureFixture):
    """Invalid values print one line and exit with code 2.

    Args:
        args: Command line.
        match: Expected part of the message.
        capsys: Pytest's output capture.
    """
    with raises(SystemExit) as info:
        main(args)
    assert info.value.code == 2
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1, err
    assert match in err


def test_cli_interrupted(
    tmp_path: Path, monkeypatch: MonkeyPatch, capsys: CaptureFixture
):
    """``Ctrl-C`` or ``SIGTERM`` names where the reports are and exits with 130.

    Args:
        tmp_path: Temporary output directory.
        monkeypatch: Pytest's monkeypatch fixture.
        capsys: Pytest's output capture.
    """

    def interrupted(**kwargs):
        assert signal.getsignal(signal.SIGTERM) is not terminate
        signal.raise_signal(signal.SIGTERM)

    monkeypatch.setattr(runner, "run_benchmark", interrupted)
    monkeypatch.setattr(faulthandler, "enable", lambda: None)  # keep pytest's
    args = ["--layer", "linear in=3 out=2", "--mem-limit", "0", "--out", str(tmp_path)]
    terminate = signal.getsignal(signal.SIGTERM)
    assert main(["bench", *args]) == 130
    assert signal.getsignal(signal.SIGTERM) is terminate
    assert f"so far, if any, are in {tmp_path}" in capsys.readouterr().err


def test_cli_runs_a_layer(tmp_path: Path):
    """``bench --layer ...`` writes the reports and prints the summary.

    Args:
        tmp_path: Temporary output directory.
    """
    proc = _cli(
        "bench",
        "--layer",
        "linear in=8 out=4 n=4",
        "--ops",
        "batch_l2",
        "--methods",
        "refs",
        "--repeats",
        "1",
        "--no-memory",
        "--no-progress",
        "--no-figure",
        "--out",
        str(tmp_path),
    )
    assert proc.returncode == 0, proc.stderr
    assert "batch_l2" in proc.stdout
    assert (tmp_path / "results.md").exists()
    settings = json.loads((tmp_path / "settings.json").read_text())
    # the command line times with the steady allocator wherever glibc has mallopt
    assert settings["steady_allocator"] == (ctypes.util.find_library("c") is not None)
