"""PNG figures with numpy + Pillow only (the runtime has no matplotlib): line plots for loss
curves, tables for probe results, and bar/line charts composed with a footer for `ijepa bench`. Text
uses Pillow's built-in font (scalable when Pillow has FreeType, a small bitmap font otherwise)."""
from __future__ import annotations

import math
import os
import re
from typing import Mapping, Sequence, Tuple

import numpy as np
from PIL import Image, ImageDraw, ImageFont

# the ten "tab10" colours: distinguishable, and readable on white
PALETTE = ((31, 119, 180), (255, 127, 14), (44, 160, 44), (214, 39, 40), (148, 103, 189),
           (140, 86, 75), (227, 119, 194), (127, 127, 127), (188, 189, 34), (23, 190, 207))
BLACK, GRID, WHITE = (0, 0, 0), (225, 225, 225), (255, 255, 255)
_SUPERSAMPLE = 2


def _font(size: int):
    try:
        return ImageFont.load_default(size=size)
    except (TypeError, OSError, ImportError):   # Pillow < 10.1 or without FreeType: fixed bitmap font
        return ImageFont.load_default()


def _text_size(draw, text, font) -> Tuple[int, int]:
    left, top, right, bottom = draw.textbbox((0, 0), text, font=font)
    return right - left, bottom - top


def _text(draw, xy, text, font, anchor="la", fill=BLACK):
    """Text placed by a two-letter anchor (horizontal l/m/r, vertical t/m/b) computed from the text's
    bounding box, so it works with bitmap fonts too (Pillow's own anchors need FreeType)."""
    left, top, right, bottom = draw.textbbox((0, 0), text, font=font)
    w, h = right - left, bottom - top
    dx = {"l": 0, "m": w / 2, "r": w}[anchor[0]]
    dy = {"a": 0, "t": 0, "m": h / 2, "b": h}[anchor[1]]
    draw.text((xy[0] - dx - left, xy[1] - dy - top), text, font=font, fill=fill)


def nice_ticks(lo: float, hi: float, target: int = 6) -> list:
    """About ``target`` round tick values (steps of 1, 2 or 5 x 10^k) covering [lo, hi]."""
    if not (math.isfinite(lo) and math.isfinite(hi)):
        return []
    if hi <= lo:
        span = abs(lo) or 1.0
        lo, hi = lo - 0.5 * span, hi + 0.5 * span
    raw = (hi - lo) / max(target - 1, 1)
    mag = 10 ** math.floor(math.log10(raw))
    step = next(m * mag for m in (1, 2, 5, 10) if m * mag >= raw)
    first = math.floor(lo / step + 1e-9) * step
    ticks, v = [], first
    while v <= hi + step * 1e-9:
        ticks.append(round(v / step) * step)
        v += step
    if ticks[-1] < hi - step * 1e-9:
        ticks.append(ticks[-1] + step)
    return ticks


def _log_ticks(lo: float, hi: float) -> list:
    e0, e1 = math.floor(math.log10(lo)), math.ceil(math.log10(hi))
    mults = (1,) if e1 - e0 > 3 else (1, 2, 5)
    cands = [m * 10.0 ** e for e in range(e0, e1 + 1) for m in mults]
    first = max(i for i, v in enumerate(cands) if v <= lo * (1 + 1e-9))
    last = min(i for i, v in enumerate(cands) if v >= hi * (1 - 1e-9))
    return cands[first:last + 1]


def _fmt_tick(v: float, step: float) -> str:
    if v == 0:
        return "0"
    if abs(v) >= 1e5 or abs(v) < 1e-3:
        return f"{v:.0e}".replace("e-0", "e-").replace("e+0", "e").replace("e+", "e")
    decimals = max(0, -math.floor(math.log10(step) + 1e-9)) if step > 0 else 0
    return f"{v:.{decimals}f}"


