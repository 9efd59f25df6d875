"""Tables, CSV, JSON, the markdown record and plots of a sweep's rows."""

from __future__ import annotations

import csv
import json
import math
import os
from dataclasses import asdict
from typing import Callable

from .cases import COLUMNS, ERROR_CASE, SUITES, Row


_SHORT = {"unsupported": "unsup", "skipped": "skip", "error": "ERROR"}


def _fmt(value: float, digits: int = 3) -> str:
    if value is None or not math.isfinite(value):
        return "-"
    if value == 0:
        return "0"
    if abs(value) >= 10 ** digits:
        return f"{value:.0f}"
    return f"{value:.{digits}g}" if abs(value) >= 1e-3 else f"{value:.1e}"


def _table(header: list[str], body: list[list[str]], markdown: bool) -> str:
    if markdown:
        rule = "|" + "|".join("---:" if index else "---" for index in range(len(header))) + "|"
        lines = ["| " + " | ".join(header) + " |", rule]
        lines += ["| " + " | ".join(line) + " |" for line in body]
        return "\n".join(lines)
    widths = [max(len(cell) for cell in column) for column in zip(header, *body)]
    lines = ["  ".join(cell.rjust(width) for cell, width in zip(header, widths))]
    lines.append("-" * len(lines[0]))
    lines += ["  ".join(cell.rjust(width) for cell, width in zip(line, widths)) for line in body]
    return "\n".join(lines)


def _grouped(rows: list[Row]):
    """{(dtype, mode): {case key: {impl: row}}} in sweep order."""
    groups: dict = {}
    for row in rows:
        case = (row.head_dim, row.seqlen, row.causal, row.batch, row.heads)
        groups.setdefault((row.dtype, row.mode), {}).setdefault(case, {})[row.impl] = row
    return groups


def _cell(row: Row | None, value: Callable[[Row], str]) -> str:
    if row is None:
        return ""
    if row.status != "ok":
        return _SHORT.get(row.status, row.status)
    return value(row)


def _error_cell(row: Row | None) -> str:
    if row is None:
        return ""
    if not math.isfinite(row.err_out):
        return _SHORT.get(row.status, row.status)
    return f"{_fmt(row.err_out, 2)} / {_fmt(row.err_grad, 2)}"


def report(rows: list[Row], markdown: bool = False) -> str:
    """Tables: time and TFLOP/s per mode, flashjit's speedup, peak memory, errors, then reasons."""
    impls = list(dict.fromkeys(row.impl for row in rows))
    peers = [impl for impl in impls if impl != "flashjit"]
    shape_header = ["D", "N", "causal", "B", "H"]
    parts = []
    groups = _grouped(rows)
    for (dtype, mode), cases in groups.items():
        title = f"{mode}, {dtype}: ms / TFLOP/s"
        body = [[str(d), str(n), "yes" if c else "no", str(b), str(h)]
                + [_cell(by_impl.get(impl), lambda r: f"{_fmt(r.ms)} / {_fmt(r.tflops)}") for impl in impls]
                for (d, n, c, b, h), by_impl in cases.items()]
        parts.append((f"### {title}" if markdown else title) + "\n\n" + _table(shape_header + impls, body, markdown))
        if "flashjit" in impls and peers:
            title = f"{mode}, {dtype}: flashjit's speedup (peer time / flashjit time)"
            body = [[str(d), str(n), "yes" if c else "no", str(b), str(h)]
                    + [_cell(by_impl.get(impl), lambda r: f"{r.flashjit_speedup:.2f}x"
                             if math.isfinite(r.flashjit_speedup) else "-") for impl in peers]
                    for (d, n, c, b, h), by_impl in cases.items()]
            parts.append((f"### {title}" if markdown else title) + "\n\n"
                         + _table(shape_header + [f"vs {impl}" for impl in peers], body, markdown))
    memory: dict = {}
    errors: dict = {}
    for row in rows:
        case = (row.dtype, row.head_dim, row.seqlen, row.causal, row.batch, row.heads)
        current = memory.setdefault(case, {}).get(row.impl)
        if current is None or (row.status == "ok" and current.status != "ok"):
            memory[case][row.impl] = row
        errors.setdefault((row.dtype, row.head_dim, row.causal), {}).setdefault(row.impl, row)
    title = "peak memory of forward+backward, MiB"
    body = [[dtype, str(d), str(n), "yes" if c else "no", str(b), str(h)]
            + [_cell(by_impl.get(impl), lambda r: _fmt(r.peak_mib)) for impl in impls]
            for (dtype, d, n, c, b, h), by_impl in memory.items()]
    parts.append((f"### {title}" if markdown else title) + "\n\n"
                 + _table(["dtype"] + shape_header + impls, body, markdown))
    title = (f"max abs error against float64 (B{ERROR_CASE['batch']} H{ERROR_CASE['heads']} "
             f"N{ERROR_CASE['seqlen']}): output / gradients")
    body = [[dtype, str(d), "yes" if c else "no"]
            + [_error_cell(by_impl.get(impl)) for impl in impls]
            for (dtype, d, c), by_impl in errors.items()]
    parts.append((f"### {title}" if markdown else title) + "\n\n"
                 + _table(["dtype", "D", "causal"] + impls, body, markdown))
    reasons: dict = {}
    for row in rows:
        if row.status != "ok":
            reasons.setdefault((row.impl, row.status, row.reason), []).append(row)
    if reasons:
        lines = [f"- {impl} {status} ({len(affected)} rows): {reason}" for (impl, status, reason), affected
                 in reasons.items()]
        parts.append(("### Not measured" if markdown else "not measured:") + "\n\n" + "\n".join(lines))
    return "\n\n".join(parts) + "\n"


