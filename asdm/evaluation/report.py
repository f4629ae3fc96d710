"""The main job's outputs: an image grid, a speedup-vs-fidelity plot (both PNG, drawn with
Pillow, which ComfyUI already needs) and a markdown table."""
from __future__ import annotations

import math

import numpy as np
from PIL import Image, ImageDraw


def _ascii(text: str) -> str:
    return text.replace("†", "+")   # Pillow's default font has no dagger: P5+ stands for P5†


def _wrap(text: str, width: int) -> list[str]:
    lines, line = [], ""
    for word in text.split():
        if line and len(line) + 1 + len(word) > width:
            lines.append(line)
            line = word
        else:
            line = f"{line} {word}".strip()
    return lines + [line] if line else lines


def grid(rows: list[tuple[str, np.ndarray]], captions: list[str], cell: int = 96, label_w: int = 150,
         line_h: int = 11) -> "Image.Image":
    """rows: (label, [C, H, W, 3] uint8 images, one per column); each column headed by its
    caption, wrapped."""
    wrapped = [_wrap(c, cell // 6) for c in captions]
    head = 4 + line_h * max((len(w) for w in wrapped), default=1)
    im = Image.new("RGB", (label_w + cell * len(captions), head + cell * len(rows)), "white")
    d = ImageDraw.Draw(im)
    for j, lines in enumerate(wrapped):
        for k, line in enumerate(lines):
            d.text((label_w + j * cell + 2, 2 + k * line_h), line, fill="black")
    for i, (label, imgs) in enumerate(rows):
        y = head + i * cell
        d.text((4, y + cell // 2 - 6), _ascii(label), fill="black")
        for j, img in enumerate(imgs):
            im.paste(Image.fromarray(img).resize((cell, cell), Image.NEAREST), (label_w + j * cell, y))
    return im


_GROUP_COLORS = {"plain": (0, 0, 0), "P5": (230, 120, 30), "P5†": (40, 110, 220), "P2†": (140, 60, 180),
                 "switch": (30, 160, 70), "compressed": (200, 40, 40)}


def plot(rows: list[dict], size=(900, 600)) -> "Image.Image":
    """Fidelity (PSNR against full compute) against the SD1.5-width UNet-time ratio, per run."""
    points = [dict(r, speedup=r["sd15_ratio"].median) for r in rows]
    x_key, y_key, title = "speedup", "psnr", "PSNR (embedded model) against UNet-time ratio at SD1.5 width"
    pts = [p for p in points if math.isfinite(p[x_key]) and math.isfinite(p[y_key])]
    W, H = size
    left, right, top, bottom = 70, 20, 40, 50
    xs, ys = [p[x_key] for p in pts], [p[y_key] for p in pts]
    x0, x1 = min(xs + [1.0]), max(xs + [1.0])
    y0, y1 = min(ys), max(ys)
    pad_x, pad_y = (x1 - x0) * 0.05 or 0.1, (y1 - y0) * 0.05 or 0.5
    x0, x1, y0, y1 = x0 - pad_x, x1 + pad_x, y0 - pad_y, y1 + pad_y
    X = lambda v: left + (v - x0) / (x1 - x0) * (W - left - right)
    Y = lambda v: H - bottom - (v - y0) / (y1 - y0) * (H - top - bottom)
    im = Image.new("RGB", size, "white")
    d = ImageDraw.Draw(im)
    d.rectangle([left, top, W - right, H - bottom], outline="black")
    for k in range(6):
        xv = x0 + (x1 - x0) * k / 5
        yv = y0 + (y1 - y0) * k / 5
        d.line([X(xv), H - bottom, X(xv), H - bottom + 4], fill="black")
        d.text((X(xv) - 12, H - bottom + 6), f"{xv:.2f}x", fill="black")
        d.line([left - 4, Y(yv), left, Y(yv)], fill="black")
        d.text((8, Y(yv) - 6), f"{yv:.1f}", fill="black")
    d.text((W // 2 - 160, H - 18), "UNet-time ratio vs full compute, SD1.5 width (measured, median)", fill="black")
    d.text((left, 8), title or f"{y_key} against full-compute sampling, same seeds", fill="black")
    lx = W - right - 110
    for i, (g, col) in enumerate(_GROUP_COLORS.items()):
        d.rectangle([lx, top + 8 + 14 * i, lx + 8, top + 16 + 14 * i], fill=col)
        d.text((lx + 12, top + 6 + 14 * i), _ascii(g), fill="black")
    for p in pts:
        col = _GROUP_COLORS.get(p["group"], (100, 100, 100))
        cx, cy = X(p[x_key]), Y(p[y_key])
        d.ellipse([cx - 3, cy - 3, cx + 3, cy + 3], fill=col)
        d.text((cx + 4, cy - 5), _ascii(p["label"]), fill=col)
    return im


def fmt(v: float, spec: str = ".2f", inf: str = "—") -> str:
    return inf if not math.isfinite(v) else format(v, spec)


def table(rows: list[dict]) -> str:
    out = ["| run | PSNR (dB) | SSIM | adherence | Fréchet dist. | UNet time, embedded | end to end, embedded "
           "| UNet time, SD1.5 width | FLOP bound | UNet time, SDXL width | FLOP bound, SDXL |",
           "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |"]
    for r in rows:
        out.append(f"| {r['label']} | {fmt(r['psnr'])} | {fmt(r['ssim'], '.3f')} | {r['adherence']:.3f} | "
                   f"{r['fd']:.1f} | {r['unet_ratio']} | {r['e2e_ratio']} | {r['sd15_ratio']} | {r['bound']:.2f}x | "
                   f"{sdxl_cells(r)} |")
    return "\n".join(out)


def sdxl_cells(r: dict) -> str:
    """A row's SDXL-width time and FLOP bound cells: "refused" where the SDXL layout refuses the
    setting, "-" where the job ran no SDXL timing."""
    if r.get("sdxl_refused"):
        return "refused | -"
    if r.get("sdxl_ratio") is None:
        return "- | -"
    return f"{r['sdxl_ratio']} | {r['sdxl_bound']:.2f}x"


def jsonable(row: dict) -> dict:
    """A report row for results.json: ratios as {median, low, high}, non-finite numbers as null."""
    def conv(v):
        if hasattr(v, "as_dict"):
            return v.as_dict()
        if isinstance(v, float) and not math.isfinite(v):
            return None
        if isinstance(v, list):
            return [conv(x) for x in v]
        return v
    return {k: conv(v) for k, v in row.items()}


_LINE_COLORS = [(200, 40, 40), (40, 110, 220), (230, 120, 30), (30, 160, 70), (140, 60, 180), (0, 0, 0),
                (120, 120, 120)]


def line_plot(series: dict, x_label: str, y_label: str, title: str, size=(900, 600)) -> "Image.Image":
    """One line per series: {name: [(x, y), ...]}, points sorted by x, each marked."""
    pts = [(x, y) for s in series.values() for x, y in s if math.isfinite(x) and math.isfinite(y)]
    W, H = size
    left, right, top, bottom = 70, 200, 40, 50
    x0, x1 = min(p[0] for p in pts), max(p[0] for p in pts)
    y0, y1 = min(p[1] for p in pts), max(p[1] for p in pts)
    pad_x, pad_y = (x1 - x0) * 0.05 or 0.1, (y1 - y0) * 0.05 or 0.5
    x0, x1, y0, y1 = x0 - pad_x, x1 + pad_x, y0 - pad_y, y1 + pad_y
    X = lambda v: left + (v - x0) / (x1 - x0) * (W - left - right)   # noqa: E731
    Y = lambda v: H - bottom - (v - y0) / (y1 - y0) * (H - top - bottom)   # noqa: E731
    im = Image.new("RGB", size, "white")
    d = ImageDraw.Draw(im)
    d.rectangle([left, top, W - right, H - bottom], outline="black")
    for k in range(6):
        xv, yv = x0 + (x1 - x0) * k / 5, y0 + (y1 - y0) * k / 5
        d.line([X(xv), H - bottom, X(xv), H - bottom + 4], fill="black")
        d.text((X(xv) - 12, H - bottom + 6), f"{xv:.2f}x", fill="black")
        d.line([left - 4, Y(yv), left, Y(yv)], fill="black")
        d.text((8, Y(yv) - 6), f"{yv:.1f}", fill="black")
    d.text((W // 2 - 200, H - 18), _ascii(x_label), fill="black")
    d.text((left, 8), _ascii(title), fill="black")
    d.text((8, top - 14), _ascii(y_label), fill="black")
    for i, (name, s) in enumerate(series.items()):
        col = _LINE_COLORS[i % len(_LINE_COLORS)]
        s = sorted((x, y) for x, y in s if math.isfinite(x) and math.isfinite(y))
        if len(s) > 1:
            d.line([(X(x), Y(y)) for x, y in s], fill=col, width=2)
        for x, y in s:
            d.ellipse([X(x) - 3, Y(y) - 3, X(x) + 3, Y(y) + 3], fill=col)
        d.rectangle([W - right + 10, top + 8 + 16 * i, W - right + 18, top + 16 + 16 * i], fill=col)
        d.text((W - right + 22, top + 6 + 16 * i), _ascii(name), fill="black")
    return im