def save_line_plot(path: str, series: Mapping[str, Tuple[Sequence[float], Sequence[float]]], title: str = "",
                   xlabel: str = "", ylabel: str = "", logy: bool = False, size: Tuple[int, int] = (900, 560)) -> str:
    """Line plot of ``{name: (xs, ys)}`` to a PNG. Non-finite points (and non-positive ones with
    ``logy``) are skipped. Returns ``path``."""
    k = _SUPERSAMPLE   # everything is drawn k times larger, then downsampled: smooth slanted lines
    W, H = size[0] * k, size[1] * k
    img = Image.new("RGB", (W, H), WHITE)
    d = ImageDraw.Draw(img)
    f_title, f_label, f_tick = _font(20 * k), _font(16 * k), _font(14 * k)

    clean = {}
    for name, (xs, ys) in series.items():
        x = np.asarray(xs, dtype=np.float64).ravel()
        y = np.asarray(ys, dtype=np.float64).ravel()
        if x.shape != y.shape:
            raise ValueError(f"series {name!r}: {x.size} x values but {y.size} y values")
        ok = np.isfinite(x) & np.isfinite(y) & ((y > 0) if logy else True)
        clean[name] = (x[ok], y[ok])
    all_x = np.concatenate([v[0] for v in clean.values()]) if clean else np.array([])
    all_y = np.concatenate([v[1] for v in clean.values()]) if clean else np.array([])
    if all_x.size == 0:
        all_x, all_y = np.array([0.0, 1.0]), np.array([1.0, 10.0] if logy else [0.0, 1.0])

    xticks = nice_ticks(float(all_x.min()), float(all_x.max()))
    x0, x1 = xticks[0], xticks[-1]
    if logy:
        yticks = _log_ticks(float(all_y.min()), float(all_y.max()))
        y0, y1 = math.log10(yticks[0]), math.log10(yticks[-1])
        ymap = math.log10
    else:
        yticks = nice_ticks(float(all_y.min()), float(all_y.max()))
        y0, y1 = yticks[0], yticks[-1]
        ymap = float
    ystep = (yticks[1] - yticks[0]) if len(yticks) > 1 else 1.0
    xstep = (xticks[1] - xticks[0]) if len(xticks) > 1 else 1.0
    ylabels = [_fmt_tick(v, v if logy else ystep) for v in yticks]

    tick_w = max(_text_size(d, s, f_tick)[0] for s in ylabels)
    left = 24 * k + _text_size(d, "Ag", f_label)[1] + 10 * k + tick_w + 10 * k
    top, right, bottom = (56 if title else 24) * k, W - 24 * k, H - 70 * k
    px = lambda v: left + (v - x0) / ((x1 - x0) or 1.0) * (right - left)
    py = lambda v: bottom - (ymap(v) - y0) / ((y1 - y0) or 1.0) * (bottom - top)

    for v, s in zip(yticks, ylabels):
        y = py(v)
        d.line([(left, y), (right, y)], fill=GRID, width=k)
        d.line([(left - 5 * k, y), (left, y)], fill=BLACK, width=k)
        _text(d, (left - 8 * k, y), s, f_tick, "rm")
    for v in xticks:
        x = px(v)
        d.line([(x, top), (x, bottom)], fill=GRID, width=k)
        d.line([(x, bottom), (x, bottom + 5 * k)], fill=BLACK, width=k)
        _text(d, (x, bottom + 8 * k), _fmt_tick(v, xstep), f_tick, "mt")
    d.rectangle([left, top, right, bottom], outline=BLACK, width=k)

    for i, (name, (x, y)) in enumerate(clean.items()):
        color = PALETTE[i % len(PALETTE)]
        pts = [(px(a), py(b)) for a, b in zip(x, y)]
        if len(pts) > 1:
            d.line(pts, fill=color, width=2 * k, joint="curve")
        r = 3.5 * k
        for p in pts if len(pts) <= 30 else []:   # markers only where they stay legible
            d.ellipse([p[0] - r, p[1] - r, p[0] + r, p[1] + r], fill=color)

    if title:
        _text(d, (W / 2, 16 * k), title, f_title, "mt")
    if xlabel:
        _text(d, ((left + right) / 2, H - 14 * k), xlabel, f_label, "mb")
    if ylabel:   # rotated: drawn on its own strip, then turned 90 degrees
        tw, th = _text_size(d, ylabel, f_label)
        strip = Image.new("RGB", (tw + 8 * k, th + 10 * k), WHITE)
        _text(ImageDraw.Draw(strip), (strip.width / 2, strip.height / 2), ylabel, f_label, "mm")
        strip = strip.rotate(90, expand=True)
        img.paste(strip, (14 * k, int((top + bottom) / 2 - strip.height / 2)))

    names = [n for n in clean if n]
    if names:
        sizes = [_text_size(d, n, f_tick) for n in names]
        lw = max(w for w, _ in sizes) + 40 * k
        lh = max(h for _, h in sizes) + 8 * k
        bx, by = right - lw - 10 * k, top + 10 * k
        d.rectangle([bx, by, bx + lw, by + lh * len(names) + 8 * k], fill=WHITE, outline=(160, 160, 160), width=k)
        for i, n in enumerate(names):
            cy = by + 4 * k + lh * i + lh / 2
            d.line([(bx + 8 * k, cy), (bx + 28 * k, cy)], fill=PALETTE[list(clean).index(n) % len(PALETTE)],
                   width=3 * k)
            _text(d, (bx + 34 * k, cy), n, f_tick, "lm")

    _save(img.resize(size, Image.Resampling.LANCZOS), path)
    return path


