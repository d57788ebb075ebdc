"""Line charts as SVG files, with no plotting library: a loss curve is a few <polyline>s.

    write_svg_chart("runs/x/loss.svg", {"train": [(step, loss), ...], "val": [...]},
                    title="loss", xlabel="step", ylabel="loss")
"""
import math
from xml.sax.saxutils import escape

from config import naming

COLOURS = ["#1f77b4", "#d62728", "#2ca02c", "#ff7f0e", "#9467bd", "#8c564b", "#e377c2", "#7f7f7f"]


def nice_ticks(lo, hi, n=5):
    """About n round numbers (1, 2 or 5 times a power of ten apart) covering [lo, hi]."""
    if hi <= lo:
        hi = lo + 1.0
    raw = (hi - lo) / n
    step = 10 ** math.floor(math.log10(raw))
    step *= next(m for m in (1, 2, 5, 10) if m * step >= raw)
    first = math.ceil(lo / step) * step
    return [first + i * step for i in range(int((hi - first) / step + 1e-9) + 1)]


def write_svg_chart(path, series, title="", xlabel="", ylabel="", width=640, height=400):
    """series: {name: [(x, y), ...]}; points with a non-finite y are left out. Text is escaped (an
    out_dir in a title may hold & or <, which would make the file invalid XML)."""
    title, xlabel, ylabel = escape(title), escape(xlabel), escape(ylabel)
    series = {k: [(x, y) for x, y in v if y is not None and math.isfinite(y)] for k, v in series.items()}
    points = [p for v in series.values() for p in v]
    left, right, top, bottom = 60, 20, 30, 45
    out = [f'<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}" '
           f'font-family="sans-serif" font-size="12">',
           f'<rect width="{width}" height="{height}" fill="white"/>',
           f'<text x="{width / 2}" y="18" text-anchor="middle" font-size="14">{title}</text>']
    if points:
        xs, ys = [p[0] for p in points], [p[1] for p in points]
        x0, x1 = min(xs), max(xs) if max(xs) > min(xs) else min(xs) + 1
        y0, y1 = min(ys), max(ys) if max(ys) > min(ys) else min(ys) + 1
        sx = lambda x: left + (x - x0) / (x1 - x0) * (width - left - right)
        sy = lambda y: height - bottom - (y - y0) / (y1 - y0) * (height - top - bottom)
        for t in nice_ticks(y0, y1):  # horizontal grid lines with their values
            out.append(f'<line x1="{left}" x2="{width - right}" y1="{sy(t):.1f}" y2="{sy(t):.1f}" stroke="#ddd"/>')
            out.append(f'<text x="{left - 5}" y="{sy(t) + 4:.1f}" text-anchor="end">{t:g}</text>')
        for t in nice_ticks(x0, x1):
            out.append(f'<text x="{sx(t):.1f}" y="{height - bottom + 16}" text-anchor="middle">{t:g}</text>')
        for i, (name, pts) in enumerate(series.items()):
            colour = COLOURS[i % len(COLOURS)]
            coords = " ".join(f"{sx(x):.1f},{sy(y):.1f}" for x, y in pts)
            out.append(f'<polyline points="{coords}" fill="none" stroke="{colour}" stroke-width="1.5"/>')
            if len(pts) == 1:
                out.append(f'<circle cx="{sx(pts[0][0]):.1f}" cy="{sy(pts[0][1]):.1f}" r="3" fill="{colour}"/>')
            out.append(f'<text x="{width - right - 5}" y="{top + 15 * (i + 1)}" text-anchor="end" '
                       f'fill="{colour}">{escape(str(name))}</text>')
    out.append(f'<line x1="{left}" x2="{left}" y1="{top}" y2="{height - bottom}" stroke="black"/>')
    out.append(f'<line x1="{left}" x2="{width - right}" y1="{height - bottom}" y2="{height - bottom}" stroke="black"/>')
    out.append(f'<text x="{(left + width - right) / 2}" y="{height - 8}" text-anchor="middle">{xlabel}</text>')
    out.append(f'<text x="14" y="{(top + height - bottom) / 2}" text-anchor="middle" '
               f'transform="rotate(-90 14 {(top + height - bottom) / 2})">{ylabel}</text>')
    out.append("</svg>")
    with naming(path), open(path, "w") as f:
        f.write("\n".join(out) + "\n")
