"""The bench's outputs: an aligned table for stdout, the JSON document, and the speedup-against-deviation chart."""

from __future__ import annotations

import json
import math
from pathlib import Path

from .measure import TOO_FEW_ROUNDS, WITHIN_NOISE, speedup_warnings
from .rows import OK, RowResult

SCHEMA_VERSION = 1

_COLUMNS = (  # header, width, cell
    ("row", 15, lambda r: r.name),
    ("status", 11, lambda r: r.status),
    ("s/step", 8, lambda r: _num(r.sec_per_step, "{:.4f}")),
    ("s/image", 8, lambda r: _num(r.sec_per_image, "{:.3f}")),
    ("speedup", 13, lambda r: speedup_cell(r)),
    ("ratio min-max", 13, lambda r: spread_cell(r)),
    ("peak MiB", 8, lambda r: _num(r.peak_mem_bytes, "{:.1f}", 1 / 2**20)),
    ("weights MiB", 11, lambda r: _num(r.weight_bytes, "{:.2f}", 1 / 2**20)),
    ("steps run/skip", 14, lambda r: "-" if r.computed_steps is None else f"{r.computed_steps}/{r.skipped_steps}"),
    ("compile s cold/warm", 19, lambda r: "-" if r.compile_s_cold is None
     else f"{r.compile_s_cold:.1f}/{_num(r.compile_s_warm, '{:.1f}')}"),
    ("recomp", 6, lambda r: _num(r.recompiles, "{}")),
    ("max|diff|", 9, lambda r: _num(r.max_abs_diff, "{:.3g}")),
    ("rel_l2", 8, lambda r: _num(r.rel_l2, "{:.3g}")),
    ("psnr dB", 7, lambda r: "-" if r.psnr is None else ("inf" if math.isinf(r.psnr) else f"{r.psnr:.1f}")),
)


NOISE_NOTE = (f"(noise): {WITHIN_NOISE}: the per-round ratios spread wider than the speedup's distance from 1.0, so "
              "it tells neither faster nor slower")


def speedup_cell(r: RowResult) -> str:
    """The speedup as the outputs show it: n/a with too few rounds, marked where it is within noise."""
    if r.speedup_vs_baseline is None:
        return "-"
    if r.speedup_verdict == TOO_FEW_ROUNDS:
        return "n/a"
    return f"{r.speedup_vs_baseline:.2f}x" + (" (noise)" if r.speedup_verdict == WITHIN_NOISE else "")


def spread_cell(r: RowResult) -> str:
    return "-" if r.speedup_min is None else f"{r.speedup_min:.2f}-{r.speedup_max:.2f}"


def warnings(rows: list[RowResult]) -> list[str]:
    return speedup_warnings([r.speedup_rounds for r in rows if r.speedup_rounds is not None])


def _num(value, fmt: str, scale: float = 1.0) -> str:
    return "-" if value is None else fmt.format(value * scale if scale != 1.0 else value)


def format_table(rows: list[RowResult]) -> str:
    header = "  ".join(h.ljust(w) if i < 2 else h.rjust(w) for i, (h, w, _) in enumerate(_COLUMNS))
    lines = [header, "-" * len(header)]
    for r in rows:
        cells = [cell(r) for _, _, cell in _COLUMNS]
        lines.append("  ".join(c.ljust(w) if i < 2 else c.rjust(w)
                               for i, (c, (_, w, _)) in enumerate(zip(cells, _COLUMNS))))
    notes = [f"  {r.name}: {r.reason or r.note}" for r in rows if r.reason or r.note]
    if any(r.speedup_verdict == WITHIN_NOISE for r in rows):
        notes.append("  " + NOISE_NOTE)
    if notes:
        lines += ["", "notes:"] + notes
    return "\n".join(warnings(rows) + lines)


_MARKDOWN = (  # header, cell
    ("row", lambda r: f"`{r.name}`"),
    ("status", lambda r: r.status),
    ("s/step", lambda r: _num(r.sec_per_step, "{:.3f}")),
    ("s/image", lambda r: _num(r.sec_per_image, "{:.2f}")),
    ("speedup", speedup_cell),
    ("ratio min-max", spread_cell),
    ("peak VRAM GiB", lambda r: _num(r.peak_vram_bytes, "{:.1f}", 1 / 2**30)),
    ("steps run/skip", lambda r: "-" if r.computed_steps is None else f"{r.computed_steps}/{r.skipped_steps}"),
    ("compile s", lambda r: _num(r.compile_s_cold, "{:.0f}")),
    ("recompiles", lambda r: _num(r.recompiles, "{}")),
    ("rel_l2 vs baseline", lambda r: _num(r.rel_l2, "{:.3g}")),
    ("PSNR dB", lambda r: "-" if r.psnr is None else ("inf" if math.isinf(r.psnr) else f"{r.psnr:.1f}")),
    ("note", lambda r: (r.reason or r.note or "").replace("|", "/")),
)


