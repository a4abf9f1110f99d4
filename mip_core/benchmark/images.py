"""Procedural portraits and shape pictures, designed to stay distinguishable at 32x32.

Faces that differ only in a combination of attributes were measured to stay at chance for a ~2M-parameter
model, so every person also gets a unique, high-contrast background texture (pattern kind x colour pair, never
repeated while combinations last, then angle/frequency). The face (skin, hair, shirt) adds signal.
Everything is rendered 4x supersampled with numpy and box-downsampled, which anti-aliases the patterns while
keeping the output a pure function of the parameters (same inputs, same bytes).
"""

from __future__ import annotations

import io
import itertools
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image

from .content import SHAPE_COLOURS, SHAPES

_SUPERSAMPLE = 4

# Background palette: spread over hue and lightness.
PALETTE: tuple[tuple[int, int, int], ...] = (
    (220, 40, 40), (245, 140, 20), (245, 220, 40), (150, 220, 50), (30, 140, 60), (0, 150, 140),
    (80, 200, 235), (40, 80, 210), (25, 30, 100), (130, 50, 170), (220, 60, 170), (250, 170, 200),
    (245, 245, 245), (25, 25, 25), (120, 70, 30), (128, 128, 128),
)  # fmt: skip
PATTERNS: tuple[str, ...] = ("stripes", "checks", "dots", "gradient", "rings", "zigzag", "diamonds")
ANGLES: tuple[float, ...] = (0.0, 45.0, 90.0, 135.0)
FREQS: tuple[float, ...] = (2.0, 3.0, 4.0)
SKIN: tuple[tuple[int, int, int], ...] = (
    (255, 224, 189), (241, 194, 125), (224, 172, 105), (198, 134, 66), (141, 85, 36), (90, 56, 37),
)  # fmt: skip
HAIR_COLOURS: tuple[tuple[int, int, int], ...] = (
    (20, 15, 10), (95, 55, 25), (230, 200, 90), (190, 70, 25), (150, 150, 150), (240, 240, 235),
    (60, 90, 200),
)  # fmt: skip
HAIR_STYLES: tuple[str, ...] = ("bald", "short", "long", "bun", "mohawk")
TRANSFORMS: tuple[str, ...] = ("colour_shift", "noise", "crop")
_MIN_PAIR_CONTRAST = 110.0


@dataclass(frozen=True, slots=True)
class Appearance:
    """All parameters of one portrait; rendering is a pure function of these and the image size."""

    pattern: str
    colour_a: tuple[int, int, int]
    colour_b: tuple[int, int, int]
    angle: float
    freq: float
    skin: tuple[int, int, int]
    hair_colour: tuple[int, int, int]
    hair_style: str
    shirt: tuple[int, int, int]


def _contrast(a: tuple[int, int, int], b: tuple[int, int, int]) -> float:
    return float(np.linalg.norm(np.subtract(a, b, dtype=float)))


