"""Per-run report: HTML with embedded PNG charts (needs the ``report`` extra: matplotlib).

For every result the report draws a per-worker timeline (cumulative work
per sample) and a per-CPU timeline (busy fraction per sample) when the
sidecar carries a ``timeline``::

    "timeline": {"interval_ms": 100,
                 "workers": {"cg0/0": [work, work, ...], ...},
                 "cpus": {"0": [busy, busy, ...], ...}}

Without one it falls back to per-worker bars of the summary telemetry.
"""

from __future__ import annotations

import base64
import html
import io
import re
from pathlib import Path
from typing import Any

from ktstr.errors import KtstrError
from ktstr.results.sidecar import Record, is_number, load_run, result_key
from ktstr.tracing import Timeline, parse_trace


def _pyplot() -> Any:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError as err:
        raise KtstrError(
            "ktstr stats report needs matplotlib: pip install 'ktstr[report]'"
        ) from err
    return plt


def _series(timeline: dict[str, Any], kind: str) -> dict[str, list[float]]:
    """The non-empty all-numeric series of one timeline kind (others are not drawable)."""
    raw = timeline.get(kind) or {}
    return {
        str(k): [float(x) for x in v]
        for k, v in raw.items()
        if isinstance(v, list) and v and all(is_number(x) for x in v)
    }


def _value(row: dict[str, Any], field: str) -> float:
    value = row.get(field)
    return float(value) if is_number(value) else 0.0


def _cpu_order(name: str) -> tuple[int, int, str]:
    # Numbered CPUs first, in number order; isdecimal, not isdigit: int("²") fails.
    return (0, int(name), name) if name.isdecimal() else (1, 0, name)


def figure_for(record: Record) -> Any:
    """A matplotlib Figure for one result (two panels)."""
    plt = _pyplot()
    monitor = _monitor_series(record)
    if monitor is not None:
        fig, (ax_w, ax_c, ax_m) = plt.subplots(1, 3, figsize=(17, 3.6))
        _draw_monitor(ax_m, *monitor)
    else:
        fig, (ax_w, ax_c) = plt.subplots(1, 2, figsize=(12, 3.6))
    fig.suptitle(f"{result_key(record)}  [{record.get('verdict', '?')}]", fontsize=9)
    timeline = record.get("timeline") or {}
    step = float(timeline.get("interval_ms") or 100) / 1000.0
    workers = _series(timeline, "workers")
    cpus = _series(timeline, "cpus")
    if workers:
        for name, values in sorted(workers.items()):
            ax_w.plot([i * step for i in range(len(values))], values, label=name, lw=1)
        ax_w.set_xlabel("seconds")
        ax_w.set_ylabel("work (cumulative)")
        ax_w.set_title("per-worker progress", fontsize=9)
        if len(workers) <= 12:
            ax_w.legend(fontsize=6)
    else:
        rows = (record.get("metrics") or {}).get("workers") or []
        field = _bar_field(rows)
        labels = [f"{w.get('cgroup', '?')}/{w.get('worker', i)}" for i, w in enumerate(rows)]
        ax_w.bar(range(len(rows)), [_value(w, field) for w in rows])
        ax_w.set_xticks(range(len(rows)), labels, rotation=60, fontsize=6)
        ax_w.set_title(f"per-worker {field or 'telemetry'} (no timeline)", fontsize=9)
    if cpus:
        names = sorted(cpus, key=_cpu_order)
        grid = [cpus[c] for c in names]
        width = max(len(r) for r in grid)
        grid = [r + [0.0] * (width - len(r)) for r in grid]
        image = ax_c.imshow(
            grid, aspect="auto", interpolation="nearest", vmin=0, vmax=1,
            extent=(0, width * step, len(names) - 0.5, -0.5),
        )
        ax_c.set_yticks(range(len(names)), names, fontsize=6)
        ax_c.set_xlabel("seconds")
        ax_c.set_title("per-CPU busy fraction", fontsize=9)
        fig.colorbar(image, ax=ax_c)
    else:
        usage: dict[int, int] = {}
        for w in (record.get("metrics") or {}).get("workers") or []:
            cpus_used = w.get("cpus_used") or w.get("cpus")
            for cpu in cpus_used if isinstance(cpus_used, list) else []:
                if isinstance(cpu, int) and not isinstance(cpu, bool):
                    usage[cpu] = usage.get(cpu, 0) + 1
        ax_c.bar(list(usage), list(usage.values()))
        ax_c.set_title("workers that ran on each CPU (no timeline)", fontsize=9)
        ax_c.set_xlabel("CPU")
    fig.tight_layout()
    return fig


