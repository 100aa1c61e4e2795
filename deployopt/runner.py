"""The Runner: export, build each variant, prove each against its reference, write the output.

Output layout::

    OUT/manifest.json               every variant: name, status, reason, path, parity
    OUT/variants/<id>/model.onnx    (+ model.onnx.data past 1.8 GB)
    OUT/variants/<id>/variant.json  parent, stage, params, sha256, metrics, parity

Each variant folder is built in a temporary folder and renamed into place when finished; the
manifest is written last. Re-running with the same inputs reuses finished variants by id.
"""

from __future__ import annotations

import shutil
import time
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from functools import cached_property
from importlib import resources
from pathlib import Path
from types import SimpleNamespace
from typing import Any

from deployopt.config import OptimizeConfig
from deployopt.errors import (
    DeployoptError,
    InputModelError,
    OutputError,
    ParityError,
    StageError,
)
from deployopt.events import Event, VariantFinished, VariantsPlanned, VariantStarted
from deployopt.feeds import is_stateful, stateful_batches, unknown_zero_dims, unknown_zero_specs
from deployopt.graphs import reorder_file
from deployopt.hardware import CpuDescriptor, detect_cpu
from deployopt.inputs import (
    Batch,
    Examples,
    InputSpec,
    count_samples,
    read_arrays,
    read_labelled,
    specs_from_onnx,
    synthetic_batches,
    text_batches,
)
from deployopt.parity import EXACT, Tolerance, compare
from deployopt.preflight import check_declared_sizes, check_graph_sizes
from deployopt.select import points_warning
from deployopt.sources import OnnxSource, Source, TorchSource, read_onnx
from deployopt.stages.base import MODEL_FILE, Context, model_files, save_model, size_bytes
from deployopt.taskeval import entry, joint_pairs
from deployopt.variant import STATUS_FAILED, STATUS_SKIPPED, Variant, variant_id
from deployopt.workspace import (
    atomic_dir,
    clean_stale_temps,
    disk_error,
    sha256_file,
    write_json,
)

MANIFEST = "manifest.json"
MANIFEST_SCHEMA = 1
SYNTHETIC_SAMPLES = 64
INPUT_VERSION = 2  # of the input's working copy (2: dims written as 0 read as unknown)
BASE = "fp32"  # the name of the root variant: the export, or the input's working copy


@dataclass
class OptimizeResult:
    out_dir: Path
    variants: list[Variant]
    manifest: Path
    meta: dict[str, Any] = field(default_factory=dict)
    bench: dict[str, list] = field(default_factory=dict)  # variant name -> BenchResult per batch
    choice: Any = None  # deployopt.select.Choice once benchmarked
    best: Path | None = None
    session: dict | None = None  # the session settings recommended for best.onnx (ship.py)
    screening: dict[str, Any] = field(default_factory=dict)  # variant name -> BenchResult
    funnel: dict[str, int] = field(default_factory=dict)  # candidates kept by each step
    reports: dict[str, Path] = field(default_factory=dict)
    failure: Any = None  # the NoViableVariantError the run ends with (ship.failure), or None

    def by_name(self, name: str) -> Variant:
        for v in self.variants:
            if v.name == name:
                return v
        raise KeyError(name)


def default_texts(kind: str) -> list[str]:
    name = "eval_sentences.txt" if kind == "eval" else "calibration_sentences.txt"
    text = resources.files("deployopt.data").joinpath(name).read_text(encoding="utf-8")
    return [ln.strip() for ln in text.splitlines() if ln.strip()]