def write_csv(rows: list[Row], path: str):
    with open(path, "w", newline="") as out:
        writer = csv.writer(out)
        writer.writerow(COLUMNS)
        for row in rows:
            values = asdict(row)
            writer.writerow([_csv_value(values[column]) for column in COLUMNS])


def _csv_value(value):
    if isinstance(value, float):
        return "" if not math.isfinite(value) else f"{value:.6g}"
    return value


def _json_value(value):
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value


def write_json(rows: list[Row], meta: dict, path: str):
    with open(path, "w") as out:
        json.dump({"metadata": meta, "columns": list(COLUMNS),
                   "rows": [{key: _json_value(value) for key, value in asdict(row).items()} for row in rows]},
                  out, indent=1)
        out.write("\n")


def markdown_record(rows: list[Row], meta: dict, plots: list[str]) -> str:
    if meta["device"] == "cuda":
        device = f"{meta['gpu']} ({meta['gpu_arch']}, {meta['gpu_memory_gib']} GiB), CUDA {meta['cuda']}, " \
                 f"cuDNN {meta['cudnn']}, NVRTC {meta.get('nvrtc')}; host {meta['cpu']}"
    else:
        device = (f"{meta['cpu']}, {meta['cpu_cores']} cores (torch {meta['torch_threads']} threads, "
                  f"flashjit {meta['flashjit_threads']})")
    config = meta["config"]
    sizes = (f"batch {config['batch']}" if config["batch"] is not None else f"B = {config['tokens']} tokens / N") + \
        ", " + (f"heads {config['heads']}" if config["heads"] is not None else f"H = {config['hidden']} / D")
    lines = [f"# flashjit bench: {meta['gpu'] if meta['device'] == 'cuda' else 'CPU'}", "",
             f"- device: {device}",
             f"- date: {meta['date']}",
             f"- commit: {meta['commit']}" + (" (working tree modified)" if meta.get("worktree_modified") else ""),
             f"- command: `{meta['command']}`",
             f"- flashjit {meta['flashjit']}, torch {meta['torch']}, Python {meta['python']}",
             f"- suite: {config.get('suite', 'prefill')} ({SUITES[config.get('suite', 'prefill')]})",
             f"- sizes: {sizes}; {meta['timing']}; TFLOP/s: {meta['flops']}",
             f"- sweep time {meta['seconds']:.0f} s; system load average (1 min) before / after: "
             f"{meta['load_average_before']} / {meta['load_average_after']}; share of the CPU time taken by "
             f"other processes / the hypervisor (steal) during the sweep: "
             + " / ".join(f"{100 * value:.1f}%" for value in meta["cpu_share_of_others"].values()),
             "- peak memory: extra memory of one forward+backward after warm-up "
             + ("(torch allocator peak + driver pool peak)" if meta["device"] == "cuda"
                else "(VmHWM - VmRSS, high-water mark reset, freed heap trimmed)"),
             f"- error: max abs difference from float64 naive attention, B{ERROR_CASE['batch']} "
             f"H{ERROR_CASE['heads']} N{ERROR_CASE['seqlen']} per dtype, head dim and causal flag"]
    if meta.get("flex"):
        lines.append(f"- FlexAttention: {meta['flex']}")
    lines += [f"- note: {note}" for note in meta["notes"]]
    lines += ["", report(rows, markdown=True).rstrip()]
    if plots:
        lines += ["", "### Plots", ""] + [f"![{os.path.basename(p)}]({os.path.basename(p)})" for p in plots]
    return "\n".join(lines) + "\n"


