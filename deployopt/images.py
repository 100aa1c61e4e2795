"""Image inputs: the size to feed a model whose height and width are symbolic, and folders of
images as calibration and evaluation data.

A detector exported with dynamic ``height``/``width`` runs only at sizes its strides divide:
a stride-32 backbone concatenates an upsampled stride-32 map with a stride-16 one, which
fails unless both sides are a multiple of 32. So the size is not guessed once:

* the candidates are the sizes the model says it was made for (``imgsz`` and the like in its
  metadata, ``preprocessor_config.json`` beside it), then the common sizes, all multiples of
  32 (the detector convention; 224 is also the classifier convention);
* each candidate is run on the fp32 model in a worker process, and the first that runs is used
  for everything after (evaluation, calibration, the benchmark);
* when none runs, the error names the input, the sizes tried and why each failed, and the
  ``--input-shape`` flag that settles it.

Dims the user gave with ``--input-shape NAME=DIMS`` are taken as they are.
"""

from __future__ import annotations

import json
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from deployopt.errors import DataError, UsageError
from deployopt.inputs import Batch, InputSpec, synthetic_batches

# all multiples of 32: a stride-32 detector's convention; 224 is also a classifier's
COMMON_SIZES = (224, 256, 320, 384, 448, 512, 640)
# text-line recognisers squeeze the height to 1 and want a short, wide line (PaddleOCR's rec
# models 48x320, CRNN-style 32x128): tried after the squares, as (height, width)
TEXT_LINE_SIZES = ((48, 320), (32, 320), (32, 128))
IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".webp", ".tif", ".tiff", ".gif")
_SIZE_KEYS = re.compile(r"imgsz|img_size|image_size|input_size|input_shape|imagesize", re.I)
DEFAULT_DIM = 16  # any other symbolic dim (a sequence length)


@dataclass(frozen=True)
class ImageLayout:
    """Where an image input keeps its channels, height and width."""

    name: str
    channel_axis: int  # 1 (NCHW) or 3 (NHWC)
    channels: int

    @property
    def spatial_axes(self) -> tuple[int, int]:
        return (2, 3) if self.channel_axis == 1 else (1, 2)


def image_layout(spec: InputSpec) -> ImageLayout | None:
    """The layout of a 4-D float input with 1, 3 or 4 channels on axis 1 or 3, else None."""
    if spec.is_text or len(spec.shape) != 4 or not np.issubdtype(np.dtype(spec.dtype), np.floating):
        return None
    for axis in (1, 3):
        c = spec.shape[axis]
        if isinstance(c, int) and c in (1, 3, 4):
            return ImageLayout(spec.name, axis, c)
    return None


def dims_from_shapes(
    specs: Sequence[InputSpec], shapes: Mapping[str, Sequence[int]], source: object
) -> dict[str, int]:
    """The symbolic dims that ``--input-shape NAME=DIMS`` settles, by dim name. The first dim
    (the batch) is left to the batch size; a fixed dim that disagrees is a usage error."""
    by_name = {s.name: s for s in specs}
    dims: dict[str, int] = {}
    for name, shape in shapes.items():
        spec = by_name.get(name)
        if spec is None:
            raise UsageError(
                f"--input-shape {name}=...: {source} has no input {name!r}",
                hint=f"its inputs are {', '.join(by_name) or 'none'}",
            )
        if len(shape) != len(spec.shape):
            raise UsageError(
                f"--input-shape {name}: {len(shape)} dims given, the input has "
                f"{len(spec.shape)} ({_shape_text(spec.shape)})",
                hint=f"write all {len(spec.shape)} dims, e.g. --input-shape {name}="
                + "x".join(str(d if isinstance(d, int) else 1) for d in spec.shape),
            )
        for i, (want, have) in enumerate(zip(shape, spec.shape)):
            if isinstance(have, int):
                if have != want and i > 0:
                    raise UsageError(
                        f"--input-shape {name}: dim {i} is fixed at {have} in the model, "
                        f"{want} given",
                        hint=f"the input's shape is {_shape_text(spec.shape)}",
                    )
            elif i > 0:
                dims[have] = int(want)
    return dims


