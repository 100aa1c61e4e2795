"""Model-source safety and loading: every refusal is typed, names the file, and carries its exit code.

Nothing here exports a model; the HF cases fail before transformers runs.
"""

from __future__ import annotations

import builtins
import json
import os
import shutil
from pathlib import Path

import numpy as np
import pytest

from deployopt.errors import (
    EXIT_INPUT_REJECTED,
    EXIT_UNSAFE_INPUT,
    EXIT_USAGE,
    InputModelError,
    UnsafeInputError,
    UsageError,
)
from deployopt.sources import OnnxSource, TorchSource, load_source
from tests.models import tiny_onnx_model

MLP_SHAPES = {"input": (1, 16)}


def raises_exactly(cls, excinfo, *fragments: str, code: int):
    """The error is exactly ``cls`` (not a subclass), its message holds every fragment, and its
    exit code is ``code``."""
    err = excinfo.value
    assert type(err) is cls, f"expected {cls.__name__}, got {type(err).__name__}: {err}"
    msg = str(err)
    for frag in fragments:
        assert frag in msg, f"{frag!r} not in message {msg!r}"
    assert err.exit_code == code
    assert "\n" not in msg.strip(), "error messages are one line"


# ---------------------------------------------------------------- small ONNX models


def _save_external(folder: Path, location: str = "weights.bin") -> Path:
    """Save the tiny model to folder/model.onnx with both initializers in folder/<location>."""
    import onnx

    folder.mkdir(parents=True, exist_ok=True)
    path = folder / "model.onnx"
    onnx.save_model(
        tiny_onnx_model(),
        str(path),
        save_as_external_data=True,
        all_tensors_to_one_file=True,
        location=location,
        size_threshold=0,
    )
    return path


def _external_entries(model) -> list:
    from onnx.external_data_helper import _get_all_tensors, uses_external_data

    return [t for t in _get_all_tensors(model) if uses_external_data(t)]


def _set_location(model_path: Path, location: str) -> None:
    """Rewrite every external-data location in model_path and re-save without touching data."""
    import onnx

    model = onnx.load(str(model_path), load_external_data=False)
    tensors = _external_entries(model)
    assert tensors, "the model must use external data"
    for t in tensors:
        for entry in t.external_data:
            if entry.key == "location":
                entry.value = location
    onnx.save_model(model, str(model_path), save_as_external_data=False)
    # the edit must survive the re-save, or the test would check nothing
    again = onnx.load(str(model_path), load_external_data=False)
    locs = {
        e.value for t in _external_entries(again) for e in t.external_data if e.key == "location"
    }
    assert locs == {location}


@pytest.fixture
def onnx_bytes(tmp_path) -> bytes:
    import onnx

    path = tmp_path / "whole.onnx"
    onnx.save_model(tiny_onnx_model(), str(path))
    data = path.read_bytes()
    assert len(data) > 200
    return data


# ---------------------------------------------------------------- refused ONNX files


def test_valid_onnx_file_loads(tmp_path, onnx_bytes):
    path = tmp_path / "model.onnx"
    path.write_bytes(onnx_bytes)
    src = load_source(str(path))
    assert isinstance(src, OnnxSource)
    assert src.path == path
    assert len(src.content_hash) == 64


def test_empty_onnx(tmp_path):
    path = tmp_path / "model.onnx"
    path.write_bytes(b"")
    with pytest.raises(InputModelError) as ei:
        load_source(str(path))
    raises_exactly(InputModelError, ei, str(path), "empty", code=EXIT_INPUT_REJECTED)