def assign_appearances(n: int, rng: np.random.Generator) -> list[Appearance]:
    """Give ``n`` people appearances, maximising the distinctness of their backgrounds.

    First pass: no two people share a pattern kind *and* an (unordered) colour pair. Once those run out, only
    the full (pattern, colours, angle, frequency) tuple is kept unique. Sequential acceptance makes the first
    ``k`` appearances independent of ``n``.
    """
    pairs = [
        (a, b)
        for a, b in itertools.permutations(range(len(PALETTE)), 2)
        if _contrast(PALETTE[a], PALETTE[b]) >= _MIN_PAIR_CONTRAST
    ]
    combos = [(p, a, b) for p in range(len(PATTERNS)) for a, b in pairs]
    out: list[Appearance] = []
    used_keys: set[tuple[int, frozenset[int]]] = set()
    used_full: set[tuple[int, frozenset[int], int, int]] = set()

    def accept(p: int, a: int, b: int, ang: int, fr: int) -> None:
        used_keys.add((p, frozenset((a, b))))
        used_full.add((p, frozenset((a, b)), ang, fr))
        out.append(
            Appearance(
                pattern=PATTERNS[p],
                colour_a=PALETTE[a],
                colour_b=PALETTE[b],
                angle=ANGLES[ang],
                freq=FREQS[fr],
                skin=SKIN[int(rng.integers(len(SKIN)))],
                hair_colour=HAIR_COLOURS[int(rng.integers(len(HAIR_COLOURS)))],
                hair_style=HAIR_STYLES[int(rng.integers(len(HAIR_STYLES)))],
                shirt=PALETTE[int(rng.integers(len(PALETTE)))],
            )
        )

    for idx in rng.permutation(len(combos)):
        if len(out) == n:
            return out
        p, a, b = combos[idx]
        if (p, frozenset((a, b))) not in used_keys:
            accept(p, a, b, int(rng.integers(len(ANGLES))), int(rng.integers(len(FREQS))))
    n_var = len(ANGLES) * len(FREQS)
    for idx in rng.permutation(len(combos) * n_var):
        if len(out) == n:
            return out
        (p, a, b), var = combos[idx // n_var], idx % n_var
        ang, fr = divmod(var, len(FREQS))
        if (p, frozenset((a, b)), ang, fr) not in used_full:
            accept(p, a, b, ang, fr)
    if len(out) < n:  # pragma: no cover - MAX_PROFILES is far below the number of combinations
        raise ValueError(f"cannot give {n} people distinct appearances")
    return out


def _grid(size: int) -> tuple[np.ndarray, np.ndarray]:
    hi = size * _SUPERSAMPLE
    c = (np.arange(hi, dtype=np.float64) + 0.5) / hi
    return np.meshgrid(c, c)  # x, y in (0, 1), y grows downwards


def _downsample(canvas: np.ndarray, size: int) -> np.ndarray:
    s = _SUPERSAMPLE
    small = canvas.reshape(size, s, size, s, 3).mean(axis=(1, 3))
    return np.clip(np.rint(small), 0, 255).astype(np.uint8)


def _paint(canvas: np.ndarray, mask: np.ndarray, colour: tuple[int, int, int]) -> None:
    canvas[mask] = colour


def _ellipse(x: np.ndarray, y: np.ndarray, cx: float, cy: float, rx: float, ry: float) -> np.ndarray:
    return ((x - cx) / rx) ** 2 + ((y - cy) / ry) ** 2 <= 1.0


def _background(app: Appearance, x: np.ndarray, y: np.ndarray) -> np.ndarray:
    th = np.deg2rad(app.angle)
    u = (x - 0.5) * np.cos(th) + (y - 0.5) * np.sin(th)
    v = -(x - 0.5) * np.sin(th) + (y - 0.5) * np.cos(th)
    f = app.freq
    a = np.asarray(app.colour_a, dtype=np.float64)
    b = np.asarray(app.colour_b, dtype=np.float64)
    if app.pattern == "gradient":
        t = np.clip(u / 0.75 + 0.5, 0.0, 1.0)[..., None]
        return a * (1 - t) + b * t
    if app.pattern == "stripes":
        m = np.sin(2 * np.pi * f * u) > 0
    elif app.pattern == "checks":
        m = np.sin(2 * np.pi * f * u) * np.sin(2 * np.pi * f * v) > 0
    elif app.pattern == "dots":
        fu, fv = (f * u) % 1.0 - 0.5, (f * v) % 1.0 - 0.5
        m = fu**2 + fv**2 < 0.32**2
    elif app.pattern == "rings":
        cx, cy = 0.5 + 0.6 * np.cos(th), 0.5 + 0.6 * np.sin(th)
        m = np.sin(2 * np.pi * f * np.hypot(x - cx, y - cy)) > 0
    elif app.pattern == "zigzag":
        m = np.sin(2 * np.pi * f * u + 2.0 * np.abs(((f * v) % 1.0) - 0.5) * 2 * np.pi) > 0
    elif app.pattern == "diamonds":
        fu, fv = (f * u) % 1.0 - 0.5, (f * v) % 1.0 - 0.5
        m = np.abs(fu) + np.abs(fv) < 0.3
    else:  # pragma: no cover - PATTERNS is closed
        raise ValueError(app.pattern)
    return np.where(m[..., None], b, a)


def render_portrait(app: Appearance, size: int) -> np.ndarray:
    """Portrait as a ``(size, size, 3)`` uint8 array: textured background, shoulders, head, hair, eyes."""
    x, y = _grid(size)
    canvas = _background(app, x, y)
    cx, cy, rx, ry = 0.5, 0.47, 0.19, 0.24
    _paint(canvas, _ellipse(x, y, 0.5, 1.06, 0.36, 0.24), app.shirt)
    style = app.hair_style
    if style == "long":
        _paint(
            canvas, _ellipse(x, y, cx, cy + 0.04, rx * 1.35, ry * 1.2) & (y < cy + ry * 0.95), app.hair_colour
        )
    if style == "bun":
        _paint(canvas, _ellipse(x, y, cx, cy - ry * 1.12, rx * 0.45, rx * 0.45), app.hair_colour)
    _paint(canvas, _ellipse(x, y, cx, cy, rx, ry), app.skin)
    if style in ("short", "long", "bun"):
        cap = _ellipse(x, y, cx, cy - 0.015, rx * 1.1, ry * 1.08) & (y < cy - ry * 0.42)
        _paint(canvas, cap, app.hair_colour)
    elif style == "mohawk":
        band = (
            _ellipse(x, y, cx, cy - 0.03, rx * 1.1, ry * 1.25)
            & (np.abs(x - cx) < rx * 0.3)
            & (y < cy - ry * 0.3)
        )
        _paint(canvas, band, app.hair_colour)
    eye_r = max(rx * 0.16, 0.6 / size)
    for ex in (cx - rx * 0.42, cx + rx * 0.42):
        _paint(canvas, _ellipse(x, y, ex, cy - ry * 0.05, eye_r, eye_r), (20, 20, 35))
    _paint(
        canvas,
        (np.abs(x - cx) < rx * 0.4) & (np.abs(y - (cy + ry * 0.5)) < max(ry * 0.07, 0.5 / size)),
        (150, 30, 40),
    )
    return _downsample(canvas, size)


def transform_image(img: np.ndarray, kind: str, rng: np.random.Generator) -> np.ndarray:
    """Mild, identity-preserving perturbation for ``test`` items: colour shift, noise, crop+resize."""
    size = img.shape[0]
    if kind == "colour_shift":
        shift = rng.integers(-35, 36, size=3)
        shift[int(rng.integers(3))] = int(rng.choice((-1, 1))) * int(rng.integers(20, 36))  # never a no-op
        return np.clip(img.astype(np.int16) + shift, 0, 255).astype(np.uint8)
    if kind == "noise":
        noisy = img.astype(np.float64) + rng.normal(0.0, 12.0, size=img.shape)
        return np.clip(np.rint(noisy), 0, 255).astype(np.uint8)
    if kind == "crop":
        c = round(size * float(rng.uniform(0.82, 0.92)))
        c = min(max(c, 2), size - 1)
        ox, oy = (int(v) for v in rng.integers(0, size - c + 1, size=2))
        crop = Image.fromarray(img[oy : oy + c, ox : ox + c], "RGB")
        return np.asarray(crop.resize((size, size), Image.Resampling.BILINEAR), dtype=np.uint8).copy()
    raise ValueError(f"unknown transform {kind!r}; use one of {list(TRANSFORMS)}")


def _shape_background(colour: tuple[int, int, int], rng: np.random.Generator) -> tuple[int, int, int]:
    candidates = [
        bg for bg in ((215, 215, 215), (240, 232, 210), (60, 60, 60)) if _contrast(bg, colour) > 130
    ]
    return candidates[int(rng.integers(len(candidates)))]


def render_shapes(shape: str, colour: str, count: int, size: int, rng: np.random.Generator) -> np.ndarray:
    """``count`` (1-4) shapes of one kind and colour, one per quadrant (jittered), on a plain background."""
    if shape not in SHAPES or colour not in SHAPE_COLOURS or not 1 <= count <= 4:
        raise ValueError(f"bad shape picture {shape!r}/{colour!r}/{count!r}")
    x, y = _grid(size)
    rgb = SHAPE_COLOURS[colour]
    canvas = np.empty((*x.shape, 3), dtype=np.float64)
    canvas[:] = _shape_background(rgb, rng)
    r = 0.16
    for cell in sorted(rng.choice(4, size=count, replace=False).tolist()):
        qx, qy = 0.25 + 0.5 * (cell % 2), 0.25 + 0.5 * (cell // 2)
        jx, jy = rng.uniform(-0.05, 0.05, size=2)
        dx, dy = x - (qx + jx), y - (qy + jy)
        if shape == "circle":
            m = dx**2 + dy**2 <= r**2
        elif shape == "square":
            m = (np.abs(dx) <= r * 0.85) & (np.abs(dy) <= r * 0.85)
        elif shape == "triangle":
            t = (dy + r) / (1.9 * r)  # 0 at apex, 1 at base
            m = (t >= 0) & (t <= 1) & (np.abs(dx) <= t * r * 1.05)
        else:  # diamond
            m = np.abs(dx) + np.abs(dy) <= r * 1.1
        canvas[m] = rgb
    return _downsample(canvas, size)


def encode_png(img: np.ndarray) -> bytes:
    """PNG bytes with no metadata chunks, so identical pixels give identical bytes."""
    buf = io.BytesIO()
    Image.fromarray(img, "RGB").save(buf, format="PNG", optimize=False, compress_level=6)
    return buf.getvalue()


def write_png(img: np.ndarray, path: Path) -> bytes:
    data = encode_png(img)
    path.write_bytes(data)
    return data
