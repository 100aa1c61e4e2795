"""Recipes: options declared once (every field a flag, every flag a field), flags <-> recipe
round trips for every command, and a recipe's bad input as one-line errors before any work."""

from __future__ import annotations

import tomllib

import pytest
import typer

from deployopt import cli
from deployopt import recipe as rc
from deployopt.config import OptimizeConfig
from deployopt.flags import flag_of
from deployopt.options import (
    BenchOptions,
    DistillOptions,
    GateOptions,
    PruneOptions,
    SourceOptions,
)
from deployopt.pipeline import plan

# command -> [(section, model, fields it leaves to a positional argument or does not take, and
# the flag a field gets instead of its own)], and the command's own parameters
COMMANDS = {
    "optimize": ([("source", SourceOptions, {"path"}, {}), ("optimize", OptimizeConfig, set(), {})],
                 {"source", "force"}),
    "distill": ([("source", SourceOptions, {"weights"}, {"path": "--teacher"}),
                 ("distill", DistillOptions, set(), {})], set()),
    "prune": ([("source", SourceOptions, {"path"}, {}), ("prune", PruneOptions, set(), {})],
              {"model"}),
    "bench": ([("bench", BenchOptions, set(), {})], {"models"}),
    "gate": ([("gate", GateOptions, set(), {})], {"model"}),
}  # fmt: skip
COMMON = {"out", "print_recipe", "sets"}


def _click(name: str):
    group = typer.main.get_command(cli.app)
    return group.commands[name]


@pytest.mark.parametrize("name", sorted(COMMANDS))
def test_every_field_has_a_flag_and_every_flag_a_field(name):
    sections, own = COMMANDS[name]
    params = {p.name: p for p in _click(name).params}
    expected = {}
    for _, model, skip, rename in sections:
        for field_name, f in model.model_fields.items():
            if field_name in skip:
                continue
            expected[field_name] = rename.get(field_name) or flag_of(field_name, f)
    for field_name, decl in expected.items():
        assert field_name in params, f"{name}: field {field_name} has no flag"
        p = params[field_name]
        assert decl.split("/")[0] in p.opts, (name, field_name, p.opts)
        help_text = p.help or ""
        assert help_text.strip(), f"{name} {decl}: no help"
    extra = set(params) - set(expected) - COMMON - own
    assert not extra, f"{name}: flags without a field: {extra}"


def test_a_default_is_declared_once_and_shown_in_help():
    # the measurement defaults come from one constant each
    assert (
        OptimizeConfig().bench_min_samples
        == BenchOptions().min_samples
        == GateOptions().min_samples
    )
    assert OptimizeConfig().bench_rounds == BenchOptions().rounds == GateOptions().rounds
    p = {p.name: p for p in _click("optimize").params}
    assert "[default: 0.99]" in p["min_cosine"].help and ">= -1" in p["min_cosine"].help


def _print_recipe(capsys, *argv):
    with pytest.raises(SystemExit) as e:
        cli.main([*argv, "--print-recipe"])
    out = capsys.readouterr()
    assert e.value.code == 0, out.err
    return out.out


ROUND_TRIPS = {
    "optimize": ["optimize", "tests.models:cnn", "--input-shape", "x=1x3x32x32",
                 "--variants", "fuse,int8-dynamic", "--batch", "1,4", "--calibration", "{calib}",
                 "--per-tensor", "--min-cosine", "0.98", "--target", "cpu-1t", "--no-tune-session",
                 "--search", "quick", "--prefer", "smallest", "--image-mean", "0.5,0.5,0.5"],
    "distill": ["distill", "--teacher", "minilm", "--data", "{calib}", "--student-layers", "0,2",
                "--epochs", "2", "--loss", "cosine,hidden:0.5", "--student-size", "heads=4",
                "--no-windows", "--freeze-embeddings", "--lr", "1e-4"],
    "prune": ["prune", "minilm", "--heads", "0.25", "--ffn", "0.5", "--data", "{calib}",
              "--recover-epochs", "1", "--drop-layers", "1,3", "--no-kd", "--scope", "global"],
    "bench": ["bench", "{model}", "{model2}", "--batch", "1,8", "--shape", "x=2x3",
              "--min-samples", "5", "--include-copies", "--no-history", "--json", "b.json"],
    "gate": ["gate", "{model}", "--p50-ms", "12", "--max-size-mb", "3", "--max-slowdown", "7%",
             "--baseline", "last-pass", "--junit", "g.xml", "--target", "cpu-1t"],
}  # fmt: skip