def _shape_text(shape: Sequence[int | str]) -> str:
    return "[" + ", ".join(str(d) for d in shape) + "]"


def unresolved(specs: Sequence[InputSpec], dims: Mapping[str, int]) -> list[ImageLayout]:
    """Image inputs with a symbolic height or width that ``dims`` does not settle."""
    out = []
    for s in specs:
        lay = image_layout(s)
        if lay and any(
            isinstance(s.shape[a], str) and s.shape[a] not in dims for a in lay.spatial_axes
        ):
            out.append(lay)
    return out


def size_hints(model_path: Path) -> list[tuple[int, int]]:
    """(height, width) sizes the model says it was made for: metadata keys like ``imgsz``
    (Ultralytics writes ``[640, 640]``) and ``preprocessor_config.json`` beside the file."""
    import onnx

    hints: list[tuple[int, int]] = []
    try:
        model = onnx.load(str(model_path), load_external_data=False)
        props = {p.key: p.value for p in model.metadata_props}
    except Exception:  # noqa: BLE001 - the loader refuses bad files elsewhere, with its reason
        props = {}
    for key, value in props.items():
        if _SIZE_KEYS.search(key):
            nums = [int(n) for n in re.findall(r"\d+", value)]
            if len(nums) == 1:
                hints.append((nums[0], nums[0]))
            elif len(nums) >= 2:
                hints.append((nums[-2], nums[-1]))
    pre = _preprocessor(model_path)
    for key in ("crop_size", "size"):
        v = pre.get(key)
        if isinstance(v, int):
            hints.append((v, v))
        elif isinstance(v, dict):
            if "height" in v and "width" in v:
                hints.append((int(v["height"]), int(v["width"])))
            elif "shortest_edge" in v:
                hints.append((int(v["shortest_edge"]), int(v["shortest_edge"])))
    return [h for h in dict.fromkeys(hints) if 0 < h[0] <= 8192 and 0 < h[1] <= 8192]


def _preprocessor(model_path: Path) -> dict:
    p = Path(model_path).parent / "preprocessor_config.json"
    try:
        data = json.loads(p.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}
    return data if isinstance(data, dict) else {}


def candidates(
    specs: Sequence[InputSpec], dims: Mapping[str, int], hints: Sequence[tuple[int, int]]
) -> list[dict[str, int]]:
    """One dims mapping per size to try (hints, then the COMMON_SIZES squares, then the
    TEXT_LINE_SIZES): every unresolved height/width of every image input set to it (a height
    and width sharing one dim name stay square)."""
    out: list[dict[str, int]] = []
    for h, w in [*hints, *((s, s) for s in COMMON_SIZES), *TEXT_LINE_SIZES]:
        c: dict[str, int] = {}
        for lay in unresolved(specs, dims):
            spec = next(s for s in specs if s.name == lay.name)
            for axis, size in zip(lay.spatial_axes, (h, w)):
                d = spec.shape[axis]
                if isinstance(d, str) and d not in dims:
                    c.setdefault(d, size)
        if c and c not in out:
            out.append(c)
    return out


def describe_size(specs: Sequence[InputSpec], dims: Mapping[str, int]) -> str:
    """``images 1x3x224x224``-style text of the image inputs under ``dims``."""
    parts = []
    for s in specs:
        if image_layout(s):
            parts.append(
                f"{s.name} "
                + "x".join(str(d if isinstance(d, int) else dims.get(d, "?")) for d in s.shape[1:])
            )
    return ", ".join(parts)


