"""Write benchmark rows as CSV, markdown tables and a figure of ratios."""

from __future__ import annotations

import csv
import json
import math
import os
from collections.abc import Sequence
from pathlib import Path

from backpack_tn.benchmark.ops import OPS, REFERENCE_METHODS

#: Cell text per non-``ok`` status.
_STATUS_TEXT = {"n/a": "n/a", "oom": "oom", "error": "error", "timeout": "timeout"}


def _is_num(value: object) -> bool:
    return isinstance(value, int | float) and not (
        isinstance(value, float) and math.isnan(value)
    )


def _fmt_value(value: float) -> str:
    """Three significant digits, e.g. ``462``, ``59.3``, ``4.50``, ``0.061``.

    Args:
        value: A non-negative number.

    Returns:
        The text.
    """
    if value >= 100:
        return f"{value:.0f}"
    if value >= 0.1:
        return f"{value:.3g}" if value < 10 else f"{value:.1f}"
    return "<0.1" if value < 0.05 else f"{value:.2f}"


def write_csv(rows: Sequence[dict], path: str | os.PathLike):
    """Write one line per (layer, op, method).

    Args:
        rows: Result rows of :func:`backpack_tn.benchmark.run_benchmark`.
        path: Output file.
    """
    if not rows:
        Path(path).write_text("")
        return
    with open(path, "w", newline="") as file:
        writer = csv.DictWriter(file, fieldnames=list(rows[0]))
        writer.writeheader()
        for row in rows:
            writer.writerow(
                {
                    k: ("" if isinstance(v, float) and math.isnan(v) else v)
                    for k, v in row.items()
                }
            )


def _methods(rows: Sequence[dict]) -> list[str]:
    """References in their fixed order, then the others in first-seen order.

    Args:
        rows: Result rows.

    Returns:
        Method names.
    """
    seen = list(dict.fromkeys(row["method"] for row in rows))
    references = [m for m in REFERENCE_METHODS if m in seen]
    return references + [m for m in seen if m not in references]


def _cell(row: dict | None, value_key: str, ratio_key: str) -> str:
    """Table cell: ``value (ratio×)``, a status, or empty.

    Args:
        row: Result row, or ``None`` if the method did not run for this layer.
        value_key: ``time_ms`` or ``mem_mib``.
        ratio_key: ``ratio`` or ``mem_ratio``.

    Returns:
        The cell text.
    """
    if row is None:
        return ""
    if row["status"] != "ok":
        return _STATUS_TEXT.get(row["status"], row["status"])
    value = row.get(value_key)
    if not _is_num(value):
        return "–"
    text = _fmt_value(value)
    ratio = row.get(ratio_key)
    if _is_num(ratio):
        text += f" ({ratio:.2f}×)"
    if "disagrees" in row.get("message", ""):
        text += " †"
    return text


def _table(rows: Sequence[dict], value_key: str, ratio_key: str, unit: str) -> str:
    """Markdown table of one op: rows = layers, columns = methods.

    Args:
        rows: Rows of one op.
        value_key: ``time_ms`` or ``mem_mib``.
        ratio_key: ``ratio`` or ``mem_ratio``.
        unit: Unit for the column headers.

    Returns:
        The table.
    """
    methods = _methods(rows)
    layers = list(dict.fromkeys(row["layer"] for row in rows))
    by_key = {(row["layer"], row["method"]): row for row in rows}
    header = ["layer", "occurs in", *(f"{m} [{unit}]" for m in methods)]
    lines = [
        "| " + " | ".join(header) + " |",
        "|" + "---|" * len(header),
    ]
    for layer in layers:
        first = next(row for row in rows if row["layer"] == layer)
        cells = [f"`{layer}`", first["origin"]]
        cells += [_cell(by_key.get((layer, m)), value_key, ratio_key) for m in methods]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def _geomean(values: list[float]) -> float:
    return math.exp(sum(math.log(v) for v in values) / len(values))