@pytest.mark.parametrize("name", sorted(ROUND_TRIPS))
def test_flags_and_the_printed_recipe_make_the_same_run(name, tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "calib.txt").write_text("one line\nanother line\n")
    for m in ("model.onnx", "model2.onnx"):
        (tmp_path / m).write_bytes(b"not read before the run")
    fill = {"calib": "calib.txt", "model": "model.onnx", "model2": "model2.onnx"}
    argv = [a.format(**fill) for a in ROUND_TRIPS[name]]
    compiled = []
    real = cli._printed
    monkeypatch.setattr(cli, "_printed", lambda r, p: compiled.append(r) or real(r, p))
    text = _print_recipe(capsys, *argv)
    (flags_recipe,) = compiled
    (tmp_path / "sub").mkdir()
    path = tmp_path / "sub" / "recipe.toml"  # another folder: paths must not move
    path.write_text(text)
    from_file = rc.load(path)
    # the recipe the flags compiled to and the printed file are one run: same options, ids
    assert from_file == flags_recipe
    assert from_file.stages() == [name]
    assert plan(from_file) == plan(flags_recipe)
    # every flag given shows up in the file with the flag's own name
    body = tomllib.loads(text)[name]
    for a in argv:
        if a.startswith("--") and a not in ("--teacher", "--input-shape"):
            key = a[2:].replace("-", "_")
            key = key[3:] if key.startswith("no_") and key not in body else key
            assert key in body or key in ("per_tensor", "train_embeddings"), (key, body)