def resolve_dims(
    path: Path,
    specs: Sequence[InputSpec],
    dims: Mapping[str, int],
    threads: int | None,
    timeout_s: float,
) -> tuple[dict[str, int], str | None]:
    """Settle the symbolic height/width of image inputs by running the fp32 model once at each
    candidate size (:func:`candidates`), in one worker, until one runs; return the dims and a
    line saying what was chosen (None when nothing needed choosing). A model that does not
    load is left for the input probe to refuse with its own reason."""
    from deployopt.runtime.session import first_runnable
    from deployopt.runtime.worker import WorkerCrashed, run_in_worker

    dims = dict(dims)
    todo = unresolved(specs, dims)
    if not todo:
        return dims, None
    cands = candidates(specs, dims, size_hints(path))
    feeds = [synthetic_batches(specs, 1, 1, {"*": DEFAULT_DIM, **dims, **c})[0] for c in cands]
    try:
        verdict = run_in_worker(
            first_runnable, path, feeds, threads, timeout_s=timeout_s, label="image size probe"
        )
    except WorkerCrashed:  # the input probe runs it again and says so
        return dims, None
    kind, index, reasons = verdict
    if kind == "load":
        return dims, None
    names = ", ".join(lay.name for lay in todo)
    tried = [describe_size(specs, {**dims, **c}) for c in cands]
    if kind == "ok":
        chosen = {**dims, **cands[index]}
        first = "the size its metadata gives" if index < len(size_hints(path)) else "the first size"
        skipped = f" ({len(reasons)} smaller tries failed)" if reasons else ""
        return chosen, (
            f"symbolic image size of {names}: {describe_size(specs, chosen)}, {first} that "
            f"ran{skipped}; set it with --input-shape"
        )
    detail = "; ".join(f"{t}: {r}" for t, r in zip(tried, reasons))
    example = _example_flag(specs, todo[0], {**dims, **cands[-1]}) if cands else ""
    raise UsageError(
        f"{path}: input {names} has a symbolic height/width and the model ran at none of the "
        f"sizes tried ({detail})",
        hint=f"give the size the model was exported for, e.g. {example}",
    )


def _example_flag(specs: Sequence[InputSpec], lay: ImageLayout, dims: Mapping[str, int]) -> str:
    spec = next(s for s in specs if s.name == lay.name)
    shape = [d if isinstance(d, int) else dims.get(d, 1) for d in spec.shape]
    shape[0] = 1
    return f"--input-shape {lay.name}=" + "x".join(str(d) for d in shape)


# ---------------------------------------------------------------- folders of images


@dataclass(frozen=True)
class Normalization:
    """``(pixel * scale - mean) / std`` per channel, RGB order."""

    scale: float = 1 / 255
    mean: tuple[float, ...] = (0.0,)
    std: tuple[float, ...] = (1.0,)
    source: str = "pixels scaled to [0, 1]"

    def describe(self) -> str:
        return self.source


def normalization(
    model_path: Path | None,
    mean: Sequence[float] | None = None,
    std: Sequence[float] | None = None,
) -> Normalization:
    """The flags' mean/std when given, else ``preprocessor_config.json`` beside the model,
    else pixels scaled to [0, 1]."""
    if mean is not None or std is not None:
        m, s = tuple(mean or (0.0,)), tuple(std or (1.0,))
        return Normalization(
            1 / 255, m, s, f"pixels scaled to [0, 1], mean {list(m)}, std {list(s)}"
        )
    pre = _preprocessor(model_path) if model_path else {}
    if pre.get("image_mean") is not None and pre.get("do_normalize", True):
        scale = float(pre.get("rescale_factor", 1 / 255)) if pre.get("do_rescale", True) else 1.0
        m, s = tuple(pre["image_mean"]), tuple(pre.get("image_std") or (1.0,))
        return Normalization(
            scale,
            m,
            s,
            f"normalised as preprocessor_config.json says (mean {list(m)}, std {list(s)})",
        )
    return Normalization()


def image_files(folder: Path) -> list[Path]:
    return sorted(
        p for p in Path(folder).rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file()
    )


def class_folders(folder: Path) -> list[str]:
    """The class names of ``FOLDER/<class>/<image>``: its subfolders that hold images (at any
    depth), sorted. A DataError when images lie directly in it or it has no such subfolder."""
    folder = Path(folder)
    files = image_files(folder)
    loose = [f for f in files if f.parent == folder]
    if loose:
        raise DataError(
            f"{folder}: {len(loose)} images lie outside class folders (e.g. {loose[0].name}), "
            "so they have no label",
            hint="lay out labelled images as FOLDER/<class>/<image>",
        )
    classes = sorted({f.relative_to(folder).parts[0] for f in files})
    if not classes:
        raise DataError(
            f"{folder}: no images found ({', '.join(IMAGE_SUFFIXES)})",
            hint="lay out labelled images as FOLDER/<class>/<image>",
        )
    return classes