def build_data(
    source: Source,
    specs: list[InputSpec],
    cfg: OptimizeConfig,
    warn: Callable[[str], None] | None = None,
    dims: dict[str, int] | None = None,
) -> tuple[list[Batch], list[Batch], dict[str, str]]:
    """Evaluation and calibration batches, and a description of where each came from;
    ``warn`` hears about texts cut at the token limit (once per data set) and about image
    models measured on noise. ``dims``: symbolic dims already settled (deployopt.images);
    any other gets 16."""
    from deployopt import images

    text = source.tokenizer is not None and all(s.is_text for s in specs)
    bs = cfg.batch_size
    desc = {}
    dims = {"*": images.DEFAULT_DIM, **(dims or {})}
    is_image = any(images.image_layout(s) for s in specs)

    def load(path: Path | None, kind: str, seed: int) -> list[Batch]:
        limit = cfg.eval_samples if kind == "eval" else None
        if text:
            if path is None or path.suffix not in (".npz", ".npy"):
                ex = _texts(path, kind, limit, cfg)
                texts, pairs = ex.texts, ex.pairs
                if pairs is not None and not joint_pairs(source.meta):
                    texts, pairs = texts + pairs, None  # an encoder embeds each text alone
                what = "text pairs" if ex.pairs is not None else "texts"
                desc[kind] = f"{path or 'bundled ' + kind + ' sentences'} ({len(ex.texts)} {what})"
                return text_batches(
                    source.tokenizer, texts, specs, bs, cfg.max_length, warn,
                    f"the {'evaluation' if kind == 'eval' else 'calibration'} data "
                    f"({path or 'bundled sentences'})", pairs,
                )  # fmt: skip
        if path is not None and path.is_dir():  # a folder of images
            norm = images.normalization(
                getattr(source, "path", None), cfg.image_mean, cfg.image_std
            )
            labelled = kind == "eval" and cfg.labels_column is not None
            batches, desc[kind] = images.read_images(
                path, specs, dims, bs, limit or cfg.calibration_samples, norm, labelled
            )
            return batches
        if path is not None:
            batches = read_arrays(path, specs, bs)
            desc[kind] = f"{path} ({count_samples(batches)} samples)"
            return batches
        n = limit or SYNTHETIC_SAMPLES
        model = getattr(source, "path", None)
        # declared sizes against the memory budget before anything is allocated (exit 5)
        check_declared_sizes(model or source.label, specs, 1 if stateful else bs)
        if stateful:  # scalars and recurrent state: one sample a batch, scalars from the graph
            desc[kind] = (
                f"synthetic seeded inputs ({n} single samples, seed {seed}; scalar inputs "
                "set to the constants the graph compares them with)"
            )
            return stateful_batches(specs, model, n, seed)
        desc[kind] = f"synthetic seeded inputs ({n} samples, seed {seed})"
        if is_image and warn:
            flag = "--eval" if kind == "eval" else "--calibration"
            warn(
                f"the {'evaluation' if kind == 'eval' else 'calibration'} inputs are seeded "
                "noise, not images: "
                + (
                    "cosine and argmax agreement measured on noise say little about "
                    "accuracy on real images"
                    if kind == "eval"
                    else "static int8 ranges calibrated on noise fit real images poorly"
                )
                + f"; give {flag} FOLDER of images"
            )
        return synthetic_batches(specs, n, bs, dims, seed=seed)

    stateful = isinstance(source, OnnxSource) and is_stateful(specs)
    evaluation = load(cfg.evaluation, "eval", 0)
    calibration = load(cfg.calibration, "calibration", 1)
    if not stateful:
        # one single-sample batch: export is proved on batch 1 as well as on full batches
        first = evaluation[0]
        evaluation = evaluation + [{k: v[:1] for k, v in first.items()}]
    return evaluation, calibration, desc


def _texts(path: Path | None, kind: str, limit: int | None, cfg: OptimizeConfig) -> Examples:
    """The texts (and second texts of pairs) of ``path`` by ``--text-column`` and
    ``--text-pair-column``; the bundled sentences when no file is given. Calibration data
    takes pairs from .csv/.jsonl only (a .txt holds single sentences)."""
    if path is None:
        return Examples(default_texts(kind)[:limit])
    pair = cfg.text_pair_column
    if kind != "eval" and path.suffix.lower() not in (".csv", ".jsonl"):
        pair = None
    return read_labelled(path, cfg.text_column, None, pair).head(limit)