def test_truncated_onnx(tmp_path, onnx_bytes):
    path = tmp_path / "model.onnx"
    path.write_bytes(onnx_bytes[: len(onnx_bytes) // 2])
    with pytest.raises(InputModelError) as ei:
        load_source(str(path))
    raises_exactly(InputModelError, ei, str(path), "truncated", code=EXIT_INPUT_REJECTED)


def test_git_lfs_pointer(tmp_path):
    path = tmp_path / "model.onnx"
    path.write_text(
        "version https://git-lfs.github.com/spec/v1\n"
        "oid sha256:4d7a214614ab2935c943f9e0ff69d22eadbb8f32b1258daaa5e2ca24d17e2393\n"
        "size 90387606\n"
    )
    with pytest.raises(InputModelError) as ei:
        load_source(str(path))
    raises_exactly(InputModelError, ei, str(path), "Git LFS pointer", code=EXIT_INPUT_REJECTED)
    assert "git lfs pull" in str(ei.value)


@pytest.mark.parametrize(
    "page",
    [
        "<!DOCTYPE html>\n<html><head><title>404 Not Found</title></head><body></body></html>\n",
        "\n  <html><body>Access denied</body></html>",
    ],
)
def test_html_page(tmp_path, page):
    path = tmp_path / "model.onnx"
    path.write_text(page)
    with pytest.raises(InputModelError) as ei:
        load_source(str(path))
    raises_exactly(InputModelError, ei, str(path), "HTML page", code=EXIT_INPUT_REJECTED)


def test_random_bytes(tmp_path):
    path = tmp_path / "model.onnx"
    path.write_bytes(np.random.default_rng(1234).bytes(4096))
    with pytest.raises(InputModelError) as ei:
        load_source(str(path))
    raises_exactly(InputModelError, ei, str(path), code=EXIT_INPUT_REJECTED)
    assert "not a valid ONNX file" in str(ei.value) or "holds no graph" in str(ei.value)


def test_zip_archive_saved_as_onnx(tmp_path):
    import torch

    path = tmp_path / "model.onnx"
    torch.save({"w": torch.zeros(2)}, path)  # a torch zip checkpoint under an .onnx name
    with pytest.raises(InputModelError) as ei:
        load_source(str(path))
    raises_exactly(InputModelError, ei, str(path), "zip archive", code=EXIT_INPUT_REJECTED)


def test_path_that_does_not_exist(tmp_path):
    path = tmp_path / "nowhere" / "model.onnx"
    with pytest.raises(InputModelError) as ei:
        load_source(str(path))
    raises_exactly(
        InputModelError, ei, str(path), "no such file or folder", code=EXIT_INPUT_REJECTED
    )


def test_folder_without_config(tmp_path):
    folder = tmp_path / "not-a-model"
    folder.mkdir()
    (folder / "README.md").write_text("nothing here\n")
    with pytest.raises(InputModelError) as ei:
        load_source(str(folder))
    raises_exactly(InputModelError, ei, str(folder), "no config.json", code=EXIT_INPUT_REJECTED)


# ---------------------------------------------------------------- ONNX external data


def test_external_data_model_loads(tmp_path):
    path = _save_external(tmp_path / "m")
    import onnx

    assert len(_external_entries(onnx.load(str(path), load_external_data=False))) == 2
    src = load_source(str(path))
    assert isinstance(src, OnnxSource)
    assert src.path == path
    # the hash covers the external data: changing a byte of it changes the hash
    data = tmp_path / "m" / "weights.bin"
    raw = bytearray(data.read_bytes())
    raw[0] ^= 0xFF
    data.write_bytes(bytes(raw))
    assert load_source(str(path)).content_hash != src.content_hash


def test_external_data_dotdot(tmp_path):
    path = _save_external(tmp_path / "m")
    shutil.move(tmp_path / "m" / "weights.bin", tmp_path / "weights.bin")  # the file exists there
    _set_location(path, "../weights.bin")
    with pytest.raises(UnsafeInputError) as ei:
        load_source(str(path))
    raises_exactly(
        UnsafeInputError, ei, str(path), "../weights.bin", "outside", code=EXIT_UNSAFE_INPUT
    )


def test_external_data_absolute(tmp_path):
    path = _save_external(tmp_path / "m")
    absolute = str((tmp_path / "m" / "weights.bin").resolve())  # even inside the folder
    _set_location(path, absolute)
    with pytest.raises(UnsafeInputError) as ei:
        load_source(str(path))
    raises_exactly(UnsafeInputError, ei, str(path), "absolute", absolute, code=EXIT_UNSAFE_INPUT)


def test_external_data_symlink(tmp_path):
    folder = tmp_path / "m"
    path = _save_external(folder)
    (folder / "link.bin").symlink_to("weights.bin")  # a link to a file in the same folder
    _set_location(path, "link.bin")
    with pytest.raises(UnsafeInputError) as ei:
        load_source(str(path))
    raises_exactly(
        UnsafeInputError, ei, str(path), "link.bin", "symbolic link", code=EXIT_UNSAFE_INPUT
    )


def test_external_data_through_symlinked_folder(tmp_path):
    folder = tmp_path / "m"
    path = _save_external(folder)
    (tmp_path / "outside").mkdir()
    shutil.move(folder / "weights.bin", tmp_path / "outside" / "weights.bin")
    (folder / "sub").symlink_to(
        tmp_path / "outside"
    )  # the file itself is regular, its folder a link
    _set_location(path, "sub/weights.bin")
    with pytest.raises(UnsafeInputError) as ei:
        load_source(str(path))
    raises_exactly(
        UnsafeInputError, ei, str(path), "sub/weights.bin", "outside", code=EXIT_UNSAFE_INPUT
    )


def test_external_data_hardlink(tmp_path):
    folder = tmp_path / "m"
    path = _save_external(folder)
    os.link(folder / "weights.bin", tmp_path / "elsewhere.bin")
    with pytest.raises(UnsafeInputError) as ei:
        load_source(str(path))
    raises_exactly(
        UnsafeInputError, ei, str(path), "weights.bin", "hard link", code=EXIT_UNSAFE_INPUT
    )


def test_external_data_missing(tmp_path):
    folder = tmp_path / "m"
    path = _save_external(folder)
    (folder / "weights.bin").unlink()
    with pytest.raises(InputModelError) as ei:
        load_source(str(path))
    raises_exactly(
        InputModelError, ei, str(path), "weights.bin", "missing", code=EXIT_INPUT_REJECTED
    )


def test_external_data_truncated(tmp_path):
    folder = tmp_path / "m"
    path = _save_external(folder)
    data = folder / "weights.bin"
    full = data.read_bytes()
    data.write_bytes(full[: len(full) - 8])  # the last tensor's offset+length is past the end
    with pytest.raises(InputModelError) as ei:
        load_source(str(path))
    raises_exactly(
        InputModelError, ei, str(path), "weights.bin", "truncated", code=EXIT_INPUT_REJECTED
    )


def test_external_data_truncated_without_length_field(tmp_path):
    import onnx

    folder = tmp_path / "m"
    path = _save_external(folder)
    model = onnx.load(str(path), load_external_data=False)
    for t in _external_entries(model):  # 'length' is optional in the ONNX spec
        keep = [(e.key, e.value) for e in t.external_data if e.key != "length"]
        del t.external_data[:]
        for k, v in keep:
            entry = t.external_data.add()
            entry.key, entry.value = k, v
    onnx.save_model(model, str(path), save_as_external_data=False)
    again = onnx.load(str(path), load_external_data=False)
    assert all(e.key != "length" for t in _external_entries(again) for e in t.external_data)
    data = folder / "weights.bin"
    full = data.read_bytes()
    data.write_bytes(full[: len(full) - 8])  # bias B (16 bytes at offset 256) loses half
    with pytest.raises(InputModelError) as ei:
        load_source(str(path))
    raises_exactly(
        InputModelError, ei, str(path), "weights.bin", "truncated", code=EXIT_INPUT_REJECTED
    )


# ---------------------------------------------------------------- pickles and weights


class _WritesMarker:
    """Unpickling this calls builtins.open(marker, "w"): creating the file proves code ran."""

    def __init__(self, marker: Path):
        self.marker = str(marker)

    def __reduce__(self):
        return (builtins.open, (self.marker, "w"))


def _evil_pickle(path: Path, marker: Path, keys=("0.weight",)) -> Path:
    import torch

    torch.save({k: _WritesMarker(marker) for k in keys}, path)
    return path


def test_malicious_pickle_payload_is_live(tmp_path):
    """Control: the payload really runs under a plain unpickler, so the refusal tests mean something."""
    import torch

    marker = tmp_path / "CONTROL_MARKER"
    path = _evil_pickle(tmp_path / "evil.pt", marker)
    f = torch.load(path, map_location="cpu", weights_only=False)
    for v in f.values():
        v.close()
    assert marker.exists()


def test_malicious_pickle_weights_refused(tmp_path):
    marker = tmp_path / "MARKER"
    path = _evil_pickle(tmp_path / "evil.pt", marker)
    with pytest.raises(UnsafeInputError) as ei:
        load_source("tests.models:mlp", input_shapes=MLP_SHAPES, weights=path)
    raises_exactly(UnsafeInputError, ei, str(path), "would run code", code=EXIT_UNSAFE_INPUT)
    assert not marker.exists()


def _other_state():
    """A state dict for tests.models.mlp with values unlike the factory's seeded ones."""
    import torch

    from tests.models import mlp

    g = torch.Generator().manual_seed(7)
    return {k: torch.randn(v.shape, generator=g) for k, v in mlp().state_dict().items()}


def _assert_weights_applied(src, state):
    import torch

    assert isinstance(src, TorchSource)
    got = src.module.state_dict()  # the module is wrapped: keys gain a "model." prefix
    assert set(got) == {f"model.{k}" for k in state}
    for k, v in state.items():
        assert torch.equal(got[f"model.{k}"], v), k


def test_safetensors_weights_load(tmp_path):
    from safetensors.torch import save_file

    state = _other_state()
    path = tmp_path / "w.safetensors"
    save_file(state, str(path))
    src = load_source("tests.models:mlp", input_shapes=MLP_SHAPES, weights=path)
    _assert_weights_applied(src, state)
    assert src.input_names == ["input"]


def test_tensors_only_torch_pickle_loads(tmp_path):
    import torch

    state = _other_state()
    path = tmp_path / "w.pt"
    torch.save(state, path)
    src = load_source("tests.models:mlp", input_shapes=MLP_SHAPES, weights=path)
    _assert_weights_applied(src, state)
    # and the weights changed the content hash relative to the factory's own weights
    assert src.content_hash != load_source("tests.models:mlp", input_shapes=MLP_SHAPES).content_hash


def test_weights_that_do_not_fit(tmp_path):
    import torch

    path = tmp_path / "w.pt"
    torch.save({"0.weight": torch.zeros(3, 3)}, path)
    with pytest.raises(InputModelError) as ei:
        load_source("tests.models:mlp", input_shapes=MLP_SHAPES, weights=path)
    raises_exactly(InputModelError, ei, str(path), "do not fit", code=EXIT_INPUT_REJECTED)


LFS_POINTER = (
    "version https://git-lfs.github.com/spec/v1\n"
    "oid sha256:4d7a214614ab2935c943f9e0ff69d22eadbb8f32b1258daaa5e2ca24d17e2393\n"
    "size 90387606\n"
)


def test_lfs_pointer_weights_are_unreadable_not_unsafe(tmp_path):
    path = tmp_path / "w.pt"
    path.write_text(LFS_POINTER)
    with pytest.raises(InputModelError) as ei:
        load_source("tests.models:mlp", input_shapes=MLP_SHAPES, weights=path)
    raises_exactly(InputModelError, ei, str(path), code=EXIT_INPUT_REJECTED)


def test_unreadable_safetensors_weights(tmp_path):
    path = tmp_path / "w.safetensors"
    path.write_text(LFS_POINTER)
    with pytest.raises(InputModelError) as ei:
        load_source("tests.models:mlp", input_shapes=MLP_SHAPES, weights=path)
    raises_exactly(
        InputModelError, ei, str(path), "not a readable safetensors file", code=EXIT_INPUT_REJECTED
    )


def test_missing_weights_file(tmp_path):
    path = tmp_path / "absent.safetensors"
    with pytest.raises(InputModelError) as ei:
        load_source("tests.models:mlp", input_shapes=MLP_SHAPES, weights=path)
    raises_exactly(InputModelError, ei, str(path), "no such weights file", code=EXIT_INPUT_REJECTED)


# ---------------------------------------------------------------- Hugging Face folders


@pytest.fixture
def bert_copy(tiny_bert_dir, tmp_path) -> Path:
    folder = tmp_path / "bert"
    shutil.copytree(tiny_bert_dir, folder)
    assert (folder / "config.json").is_file() and (folder / "model.safetensors").is_file()
    return folder


def test_hf_auto_map_refused(bert_copy):
    cfg = json.loads((bert_copy / "config.json").read_text())
    cfg["auto_map"] = {"AutoModel": "modeling_evil.EvilModel"}
    (bert_copy / "config.json").write_text(json.dumps(cfg))
    (bert_copy / "modeling_evil.py").write_text("raise SystemExit('remote code ran')\n")
    with pytest.raises(UnsafeInputError) as ei:
        load_source(str(bert_copy))
    raises_exactly(UnsafeInputError, ei, str(bert_copy), "auto_map", code=EXIT_UNSAFE_INPUT)
    assert "--trust-remote-code" in ei.value.hint


def test_hf_malicious_pytorch_bin_refused(bert_copy):
    (bert_copy / "model.safetensors").unlink()
    marker = bert_copy.parent / "MARKER"
    _evil_pickle(
        bert_copy / "pytorch_model.bin", marker, keys=("embeddings.word_embeddings.weight",)
    )
    with pytest.raises(UnsafeInputError) as ei:
        load_source(str(bert_copy))
    raises_exactly(
        UnsafeInputError,
        ei,
        str(bert_copy / "pytorch_model.bin"),
        "would run code",
        code=EXIT_UNSAFE_INPUT,
    )
    assert not marker.exists()


def test_hf_no_weights(bert_copy):
    (bert_copy / "model.safetensors").unlink()
    with pytest.raises(InputModelError) as ei:
        load_source(str(bert_copy))
    raises_exactly(InputModelError, ei, str(bert_copy), "no weights", code=EXIT_INPUT_REJECTED)


def test_hf_lfs_pointer_safetensors(bert_copy):
    (bert_copy / "model.safetensors").write_text(LFS_POINTER)
    with pytest.raises(InputModelError) as ei:
        load_source(str(bert_copy))
    raises_exactly(InputModelError, ei, str(bert_copy), code=EXIT_INPUT_REJECTED)


def test_hf_config_not_json(bert_copy):
    (bert_copy / "config.json").write_text("{'model_type': 'bert',  <- not JSON\n")
    with pytest.raises(InputModelError) as ei:
        load_source(str(bert_copy))
    raises_exactly(
        InputModelError,
        ei,
        str(bert_copy / "config.json"),
        "not a readable JSON",
        code=EXIT_INPUT_REJECTED,
    )


# ---------------------------------------------------------------- factories and modules


def test_factory_cannot_be_imported():
    with pytest.raises(InputModelError) as ei:
        load_source("tests.nosuch:thing", input_shapes=MLP_SHAPES)
    raises_exactly(
        InputModelError, ei, "tests.nosuch:thing", "cannot import", code=EXIT_INPUT_REJECTED
    )


def test_factory_attribute_missing():
    with pytest.raises(InputModelError) as ei:
        load_source("tests.models:no_such_factory", input_shapes=MLP_SHAPES)
    raises_exactly(
        InputModelError,
        ei,
        "tests.models:no_such_factory",
        "cannot import",
        code=EXIT_INPUT_REJECTED,
    )


def test_factory_not_callable():
    with pytest.raises(InputModelError) as ei:
        load_source("tests.models:WORDS", input_shapes=MLP_SHAPES)
    raises_exactly(InputModelError, ei, "tests.models:WORDS", code=EXIT_INPUT_REJECTED)


def test_factory_returning_non_module():
    with pytest.raises(InputModelError) as ei:
        load_source("tests.models:not_a_module", input_shapes=MLP_SHAPES)
    raises_exactly(
        InputModelError,
        ei,
        "tests.models:not_a_module",
        "int",
        "not a Module",
        code=EXIT_INPUT_REJECTED,
    )


def test_factory_without_input_shapes():
    with pytest.raises(UsageError) as ei:
        load_source("tests.models:mlp")
    raises_exactly(UsageError, ei, "tests.models:mlp", "input shapes", code=EXIT_USAGE)
    assert "--input-shape" in ei.value.hint


def test_module_object_without_input_shapes():
    from tests.models import mlp

    with pytest.raises(UsageError) as ei:
        load_source(mlp())
    raises_exactly(UsageError, ei, "module", "input shapes", code=EXIT_USAGE)


def test_factory_with_shapes_loads():
    src = load_source("tests.models:mlp", input_shapes=MLP_SHAPES)
    assert isinstance(src, TorchSource)
    assert src.input_names == ["input"] and src.output_names == ["output"]
    assert src.meta.classifier_outputs == ("output",)