def _monitor_series(record: Record) -> tuple[list[float], dict[str, dict[str, list[float]]]] | None:
    """The host-side monitor's samples (``observer.samples``): times and per-CPU columns."""
    observer = record.get("observer")
    samples = observer.get("samples") if isinstance(observer, dict) else None
    if not isinstance(samples, dict):
        return None
    times = [float(t) for t in samples.get("t") or [] if is_number(t)]
    cpus = {str(cpu): {k: [float(v) for v in col.get(k) or [] if is_number(v)]
                       for k in ("nr_running", "local_dsq_nr")}
            for cpu, col in (samples.get("cpus") or {}).items() if isinstance(col, dict)}
    return (times, cpus) if times and cpus else None


def _draw_monitor(ax: Any, times: list[float], cpus: dict[str, dict[str, list[float]]]) -> None:
    for cpu in sorted(cpus, key=lambda c: int(c) if c.isdigit() else 0):
        nr = cpus[cpu]["nr_running"][:len(times)]
        line = ax.step(times[:len(nr)], nr, where="post", lw=1, label=f"CPU {cpu}")[0]
        dsq = cpus[cpu]["local_dsq_nr"][:len(times)]
        if any(dsq):
            ax.step(times[:len(dsq)], dsq, where="post", lw=0.8, ls="--",
                    color=line.get_color())
    ax.set_xlabel("seconds since VM start")
    ax.set_ylabel("nr_running (dashed: local DSQ)")
    ax.set_title("per-CPU run queues, read from guest memory", fontsize=9)
    if len(cpus) <= 16:
        ax.legend(fontsize=6)


def _bar_field(rows: list[dict[str, Any]]) -> str:
    for candidate in ("work_units", "work", "iterations", "cpu_ns", "wall_ns"):
        if any(candidate in r for r in rows):
            return candidate
    for row in rows:
        for key, value in row.items():
            if is_number(value):
                return key
    return ""


def trace_files(record: Record) -> list[tuple[str, Path]]:
    """The traces a result has: its own, and its repro's (label, path)."""
    out = []
    for label, holder in (("run", record), ("repro", record.get("repro") or {})):
        trace = holder.get("trace") if isinstance(holder, dict) else None
        path = trace.get("path") if isinstance(trace, dict) else None
        if isinstance(path, str) and Path(path).is_file():
            out.append((label, Path(path)))
    return out


def highlighted_pids(record: Record) -> set[int]:
    """Tasks a failure names: the workers of its failed checks, the monitor's stalls."""
    pids: set[int] = set()
    for check in record.get("checks") or []:
        if isinstance(check, dict) and not check.get("passed", True):
            pids.update(int(p) for p in re.findall(r"pid (\d+)", str(check.get("worker") or "")))
    observer = record.get("observer") if isinstance(record.get("observer"), dict) else {}
    for stall in (observer or {}).get("stalls") or []:
        if isinstance(stall, dict) and isinstance(stall.get("pid"), int):
            pids.add(stall["pid"])
    return pids


def worker_pids(record: Record) -> list[int]:
    workers = (record.get("metrics") or {}).get("workers") or []
    return [w["pid"] for w in workers if isinstance(w, dict) and isinstance(w.get("pid"), int)]