class Runner:
    def __init__(
        self,
        source: Source,
        out_dir: Path,
        cfg: OptimizeConfig,
        log: Callable[[str], None] = print,
        force: bool = False,
        cpu: CpuDescriptor | None = None,
        on_event: Callable[[Event], None] | None = None,
    ):
        """``cpu``: the CPU the candidates are derived for (default: this machine's).
        ``on_event`` hears the run's progress (deployopt.events): VariantStarted and
        VariantFinished for every variant, VariantsPlanned once the candidate plan is known."""
        self.source = source
        self.on_event = on_event
        self._open: str | None = None  # the variant started and not yet finished
        self.cpu = cpu or detect_cpu()
        self.out = Path(out_dir)
        self.cfg = cfg
        self.log = log
        self.force = force
        self.variants: list[Variant] = []
        self.timings: dict[str, float] = {}
        self.warnings: list[str] = []  # run-level: said once on the log, kept in the report
        self.dims: dict[str, int] = {}  # symbolic input dims settled (deployopt.images)
        self.meter = None  # deployopt.taskeval.Meter with --labels-column, once the original ran
        self._labelled = None  # the labels as read (deployopt.taskeval.Labelled)

    # ---------------------------------------------------------------- public

    def run(self) -> OptimizeResult:
        try:
            return self._run()
        except BaseException as e:  # a run stopped mid-variant: that variant is finished too
            if self._open is not None:
                reason = str(e).splitlines()[0][:300] if str(e) else type(e).__name__
                self._emit(VariantFinished(self._open, STATUS_FAILED, reason))
            raise

    def _emit(self, event: Event) -> None:
        if isinstance(event, VariantStarted):
            self._open = event.name
        elif isinstance(event, VariantFinished):
            self._open = None
        if self.on_event is not None:
            self.on_event(event)

    def _run(self) -> OptimizeResult:
        (self.out / "variants").mkdir(parents=True, exist_ok=True)
        clean_stale_temps(self.out)
        clean_stale_temps(self.out / "variants")
        from deployopt.stages.fuse import FuseStage

        warning = points_warning(self.cfg.max_accuracy_drop, "--max-accuracy-drop")
        if warning:
            self.warn(warning)
        base, evaluation, calibration, desc = self._root()
        self.meta = {
            "data": desc,
            "source": self.source.label,
            "task": self.source.meta.task,
            "lineage": list(getattr(self.source.meta, "lineage", []) or []),
            "warnings": self.warnings,
            "input_dims": dict(self.dims),  # symbolic dims settled for this run (images.py)
        }
        if not base.ok:
            self._finish()
            raise ParityError(
                f"{base.name}: {base.reason}",
                failures=list((base.parity or {}).get("failures", [])),
            )
        specs = specs_from_onnx(base.path)
        ctx = Context(
            meta=self.source.meta,
            specs=specs,
            calibration=calibration,
            evaluation=evaluation,
            threads=self.cfg.threads,
            log=self.log,
            timeout_s=self.cfg.worker_timeout_s,
        )
        reference = getattr(self, "_reference", None)  # the input's, from its load probe
        if reference is None:
            reference = self._outputs(base.path, base.name)
        self._warn_constant(reference, evaluation, desc.get("eval", "the evaluation inputs"))
        if self._labelled is not None:
            base = self._measure_original(base, reference)
        fuse = [FuseStage()] if "fuse" in self.cfg.variants else []
        for stage in fuse:
            self._variant(stage, ctx, reference)
        stages = self.plan(base, ctx)  # needs the fused graph's facts
        names = [base.name] + [s.label for s in fuse + stages]
        self._emit(VariantsPlanned(tuple(names)))
        for stage in stages:
            self._variant(stage, ctx, reference)
        return self._finish()

    def plan(self, base: Variant, ctx: Context) -> list:
        """The candidate stages after export and fusion: the quantization recipes derived from
        the model's facts, the target CPU and the search effort (deployopt.candidates), then
        fp16. Recorded in ``meta["candidates"]`` with the reason for each."""
        from deployopt.candidates import quant_candidates
        from deployopt.stages.fp16 import Fp16Stage
        from deployopt.stages.quantize import DynamicQuantStage, StaticQuantStage, static_search

        kinds = [k for k in ("dynamic", "static") if f"int8-{k}" in self.cfg.variants]
        facts = self.facts(base)
        recipes = quant_candidates(facts, self.cpu, self.cfg.search, kinds)
        if not self.cfg.per_channel:  # --per-tensor: every recipe per-tensor
            per_tensor = (replace(r, per_channel=False) for r in recipes)
            recipes = list({r.name: r for r in per_tensor}.values())
        stages: list = []
        for r in recipes:
            if r.kind == "dynamic":
                stages.append(DynamicQuantStage(r))
            else:
                stages.append(
                    StaticQuantStage(
                        methods=self.cfg.calibration_methods,
                        max_samples=self.cfg.calibration_samples,
                        search=static_search(self.cfg.search, facts.transformer),
                        recipe=r,
                    )
                )
        if "fp16" in self.cfg.variants:
            stages.append(Fp16Stage(op_block_list=self.cfg.fp16_op_block_list))
        self.meta["cpu"] = self.cpu.to_json()
        self.meta["candidates"] = [
            {"name": r.name, "why": r.why, "params": r.params()} for r in recipes
        ]
        if recipes:
            self.log(
                f"candidates: {len(recipes)} quantization recipes for {self.cpu.model} "
                f"({'int8 dot product' if self.cpu.int8_dot else 'no VNNI-class int8 dot product'}"
                f", search {self.cfg.search}): {', '.join(r.name for r in recipes)}"
            )
        return stages

    def facts(self, base: Variant):
        """What the candidate generator needs to know of the exported graph and its fusion."""
        import onnx

        from deployopt.candidates import ModelFacts
        from deployopt.stages.fuse import looks_like_transformer

        model = onnx.load(str(base.path), load_external_data=False)
        inits = {i.name for i in model.graph.initializer}
        fuse = next((v for v in self.variants if v.name == "fuse" and v.ok), None)
        fused = (fuse.metrics.get("fused") or {}) if fuse else {}
        return ModelFacts(
            transformer=self.source.meta.is_transformer or looks_like_transformer(model),
            fused_attention=bool(fused.get("Attention") or fused.get("MultiHeadAttention")),
            weighted_matmuls=sum(
                n.op_type in ("MatMul", "Gemm") and len(n.input) > 1 and n.input[1] in inits
                for n in model.graph.node
            ),
            has_gather=any(
                n.op_type == "Gather" and n.input and n.input[0] in inits for n in model.graph.node
            ),
        )

    # ---------------------------------------------------------------- the root variant

    def _root(self):
        src = self.source
        evaluation: list[Batch]
        self._emit(VariantStarted(BASE))
        if isinstance(src, TorchSource):
            evaluation, calibration, desc = build_data(src, src.specs, self.cfg, self.warn)
            self._evaluation = evaluation
            self._read_labels()
            from deployopt.stages import export as export_stage

            def do_export(d: Path) -> None:
                export_stage.export(src, d, self.cfg.opset)
                _name_nodes(d)

            params = {"opset": self.cfg.opset, "exporter": "dynamo"}
            vid = variant_id(src.content_hash, "export", export_stage.VERSION, params)
            ref = export_stage.torch_outputs(src, evaluation)
            cached = self._cached(vid)
            v = cached or self._build(vid, BASE, "export", None, params, do_export)
            v = self._prove(v, ref, EXACT, "PyTorch", classifier=src.meta.classifier_outputs)
        else:
            assert isinstance(src, OnnxSource)
            specs = unknown_zero_specs(specs_from_onnx(src.path))
            self.dims = self._image_dims(specs)
            # declared sizes are checked against the memory budget inside build_data
            evaluation, calibration, desc = build_data(src, specs, self.cfg, self.warn, self.dims)
            check_graph_sizes(src.path)  # a ConstantOfShape of 2**40: refused before any run
            self._evaluation = evaluation
            self._read_labels()
            # v2: the working copy reads dims written as 0 as unknown (deployopt.feeds)
            vid = variant_id(None, "input", INPUT_VERSION, {"sha256": src.content_hash})

            def copy(d: Path):
                import onnx

                read_onnx(src.path)  # checked again: the file may have changed since loading
                model = onnx.load(str(src.path))
                warnings = unknown_zero_dims(model)
                save_model(model, d)
                return SimpleNamespace(warnings=warnings)

            cached = self._cached(vid)
            v = cached or self._build(vid, BASE, "input", None, {"source": str(src.path)}, copy)
            # loaded and run in a worker before it is called ok: its outputs are the reference
            self._reference = self._probe(v, evaluation, desc.get("eval", ""))
        self._record(v, reused=cached is not None)
        return v, evaluation, calibration, desc

    def _read_labels(self) -> None:
        """--labels-column: the labels of the evaluation samples, read before any model runs
        (a missing column or an empty set stops the run here)."""
        from deployopt.taskeval import read_labels

        if self.cfg.labels_column is not None:
            self._labelled = read_labels(self.cfg)

    def _measure_original(self, base: Variant, reference) -> Variant:
        """Settle the task from the original's outputs (``reference``) and record its task
        metrics on the root variant: the baseline of every variant's accuracy drop."""
        from deployopt.taskeval import Meter

        text = self.source.tokenizer is not None
        self.meter = Meter.start(self._labelled, self.source.meta, reference, self._evaluation,
                                 text, self.warn)  # fmt: skip
        self.meta["data"]["labels"] = self.meter.task.describe()
        measured = self._task_metrics(base, reference)
        self.variants[self.variants.index(base)] = measured
        self._write_meta(measured)
        self.log(f"{base.name}: {self.meter.line(measured.metrics)} on "
                 f"{self.meter.task.samples} labelled samples")  # fmt: skip
        return measured

    def _task_metrics(self, v: Variant, outputs) -> Variant:
        """``v`` with the task metrics of ``outputs`` (its evaluation outputs) when it is ok
        and labels were given; any from an earlier run are dropped (deployopt.taskeval)."""
        from deployopt.taskeval import merged

        ok = self.meter is not None and v.ok
        new = self.meter.metrics(outputs, self._evaluation) if ok else None
        return replace(v, metrics=merged(v.metrics, new))

    def _image_dims(self, specs: list[InputSpec]) -> dict[str, int]:
        """The symbolic dims of an ONNX input: those ``--input-shape`` settles, then an image
        input's height and width probed at the sizes it can run (deployopt.images)."""
        from deployopt import images

        src = self.source
        dims = images.dims_from_shapes(specs, src.input_shapes, src.path)
        if is_stateful(specs):
            return dims
        dims, note = images.resolve_dims(
            src.path, specs, dims, self.cfg.threads, self.cfg.worker_timeout_s
        )
        if note:
            self.log(f"input: {note}")
        return dims

    def _probe(self, v: Variant, evaluation: list[Batch], data: str) -> list:
        """The input model's outputs on ``evaluation``, from a worker that loads and runs it
        first thing; a model onnxruntime cannot load or run is refused with one precise line,
        and its working copy is removed, so nothing of it is cached as ok."""
        from deployopt.feeds import describe
        from deployopt.preflight import judge_probe
        from deployopt.runtime.session import probe_model
        from deployopt.runtime.worker import WorkerCrashed, run_in_worker

        path = self.source.path
        try:
            verdict = run_in_worker(
                probe_model,
                v.path,
                evaluation,
                self.cfg.threads,
                timeout_s=self.cfg.worker_timeout_s,
                label="fp32 load",
            )
            return judge_probe(path, verdict, f"{describe(evaluation[0])} ({data})")
        except WorkerCrashed as e:
            shutil.rmtree(v.path.parent, ignore_errors=True)
            raise InputModelError(
                f"{path}: onnxruntime crashed loading or running the model ({e})",
                hint="the model crashes onnxruntime natively; report it to the model's authors",
            ) from None
        except DeployoptError:
            shutil.rmtree(v.path.parent, ignore_errors=True)
            raise

    def warn(self, message: str) -> None:
        """A run-level warning: logged once and kept in the report (meta["warnings"])."""
        if message not in self.warnings:
            self.warnings.append(message)
            self.log(f"warning: {message}")

    def _warn_constant(self, reference, evaluation, data: str) -> None:
        """Outputs that do not vary across the evaluation inputs: parity on them proves nothing
        (a model that outputs zeros has cosine 1.0 with any candidate that does too)."""
        from deployopt.parity import constant_outputs

        for name, what in constant_outputs(reference, evaluation).items():
            self.warn(
                f"output {name!r} does not vary across the evaluation inputs ({what} on "
                f"{data}): parity on it cannot tell a broken variant from a good one; check the "
                "model, or give varied --eval data"
            )

    # ---------------------------------------------------------------- variants

    def _variant(self, stage, ctx: Context, reference) -> None:
        self._emit(VariantStarted(stage.label))
        parent = next(
            (v for name in stage.parent for v in self.variants if v.name == name and v.ok), None
        )
        params = stage.params()
        if parent is None:
            self._record(
                Variant(
                    id=variant_id(None, stage.label, stage.version, params),
                    name=stage.label,
                    stage=stage.name,
                    parent=None,
                    params=params,
                    status=STATUS_SKIPPED,
                    reason=f"no usable parent ({' or '.join(stage.parent)})",
                )
            )
            return
        skip = stage.skip_reason(parent.path, ctx)
        # calibration-dependent: the data is a param
        if stage.name in ("int8-static", "fp16") or params.get("fp32_matmuls"):
            params = {**params, "calibration": self.meta["data"].get("calibration")}
        vid = variant_id(parent.id, stage.name, stage.version, params)

        def unbuilt(status: str, reason: str, metrics: dict | None = None) -> Variant:
            return Variant(
                id=vid,
                name=stage.label,
                stage=stage.name,
                parent=parent.id,
                params=params,
                status=status,
                reason=reason,
                metrics=metrics or {},
            )

        if skip:
            self._record(unbuilt(STATUS_SKIPPED, skip))
            return
        v = self._cached(vid)
        reused = v is not None
        if v is None:
            try:
                v = self._build(
                    vid,
                    stage.label,
                    stage.name,
                    parent.id,
                    params,
                    lambda d: stage.apply(parent.path, d, ctx),
                )
            except StageError as e:
                metrics = {"search": e.tried} if hasattr(e, "tried") else {}
                v = unbuilt(STATUS_FAILED, str(e), metrics)
                self._write_failed(v)
                self._record(v)
                return
        v = self._prove(
            v, reference, stage.tolerance, "fp32", classifier=self.source.meta.classifier_outputs
        )
        self._record(v, reused=reused)

    def _build(self, vid, name, stage, parent, params, fn) -> Variant:
        """Run ``fn(tmpdir)`` to write the model, then rename the finished folder into place."""
        final = self.out / "variants" / vid
        t0 = time.perf_counter()
        try:
            with atomic_dir(final) as tmp:
                result = fn(tmp)
                model = tmp / MODEL_FILE
                if not model.is_file():
                    raise StageError(f"{name}: the stage wrote no model")
                if stage != "input":  # the user's own file was checked when it was read
                    reorder_file(tmp, MODEL_FILE)  # If/Loop/Scan bodies' outer reads first
                    check_model(model, name)
                for p in tmp.glob(".*"):  # scratch files of the stage
                    p.unlink() if p.is_file() else shutil.rmtree(p)
                metrics = dict(getattr(result, "metrics", {}) or {})
                metrics["size_bytes"] = size_bytes(model)
                metrics["build_s"] = round(time.perf_counter() - t0, 2)
                chosen = dict(getattr(result, "chosen", {}) or {})
                if chosen:
                    metrics["chosen"] = chosen
                v = Variant(
                    id=vid,
                    name=name,
                    stage=stage,
                    parent=parent,
                    params=params,
                    path=final / MODEL_FILE,
                    sha256=sha256_file(model),
                    metrics=metrics,
                    warnings=tuple(getattr(result, "warnings", []) or []),
                )
                write_json(tmp / "variant.json", v.to_json(relative_to=final))
        except Exception as e:  # a library failing inside a stage fails that variant only
            err = disk_error(e, final)  # but a full disk is the machine's state: no cache
            if err is not None:
                raise err from e
            if isinstance(e, DeployoptError):
                raise
            raise StageError(f"{name}: {type(e).__name__}: {str(e).splitlines()[0][:300]}") from e
        for w in v.warnings:
            self.log(f"warning: {name}: {w}")
        return v

    def _cached(self, vid: str) -> Variant | None:
        if self.force:
            return None
        folder = self.out / "variants" / vid
        meta = folder / "variant.json"
        if not meta.is_file():
            return None
        import json

        try:
            v = Variant.from_json(json.loads(meta.read_text()), base=folder)
        except (ValueError, KeyError):
            return None
        if not v.ok or v.path is None or not v.path.is_file() or sha256_file(v.path) != v.sha256:
            return None
        self.log(f"{v.name}: reusing {vid}")
        return v

    def _prove(self, v: Variant, reference, tol: Tolerance, against: str, classifier=()) -> Variant:
        """Parity of ``v`` against ``reference``; a variant outside tolerance becomes failed."""
        try:
            cand = self._outputs(v.path, v.name)
        except OutputError:  # the disk, not the variant: stop the run, record nothing
            raise
        except DeployoptError as e:
            v = self._fail(v, f"cannot run: {e}")
            self._write_meta(v)
            return v
        rep = compare(reference, cand, tol, classifier_outputs=classifier)
        summary = {**rep.summary(), "against": against, "tolerance": tol.describe()}
        v = replace(v, parity=summary)
        if not rep.passed:
            v = self._fail(v, f"parity vs {against} failed: " + "; ".join(rep.failures))
        v = self._task_metrics(v, cand)  # passed parity: measured on the labels
        self._write_meta(v)
        return v

    @cached_property
    def _parity_ep(self) -> str:
        """The EP parity runs on (the target's, resolved once: it may read the config file)."""
        from deployopt.runtime.session import parity_provider
        from deployopt.ship import target_of

        return parity_provider(target_of(self.cfg).ep)

    def _outputs(self, path: Path, label: str):
        """The model's outputs on the evaluation set, computed in a worker process: on the
        target's EP when it is a GPU EP (the reference and every candidate alike, so an fp16
        model is proven where it runs), else on the CPU."""
        from deployopt.runtime.session import model_outputs
        from deployopt.runtime.worker import run_in_worker

        return run_in_worker(
            model_outputs,
            path,
            self._evaluation,
            self.cfg.threads,
            self._parity_ep,
            timeout_s=self.cfg.worker_timeout_s,
            label=f"{label} parity",
        )

    def _fail(self, v: Variant, reason: str) -> Variant:
        return replace(v, status=STATUS_FAILED, reason=reason)

    def _write_meta(self, v: Variant) -> None:
        if v.path is not None:
            folder = v.path.parent
            write_json(folder / "variant.json", v.to_json(relative_to=folder))

    def _write_failed(self, v: Variant) -> None:
        folder = self.out / "variants" / v.id
        with atomic_dir(folder) as tmp:
            write_json(tmp / "variant.json", v.to_json())

    def _record(self, v: Variant, reused: bool = False) -> None:
        """Keep ``v`` and say so: the log line and VariantFinished (status "reused" for an ok
        variant taken from the cache and proved again)."""
        self.variants.append(v)
        mark = {"ok": "ok", "failed": "FAILED", "skipped": "skipped"}[v.status]
        extra = ""
        if v.parity:
            extra = f" mean cos {v.parity['mean_cosine']:.5f}"
        if self.meter is not None and self.meter.line(v.metrics):
            extra += f", {self.meter.line(v.metrics)}"
        self.log(f"{v.name}: {mark}{extra}" + (f" ({v.reason})" if v.reason else ""))
        self._emit(VariantFinished(v.name, "reused" if reused and v.ok else v.status, v.reason))

    def _finish(self) -> OptimizeResult:
        manifest = {
            "schema": MANIFEST_SCHEMA,
            "source": self.source.label,
            "task": self.source.meta.task,
            "data": getattr(self, "meta", {}).get("data", {}),
            "variants": [manifest_entry(v, self.out) for v in self.variants],
        }
        path = self.out / MANIFEST
        write_json(path, manifest)
        return OptimizeResult(self.out, list(self.variants), path, getattr(self, "meta", {}))