def test_printed_values_are_the_flags_values(capsys, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    text = _print_recipe(capsys, "optimize", "minilm", "--batch", "1,8", "--per-tensor",
                         "--variants", "fuse,fp16", "--max-size-mb", "30")  # fmt: skip
    doc = tomllib.loads(text)
    assert doc["source"] == {"path": "minilm"}
    assert doc["optimize"] == {"batch": [1, 8], "per_channel": False,
                               "variants": ["fuse", "fp16"], "max_size_mb": 30.0}  # fmt: skip


def test_set_overrides_a_flag_and_a_recipe(capsys, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    text = _print_recipe(capsys, "optimize", "minilm", "--min-cosine", "0.98",
                         "--set", "optimize.min_cosine=0.95", "--set", "optimize.batch=[1, 2]")  # fmt: skip
    doc = tomllib.loads(text)
    assert doc["optimize"]["min_cosine"] == 0.95 and doc["optimize"]["batch"] == [1, 2]


def test_presets_merge_under_the_recipe(tmp_path):
    p = tmp_path / "r.toml"
    p.write_text('preset = "edge-1t"\n[source]\npath = "minilm"\n[optimize]\nmax_size_mb = 25\n')
    r = rc.load(p)
    assert r.target == "cpu-1t" and r.optimize.max_size_mb == 25.0
    assert r.optimize.variants == tuple(rc.PRESETS["edge-1t"]["optimize"]["variants"])
    assert not r.optimize.tune_session
    for name in rc.PRESETS:  # every preset is a valid recipe with a source
        rc.from_dict({"preset": name, "source": {"path": "minilm"}})
    smallest = rc.from_dict({"preset": "smallest", "source": {"path": "minilm"}})
    assert smallest.optimize.prefer == "smallest"


def test_presets_command_lists_every_preset(capsys):
    with pytest.raises(SystemExit) as e:
        cli.main(["presets"])
    out = capsys.readouterr().out
    assert e.value.code == 0
    for name in rc.PRESETS:
        assert name in out
    assert 'prefer = "smallest"' in out


BAD = [
    ("[source]\npath = 'minilm'\n[optimize]\nmin_cosin = 0.9\n",
     "[optimize] unknown key 'min_cosin'", "did you mean 'min_cosine'?"),
    ("[source]\npath = 'minilm'\n[optimize]\nmin_cosine = 'high'\n",
     "[optimize] min_cosine: Input should be a valid number", "'high'"),
    ("[source]\npath = 'minilm'\n[optimize]\nmin_cosine = 3\n",
     "[optimize] min_cosine: Input should be less than or equal to 1", "(got 3)"),
    ("[source]\npath = 'minilm'\n[optimize]\ncalibration = 'missing.txt'\n",
     "[optimize] calibration = ", "missing.txt': no such file"),
    ("[source]\npath = 'minilm'\n[prune]\nheads = 0.3\nrecover_epochs = 1\n",
     "[prune] recover_epochs needs data", ""),
    ("preset = 'gpu-magic'\n[source]\npath = 'minilm'\n[optimize]\n",
     "unknown preset 'gpu-magic'", "cpu-int8"),
    ("[source\npath = 'minilm'\n", "not valid TOML", ""),
    ("[source]\npath = 'minilm'\n", "nothing to do", ""),
    ("[source]\npath = 'minilm'\n[optimise]\n", "unknown key 'optimise'", "did you mean 'optimize'?"),
    ("[source]\npath = 'minilm'\n[gate]\np50_ms = 5\n", "[gate] measures an ONNX model", ""),
    ("[source]\npath = 'm.onnx'\n[distill]\ndata = 'x'\n", "[distill] needs a PyTorch model", ""),
]  # fmt: skip


@pytest.mark.parametrize("text,message,detail", BAD)
def test_bad_recipe_is_one_line_naming_the_file_exit_2(text, message, detail, tmp_path, capsys):
    p = tmp_path / "recipe.toml"
    p.write_text(text)
    (tmp_path / "m.onnx").write_bytes(b"")
    with pytest.raises(SystemExit) as e:
        cli.main(["run", str(p), "-o", str(tmp_path / "out")])
    err = " ".join(capsys.readouterr().err.split())
    assert e.value.code == 2, err
    assert f"error: {p}: " in err and message in err and detail in err, err
    assert "Traceback" not in err
    assert not (tmp_path / "out").exists()  # refused before any work


def test_set_on_a_key_that_does_not_exist(tmp_path, capsys):
    p = tmp_path / "recipe.toml"
    p.write_text("[source]\npath = 'minilm'\n[optimize]\n")
    for bad, said in (("optimize.min_cosin=0.9", "did you mean 'min_cosine'?"),
                      ("nothing.key=1", "unknown key"), ("optimize", "write --set table.key")):  # fmt: skip
        with pytest.raises(SystemExit) as e:
            cli.main(["run", str(p), "-o", str(tmp_path / "out"), "--set", bad])
        err = " ".join(capsys.readouterr().err.split())
        assert e.value.code == 2 and said in err, err


def test_relative_paths_are_read_against_the_recipe_folder(tmp_path, monkeypatch):
    (tmp_path / "data").mkdir()
    (tmp_path / "data" / "c.txt").write_text("a\n")
    p = tmp_path / "recipe.toml"
    p.write_text("[source]\npath = 'minilm'\n[optimize]\ncalibration = 'data/c.txt'\n"
                 "[gate]\np50_ms = 1\njunit = 'gate.xml'\n")  # fmt: skip
    monkeypatch.chdir("/")
    r = rc.load(p)
    assert r.optimize.calibration == tmp_path / "data" / "c.txt"
    assert str(r.gate.junit) == "gate.xml"  # outputs: under the run's folder, not the recipe's
    assert r.source.path == "minilm"  # a bundled name stays a name