_NUMERIC = re.compile(r"^[+-]?(\d+(\.\d*)?|\.\d+)(e[+-]?\d+)?\s*%?$", re.IGNORECASE)


def save_table_png(path: str, rows: Sequence[Sequence], title: str = "", header: bool = True) -> str:
    """A table to a PNG; the first row is the header when ``header``. Cells are ``str()``-ed;
    numeric cells are right-aligned. Returns ``path``."""
    rows = [[("" if c is None else str(c)) for c in r] for r in rows]
    if not rows:
        raise ValueError("save_table_png: no rows")
    ncol = max(len(r) for r in rows)
    rows = [r + [""] * (ncol - len(r)) for r in rows]
    f_title, f_cell = _font(20), _font(16)
    probe = ImageDraw.Draw(Image.new("RGB", (1, 1)))
    pad_x, pad_y = 14, 8
    line_h = _text_size(probe, "Ag", f_cell)[1] + 2 * pad_y + 4
    col_w = [max(_text_size(probe, r[j], f_cell)[0] for r in rows) + 2 * pad_x for j in range(ncol)]
    title_h = (_text_size(probe, title, f_title)[1] + 24) if title else 0
    W = max(sum(col_w), _text_size(probe, title, f_title)[0] + 20 if title else 0) + 40
    H = title_h + line_h * len(rows) + 40
    img = Image.new("RGB", (W, H), WHITE)
    d = ImageDraw.Draw(img)
    if title:
        _text(d, (W / 2, 16), title, f_title, "mt", BLACK)
    numeric_col = [all(_NUMERIC.match(r[j]) or r[j] in ("", "-") for r in rows[1 if header else 0:])
                   for j in range(ncol)]
    x_start, y = 20, title_h + 20
    for i, r in enumerate(rows):
        is_header = header and i == 0
        shade = (220, 228, 240) if is_header else ((246, 246, 246) if i % 2 == 0 else WHITE)
        d.rectangle([x_start, y, x_start + sum(col_w), y + line_h], fill=shade)
        x = x_start
        for j, cell in enumerate(r):
            cy = y + line_h / 2
            if numeric_col[j]:
                _text(d, (x + col_w[j] - pad_x, cy), cell, f_cell, "rm", BLACK)
            else:
                _text(d, (x + pad_x, cy), cell, f_cell, "lm", BLACK)
            x += col_w[j]
        y += line_h
        if is_header:
            d.line([(x_start, y), (x_start + sum(col_w), y)], fill=BLACK, width=2)
    d.rectangle([x_start, title_h + 20, x_start + sum(col_w), y], outline=(120, 120, 120))
    _save(img, path)
    return path


def _save(img, path):
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    img.save(path, format="PNG")

# ----------------------------------------------------------------------------- benchmark charts
# Bar / line charts composed into one picture with a text footer (``ijepa bench``).
_BG, _FG = WHITE, (30, 30, 30)


def _text_w(draw, text, font) -> float:
    return draw.textlength(text, font=font)


def _fmt_value(v: float) -> str:
    if v == 0:
        return "0"
    a = abs(v)
    if 1000 <= a < 1e7:
        return f"{v:.0f}"
    if a >= 1e7 or a < 0.01:
        return f"{v:.3g}"
    return f"{v:.4g}"


