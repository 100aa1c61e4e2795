"""Variant ids, atomic writes, config validation: pure, no runtime."""

import os

import pytest

from deployopt.config import make_config
from deployopt.errors import ConfigError
from deployopt.variant import Variant, variant_id
from deployopt.workspace import atomic_dir, atomic_path, clean_stale_temps, write_json


def test_variant_id_is_content_addressed():
    a = variant_id("p", "fuse", 1, {"x": 1, "y": [1, 2]})
    assert a == variant_id("p", "fuse", 1, {"y": [1, 2], "x": 1})  # key order does not matter
    assert a != variant_id("p", "fuse", 2, {"x": 1, "y": [1, 2]})  # stage version does
    assert a != variant_id("q", "fuse", 1, {"x": 1, "y": [1, 2]})  # parent does
    assert a != variant_id("p", "fuse", 1, {"x": 2, "y": [1, 2]})  # params do
    assert len(a) == 16


def test_variant_json_round_trip(tmp_path):
    v = Variant(
        id="abc",
        name="fuse",
        stage="fuse",
        parent="p",
        params={"a": 1},
        path=tmp_path / "model.onnx",
        sha256="00",
        metrics={"size_bytes": 3},
        warnings=("w",),
    )
    back = Variant.from_json(v.to_json(relative_to=tmp_path), base=tmp_path)
    assert back == v


def test_atomic_path_leaves_nothing_on_failure(tmp_path):
    final = tmp_path / "f.json"
    with pytest.raises(RuntimeError):
        with atomic_path(final) as tmp:
            tmp.write_text("half")
            raise RuntimeError("killed")
    assert not final.exists()
    assert os.listdir(tmp_path) == []


def test_atomic_dir_replaces_whole_folder_only_on_success(tmp_path):
    final = tmp_path / "v"
    with atomic_dir(final) as d:
        (d / "model.onnx").write_text("one")
    assert (final / "model.onnx").read_text() == "one"
    with pytest.raises(KeyboardInterrupt):
        with atomic_dir(final) as d:
            (d / "model.onnx").write_text("two, half-written")
            raise KeyboardInterrupt
    assert (final / "model.onnx").read_text() == "one"
    assert sorted(os.listdir(tmp_path)) == ["v"]


def test_clean_stale_temps(tmp_path):
    (tmp_path / ".tmp-x.123").mkdir()
    (tmp_path / ".tmp-y.json.1").write_text("")
    write_json(tmp_path / "keep.json", {"a": 1})
    clean_stale_temps(tmp_path)
    assert os.listdir(tmp_path) == ["keep.json"]


@pytest.mark.parametrize(
    "kwargs, fragment",
    [
        ({"variants": ("fuse", "int4")}, "unknown variant(s) int4"),
        ({"opset": 9}, "opset"),
        ({"pooling": "max"}, "pooling must be mean, cls or none"),
        ({"calibration_samples": 0}, "calibration_samples"),
        ({"bogus": 1}, "bogus"),
    ],
)
def test_config_errors_are_one_line_config_errors(kwargs, fragment):
    with pytest.raises(ConfigError) as e:
        make_config(**kwargs)
    assert fragment in str(e.value)
    assert "\n" not in str(e.value)
    assert e.value.exit_code == 2


def test_importing_package_loads_no_heavy_runtime():
    import subprocess
    import sys

    code = (
        "import sys, deployopt, deployopt.cli; "
        "print(any(m in sys.modules for m in ('torch', 'onnxruntime')))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"


def test_written_files_and_folders_get_normal_permissions(tmp_path):
    """Temporary files are 0600 and folders 0700; what is renamed into place is not."""
    import os

    from deployopt.workspace import atomic_dir, write_json

    old = os.umask(0o022)
    try:
        write_json(tmp_path / "a.json", {"x": 1})
        with atomic_dir(tmp_path / "folder") as d:
            (d / "inner").mkdir()
            (d / "inner" / "f.txt").write_text("x")
    finally:
        os.umask(old)
    assert (tmp_path / "a.json").stat().st_mode & 0o777 == 0o644
    assert (tmp_path / "folder").stat().st_mode & 0o777 == 0o755
    assert (tmp_path / "folder" / "inner").stat().st_mode & 0o777 == 0o755
    assert (tmp_path / "folder" / "inner" / "f.txt").stat().st_mode & 0o777 == 0o644
    os.umask(0o077)
    try:
        write_json(tmp_path / "b.json", {"x": 1})
    finally:
        os.umask(old)
    assert (tmp_path / "b.json").stat().st_mode & 0o777 == 0o600  # the umask is respected