def plot(rows: list[Row], out_dir: str, stem: str) -> list[str]:
    """TFLOP/s against seqlen (one figure per dtype and mode, a subplot per head dim and causal
    flag, a line per implementation) and peak memory against seqlen on a log scale."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import matplotlib.ticker

    impls = list(dict.fromkeys(row.impl for row in rows))
    styles = {impl: dict(color=f"C{i}", marker="os^vDPX*"[i % 8]) for i, impl in enumerate(impls)}
    ok = [row for row in rows if row.status == "ok"]
    written = []

    def grid(dtype, value, title, ylabel, log_y, name, select):
        chosen = [row for row in ok if row.dtype == dtype and select(row) and math.isfinite(value(row))]
        if not chosen:
            return
        head_dims = sorted({row.head_dim for row in chosen})
        causals = sorted({row.causal for row in chosen})
        labels_shown = [impl for impl in impls if any(row.impl == impl for row in chosen)]
        width = 3.3 * len(head_dims) + 0.4
        # As many legend entries a row as the width holds (about 1.2 inches each), the rows below the plots.
        legend_columns = max(1, min(len(labels_shown), int(width / 1.2)))
        legend_rows = -(-len(labels_shown) // legend_columns)
        height = 2.5 * len(causals) + 0.6 + 0.25 * legend_rows
        fig, axes = plt.subplots(len(causals), len(head_dims), figsize=(width, height), squeeze=False, sharex=True)
        for i, causal in enumerate(causals):
            for j, head_dim in enumerate(head_dims):
                axis = axes[i][j]
                for impl in impls:
                    points = sorted({row.seqlen: value(row) for row in chosen
                                     if row.impl == impl and row.causal == causal and row.head_dim == head_dim}.items())
                    if points:
                        axis.plot(*zip(*points), label=impl, markersize=4, linewidth=1.2, **styles[impl])
                axis.set_xscale("log", base=2)
                seqlens = sorted({row.seqlen for row in chosen})
                axis.set_xticks(seqlens, [f"{n // 1024}k" if n >= 1024 and n % 1024 == 0 else str(n)
                                          for n in seqlens])
                axis.xaxis.set_minor_locator(matplotlib.ticker.NullLocator())
                if log_y:
                    axis.set_yscale("log")
                    axis.yaxis.set_major_locator(matplotlib.ticker.LogLocator(base=10, subs=(1.0, 2.0, 5.0)))
                    axis.yaxis.set_major_formatter(matplotlib.ticker.FuncFormatter(lambda value, _: f"{value:g}"))
                    axis.yaxis.set_minor_formatter(matplotlib.ticker.NullFormatter())
                else:
                    axis.set_ylim(bottom=0)
                axis.set_title(f"D={head_dim}, {'causal' if causal else 'non-causal'}", fontsize=9)
                axis.tick_params(labelsize=7)
                axis.grid(True, alpha=0.3)
                if i == len(causals) - 1:
                    axis.set_xlabel("seqlen", fontsize=8)
                if j == 0:
                    axis.set_ylabel(ylabel, fontsize=8)
        handles, labels = {}, []
        for axis in axes.flat:
            for handle, label in zip(*axis.get_legend_handles_labels()):
                handles.setdefault(label, handle)
        labels = [impl for impl in impls if impl in handles]
        fig.legend([handles[label] for label in labels], labels, loc="lower center", ncol=legend_columns,
                   fontsize=8, frameon=False)
        fig.suptitle(title.replace(" (", "\n(") if width < 6 else title, fontsize=10)  # one panel: two lines
        fig.tight_layout(rect=(0, (0.25 * legend_rows + 0.1) / height, 1, 1))
        path = os.path.join(out_dir, f"{stem}-{name}.png")
        fig.savefig(path, dpi=100, bbox_inches="tight", pad_inches=0.1)  # nothing outside the figure is cut
        plt.close(fig)
        _shrink_png(path)
        written.append(path)

    for dtype in dict.fromkeys(row.dtype for row in rows):
        for mode in dict.fromkeys(row.mode for row in rows):
            grid(dtype, lambda row: row.tflops, f"{mode} TFLOP/s, {dtype} (higher is better)", "TFLOP/s", False,
                 f"tflops-{mode}-{dtype}", lambda row, mode=mode: row.mode == mode)
        grid(dtype, lambda row: row.peak_mib, f"peak memory of forward+backward, {dtype} (lower is better)", "MiB",
             True, f"memory-{dtype}", lambda row: True)
    return written


def _shrink_png(path: str):
    """A 64-colour palette: line plots look the same at a third of the size."""
    try:
        from PIL import Image
    except ImportError:
        return
    with Image.open(path) as image:
        small = image.convert("RGB").quantize(colors=64)
    small.save(path, optimize=True)
