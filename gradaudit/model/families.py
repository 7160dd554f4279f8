"""Model-family adapters: where embeddings and per-layer linear components live.

Everything that depends on a model's module layout goes through a `Family`, so the rest of
gradaudit never builds module names by string hacks of its own. A family gradaudit does not
know can be added with `register_family`.
"""

from __future__ import annotations

import contextlib
import re
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field

from torch import nn

from gradaudit.errors import GradAuditError
from gradaudit.model.adapter import ModelLayout
from gradaudit.model.lora import LORA_PARTS, inner_model, split_part

# Every component name any family defines, in the order reports list them. A family maps the
# ones it has; BERT's six keep their meaning everywhere (`ffn_in` widens, `ffn_out` narrows).
COMPONENTS = ("query", "key", "value", "qkv", "attn_output", "ffn_gate", "ffn_in", "ffn_out")
BERT_COMPONENTS = {
    "query": "attention.self.query",
    "key": "attention.self.key",
    "value": "attention.self.value",
    "attn_output": "attention.output.dense",
    "ffn_in": "intermediate.dense",
    "ffn_out": "output.dense",
}


@dataclass(frozen=True)
class Family:
    """Layout of one model family, relative to the model's base model (e.g. `bert`, `model`).

    An embedding part set to None does not exist in the family (`lacks` says why); asking the
    layout for it is a `GradAuditError`, so BERT-only code fails clearly on other families.
    """

    name: str
    model_types: tuple[str, ...]
    layers: str = "encoder.layer"
    components: dict[str, str] = field(default_factory=lambda: dict(BERT_COMPONENTS))
    word_embeddings: str = "embeddings.word_embeddings"
    position_embeddings: str | None = "embeddings.position_embeddings"
    token_type_embeddings: str | None = "embeddings.token_type_embeddings"
    embedding_norm: str | None = "embeddings.LayerNorm"
    # RoBERTa numbers positions from padding_idx + 1; BERT from 0.
    position_offset_from_padding: bool = False
    decoder: bool = False  # causal attention: position t sees tokens <= t only
    rotary: bool = False  # positions enter as rotations (RoPE): only distances matter
    lacks: str = ""  # why the parts set to None are missing


BERT = Family("bert", ("bert",))
ROBERTA = Family(
    "roberta", ("roberta", "xlm-roberta", "camembert"), position_offset_from_padding=True
)
LLAMA = Family(
    "llama",
    ("llama", "qwen2", "mistral"),
    layers="layers",
    components={
        "query": "self_attn.q_proj",
        "key": "self_attn.k_proj",
        "value": "self_attn.v_proj",
        "attn_output": "self_attn.o_proj",
        "ffn_gate": "mlp.gate_proj",
        "ffn_in": "mlp.up_proj",
        "ffn_out": "mlp.down_proj",
    },
    word_embeddings="embed_tokens",
    position_embeddings=None,
    token_type_embeddings=None,
    embedding_norm=None,
    decoder=True,
    rotary=True,
    lacks="rotary positions (RoPE) inside attention, no token types, RMSNorm inside each layer",
)
GPT2 = Family(
    "gpt2",
    ("gpt2",),
    layers="h",
    components={
        "qkv": "attn.c_attn",  # query, key and value in one Conv1D
        "attn_output": "attn.c_proj",
        "ffn_in": "mlp.c_fc",
        "ffn_out": "mlp.c_proj",
    },
    word_embeddings="wte",
    position_embeddings="wpe",
    token_type_embeddings=None,
    embedding_norm=None,
    decoder=True,
    lacks="no token types; its LayerNorm sits inside each layer (ln_1), not after the embeddings",
)
FAMILIES: list[Family] = [BERT, ROBERTA, LLAMA, GPT2]
ADD_FAMILY_HINT = (
    "select modules by glob, or describe the family (its layer path, component module names "
    "and embeddings) as a gradaudit.model.families.Family and pass it to register_family"
)


