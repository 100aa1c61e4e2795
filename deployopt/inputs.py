"""Input signatures and the data that feeds them: evaluation, calibration, synthetic.

A *batch* is a dict ``input name -> numpy array`` with the batch dimension first. Text models
get real sentences through their tokenizer (never random token ids); other models read an
``.npz`` file (one array per input, samples first) or get seeded synthetic data.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from deployopt.errors import DataError

Batch = dict[str, np.ndarray]

ONNX_TO_NUMPY = {
    "tensor(float)": np.float32,
    "tensor(float16)": np.float16,
    "tensor(double)": np.float64,
    "tensor(int64)": np.int64,
    "tensor(int32)": np.int32,
    "tensor(int8)": np.int8,
    "tensor(uint8)": np.uint8,
    "tensor(bool)": np.bool_,
}
TEXT_INPUTS = ("input_ids", "attention_mask", "token_type_ids")


@dataclass(frozen=True)
class InputSpec:
    """One model input: name, numpy dtype name, shape with ``str`` for symbolic dims."""

    name: str
    dtype: str
    shape: tuple[int | str, ...]

    @property
    def is_text(self) -> bool:
        return self.name in TEXT_INPUTS


def specs_from_onnx(model_path: Path) -> list[InputSpec]:
    """Read the graph inputs (initializers excluded) of an ONNX file without loading weights."""
    import onnx

    model = onnx.load(str(model_path), load_external_data=False)
    inits = {i.name for i in model.graph.initializer}
    specs = []
    elem = onnx.helper.tensor_dtype_to_np_dtype
    for inp in model.graph.input:
        if inp.name in inits:
            continue
        tt = inp.type.tensor_type
        dims: list[int | str] = []
        for i, d in enumerate(tt.shape.dim):
            if d.HasField("dim_value"):
                dims.append(int(d.dim_value))
            else:
                dims.append(d.dim_param or f"dim{i}")
        specs.append(InputSpec(inp.name, np.dtype(elem(tt.elem_type)).name, tuple(dims)))
    return specs


def synthetic_batches(
    specs: Sequence[InputSpec],
    samples: int,
    batch_size: int,
    dims: Mapping[str, int] | None = None,
    seed: int = 0,
) -> list[Batch]:
    """Seeded random inputs for a signature: floats ~ N(0, 1), ints in [0, 100), masks of ones."""
    rng = np.random.default_rng(seed)
    dims = dict(dims or {})
    batches = []
    for start in range(0, samples, batch_size):
        n = min(batch_size, samples - start)
        batch = {}
        for s in specs:
            shape = [n] + [_dim(d, dims) for d in s.shape[1:]]
            dt = np.dtype(s.dtype)
            if s.name == "attention_mask" or dt == np.bool_:
                batch[s.name] = np.ones(shape, dtype=dt)
            elif s.name == "token_type_ids":
                batch[s.name] = np.zeros(shape, dtype=dt)
            elif np.issubdtype(dt, np.integer):
                batch[s.name] = rng.integers(0, 100, size=shape).astype(dt)
            else:
                batch[s.name] = rng.standard_normal(shape).astype(dt)
        batches.append(batch)
    return batches


def _dim(d: int | str, dims: Mapping[str, int]) -> int:
    if isinstance(d, int):
        return d
    if d in dims:
        return dims[d]
    return dims.get("*", 16)


def text_batches(
    tokenizer: Any,
    texts: Sequence[str],
    specs: Sequence[InputSpec],
    batch_size: int,
    max_length: int,
    warn: Callable[[str], None] | None = None,
    source: str = "the texts",
    pairs: Sequence[str] | None = None,
) -> list[Batch]:
    """Tokenize real sentences into batches padded to each batch's longest sentence; texts
    over ``max_length`` tokens are truncated, and ``warn`` (when given) is told so once, with
    how many and the limit (:func:`truncation_note`). ``pairs``: a second text for each, the
    two encoded together as one sample (a cross-encoder's sentence pair)."""
    if warn is not None:
        note = truncation_note(tokenizer, texts, max_length, source, pairs)
        if note:
            warn(note)
    wanted = {s.name: np.dtype(s.dtype) for s in specs}
    batches = []
    for start in range(0, len(texts), batch_size):
        second = list(pairs[start : start + batch_size]) if pairs is not None else None
        enc = tokenizer(
            list(texts[start : start + batch_size]),
            second,
            padding=True,
            truncation=True,
            max_length=max_length,
            return_tensors="np",
        )
        batch = {}
        for name, dt in wanted.items():
            if name in enc:
                batch[name] = np.asarray(enc[name]).astype(dt)
            elif name == "token_type_ids":
                batch[name] = np.zeros_like(np.asarray(enc["input_ids"]), dtype=dt)
            else:
                raise DataError(f"the tokenizer gives no {name!r}, which the model needs")
        batches.append(batch)
    return batches


def truncation_note(
    tokenizer: Any,
    texts: Sequence[str],
    max_length: int,
    source: str = "the texts",
    pairs: Sequence[str] | None = None,
) -> str | None:
    """One line saying how many of ``texts`` (with their ``pairs``) are longer than
    ``max_length`` tokens (special tokens included) and so are cut, or None when none is."""
    second = list(pairs) if pairs is not None else None
    enc = tokenizer(list(texts), second, truncation=False, verbose=False)  # no per-text warning
    lengths = [len(ids) for ids in enc["input_ids"]]
    over = [n for n in lengths if n > max_length]
    if not over:
        return None
    return (
        f"{len(over)} of {len(texts)} lines of {source} are longer than the {max_length}-token "
        f"limit (the longest has {max(over)} tokens) and were truncated to {max_length} tokens; "
        "raise --max-length or shorten them"
    )


def vocab_size(model_path: Path, input_name: str = "input_ids") -> int | None:
    """Rows of the embedding table that ``input_name`` indexes in the ONNX graph (a Gather on
    an initializer, or onnxruntime's fused EmbedLayerNormalization), following Casts,
    Reshapes and the like on the ids and Casts / DequantizeLinear on the table (fp16, int8
    variants); the smallest if several, None if none is found. Token ids drawn for that input
    must stay below it (issue 12: a 1,000-token BERT got id 13463)."""
    import onnx

    graph = onnx.load(str(model_path), load_external_data=False).graph
    tables = {i.name: int(i.dims[0]) for i in graph.initializer if i.dims}
    for n in graph.node:  # a table given as a Constant node
        if n.op_type == "Constant" and n.output:
            t = next((a.t for a in n.attribute if a.name == "value" and a.t.dims), None)
            if t is not None:
                tables[n.output[0]] = int(t.dims[0])
    producer = {o: n for n in graph.node for o in n.output if o}
    consumers: dict[str, list] = {}
    for n in graph.node:
        for i in n.input:
            consumers.setdefault(i, []).append(n)

    def table_rows(name: str) -> int | None:
        for _ in range(8):  # through a few Casts / DequantizeLinear
            if name in tables:
                return tables[name]
            p = producer.get(name)
            if p is None or p.op_type not in ("Cast", "DequantizeLinear", "Identity"):
                return None
            name = p.input[0]
        return None

    found, ids, seen = [], [input_name], set()
    while ids:
        t = ids.pop()
        if t in seen:
            continue
        seen.add(t)
        for n in consumers.get(t, []):
            if n.op_type == "Gather" and len(n.input) > 1 and n.input[1] == t:
                found.append(table_rows(n.input[0]))
            elif n.op_type == "EmbedLayerNormalization" and n.input[0] == t:
                found.append(table_rows(n.input[2]) if len(n.input) > 2 else None)
            elif n.op_type in _ID_PASSTHROUGH and n.input[0] == t:
                ids.extend(o for o in n.output if o)
    rows = [r for r in found if r]
    return min(rows) if rows else None


_ID_PASSTHROUGH = ("Cast", "Reshape", "Unsqueeze", "Squeeze", "Flatten", "Identity", "Expand")


def read_texts(path: Path, limit: int | None = None, text_column: str = "text") -> list[str]:
    """Read text examples: one a line (.txt), a ``text_column`` field (.jsonl) or column (.csv)."""
    texts = read_labelled(path, text_column).texts
    return texts[:limit] if limit else texts


def read_examples(
    path: Path, text_column: str = "text", label_column: str | None = None
) -> tuple[list[str], list[str] | None]:
    """Text examples and, with ``label_column``, their labels: one example a line (.txt, no
    labels), one JSON object a line (.jsonl) or a CSV with a header. Errors name the line."""
    ex = read_labelled(path, text_column, label_column)
    return ex.texts, ex.labels


@dataclass(frozen=True)
class Examples:
    """Text examples read from a file, in file order: ``pairs`` (the second text of each, for
    sentence pairs) and ``labels`` are None when not asked for."""

    texts: list[str]
    pairs: list[str] | None = None
    labels: list[str] | None = None

    def head(self, limit: int | None) -> Examples:
        """The first ``limit`` examples (all when None)."""
        if not limit:
            return self
        cut = slice(0, limit)
        return Examples(
            self.texts[cut],
            self.pairs[cut] if self.pairs is not None else None,
            self.labels[cut] if self.labels is not None else None,
        )


def read_labelled(
    path: Path,
    text_column: str = "text",
    label_column: str | None = None,
    pair_column: str | None = None,
) -> Examples:
    """Text examples with, when asked, a second text (``pair_column``) and a label
    (``label_column``) each: one example a line (.txt: texts only), one JSON object a line
    (.jsonl) or a CSV with a header (rows with an empty text are skipped). A missing column
    is a DataError naming the file and listing the columns it has; errors name the line."""
    import csv

    path = Path(path)
    if not path.is_file():
        raise DataError(f"{path}: no such data file", hint="give an existing file path")
    suffix = path.suffix.lower()
    extra = [k for k in (pair_column, label_column) if k]
    want = [text_column, *extra]
    rows: list[list[str]] = []
    try:
        with open(path, encoding="utf-8", newline="") as f:
            if suffix == ".jsonl":
                for lineno, line in enumerate(f, 1):
                    if not line.strip():
                        continue
                    try:
                        rec = json.loads(line)
                    except json.JSONDecodeError:
                        rec = None
                    if not isinstance(rec, dict) or any(k not in rec for k in want):
                        has = sorted(rec) if isinstance(rec, dict) else []
                        raise DataError(
                            f"{path}:{lineno}: not a JSON object with "
                            + " and ".join(repr(k) for k in want)
                            + (f" (fields: {', '.join(map(str, has))})" if has else ""),
                            hint=f'write one object a line, e.g. {{"{text_column}": "a sentence"}}',
                        )
                    rows.append([str(rec[k]) for k in want])
            elif suffix == ".csv":
                reader = csv.DictReader(f)
                found = reader.fieldnames or []
                missing = [k for k in want if k not in found]
                if missing:
                    raise DataError(
                        f"{path}: CSV has no {', '.join(repr(k) for k in missing)} column "
                        f"(columns: {', '.join(found) or 'none'})",
                        hint="name the columns with --text-column, --text-pair-column and "
                        "--labels-column",
                    )
                for row in reader:
                    if any(row.get(k) is None for k in want):
                        raise DataError(
                            f"{path}:{reader.line_num}: row has fewer fields than the header"
                        )
                    if row[text_column]:
                        rows.append([row[k] for k in want])
            else:
                if extra:
                    raise DataError(
                        f"{path}: a plain text file has no "
                        + " or ".join(repr(k) for k in extra)
                        + " column",
                        hint="use .csv or .jsonl with a column per field",
                    )
                rows = [[ln.strip()] for ln in f if ln.strip()]
    except UnicodeDecodeError as e:  # its offset is into a decoder chunk: find the line
        lineno, col, reason = first_invalid_utf8(path) or (None, e.start, e.reason)
        where = f"{path}:{lineno}" if lineno else str(path)
        raise DataError(
            f"{where}: not UTF-8 text ({reason} at byte {col + 1} of line {lineno or '?'})",
            hint="save the file as UTF-8, e.g. iconv -f latin1 -t utf-8 IN > OUT",
        ) from None
    except csv.Error as e:
        raise DataError(f"{path}: not valid CSV ({e})") from None
    if not rows:
        raise DataError(f"{path}: no examples found", hint="the file is empty")
    cols = list(zip(*rows))
    i = 1
    pairs = labels = None
    if pair_column:
        pairs, i = list(cols[i]), i + 1
    if label_column:
        labels = list(cols[i])
    return Examples(list(cols[0]), pairs, labels)


def first_invalid_utf8(path: Path) -> tuple[int, int, str] | None:
    """(1-based line, 0-based byte in that line, reason) of the first bytes of ``path`` that
    are not UTF-8, or None when it all decodes."""
    with open(path, "rb") as f:
        for lineno, raw in enumerate(f, 1):
            try:
                raw.decode("utf-8")
            except UnicodeDecodeError as e:
                return lineno, e.start, e.reason
    return None


def read_arrays(path: Path, specs: Sequence[InputSpec], batch_size: int) -> list[Batch]:
    """Read an ``.npz`` (one array per input name) or ``.npy`` (single-input models)."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"{path}: no such data file", hint="give an existing file path")
    try:
        if path.suffix == ".npy":
            if len(specs) != 1:
                raise DataError(
                    f"{path}: an .npy feeds one input, the model has {len(specs)}",
                    hint="use an .npz with one array per input name",
                )
            arrays = {specs[0].name: np.load(path, allow_pickle=False)}
        else:
            with np.load(path, allow_pickle=False) as z:
                arrays = {k: z[k] for k in z.files}
    except (ValueError, OSError) as e:
        raise DataError(f"{path}: not a readable .npz/.npy file ({e})") from None
    missing = [s.name for s in specs if s.name not in arrays]
    if missing:
        raise DataError(
            f"{path}: no array for input(s) {', '.join(missing)}",
            hint=f"the model's inputs are {', '.join(s.name for s in specs)}",
        )
    n = {len(arrays[s.name]) for s in specs}
    if len(n) != 1:
        raise DataError(f"{path}: arrays have different sample counts {sorted(n)}")
    total = n.pop()
    return [
        {s.name: np.asarray(arrays[s.name][i : i + batch_size]).astype(s.dtype) for s in specs}
        for i in range(0, total, batch_size)
    ]


def batch_rows(batch: Batch) -> int:
    """Samples in one batch: the leading dim of its first input that has one (a scalar input,
    like a voice model's ``sr``, has none; such batches hold one sample, deployopt.feeds)."""
    return next((len(a) for a in batch.values() if np.ndim(a) > 0), 1)


def count_samples(batches: Sequence[Batch]) -> int:
    return sum(batch_rows(b) for b in batches)
