"""Small PNG charts drawn with PIL (bar charts, line charts, a text footer).

The engine's runtime dependencies do not include matplotlib, and benchmark outputs
must still come with a picture; these few primitives are all the benchmarks need.
"""
from __future__ import annotations

import math

from PIL import Image, ImageDraw, ImageFont

PALETTE = [(31, 119, 180), (255, 127, 14), (44, 160, 44), (214, 39, 40), (148, 103, 189),
           (140, 86, 75), (227, 119, 194), (127, 127, 127)]
_BG, _FG, _GRID = (255, 255, 255), (30, 30, 30), (225, 225, 225)


def _font(size: int = 12):
    try:
        return ImageFont.load_default(size=size)
    except TypeError:     # Pillow < 10.1 has a single bitmap size
        return ImageFont.load_default()


def _text_w(draw, text, font) -> float:
    return draw.textlength(text, font=font)


def nice_ticks(lo: float, hi: float, n: int = 5) -> list[float]:
    """About ``n`` round tick values covering [lo, hi]."""
    if not math.isfinite(lo) or not math.isfinite(hi):
        return [0.0]
    if hi <= lo:
        hi = lo + (abs(lo) or 1.0)
    raw = (hi - lo) / max(1, n)
    mag = 10 ** math.floor(math.log10(raw))
    step = next(m * mag for m in (1, 2, 2.5, 5, 10) if m * mag >= raw)
    start = math.floor(lo / step) * step
    end = math.ceil(hi / step - 1e-9) * step
    ticks, t = [], start
    while t <= end + 1e-9 * step:
        ticks.append(round(t, 12))
        t += step
    return ticks


def _fmt(v: float) -> str:
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
        lw = max(_text_w(self.d, _fmt(t), self.f) for t in self.ticks)
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
            self.d.line([(self.x0, y), (self.x1, y)], fill=_GRID)
            self.d.text((self.x0 - 6, y), _fmt(t), fill=_FG, font=self.f, anchor="rm")
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
            ax.d.text(((xa + xb) / 2, ax.y(v) - 3), _fmt(v), fill=_FG, font=ax.f, anchor="mb")
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
        d.line([(px(t), top), (px(t), H - bottom)], fill=_GRID)
        d.text((px(t), H - bottom + 4), _fmt(t), fill=_FG, font=f, anchor="mt")
    if xlabel:
        d.text(((x0 + x1) / 2, H - 6), xlabel, fill=_FG, font=f, anchor="mb")
    for i, (lab, v) in enumerate(zip(labels, vals)):
        y = top + row_h * i
        c = (colors[i] if colors else PALETTE[0])
        d.rectangle([x0, y + 3, px(v), y + row_h - 3], fill=c)
        d.text((px(v) + 4, y + row_h / 2), _fmt(v), fill=_FG, font=f, anchor="lm")
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
            ax.d.text((px(t), ax.y1 + 5), _fmt(t), fill=_FG, font=ax.f, anchor="mt")
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
