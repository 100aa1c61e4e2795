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