def manifest_entry(v: Variant, out: Path) -> dict[str, Any]:
    p = v.parity or {}
    return {
        "id": v.id,
        "name": v.name,
        "stage": v.stage,
        "parent": v.parent,
        "status": v.status,
        "reason": v.reason,
        "params": dict(v.params),
        "path": str(v.path.relative_to(out)) if v.path is not None and v.ok else None,
        "size_bytes": v.metrics.get("size_bytes"),
        "parity": {
            k: p.get(k)
            for k in (
                "mean_cosine",
                "min_cosine",
                "max_abs_diff",
                "nonfinite",
                "argmax_agreement",
                "samples",
                "against",
            )
        }
        if p
        else None,
        "task": entry(v.metrics),
        "warnings": list(v.warnings),
    }


def check_model(path: Path, name: str) -> None:
    """onnx's full check (structure, topological order, shape and type inference) on a model
    a stage wrote: a variant that fails it is failed, never shipped."""
    import onnx

    try:
        onnx.checker.check_model(str(path), full_check=True)
    except (onnx.checker.ValidationError, onnx.shape_inference.InferenceError) as e:
        msg = str(e).strip().splitlines()[0][:300]
        raise StageError(f"{name}: the written model fails onnx.checker: {msg}") from None


def _name_nodes(folder: Path) -> None:
    """Give every node a unique name: quantization and fp16 block lists address nodes by name."""
    import onnx

    path = folder / MODEL_FILE
    model = onnx.load(str(path))
    seen: set[str] = set()
    changed = False
    for i, node in enumerate(model.graph.node):
        if not node.name or node.name in seen:
            node.name = f"{node.op_type}_{i}"
            changed = True
        seen.add(node.name)
    if changed:
        for f in model_files(path):
            f.unlink()
        save_model(model, folder)