def labelled_files(folder: Path, limit: int | None) -> tuple[list[Path], list[str]]:
    """The images of ``FOLDER/<class>/<image>`` taken class by class in turn (the first of
    each class, then the second, ...), so that a ``limit`` keeps every class; and each one's
    class name (its top subfolder)."""
    folder = Path(folder)
    classes = class_folders(folder)
    by_class = {c: image_files(folder / c) for c in classes}
    files: list[Path] = []
    labels: list[str] = []
    for i in range(max(len(v) for v in by_class.values())):
        for c in classes:
            if i < len(by_class[c]):
                files.append(by_class[c][i])
                labels.append(c)
    if limit:
        files, labels = files[:limit], labels[:limit]
    return files, labels


def read_images(
    folder: Path,
    specs: Sequence[InputSpec],
    dims: Mapping[str, int],
    batch_size: int,
    limit: int,
    norm: Normalization,
    labelled: bool = False,
) -> tuple[list[Batch], str]:
    """Batches from a folder of images (searched recursively) for a one-input image model:
    each image converted to RGB (or grayscale for one channel), resized to the input's size and
    normalised. Returns the batches and a description for the report. ``labelled``: the folder
    is ``FOLDER/<class>/<image>`` and the images are taken class by class in turn
    (:func:`labelled_files`, whose order the labels follow)."""
    from PIL import Image, UnidentifiedImageError

    folder = Path(folder)
    lays = [image_layout(s) for s in specs]
    if len(specs) != 1 or lays[0] is None:
        raise DataError(
            f"{folder}: a folder of images feeds a model with one image input; this one has "
            f"{', '.join(s.name for s in specs)}",
            hint="give an .npz file with one array per input name instead",
        )
    spec, lay = specs[0], lays[0]
    h_axis, w_axis = lay.spatial_axes
    h = spec.shape[h_axis] if isinstance(spec.shape[h_axis], int) else dims.get(spec.shape[h_axis])
    w = spec.shape[w_axis] if isinstance(spec.shape[w_axis], int) else dims.get(spec.shape[w_axis])
    if not h or not w:  # pragma: no cover - resolve_dims settles them first
        raise DataError(f"{folder}: the image size of {spec.name} is not known")
    files = labelled_files(folder, limit)[0] if labelled else image_files(folder)[:limit]
    if not files:
        raise DataError(
            f"{folder}: no images found ({', '.join(IMAGE_SUFFIXES)})",
            hint="point at a folder holding image files (subfolders are searched)",
        )
    mode = "L" if lay.channels == 1 else "RGB"
    # one value per channel (a single value is used for every channel)
    mean = np.resize(np.asarray(norm.mean, dtype=np.float32), lay.channels)
    std = np.resize(np.asarray(norm.std, dtype=np.float32), lay.channels)
    arrays = []
    for f in files:
        try:
            with Image.open(f) as im:
                im = im.convert(mode).resize((int(w), int(h)), Image.BILINEAR)
                a = np.asarray(im, dtype=np.float32)
        except (UnidentifiedImageError, OSError) as e:
            raise DataError(
                f"{f}: not a readable image ({e})", hint="remove or replace the file"
            ) from None
        if a.ndim == 2:
            a = a[..., None]
        if lay.channels == 4:
            a = np.concatenate([a, np.full(a.shape[:2] + (1,), 255, np.float32)], axis=-1)
        a = (a * norm.scale - mean) / std
        arrays.append(a.transpose(2, 0, 1) if lay.channel_axis == 1 else a)
    x = np.stack(arrays).astype(spec.dtype)
    batches = [{spec.name: x[i : i + batch_size]} for i in range(0, len(x), batch_size)]
    classes = f", {len(class_folders(folder))} class folders taken in turn" if labelled else ""
    desc = f"{folder} ({len(files)} images{classes}, resized to {h}x{w}, {norm.describe()})"
    return batches, desc