def format_markdown(rows: list[RowResult]) -> str:
    """The README's table: one markdown row per bench row, failures and their reasons included."""
    lines = ["| " + " | ".join(h for h, _ in _MARKDOWN) + " |", "|" + " --- |" * len(_MARKDOWN)]
    lines += ["| " + " | ".join(cell(r) for _, cell in _MARKDOWN) + " |" for r in rows]
    extra = warnings(rows) + ([NOISE_NOTE] if any(r.speedup_verdict == WITHIN_NOISE for r in rows) else [])
    return "\n".join(lines + ([""] + extra if extra else []))


def document(rows: list[RowResult], machine: dict, options: dict) -> dict:
    return {"schema_version": SCHEMA_VERSION, "machine": machine, "options": options, "warnings": warnings(rows),
            "rows": [r.to_json() for r in rows]}


def write_json(path: str | Path, doc: dict) -> None:
    Path(path).write_text(json.dumps(doc, indent=2, allow_nan=False) + "\n")


def plot(path: str | Path, rows: list[RowResult], title: str) -> None:
    """Speedup (y) against rel_l2 deviation of the latents (x, log scale); exact rows sit on the left edge."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import matplotlib.ticker  # noqa: F401

    points = [r for r in rows if r.status == OK and r.speedup_vs_baseline is not None and r.rel_l2 is not None
              and r.speedup_verdict != TOO_FEW_ROUNDS]  # no figure to plot
    if any(r.speedup_verdict == TOO_FEW_ROUNDS for r in rows):
        title += f" ({'; '.join(warnings(rows))})".replace("warning: ", "")
    nonzero = [r.rel_l2 for r in points if r.rel_l2 > 0]
    floor = min(nonzero) / 10 if nonzero else 1e-6
    fig, ax = plt.subplots(figsize=(7, 4.5), dpi=120)
    xy = [(r.rel_l2 if r.rel_l2 > 0 else floor, r.speedup_vs_baseline) for r in points]
    for r, (x, y) in zip(points, xy):
        color = "tab:blue" if r.rel_l2 > 0 else "tab:green"
        noise = r.speedup_verdict == WITHIN_NOISE
        if r.speedup_min is not None:  # the spread of the per-round ratios
            ax.errorbar(x, y, yerr=[[y - r.speedup_min], [r.speedup_max - y]], color="grey" if noise else color,
                        lw=0.8, capsize=2, zorder=2)
        ax.scatter(x, y, facecolors="none" if noise else color, edgecolors="grey" if noise else color, zorder=3)
    ax.set_xscale("log")
    ax.xaxis.set_minor_formatter(matplotlib.ticker.NullFormatter())
    fig.canvas.draw()  # fixes the limits, so labels can be spaced in screen units
    placed: list[tuple[float, float]] = []
    for r, (x, y) in sorted(zip(points, xy), key=lambda item: item[1][1]):
        px, py = ax.transData.transform((x, y))
        dy = 4
        while any(abs(px - qx) < 70 and abs(py + dy - qy) < 14 for qx, qy in placed):
            dy += 14  # one label per line where points crowd (bit-exact rows share an x)
        placed.append((px, py + dy))
        label = r.name + (f" ({WITHIN_NOISE})" if r.speedup_verdict == WITHIN_NOISE else "")
        ax.annotate(label, (x, y), textcoords="offset points", xytext=(5, dy * 72 / fig.dpi), fontsize=8,
                    arrowprops=dict(arrowstyle="-", lw=0.4, color="grey") if dy > 4 else None)
    ax.axhline(1.0, color="grey", lw=0.8, ls="--")
    ax.axvline(floor, color="tab:green", lw=0.8, ls=":")
    ax.text(floor, ax.get_ylim()[0], " bit-exact", color="tab:green", fontsize=7, va="bottom")
    ax.set_xlabel("deviation from baseline: rel_l2 of latents (log)")
    ax.set_ylabel("speedup vs bare diffusers (x; bars: min-max of the ratios;\nhollow grey: within noise)",
                  fontsize=8)
    ax.set_title(title, fontsize=9)
    ax.grid(True, which="both", alpha=0.3)
    fig.tight_layout()
    fig.savefig(str(path))
    plt.close(fig)
