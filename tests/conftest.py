"""Shared fixtures: a tiny random BERT with a written vocabulary, and the real data paths."""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path

import pytest
import torch
from transformers import BertConfig, BertForSequenceClassification, BertTokenizerFast

os.environ.setdefault("HF_HUB_OFFLINE", "1")

SHARED_DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data"
WORDS = (
    "the a an and or but not very quite rather movie film story plot actor actress scene music "
    "good bad great awful boring charming funny sad dark bright long short slow fast cast role "
    "director script ending beginning is was are were be been it this that these those with "
    "without of in on at to from for by about as than so too also just only never always "
    "love hate like enjoy watch see feel make made lot little much many more most less least "
    "my your his her their our account number name card bank please help thanks refund order"
).split()
SPECIALS = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]


def make_tiny_tokenizer(directory: Path, words: Sequence[str] = WORDS) -> BertTokenizerFast:
    """A WordPiece tokenizer over `words`, its vocab file written in `directory`.

    (`vocab=`, not `vocab_file=`: transformers 5 ignores the latter and maps every word to
    [UNK].)
    """
    path = Path(directory) / "vocab.txt"
    path.write_text("\n".join(SPECIALS + [".", ",", "!", "?", "'"] + sorted(set(words))) + "\n")
    return BertTokenizerFast(vocab=str(path), do_lower_case=True)


@pytest.fixture(scope="session")
def tiny_tokenizer(tmp_path_factory: pytest.TempPathFactory) -> BertTokenizerFast:
    return make_tiny_tokenizer(tmp_path_factory.mktemp("vocab"))


def make_tiny_model(vocab_size: int, *, hidden: int = 48, layers: int = 2, seed: int = 0):
    """A random BERT classifier small enough for unit tests (wider than test batches)."""
    config = BertConfig(
        vocab_size=vocab_size,
        hidden_size=hidden,
        num_hidden_layers=layers,
        num_attention_heads=4,
        intermediate_size=2 * hidden,
        max_position_embeddings=32,
        num_labels=2,
    )
    torch.manual_seed(seed)
    return BertForSequenceClassification(config).eval()


@pytest.fixture(scope="session")
def tokenizer(tiny_tokenizer: BertTokenizerFast) -> BertTokenizerFast:
    """The tiny tokenizer under the name the training-loop tests use."""
    return tiny_tokenizer


@pytest.fixture(scope="module")
def one_torch_thread():
    """torch on one thread for a module (shared CPUs thrash with more), then restored."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture
def tiny_model(tiny_tokenizer: BertTokenizerFast):
    return make_tiny_model(tiny_tokenizer.vocab_size)


@pytest.fixture(scope="session")
def minilm():
    """The packaged pretrained MiniLM (model, tokenizer); loaded once per session."""
    from gradaudit import load_model

    return load_model("minilm")


@pytest.fixture(scope="session")
def smollm2():
    """The packaged SmolLM2 (model, tokenizer), loaded once per session, or a skip saying
    what is missing."""
    from _decoders import smollm2_or_skip

    return smollm2_or_skip()


@pytest.fixture
def sst2_path() -> Path:
    path = SHARED_DATA / "sst2" / "dev.tsv"
    if not path.is_file():
        pytest.skip(
            f"real SST-2 text not found at {path} (the shared data folder sits beside the repo)"
        )
    return path
