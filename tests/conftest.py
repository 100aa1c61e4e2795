"""Test set-up: no network, offline Hugging Face, fixed seeds, tiny model builders."""

from __future__ import annotations

import os
import socket
import tempfile

import pytest

os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["TRANSFORMERS_OFFLINE"] = "1"
# results history: never the repository's .deployopt/, one throwaway database per test session
os.environ["DEPLOYOPT_HISTORY"] = os.path.join(
    tempfile.mkdtemp(prefix="deployopt-test-history-"), "history.sqlite"
)


@pytest.fixture(autouse=True)
def _no_network(monkeypatch):
    real = socket.socket.connect

    def guarded(self, address):
        if self.family in (socket.AF_INET, socket.AF_INET6):
            host = address[0]
            if host not in ("127.0.0.1", "::1", "localhost"):
                raise RuntimeError(f"test tried to reach the network: {address}")
        return real(self, address)

    monkeypatch.setattr(socket.socket, "connect", guarded)


@pytest.fixture(autouse=True)
def _seeds():
    import random

    import numpy as np

    random.seed(0)
    np.random.seed(0)
    try:
        import torch

        torch.manual_seed(0)
    except ImportError:
        pass


@pytest.fixture(scope="session")
def tiny_bert_dir(tmp_path_factory):
    from tests.models import save_tiny_bert

    return save_tiny_bert(tmp_path_factory.mktemp("tiny-bert"))


@pytest.fixture(scope="session")
def tiny_bert_classifier_dir(tmp_path_factory):
    from tests.models import save_tiny_bert

    return save_tiny_bert(tmp_path_factory.mktemp("tiny-bert-cls"), classifier=True)


@pytest.fixture(scope="session")
def pg_server():
    """A real PostgreSQL server (the pgserver wheel) for this test session, in a temporary
    folder, stopped and deleted at the end. It listens on a Unix socket only. It is skipped
    with the reason when it cannot start, except under CI, where that is a failure."""
    import shutil
    import warnings
    from pathlib import Path

    root = tempfile.mkdtemp(prefix="deployopt-pg-")  # short: the socket path has a length limit
    try:
        with warnings.catch_warnings():  # platformdirs: "XDG_RUNTIME_DIR is not set" as root
            warnings.simplefilter("ignore")
            import pgserver

        server = pgserver.get_server(Path(root) / "data", cleanup_mode="delete")
    except Exception as e:
        shutil.rmtree(root, ignore_errors=True)
        if os.environ.get("CI"):
            raise
        pytest.skip(f"PostgreSQL (pgserver) could not start: {type(e).__name__}: {e}")
    yield server
    server.cleanup()
    shutil.rmtree(root, ignore_errors=True)


@pytest.fixture
def pg_url(pg_server):
    """The URL of a fresh, empty database on the session's PostgreSQL server, dropped after."""
    import uuid

    from sqlalchemy.engine import make_url

    name = f"t_{uuid.uuid4().hex[:12]}"
    pg_server.psql(f"CREATE DATABASE {name};")
    yield make_url(pg_server.get_uri()).set(database=name).render_as_string(hide_password=False)
    pg_server.psql(f"DROP DATABASE IF EXISTS {name} WITH (FORCE);")


def cuda_skip_reason(ep: bool = False) -> str | None:
    """Why a ``cuda``-marked test cannot run here, or None: torch needs a usable CUDA device;
    ``cuda(ep=True)`` tests also need onnxruntime's CUDAExecutionProvider (onnxruntime-gpu)."""
    import torch

    if not torch.cuda.is_available():
        what = "has no CUDA support" if torch.version.cuda is None else "sees no usable GPU"
        return f"no usable CUDA device: torch {torch.__version__} {what}"
    if ep:
        import onnxruntime

        if "CUDAExecutionProvider" not in onnxruntime.get_available_providers():
            return (
                "no CUDAExecutionProvider in this onnxruntime "
                f"({', '.join(onnxruntime.get_available_providers())}): needs onnxruntime-gpu"
            )
    return None


def pytest_runtest_setup(item):
    marker = item.get_closest_marker("cuda")
    if marker is not None:
        reason = cuda_skip_reason(**marker.kwargs)
        if reason:
            pytest.skip(reason)
