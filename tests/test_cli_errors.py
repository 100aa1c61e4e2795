"""CLI error paths: `python -m deployopt ...` exits with the documented code, prints a one-line
``error:`` (never a traceback), and leaves no half-written model behind.

Every case fails before export, so each run costs only the interpreter start and imports.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.models import flat, run_cli

LFS_POINTER = (
    "version https://git-lfs.github.com/spec/v1\n"
    "oid sha256:4d7a214614ab2935c943f9e0ff69d22eadbb8f32b1258daaa5e2ca24d17e2393\n"
    "size 90387606\n"
)


@pytest.fixture
def files(tmp_path) -> dict[str, Path]:
    """Bad inputs the rows refer to as {name}; {out} is a fresh output folder."""
    import builtins

    import torch

    empty = tmp_path / "empty.onnx"
    empty.write_bytes(b"")
    lfs = tmp_path / "lfs" / "model.onnx"
    lfs.parent.mkdir()
    lfs.write_text(LFS_POINTER)

    class Evil:
        def __reduce__(self):
            return (builtins.open, (str(tmp_path / "MARKER"), "w"))

    evil = tmp_path / "evil.pt"
    torch.save({"0.weight": Evil()}, evil)
    return {
        "tmp": tmp_path,
        "out": tmp_path / "out",
        "empty": empty,
        "lfs": lfs,
        "evil": evil,
        "missing": tmp_path / "nowhere" / "model.onnx",
    }


MLP = ("tests.models:mlp", "--input-shape", "input=1x16")

ROWS = [
    pytest.param(
        ("optimize", *MLP, "--variants", "nope", "-o", "{out}"),
        2,
        "unknown variant(s) nope",
        id="unknown-variant",
    ),
    pytest.param(
        ("optimize", *MLP, "--variants", "fuse,nope", "-o", "{out}"),
        2,
        "unknown variant(s) nope",
        id="unknown-variant-in-list",
    ),
    pytest.param(
        ("optimize", "{missing}", "-o", "{out}"),
        5,
        "{missing}: no such file or folder",
        id="missing-source",
    ),
    pytest.param(
        ("optimize", "{empty}", "-o", "{out}"), 5, "{empty}: the file is empty", id="empty-onnx"
    ),
    pytest.param(
        ("optimize", "{lfs}", "-o", "{out}"), 5, "{lfs}: a Git LFS pointer", id="lfs-pointer-onnx"
    ),
    pytest.param(
        ("optimize", "tests.models:mlp", "--input-shape", "x=abc", "-o", "{out}"),
        2,
        "--input-shape: bad shape 'x=abc'",
        id="bad-input-shape",
    ),
    pytest.param(
        ("optimize", "tests.models:mlp", "-o", "{out}"),
        2,
        "tests.models:mlp: a PyTorch module needs its input shapes",
        id="factory-without-shapes",
    ),
    pytest.param(
        ("optimize", "tests.nosuch:thing", "--input-shape", "x=1x4", "-o", "{out}"),
        5,
        "tests.nosuch:thing: cannot import the factory",
        id="factory-not-importable",
    ),
    pytest.param(
        ("optimize", *MLP, "--weights", "{evil}", "-o", "{out}"),
        7,
        "{evil}: refused: this pickle would run code",
        id="malicious-weights",
    ),
    pytest.param(("optimize", *MLP, "--opset", "5", "-o", "{out}"), 2, "opset", id="opset-too-low"),
    pytest.param(
        ("optimize", *MLP, "--target", "cuda", "-o", "{out}"),
        4,
        "execution provider 'cuda' (CUDAExecutionProvider) is not available",
        id="target-ep-missing-fails-before-building",
    ),
    pytest.param(
        ("optimize", *MLP, "--search", "fast", "-o", "{out}"),
        2,
        "search: must be quick, default or exhaustive, not 'fast'",
        id="unknown-search-effort",
    ),
    pytest.param(
        ("optimize", *MLP, "--min-min-cosine", "1.5", "-o", "{out}"),
        2,
        "--min-min-cosine: Input should be less than or equal to 1",
        id="min-min-cosine-out-of-range",
    ),
    pytest.param(
        ("optimize", *MLP, "--calibration-methods", "kl", "-o", "{out}"),
        2,
        "calibration methods must be minmax, entropy or percentile",
        id="bad-method",
    ),
    pytest.param(
        ("optimize", *MLP, "--eval", "{missing}", "-o", "{out}"),
        2,
        "--eval '{missing}': no such file",
        id="missing-eval-data",
    ),
    pytest.param(
        ("optimize", *MLP, "--bogus", "-o", "{out}"),
        2,
        "No such option: --bogus",
        id="unknown-option",
    ),
    pytest.param(("optimize", *MLP), 2, "missing option --out / -o", id="missing-out"),
]


@pytest.mark.parametrize(("argv", "code", "fragment"), ROWS)
def test_cli_error(files, argv, code, fragment):
    argv = tuple(a.format(**files) for a in argv)
    fragment = fragment.format(**files)
    r = run_cli(*argv)
    err = flat(r.stderr)
    assert "Traceback" not in r.stderr and "Traceback" not in r.stdout, r.stderr
    assert r.returncode == code, f"exit {r.returncode}, stderr: {r.stderr}"
    assert "error:" in err.lower(), r.stderr
    assert flat(fragment) in err, r.stderr
    assert "internal error" not in err
    out = files["out"]
    if out.exists():
        assert not list(out.rglob("model.onnx")), "a failed run left a model behind"
    assert not (files["tmp"] / "MARKER").exists(), "a pickle payload ran"


def test_failed_run_into_existing_outdir_writes_no_model(files):
    out = files["out"]
    out.mkdir()
    (out / "keep.txt").write_text("user file\n")
    r = run_cli("optimize", str(files["empty"]), "-o", str(out))
    assert r.returncode == 5, r.stderr
    assert "Traceback" not in r.stderr
    assert not list(out.rglob("model.onnx"))
    assert not list(out.rglob("*.onnx"))
    assert (out / "keep.txt").read_text() == "user file\n"


def test_no_args_prints_usage():
    r = run_cli()
    assert "Traceback" not in r.stderr, r.stderr
    assert r.returncode in (0, 2), f"exit {r.returncode}"
    assert "Usage" in r.stdout + r.stderr
    assert "optimize" in r.stdout + r.stderr


def test_help_exits_zero():
    r = run_cli("optimize", "--help")
    assert r.returncode == 0, r.stderr
    assert "Traceback" not in r.stderr
    assert "--input-shape" in r.stdout


def _children(pid: int) -> list[str]:
    out = []
    for task in Path(f"/proc/{pid}/task").glob("*"):
        try:
            out += (task / "children").read_text().split()
        except OSError:
            pass
    return out


@pytest.mark.parametrize("command", ["bench", "gate"])
def test_ctrl_c_exits_130_and_says_so(tmp_path, command):
    """A real SIGINT to a running measurement: exit 130 and one line, never 0 (a cancelled CI
    gate must not read as PASS), and no traceback."""
    import os
    import signal
    import subprocess
    import sys
    import time

    import onnx

    from tests.models import tiny_onnx_model

    model = tmp_path / "m.onnx"
    onnx.save(tiny_onnx_model(), str(model))
    argv = [sys.executable, "-m", "deployopt", command, str(model), "--min-seconds", "120"]
    argv += ["--no-history"] + (["--p50-ms", "100"] if command == "gate" else [])
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    # a test run started in the background by a non-interactive shell inherits SIGINT ignored,
    # and Python then installs no KeyboardInterrupt handler: give the CLI the default, as a
    # terminal or a CI runner does
    p = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env,
                         preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))  # fmt: skip
    deadline = time.monotonic() + 120
    while not _children(p.pid) and time.monotonic() < deadline and p.poll() is None:
        time.sleep(0.2)  # wait for the measurement worker: the CLI is then inside the command
    time.sleep(1.0)
    p.send_signal(signal.SIGINT)
    out, err = p.communicate(timeout=120)
    assert p.returncode == 130, (p.returncode, err)
    assert "interrupted (exit 130)" in flat(err) and "Traceback" not in err