class _Axes:
    def __init__(self, size, title, xlabel, ylabel, ylo, yhi):
        self.img = Image.new("RGB", size, _BG)
        self.d = ImageDraw.Draw(self.img)
        self.f, self.ft = _font(12), _font(15)
        self.W, self.H = size
        self.ticks = nice_ticks(ylo, yhi)
        self.ylo, self.yhi = min(self.ticks[0], ylo), max(self.ticks[-1], yhi)
        lw = max(_text_w(self.d, _fmt_value(t), self.f) for t in self.ticks)
        self.x0, self.x1 = int(lw) + 44, self.W - 20
        self.y0, self.y1 = 44, self.H - 56
        self.d.text((self.W / 2, 12), title, fill=_FG, font=self.ft, anchor="mt")
        if xlabel:
            self.d.text(((self.x0 + self.x1) / 2, self.H - 8), xlabel, fill=_FG, font=self.f, anchor="mb")
        if ylabel:
            lab = Image.new("RGB", (int(_text_w(self.d, ylabel, self.f)) + 4, 16), _BG)
            ImageDraw.Draw(lab).text((2, 1), ylabel, fill=_FG, font=self.f)
            lab = lab.rotate(90, expand=True)
            self.img.paste(lab, (4, int((self.y0 + self.y1) / 2 - lab.size[1] / 2)))
        for t in self.ticks:
            y = self.y(t)
            self.d.line([(self.x0, y), (self.x1, y)], fill=GRID)
            self.d.text((self.x0 - 6, y), _fmt_value(t), fill=_FG, font=self.f, anchor="rm")
        self.d.line([(self.x0, self.y0), (self.x0, self.y1), (self.x1, self.y1)], fill=_FG)

    def y(self, v):
        span = (self.yhi - self.ylo) or 1.0
        return self.y1 - (v - self.ylo) / span * (self.y1 - self.y0)


def bar_chart(labels, values, title="", ylabel="", xlabel="", size=(720, 420), ref_line=None,
              colors=None, annotate=True) -> Image.Image:
    """Vertical bars; ``ref_line`` draws a dashed horizontal line (e.g. speedup 1.0)."""
    vals = [float(v) if v is not None and math.isfinite(float(v)) else 0.0 for v in values]
    hi = max(vals + [ref_line or 0.0, 1e-12]) * 1.12
    ax = _Axes(size, title, xlabel, ylabel, 0.0, hi)
    n = max(1, len(vals))
    slot = (ax.x1 - ax.x0) / n
    for i, (lab, v) in enumerate(zip(labels, vals)):
        c = (colors or PALETTE)[i % len(colors or PALETTE)]
        xa, xb = ax.x0 + slot * (i + 0.18), ax.x0 + slot * (i + 0.82)
        ax.d.rectangle([xa, ax.y(v), xb, ax.y1], fill=c)
        if annotate:
            ax.d.text(((xa + xb) / 2, ax.y(v) - 3), _fmt_value(v), fill=_FG, font=ax.f, anchor="mb")
        text = str(lab)
        while len(text) > 4 and _text_w(ax.d, text, ax.f) > slot - 4:
            text = text.rstrip("…")[:-1] + "…"
        ax.d.text(((xa + xb) / 2, ax.y1 + 5), text, fill=_FG, font=ax.f, anchor="mt")
    if ref_line is not None:
        y = ax.y(ref_line)
        x = ax.x0
        while x < ax.x1:
            ax.d.line([(x, y), (min(x + 8, ax.x1), y)], fill=(200, 0, 0), width=1)
            x += 14
    return ax.img


def hbar_chart(labels, values, title="", xlabel="", ref_line=None, colors=None, width=1000,
               row_h=18, max_label_w=560) -> Image.Image:
    """Horizontal bars, one row per label (long labels such as kernel cases stay readable)."""
    vals = [float(v) if v is not None and math.isfinite(float(v)) else 0.0 for v in values]
    f, ft = _font(12), _font(15)
    probe = ImageDraw.Draw(Image.new("RGB", (1, 1)))
    lw = min(max_label_w, int(max((_text_w(probe, str(x), f) for x in labels), default=40)) + 12)
    top, bottom = 40, 40
    H = top + bottom + row_h * max(1, len(vals))
    img = Image.new("RGB", (width, H), _BG)
    d = ImageDraw.Draw(img)
    x0, x1 = lw, width - 60
    hi = max(vals + [ref_line or 0.0, 1e-12]) * 1.05
    ticks = nice_ticks(0.0, hi)
    hi = max(hi, ticks[-1])

    def px(v):
        return x0 + v / hi * (x1 - x0)
    d.text((width / 2, 10), title, fill=_FG, font=ft, anchor="mt")
    for t in ticks:
        d.line([(px(t), top), (px(t), H - bottom)], fill=GRID)
        d.text((px(t), H - bottom + 4), _fmt_value(t), fill=_FG, font=f, anchor="mt")
    if xlabel:
        d.text(((x0 + x1) / 2, H - 6), xlabel, fill=_FG, font=f, anchor="mb")
    for i, (lab, v) in enumerate(zip(labels, vals)):
        y = top + row_h * i
        c = (colors[i] if colors else PALETTE[0])
        d.rectangle([x0, y + 3, px(v), y + row_h - 3], fill=c)
        d.text((px(v) + 4, y + row_h / 2), _fmt_value(v), fill=_FG, font=f, anchor="lm")
        text = str(lab)
        while len(text) > 4 and _text_w(d, text, f) > lw - 10:
            text = text.rstrip("…")[:-1] + "…"
        d.text((x0 - 6, y + row_h / 2), text, fill=_FG, font=f, anchor="rm")
    d.line([(x0, top), (x0, H - bottom)], fill=_FG)
    if ref_line is not None:
        y = top
        while y < H - bottom:
            d.line([(px(ref_line), y), (px(ref_line), min(y + 6, H - bottom))], fill=(200, 0, 0))
            y += 10
    return img