def summary_table(rows: Sequence[dict]) -> str:
    """Per op and method: geometric mean of the time ratios over layers.

    Args:
        rows: All result rows.

    Returns:
        Markdown table; cells are ``geomean× (k/n)`` where ``k`` counts the
        layers on which the method is at least as fast as every reference.
    """
    methods = _methods(rows)
    ops = [op for op in OPS if any(row["op"] == op for row in rows)]
    header = ["op", *methods]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for op in ops:
        cells = [op]
        for method in methods:
            ratios = [
                row["ratio"]
                for row in rows
                if row["op"] == op and row["method"] == method and _is_num(row["ratio"])
            ]
            if not ratios:
                cells.append("n/a")
                continue
            wins = sum(r <= 1.0 for r in ratios)
            cells.append(f"{_geomean(ratios):.2f}× ({wins}/{len(ratios)})")
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def write_markdown(
    rows: Sequence[dict], path: str | os.PathLike, settings: dict | None = None
):
    """Write the per-op tables.

    Args:
        rows: Result rows.
        path: Output file.
        settings: Run settings and machine description to print on top.
    """
    parts = ["# backpack_tn layer benchmark", ""]
    if settings:
        keys = (
            "device", "gpu", "processor", "cpus", "threads", "gemm", "dtype", "torch",
            "backpack", "repeats", "warmup", "min_block_ms", "settle", "gate",
            "memory", "ggn_vectors", "ggn_batch_divisor", "date",
        )  # fmt: skip
        parts += [
            ", ".join(f"{k}: {settings[k]}" for k in keys if k in settings),
            "",
        ]
        if "interrupted" in settings:
            parts += [
                f"**Incomplete run** (interrupted: {settings['interrupted']}).",
                "",
            ]
    parts += [
        "Time cells: median wall time per call in ms over interleaved rounds "
        "(ratio to the fastest reference method of the row). Memory cells: peak "
        "extra memory in MiB of the second call (ratio to the smallest "
        "reference). `n/a`: the method does not support the layer; `oom`: "
        "allocation failed; `†`: the result differs from the first reference. "
        "Layers are given as `--layer` specs; `occurs in` counts how often the "
        "configuration appears per network.",
        "",
        "## Summary: geometric mean of time ratios (layers where the method is "
        "at least as fast as every reference / layers)",
        "",
        summary_table(rows),
        "",
    ]
    for op, info in OPS.items():
        op_rows = [row for row in rows if row["op"] == op]
        if not op_rows:
            continue
        parts += [f"## {op}", "", info.description + ".", ""]
        parts += ["### Time [ms]", "", _table(op_rows, "time_ms", "ratio", "ms"), ""]
        if any(_is_num(row.get("mem_mib")) for row in op_rows):
            parts += [
                "### Peak extra memory [MiB]",
                "",
                _table(op_rows, "mem_mib", "mem_ratio", "MiB"),
                "",
            ]
        notes = [
            f"- `{row['method']}` on `{row['layer']}`: {row['message']}"
            for row in op_rows
            if row["status"] in ("error", "oom", "timeout")
            or "disagrees" in row["message"]
            or row["message"].startswith("memory:")
        ]
        if notes:
            parts += ["Notes:", "", *notes, ""]
    Path(path).write_text("\n".join(parts))


def write_figure(rows: Sequence[dict], path: str | os.PathLike) -> bool:
    """Box plot of time ratios (method / fastest reference) per op, log scale.

    Plots the methods of ``backpack_tn`` if any ran, else the references.

    Args:
        rows: Result rows.
        path: Output image file.

    Returns:
        Whether a figure was written (``False`` if there is nothing to plot).
    """
    from matplotlib.figure import Figure

    ours = [
        m
        for m in _methods(rows)
        if any(r["method"] == m and r["family"] == "ours" for r in rows)
    ]
    methods = ours or _methods(rows)
    ops = [op for op in OPS if any(row["op"] == op for row in rows)]
    data = {
        (op, m): [
            row["ratio"]
            for row in rows
            if row["op"] == op and row["method"] == m and _is_num(row["ratio"])
        ]
        for op in ops
        for m in methods
    }
    if not any(data.values()):
        return False
    width_in = 1.0 + len(ops) * (0.6 + 0.25 * len(methods))
    fig = Figure(figsize=(min(16.0, max(6.0, width_in)), 4.5))
    ax = fig.add_subplot()
    width = 0.8 / len(methods)
    colors = [f"C{i}" for i in range(len(methods))]
    for j, method in enumerate(methods):
        positions, values = [], []
        for i, op in enumerate(ops):
            if data[(op, method)]:
                positions.append(i + (j - (len(methods) - 1) / 2) * width)
                values.append(data[(op, method)])
        if not values:
            continue
        boxes = ax.boxplot(
            values, positions=positions, widths=width * 0.9, patch_artist=True
        )
        for box in boxes["boxes"]:
            box.set_facecolor(colors[j])
            box.set_alpha(0.6)
        ax.plot([], [], color=colors[j], linewidth=6, alpha=0.6, label=method)
    ax.axhline(1.0, color="black", linewidth=0.8, linestyle="--")
    ax.set_yscale("log")
    ax.set_xticks(range(len(ops)))
    ax.set_xticklabels(ops, rotation=20, ha="right")
    ax.set_ylabel("time / fastest reference")
    ax.set_title("Per-layer time ratios (below 1: faster than every reference)")
    ax.legend(fontsize="small", ncols=min(4, len(methods)))
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    return True


def write_reports(
    rows: Sequence[dict],
    out: str | os.PathLike,
    settings: dict | None = None,
    figure: bool = True,
) -> dict[str, Path]:
    """Write ``results.csv``, ``results.md``, ``settings.json``, ``ratios.png``.

    Args:
        rows: Result rows.
        out: Output directory (created if missing).
        settings: Run settings for ``settings.json`` and the markdown header.
        figure: Whether to draw the figure.

    Returns:
        ``{"csv": path, "markdown": path, "settings": path, "figure": path}``;
        ``figure`` only if one was written.
    """
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    paths = {
        "csv": out / "results.csv",
        "markdown": out / "results.md",
        "settings": out / "settings.json",
    }
    write_csv(rows, paths["csv"])
    write_markdown(rows, paths["markdown"], settings)
    paths["settings"].write_text(json.dumps(settings or {}, indent=2, default=str))
    if figure and write_figure(rows, out / "ratios.png"):
        paths["figure"] = out / "ratios.png"
    return paths