def timeline_figure(timeline: Timeline, highlight: set[int], title: str) -> Any:
    """Per-CPU lanes of who ran when; highlighted tasks in red, the longest runnable wait
    of one of them marked as the failure moment."""
    plt = _pyplot()
    lanes = timeline.cpus or [0]
    fig, ax = plt.subplots(figsize=(11, 1.0 + 0.55 * len(lanes)))
    t0 = timeline.start
    palette = plt.get_cmap("tab20")
    for row, cpu in enumerate(lanes):
        # One call per colour: traces hold tens of thousands of segments.
        by_color: dict[Any, list[tuple[float, float]]] = {}
        for s in timeline.segments:
            if s.cpu != cpu or s.pid == 0:
                continue  # idle: left blank
            color = "#d62728" if s.pid in highlight else palette(s.pid % 20)
            by_color.setdefault(color, []).append((s.start - t0, max(s.end - s.start, 1e-6)))
        for color, spans in by_color.items():
            ax.broken_barh(spans, (row - 0.4, 0.8), color=color, linewidth=0)
    waits = [(end - start, start, end, pid) for pid, (start, end)
             in timeline.longest_wait.items() if pid in highlight]
    if waits:
        length, start, end, pid = max(waits)
        ax.axvspan(start - t0, end - t0, color="#d62728", alpha=0.12)
        ax.axvline(start - t0, color="#d62728", linestyle="--", linewidth=1)
        ax.annotate(f"pid {pid} runnable, not run: {length * 1000:.0f} ms",
                    (start - t0, len(lanes) - 0.35), color="#d62728", fontsize=8)
    ax.set_yticks(range(len(lanes)), [f"CPU {c}" for c in lanes])
    ax.set_ylim(-0.6, len(lanes) - 0.05)  # room above the lanes for the mark's label
    ax.set_xlabel("seconds from the first traced event")
    ax.set_title(title, fontsize=10)
    fig.tight_layout()
    return fig


def _latency_table(timeline: Timeline, pids: list[int]) -> str:
    rows = [t for t in timeline.latencies if t.pid in set(pids)]
    if not rows:
        return ""
    body = "".join(f"<tr><td>{t.pid}</td><td>{html.escape(t.comm)}</td><td>{t.wakeups}</td>"
                   f"<td>{t.p99_us:.0f}</td><td>{t.max_us:.0f}</td></tr>" for t in rows)
    return ("<table border=1 cellspacing=0 cellpadding=2><tr><th>pid</th><th>comm</th>"
            "<th>wakeups</th><th>wake-to-run p99 us</th><th>max us</th></tr>" + body +
            "</table>")


def _png(fig: Any) -> bytes:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=90)
    _pyplot().close(fig)
    return buf.getvalue()


def write_report(run_dir: Path, output: Path | None = None) -> Path:
    """Write ``report.html`` (or ``output``; a ``.png`` path gets the first result)."""
    records = load_run(run_dir)
    if not records:
        raise KtstrError(f"{run_dir}: no results to report on")
    output = output or run_dir / "report.html"
    if output.suffix == ".png":
        _write(output, _png(figure_for(records[0])))
        return output
    parts = [
        "<!doctype html><meta charset='utf-8'>",
        f"<title>ktstr run {html.escape(run_dir.name)}</title>",
        "<style>body{font-family:sans-serif}pre{background:#eee;padding:4px;font-size:11px}"
        ".fail{color:#b00}.pass{color:#070}</style>",
        f"<h1>ktstr run {html.escape(run_dir.name)}</h1><p>{len(records)} result(s)</p>",
    ]
    for record in records:
        verdict = str(record.get("verdict", "?"))
        wall = (record.get("timings") or {}).get("wall_s")
        parts.append(
            f"<h2 class='{'pass' if verdict == 'pass' else 'fail'}'>"
            f"{html.escape(result_key(record))}: {html.escape(verdict)}</h2>"
        )
        if wall is not None:
            parts.append(f"<p>wall {float(wall):.1f} s</p>")
        if record.get("reason"):
            parts.append(f"<pre>{html.escape(str(record['reason']))}</pre>")
        image = base64.b64encode(_png(figure_for(record))).decode()
        parts.append(f"<img src='data:image/png;base64,{image}'>")
        for label, path in trace_files(record):
            timeline = parse_trace(path.read_text(errors="replace"), worker_pids(record))
            fig = timeline_figure(timeline, highlighted_pids(record),
                                  f"{result_key(record)}: {label} trace ({timeline.events} "
                                  f"events, {path.name})")
            image = base64.b64encode(_png(fig)).decode()
            parts.append(f"<h3>{label} timeline</h3><img src='data:image/png;base64,{image}'>")
            parts.append(_latency_table(timeline, worker_pids(record)))
    _write(output, "\n".join(parts).encode())
    return output


def _write(output: Path, data: bytes) -> None:
    try:
        output.write_bytes(data)
    except OSError as err:
        raise KtstrError(f"cannot write the report to {output}: {err.strerror}") from None