def register_family(family: Family) -> None:
    """Make `family` known (it takes precedence over a built-in family of the same type)."""
    if not isinstance(family, Family):
        raise GradAuditError(f"{family!r} is not a gradaudit.model.families.Family")
    FAMILIES.insert(0, family)


def known_families() -> str:
    """`name (model types)` of every known family, for error messages."""
    return ", ".join(f"{f.name} ({', '.join(f.model_types)})" for f in FAMILIES)


def locate_name(
    module_name: str, families: Iterable[Family] | None = None
) -> tuple[str, int] | None:
    """(component, layer) read from a module name alone (no model), or None when unknown; a
    LoRA part (`...query.lora_A.default`) is located at the module it wraps."""
    module_name = split_part(module_name)[0]
    for family in FAMILIES if families is None else families:
        for component, relative in family.components.items():
            layers, tail = re.escape(family.layers), re.escape(relative)
            match = re.search(rf"(?:^|\.){layers}\.(\d+)\.{tail}$", module_name)
            if match:
                return component, int(match.group(1))
    return None


def _layer_ranges(layers: list[int]) -> str:
    runs: list[list[int]] = []
    for layer in sorted(set(layers)):
        if runs and layer == runs[-1][-1] + 1:
            runs[-1].append(layer)
        else:
            runs.append([layer])
    return ",".join(str(r[0]) if len(r) == 1 else f"{r[0]}-{r[-1]}" for r in runs)


def modules_label(module_names: Iterable[str]) -> str:
    """Short label of a module set, e.g. `query@0-2, ffn_in@4, value@0:lora_A`; unknown names
    stay in full."""
    layers: dict[tuple[str, str], list[int]] = {}
    others: list[str] = []
    for name in module_names:
        found = locate_name(name)
        if found is None:
            others.append(name)
        else:
            part = split_part(name)[1]
            layers.setdefault((found[0], f":{part}" if part else ""), []).append(found[1])
    labels = [
        f"{component}@{_layer_ranges(layers[component, part])}{part}"
        for component in COMPONENTS
        for part in ("", *(f":{p}" for p in LORA_PARTS))
        if (component, part) in layers
    ]
    return ", ".join(labels + others)


def _base_prefix(model: nn.Module) -> str:
    inner = inner_model(model)  # seen through PEFT's wrappers
    base = getattr(inner, "base_model", inner)
    for name, module in model.named_modules():
        if module is base:
            return f"{name}." if name else ""
    return ""


def find_family(model: nn.Module) -> Family | None:
    """The family of `model` (by `config.model_type`), or None when gradaudit does not know it."""
    model_type = getattr(getattr(model, "config", None), "model_type", None)
    return next((f for f in FAMILIES if model_type in f.model_types), None)


def layout(model: nn.Module) -> ModelLayout:
    """The family adapter for `model`; a clear error for families not supported yet."""
    family = find_family(model)
    if family is None:
        model_type = getattr(getattr(model, "config", None), "model_type", None)
        raise GradAuditError(
            f"model type {model_type!r} has no gradaudit family adapter yet (known families: "
            f"{known_families()}); {ADD_FAMILY_HINT}"
        )
    return ModelLayout(family, model, _base_prefix(model))


def is_causal_lm(model: nn.Module) -> bool:
    """True for a causal language-model head (its text is its own label), e.g.
    `LlamaForCausalLM` or `GPT2LMHeadModel`: a class transformers lists as a causal LM."""
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

    names: set[str] = set()
    for value in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES.values():
        names.update([value] if isinstance(value, str) else value)
    return any(cls.__name__ in names for cls in type(inner_model(model)).__mro__)


@contextlib.contextmanager
def eager_attention(model: nn.Module) -> Iterator[None]:
    """Run attention with the eager kernel, which supports the double backward attacks need."""
    config = model.config
    previous = getattr(config, "_attn_implementation", None)
    setter = getattr(model, "set_attn_implementation", None)
    if previous in (None, "eager"):
        yield
        return
    if setter is not None:
        setter("eager")
    else:
        config._attn_implementation = "eager"
    try:
        yield
    finally:
        if setter is not None:
            setter(previous)
        else:
            config._attn_implementation = previous
