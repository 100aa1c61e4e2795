"""Tiny seeded models built in the tests: milliseconds per inference, no downloads."""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

WORDS = (
    "the a an is are was were be to of and in on at for with by from this that it as or not "
    "model data test sentence short long fast slow small large good bad new old day time year "
    "people water rain sun city market price stock team game music food phone battery light "
    "how what why when where who do does did can will would should i you we they he she "
    "deployopt traces one shorter second"
).split()


def mlp() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(16, 32), nn.ReLU(), nn.Linear(32, 4))


class ConvBnRelu(nn.Module):
    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.body = nn.Sequential(
            nn.Conv2d(3, 8, 3, padding=1),
            nn.BatchNorm2d(8),
            nn.ReLU(),
            nn.Conv2d(8, 8, 3, padding=1),
            nn.BatchNorm2d(8),
            nn.ReLU(),
        )
        self.head = nn.Linear(8, 5)
        with torch.no_grad():  # non-trivial BatchNorm statistics
            for m in self.modules():
                if isinstance(m, nn.BatchNorm2d):
                    m.running_mean.uniform_(-0.5, 0.5)
                    m.running_var.uniform_(0.5, 2.0)

    def forward(self, x):
        return self.head(self.body(x).mean(dim=(2, 3)))


def cnn() -> nn.Module:
    return ConvBnRelu()


def not_a_module():
    return 42


def write_vocab(folder: Path) -> Path:
    vocab = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *WORDS]
    vocab += [c for c in "abcdefghijklmnopqrstuvwxyz0123456789.,?!'"]
    vocab += ["##" + c for c in "abcdefghijklmnopqrstuvwxyz0123456789"]
    path = folder / "vocab.txt"
    path.write_text("\n".join(dict.fromkeys(vocab)) + "\n")
    return path


def tiny_bert_config(classifier: bool = False, vocab_size: int = 200):
    from transformers import BertConfig

    return BertConfig(
        vocab_size=vocab_size,
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=4,
        intermediate_size=64,
        max_position_embeddings=64,
        num_labels=3,
        architectures=["BertForSequenceClassification" if classifier else "BertModel"],
    )


def save_tiny_bert(folder: Path, classifier: bool = False) -> Path:
    """A 2-layer BERT with random (seeded) weights and a real WordPiece tokenizer, as an HF folder."""
    from transformers import BertForSequenceClassification, BertModel, BertTokenizerFast

    folder = Path(folder)
    vocab = write_vocab(folder)
    tok = BertTokenizerFast(vocab_file=str(vocab), do_lower_case=True)
    cfg = tiny_bert_config(classifier, vocab_size=len(vocab.read_text().split()))
    torch.manual_seed(0)
    model = (BertForSequenceClassification if classifier else BertModel)(cfg).eval()
    model.save_pretrained(folder)
    tok.save_pretrained(folder)
    return folder