def line_chart(series: dict, title="", xlabel="", ylabel="", size=(720, 420), x=None) -> Image.Image:
    """One line per entry of ``series`` (name -> list of y), with a legend."""
    ys = [v for s in series.values() for v in s if v is not None and math.isfinite(v)]
    lo, hi = (min(ys), max(ys)) if ys else (0.0, 1.0)
    pad = (hi - lo) * 0.08 or abs(hi) * 0.05 or 1.0
    ax = _Axes(size, title, xlabel, ylabel, lo - pad, hi + pad)
    n = max((len(s) for s in series.values()), default=1)
    xs = list(x) if x is not None else list(range(n))
    xlo, xhi = (min(xs), max(xs)) if xs else (0, 1)
    span = (xhi - xlo) or 1

    def px(v):
        return ax.x0 + (v - xlo) / span * (ax.x1 - ax.x0)
    integral = all(float(v).is_integer() for v in xs)
    for t in nice_ticks(xlo, xhi, 6):
        if xlo <= t <= xhi and (not integral or float(t).is_integer()):
            ax.d.text((px(t), ax.y1 + 5), _fmt_value(t), fill=_FG, font=ax.f, anchor="mt")
    for i, (name, s) in enumerate(series.items()):
        c = PALETTE[i % len(PALETTE)]
        pts = [(px(xs[j]), ax.y(v)) for j, v in enumerate(s) if v is not None and math.isfinite(v)]
        if len(pts) > 1:
            ax.d.line(pts, fill=c, width=2 if i == 0 else 1)
        for p in pts if len(pts) <= 60 else []:
            ax.d.ellipse([p[0] - 2, p[1] - 2, p[0] + 2, p[1] + 2], outline=c)
        ly = ax.y0 + 4 + 16 * i
        ax.d.line([(ax.x1 - 150, ly + 6), (ax.x1 - 130, ly + 6)], fill=c, width=3)
        ax.d.text((ax.x1 - 125, ly), str(name), fill=_FG, font=ax.f)
    return ax.img


def compose(images, footer_lines=(), width=None) -> Image.Image:
    """Stack images vertically and add a footer of text lines (device, versions, command)."""
    f = _font(11)
    W = width or max(im.size[0] for im in images)
    lines = []
    probe = ImageDraw.Draw(Image.new("RGB", (1, 1)))
    for line in footer_lines:   # wrap long lines (commands) to the image width
        cur = ""
        for word in str(line).split(" "):
            cand = (cur + " " + word).strip()
            if _text_w(probe, cand, f) > W - 16 and cur:
                lines.append(cur)
                cur = "    " + word
            else:
                cur = cand
        lines.append(cur)
    H = sum(im.size[1] for im in images) + 14 * len(lines) + (10 if lines else 0)
    out = Image.new("RGB", (W, H), _BG)
    y = 0
    for im in images:
        out.paste(im, (0, y))
        y += im.size[1]
    d = ImageDraw.Draw(out)
    y += 4
    for line in lines:
        d.text((8, y), line, fill=(90, 90, 90), font=f)
        y += 14
    return out


def side_by_side(images) -> Image.Image:
    W = sum(im.size[0] for im in images)
    H = max(im.size[1] for im in images)
    out = Image.new("RGB", (W, H), _BG)
    x = 0
    for im in images:
        out.paste(im, (x, 0))
        x += im.size[0]
    return out
