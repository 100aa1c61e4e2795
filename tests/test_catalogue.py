"""Issue 12's fault catalogue, the remaining cases: fp16 overflow at a graph output, a model
whose output is constant, a BERT with a 1,000-token vocabulary, report.json size, rich markup
in hints, text truncated at the token limit, invalid UTF-8 data, undeclared imports."""

from __future__ import annotations

import ast
import importlib.metadata as md
import json
import re
import sys
import tomllib
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper

from deployopt.errors import DataError, NoViableVariantError
from tests.models import ROOT, flat, optimize_only, run_cli, write_vocab

FAST = {"bench_min_samples": 5, "bench_min_seconds": 0.0, "bench_rounds": 1}


def _graph_model(path: Path, nodes, inits, outputs: list[str]) -> Path:
    graph = helper.make_graph(
        nodes,
        "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["n", 4])],
        [helper.make_tensor_value_info(o, TensorProto.FLOAT, ["n", 4]) for o in outputs],
        inits,
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 9
    onnx.checker.check_model(model, full_check=True)
    onnx.save(model, str(path))
    return path


def overflow_model(path: Path) -> Path:
    """``y = x*60000 + x*60000``: each product fits fp16 for |x| < 1.09, their sum does not,
    and the Add writes the graph output."""
    c = helper.make_tensor("c", TensorProto.FLOAT, [], [60000.0])
    nodes = [
        helper.make_node("Mul", ["x", "c"], ["a"], name="m1"),
        helper.make_node("Mul", ["x", "c"], ["b"], name="m2"),
        helper.make_node("Add", ["a", "b"], ["y"], name="add"),
    ]
    return _graph_model(path, nodes, [c], ["y"])


def _true_fp16(path: Path, x: np.ndarray) -> np.ndarray:
    """The model's output in true fp16 arithmetic (the ONNX reference evaluator rounds every
    fp16 op to fp16; onnxruntime's CPU provider computes them in fp32)."""
    import warnings

    from onnx.reference import ReferenceEvaluator

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # the overflow is what we measure
        return ReferenceEvaluator(str(path)).run(None, {"x": x})[0]


@pytest.fixture
def overflow_inputs(tmp_path):
    x = np.random.default_rng(0).uniform(0.6, 1.05, (24, 4)).astype(np.float32)
    np.savez(tmp_path / "x.npz", x=x)
    return overflow_model(tmp_path / "ovf.onnx"), tmp_path / "x.npz", x


# ---------------------------------------------------------------- 1. fp16 overflow


def test_fp16_overflow_at_a_graph_output_stays_fp32_and_is_finite_in_true_fp16(
    tmp_path, overflow_inputs
):
    model, data, x = overflow_inputs
    res = optimize_only(
        str(model), tmp_path / "out", variants=["fp16"], evaluation=data, calibration=data
    )
    v = res.by_name("fp16")
    assert v.ok, v.reason
    # the node writing the graph output was probed and kept in fp32
    assert v.metrics["overflowing_tensors"] == ["y"]
    assert v.metrics["fp32_fallback_nodes"] == ["add"]
    # judged in true fp16 arithmetic too: finite, and within the fp16 tolerance of fp32
    check = v.metrics["fp16_arithmetic"]
    assert check["unsupported"] is None and check["overflow"] is None and not check["failures"]
    assert check["samples"] == 4 and 0 < check["max_abs_diff"] < 1e-2 * 126000
    want = x.astype(np.float64) * 120000
    got = _true_fp16(v.path, x)
    assert np.isfinite(got).all()
    np.testing.assert_allclose(got, want, rtol=1e-3)  # fp16 products: 11 bits, summed in fp32
    from deployopt.runtime.session import create_session

    ort = create_session(v.path).run(None, {"x": x})[0]
    assert np.isfinite(ort).all() and np.abs(ort - want).max() <= 1e-3 * want.max()
    # no fp32 -> fp16 -> fp32 round trip is left anywhere in the graph
    m = onnx.load(str(v.path))
    casts = {n.output[0]: n for n in m.graph.node if n.op_type == "Cast"}
    for n in m.graph.node:
        inner = casts.get(n.input[0]) if n.op_type == "Cast" else None
        to = {a.name: a.i for a in n.attribute}.get("to")
        assert not (inner and to == TensorProto.FLOAT), n.name


def test_fp16_overflow_the_probe_missed_fails_the_variant_naming_the_tensor(
    tmp_path, overflow_inputs, monkeypatch
):
    """Were the fp32 probe to miss it, the true-fp16 check still refuses the variant."""
    model, data, _ = overflow_inputs
    monkeypatch.setattr("deployopt.stages.fp16.fp32_nodes", lambda graph, hot: [])
    with pytest.raises(NoViableVariantError, match="no variant passed its checks: fp16") as e:
        optimize_only(
            str(model), tmp_path / "out", variants=["fp16"], evaluation=data, calibration=data
        )
    v = e.value.result.by_name("fp16")
    assert v.status == "failed"
    assert re.fullmatch(
        r"fp16: tensor '[\w]+' \(node 'add', Add\) goes inf/NaN in true fp16 arithmetic "
        r"\(ONNX reference evaluator, 4 samples\)",
        v.reason,
    ), v.reason
    assert not (tmp_path / "out" / "best.onnx").exists()


def test_fp16_says_plainly_when_true_fp16_cannot_be_checked(tmp_path):
    """A graph the reference evaluator cannot run (a com.microsoft op): the variant carries
    the warning that CPU parity upcasts fp16."""
    from deployopt.stages.base import StageOutput
    from deployopt.stages.fp16 import _judge_true_fp16, true_fp16_check

    node = helper.make_node("FastGelu", ["x"], ["y"], domain="com.microsoft")
    graph = helper.make_graph(
        [node],
        "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, 4])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [2, 4])],
    )
    opsets = [helper.make_opsetid("", 17), helper.make_opsetid("com.microsoft", 1)]
    path = tmp_path / "gelu.onnx"
    onnx.save(helper.make_model(graph, opset_imports=opsets), str(path))
    check = true_fp16_check(path, path, [{"x": np.ones((2, 4), np.float32)}])
    assert check["unsupported"].startswith("NotImplementedError: Node type 'FastGelu'")
    out = StageOutput()
    _judge_true_fp16(check, out)
    (w,) = out.warnings
    assert w.startswith(
        "parity was measured with onnxruntime's CPU provider, which computes fp16 ops without "
        "an fp16 kernel in fp32 (it upcasts)"
    )
    assert "true fp16 arithmetic was not checked" in w and "FastGelu" in w


# ---------------------------------------------------------------- 2. constant outputs


def test_constant_output_is_flagged_in_terminal_and_report(tmp_path):
    zero = helper.make_tensor("zero", TensorProto.FLOAT, [], [0.0])
    one = helper.make_tensor("one", TensorProto.FLOAT, [], [1.0])
    nodes = [
        helper.make_node("Mul", ["x", "zero"], ["y"], name="mul"),  # zeros for every input
        helper.make_node("Add", ["x", "one"], ["z"], name="add"),  # varies
    ]
    model = _graph_model(tmp_path / "zeros.onnx", nodes, [zero, one], ["y", "z"])
    out = tmp_path / "out"
    r = run_cli("optimize", str(model), "-o", str(out), "--variants", "fp16", "--no-bench")
    assert r.returncode == 0, r.stderr
    warning = (
        "warning: output 'y' does not vary across the evaluation inputs (all zeros on "
        "synthetic seeded inputs (64 samples, seed 0)): parity on it cannot tell a broken "
        "variant from a good one; check the model, or give varied --eval data"
    )
    assert flat(r.stderr).count(warning) == 1, r.stderr
    assert "output 'z'" not in r.stderr
    doc = json.loads((out / "report.json").read_text())
    assert doc["warnings"] == [warning.removeprefix("warning: ")]
    assert f"- {warning.removeprefix('warning: ')}" in (out / "report.md").read_text()
    fp16 = next(v for v in doc["variants"] if v["name"] == "fp16")
    meta = json.loads((out / fp16["path"]).with_name("variant.json").read_text())
    flags = {o["name"]: o["constant"] for o in meta["parity"]["outputs"]}
    assert flags == {"y": True, "z": False}  # beside its numbers, in the variant's parity


def test_constant_outputs_rule():
    from deployopt.parity import constant_outputs

    rng = np.random.default_rng(0)
    a = rng.standard_normal((3, 5)).astype(np.float32)
    same = np.tile(a[:1], (3, 1))
    batches = [
        {"zeros": np.zeros((3, 5, 2)), "same": same, "seven": np.full((3, 4), 7.0), "vary": a},
        {"zeros": np.zeros((2, 9, 2)), "same": same[:2], "seven": np.full((2, 4), 7.0),
         "vary": a[:2] + 1},
    ]  # fmt: skip
    assert constant_outputs(batches) == {
        "zeros": "all zeros",  # another sequence length, still zeros
        "same": "the same array for every input",
        "seven": "always 7",
    }
    assert constant_outputs([{"y": np.zeros((1, 3))}]) == {}  # one sample: cannot tell
    inputs = [{"x": np.ones((3, 2))}, {"x": np.ones((2, 2))}]
    assert constant_outputs(batches, inputs) == {}  # the same input every time


# ---------------------------------------------------------------- 3. and 6. a small-vocab BERT


@pytest.fixture(scope="module")
def small_vocab_bert(tmp_path_factory):
    """A 2-layer BERT with a 1,000-token vocabulary and 512 positions, with a WordPiece
    tokenizer whose ids all fall inside it."""
    import torch
    from transformers import BertModel, BertTokenizerFast

    from tests.models import tiny_bert_config

    folder = tmp_path_factory.mktemp("bert1000")
    tok = BertTokenizerFast(vocab_file=str(write_vocab(folder)), do_lower_case=True)
    cfg = tiny_bert_config(vocab_size=1000)
    cfg.max_position_embeddings = 512
    torch.manual_seed(0)
    BertModel(cfg).eval().save_pretrained(folder)
    tok.save_pretrained(folder)
    return folder, tok


def test_small_vocab_bert_benchmarks_and_long_lines_are_reported(tmp_path, small_vocab_bert):
    import deployopt
    from deployopt.benchmark import BenchSpec, bench_feeds
    from deployopt.inputs import specs_from_onnx, vocab_size

    folder, tok = small_vocab_bert
    long_line = " ".join(["the people of the city market"] * 12)
    lines = ["a short sentence", long_line, "how fast is it", long_line + " time", "good day"]
    calib = tmp_path / "calib.txt"
    calib.write_text("\n".join(lines) + "\n")
    out = tmp_path / "out"
    logs: list[str] = []
    res = deployopt.optimize(
        str(folder), out, variants=["fuse", "int8-dynamic"], calibration=calib,
        max_length=32, search="quick", log=logs.append, **FAST,
    )  # fmt: skip
    assert res.choice.winner is not None  # a run shipping nothing raises
    assert res.bench and all(r.valid for rs in res.bench.values() for r in rs), {
        k: rs[0].invalid for k, rs in res.bench.items()
    }
    for v in res.variants:  # the table is found through fusion and quantization alike
        if v.ok:
            assert vocab_size(v.path) == 1000, v.name
    feeds = bench_feeds(specs_from_onnx(res.by_name("fp32").path), BenchSpec(seq=128), 1000)
    assert feeds["input_ids"].max() < 1000 and feeds["input_ids"].min() >= 1
    # 6. the two long calibration lines: said once, with the count and the limit
    longest = max(len(tok(x)["input_ids"]) for x in lines)
    note = (
        f"2 of 5 lines of the calibration data ({calib}) are longer than the 32-token limit "
        f"(the longest has {longest} tokens) and were truncated to 32 tokens; raise "
        "--max-length or shorten them"
    )
    assert note in res.meta["warnings"]  # (the bundled evaluation sentences may be cut too)
    assert [w for w in res.meta["warnings"] if "calibration data" in w] == [note]
    assert logs.count(f"warning: {note}") == 1
    assert f"- {note}" in (out / "report.md").read_text()


def test_text_batches_truncation_is_said_once_with_count_and_limit(small_vocab_bert):
    from deployopt.inputs import InputSpec, text_batches

    _, tok = small_vocab_bert
    specs = [InputSpec("input_ids", "int64", ("b", "s")), InputSpec("attention_mask", "int64",
             ("b", "s"))]  # fmt: skip
    texts = ["short one", "the " * 40, "a b c", "water " * 20]
    said: list[str] = []
    batches = text_batches(tok, texts, specs, 2, 16, said.append, "eval.txt")
    assert all(b["input_ids"].shape[1] <= 16 for b in batches)
    assert said == [
        "2 of 4 lines of eval.txt are longer than the 16-token limit (the longest has 42 "
        "tokens) and were truncated to 16 tokens; raise --max-length or shorten them"
    ]
    said.clear()
    text_batches(tok, texts[::2], specs, 2, 16, said.append)
    assert said == []


# ---------------------------------------------------------------- 4. report.json size


def test_report_json_stays_small_and_samples_read_back(tmp_path):
    import jsonschema

    import deployopt
    from deployopt import report
    from deployopt.errors import ConfigError
    from deployopt.gating import judge_report, read_report
    from deployopt.judge import Budget

    out = tmp_path / "out"
    res = deployopt.optimize(
        "tests.models:mlp", out, input_shapes={"x": (1, 16)}, variants=["int8-dynamic"],
        bench_min_samples=3000, bench_min_seconds=0.0, bench_rounds=1, tune_session=False,
    )  # fmt: skip
    measured = {k: [list(r.samples_ms) for r in rs] for k, rs in res.bench.items()}
    total = sum(len(s) for ss in measured.values() for s in ss)
    assert total >= 3000 * len(measured) >= 6000
    text = (out / "report.json").read_text()
    doc = json.loads(text)
    jsonschema.validate(doc, report.schema())
    assert doc["schema"] == "deployopt.report/2" and '"samples_ms"' not in text
    # bounded by the variants, not the samples (inlined, these samples took > 18 bytes each)
    assert len(text.encode()) < 12_000 * len(doc["variants"]) < 18 * total, len(text)
    assert doc["samples_file"] == "samples.npz" and (out / "samples.npz").is_file()
    back = read_report(out / "report.json")
    for name, want in measured.items():
        v = next(x for x in back["variants"] if x["name"] == name)
        assert [b["samples_ms"] for b in v["bench"]] == want  # exactly, float64
    screened = back["search"]["screening"]
    assert all(r.get("samples_ms") for r in screened.values() if r.get("valid"))
    # the gate judges the recorded samples
    (check,) = judge_report(out / "report.json", [Budget(p50_ms=1e4)])[0]
    assert check.verdict.value == "PASS"
    assert check.measured == pytest.approx(np.percentile(measured[res.choice.winner.name][0], 50))
    assert "data:image/png" in (out / "report.html").read_text()  # plots read the samples
    # a side file that does not belong to the report is refused, naming it
    np.savez(out / "samples.npz", s00000=np.ones(3))
    with pytest.raises(ConfigError, match=r"samples\.npz: does not match the report"):
        read_report(out / "report.json")
    (out / "samples.npz").unlink()
    r = run_cli("gate", "--report", str(out / "report.json"), "--p50-ms", "100", "--no-history")
    assert r.returncode == 2
    assert f"error: {out / 'samples.npz'}: the report's latency samples file is missing" in flat(
        r.stderr
    )


# ---------------------------------------------------------------- 5. rich markup


def test_budget_typo_hint_is_printed_as_written(tmp_path):
    from tests.test_report import synthetic

    rep = tmp_path / "report.json"
    rep.write_text(json.dumps(synthetic()))
    budget = tmp_path / "budgets.toml"
    budget.write_text("[[budget]]\np50_ms = 10\n")
    r = run_cli("gate", "--report", str(rep), "--budget", str(budget), "--no-history")
    assert r.returncode == 2, r.stderr
    lines = r.stderr.strip().splitlines()
    assert f"error: {budget}: unknown table(s) budget" in lines
    assert "hint: a budget file holds [[budgets]] and optionally [targets.NAME]" in lines


def test_markup_in_user_text_is_never_interpreted(tmp_path):
    """The printing itself is plain: a path with rich tags in it comes out as written."""
    path = tmp_path / "[bold]model[/bold] [red].onnx"
    r = run_cli("optimize", str(path), "-o", str(tmp_path / "out"), "--no-bench")
    assert r.returncode == 5, r.stderr
    assert str(path) in r.stderr and "Traceback" not in r.stderr


# ---------------------------------------------------------------- 7. invalid UTF-8


@pytest.mark.parametrize("suffix", [".txt", ".jsonl", ".csv"])
def test_invalid_utf8_names_the_file_and_line(tmp_path, suffix):
    """The bad byte sits past the decoder's first chunk (8 KiB): the line is counted, not a
    chunk offset."""
    from deployopt.inputs import read_examples

    row = {".txt": b"a fine line %d", ".jsonl": b'{"text": "a fine line %d"}'}.get(
        suffix, b"a fine line %d"
    )
    head = b"text\n" if suffix == ".csv" else b""
    body = b"\n".join(row % i for i in range(2000))
    path = tmp_path / f"data{suffix}"
    path.write_bytes(head + body + b"\ncaf\xe9 au lait\n")
    line = 2001 + (1 if head else 0)
    with pytest.raises(DataError) as e:
        read_examples(path)
    assert str(e.value) == (
        f"{path}:{line}: not UTF-8 text (invalid continuation byte at byte 4 of line {line})"
    )
    assert e.value.exit_code == 2 and "iconv" in e.value.hint


def test_invalid_utf8_calibration_exits_2(tmp_path):
    from tests.models import save_tiny_bert

    (tmp_path / "bert").mkdir()
    folder = save_tiny_bert(tmp_path / "bert")
    bad = tmp_path / "calib.txt"
    bad.write_bytes(b"one line\ntwo lines\n\xff\xfe three\n")
    r = run_cli("optimize", str(folder), "-o", str(tmp_path / "out"), "--calibration", str(bad))
    assert r.returncode == 2, r.stderr
    assert f"error: {bad}:3: not UTF-8 text (invalid start byte at byte 1 of line 3)" in flat(
        r.stderr
    )
    assert "hint: save the file as UTF-8" in r.stderr and "Traceback" not in r.stderr


# ---------------------------------------------------------------- 8. declared imports


def _declared() -> tuple[set[str], set[str]]:
    def name(req: str) -> str:
        return re.split(r"[\s<>=!~;\[]", req, maxsplit=1)[0].lower().replace("_", "-")

    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    extras = {name(r) for reqs in project["optional-dependencies"].values() for r in reqs}
    return {name(r) for r in project["dependencies"]}, extras


def _imports(tree: ast.Module):
    """(top-level module, optional) for each absolute import; optional when it sits inside a
    function or a try block (loaded lazily, so an extra may provide it)."""

    def walk(node, optional: bool):
        for child in ast.iter_child_nodes(node):
            inner = optional or isinstance(child, ast.FunctionDef | ast.AsyncFunctionDef | ast.Try)
            if isinstance(child, ast.Import):
                for a in child.names:
                    yield a.name.split(".")[0], optional
            elif isinstance(child, ast.ImportFrom) and child.level == 0 and child.module:
                yield child.module.split(".")[0], optional
            yield from walk(child, inner)

    yield from walk(tree, False)


def test_every_import_is_declared():
    required, extras = _declared()
    dists = md.packages_distributions()
    problems = []
    for f in sorted((ROOT / "deployopt").rglob("*.py")):
        for mod, optional in _imports(ast.parse(f.read_text(), str(f))):
            if mod in sys.stdlib_module_names or mod in ("deployopt", "__future__"):
                continue
            names = {d.lower().replace("_", "-") for d in dists.get(mod, [])}
            where = f"{f.relative_to(ROOT)}: {mod}"
            if not names:
                problems.append(f"{where}: no installed distribution provides it")
            elif not names & (required | (extras if optional else set())):
                kind = "dependencies" if not optional else "dependencies or an extra"
                problems.append(f"{where} ({', '.join(sorted(names))}) is not in {kind}")
    assert not problems, "\n".join(problems)
