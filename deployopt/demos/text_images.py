"""Images of printed text, rendered here: calibration and evaluation data for OCR models when
no scans are at hand (the tests and benchmarks/ocr_rapidocr.py use them).

Pages (``kind="page"``) hold several lines of text of mixed sizes on a light, slightly noisy
background, as a text detector sees a document; lines (``kind="line"``) hold one line on a
short, wide strip, as a recogniser sees a detected box. Seeded, so a folder is reproducible.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

WORDS = (
    "model deploy runtime latency quantize export graph tensor kernel batch accuracy target "
    "invoice total amount date order number customer address street city phone email page "
    "section chapter figure table result report summary 2026 1024 42 3.14 #17 A-7 No. 5"
).split()


def rapidocr_models() -> Path | None:
    """The models folder of an installed ``rapidocr-onnxruntime`` (PP-OCR detector, recogniser
    and classifier), found without importing the package (its imports need OpenCV, which
    ``--no-deps`` leaves out); None when it is not installed."""
    import importlib.util

    spec = importlib.util.find_spec("rapidocr_onnxruntime")
    if spec is None or not spec.submodule_search_locations:
        return None
    return Path(next(iter(spec.submodule_search_locations))) / "models"


def _font(size: int):
    from PIL import ImageFont

    try:
        return ImageFont.load_default(size=size)  # scalable where Pillow has FreeType
    except TypeError:  # pragma: no cover - Pillow < 10.1: one bitmap size
        return ImageFont.load_default()


def _sentence(rng: np.random.Generator, words: int) -> str:
    return " ".join(rng.choice(WORDS, size=words))


def render(kind: str, size: tuple[int, int], rng: np.random.Generator):
    """One RGB image of ``size`` (width, height) as a PIL image."""
    from PIL import Image, ImageDraw

    w, h = size
    bg = int(rng.integers(215, 256))
    noise = rng.normal(0, 6, (h, w, 1)).astype(np.float32)
    base = np.clip(bg + noise + np.zeros((h, w, 3), np.float32), 0, 255).astype(np.uint8)
    im = Image.fromarray(base, "RGB")
    draw = ImageDraw.Draw(im)
    ink = tuple(int(v) for v in rng.integers(0, 80, 3))
    if kind == "line":
        font = _font(int(h * rng.uniform(0.5, 0.75)))
        draw.text((int(rng.integers(2, 12)), h // 2), _sentence(rng, 6), fill=ink, font=font,
                  anchor="lm")  # fmt: skip
        return im
    y = int(rng.integers(8, 24))
    while y < h - 16:
        fs = int(rng.integers(14, 34))
        x = int(rng.integers(8, max(9, w // 4)))
        draw.text((x, y), _sentence(rng, int(rng.integers(3, 9))), fill=ink, font=_font(fs))
        y += int(fs * rng.uniform(1.4, 2.6))
    return im


def write_text_images(
    folder: Path, count: int, kind: str = "page", size: tuple[int, int] | None = None, seed: int = 0
) -> list[Path]:
    """Write ``count`` PNG images of text into ``folder``; returns their paths.

    ``size`` is (width, height): default 640x640 for pages, 320x48 for lines.
    """
    if kind not in ("page", "line"):
        raise ValueError(f"kind must be 'page' or 'line', got {kind!r}")
    size = size or ((640, 640) if kind == "page" else (320, 48))
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    paths = []
    for i in range(count):
        p = folder / f"{kind}-{i:04d}.png"
        render(kind, size, rng).save(p)
        paths.append(p)
    return paths


__all__ = ["rapidocr_models", "render", "write_text_images"]
