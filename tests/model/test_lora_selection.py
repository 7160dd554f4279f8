"""Selecting LoRA adapter parts of a real PEFT model, and refusing what gradaudit cannot audit."""

from __future__ import annotations

import pytest
from conftest import make_tiny_model
from peft import IA3Config, LoraConfig, PrefixTuningConfig, TaskType, get_peft_model

from gradaudit import GradAuditError, select_modules
from gradaudit.model.families import layout, modules_label
from gradaudit.model.lora import lora_part

PREFIX = "base_model.model.bert.encoder.layer"


@pytest.fixture(scope="module")
def peft_model(tiny_tokenizer):
    """The tiny BERT with LoRA (r = 4, alpha 8) on query and value, as PEFT wraps it."""
    config = LoraConfig(r=4, lora_alpha=8, target_modules=["query", "value"])
    return get_peft_model(make_tiny_model(tiny_tokenizer.vocab_size), config)


def part(layer: int, component: str, name: str) -> str:
    return f"{PREFIX}.{layer}.attention.self.{component}.{name}.default"


def test_part_suffix_selects_the_adapter_part_of_the_wrapped_module(peft_model):
    (name,) = select_modules(peft_model, "query@0:lora_A")
    assert name.endswith("encoder.layer.0.attention.self.query.lora_A.default")
    assert name == part(0, "query", "lora_A")
    assert select_modules(peft_model, "value@1:lora_B") == [part(1, "value", "lora_B")]


def test_lora_suffix_selects_both_parts_of_every_layer_in_the_range(peft_model):
    assert select_modules(peft_model, "query@0-1:lora") == [
        part(0, "query", "lora_A"),
        part(0, "query", "lora_B"),
        part(1, "query", "lora_A"),
        part(1, "query", "lora_B"),
    ]


def test_layer_preset_with_a_part_selects_that_part_of_each_adapter_in_the_layer(peft_model):
    assert select_modules(peft_model, "layer@0:lora_B") == [
        part(0, "query", "lora_B"),
        part(0, "value", "lora_B"),
    ]


def test_layer_preset_without_a_part_selects_only_the_trainable_adapter_parts(peft_model):
    # The base weights are frozen under LoRA: only the adapters have a gradient to leak.
    names = select_modules(peft_model, "layer@1")
    assert names == [
        part(1, "query", "lora_A"),
        part(1, "query", "lora_B"),
        part(1, "value", "lora_A"),
        part(1, "value", "lora_B"),
    ]


def test_globs_reach_adapter_parts_by_their_names(peft_model):
    assert select_modules(peft_model, "*.query.lora_A.*") == [
        part(0, "query", "lora_A"),
        part(1, "query", "lora_A"),
    ]
    assert select_modules(peft_model, ["*.layer.1.*.value.lora_B.default", "query@1:lora_B"]) == [
        part(1, "query", "lora_B"),
        part(1, "value", "lora_B"),
    ]


def test_plain_preset_on_a_wrapped_module_is_refused_naming_the_part_specs(peft_model):
    with pytest.raises(GradAuditError, match="frozen") as refused:
        select_modules(peft_model, "query@0")
    assert "select query@0:lora_A, query@0:lora_B or query@0:lora (both)" in str(refused.value)


def test_glob_on_a_wrapped_module_is_refused_naming_its_parts(peft_model):
    wrapped = f"{PREFIX}.0.attention.self.query"
    with pytest.raises(GradAuditError, match="which a LoRA adapter wraps") as refused:
        select_modules(peft_model, "*.layer.0.attention.self.query")
    assert f"select {wrapped}.lora_A.* or {wrapped}.lora_B.*" in str(refused.value)


def test_part_of_a_module_without_an_adapter_is_refused(peft_model, tiny_model):
    with pytest.raises(GradAuditError, match="'key@0:lora_A': .*key' carries no LoRA adapter"):
        select_modules(peft_model, "key@0:lora_A")
    with pytest.raises(GradAuditError, match="carries no LoRA adapter"):  # no PEFT at all
        select_modules(tiny_model, "query@0:lora_A")


def test_unknown_adapter_part_is_refused_listing_the_parts(peft_model):
    with pytest.raises(GradAuditError, match="unknown adapter part 'lora_C'.*lora_A, lora_B"):
        select_modules(peft_model, "query@0:lora_C")


@pytest.mark.parametrize(
    "config",
    [
        IA3Config(target_modules=["query", "value"], feedforward_modules=[]),
        PrefixTuningConfig(num_virtual_tokens=4, task_type=TaskType.SEQ_CLS),
    ],
    ids=["ia3", "prefix-tuning"],
)
def test_peft_methods_other_than_lora_are_refused(tiny_tokenizer, config):
    model = get_peft_model(make_tiny_model(tiny_tokenizer.vocab_size), config)
    method = config.peft_type.value
    with pytest.raises(GradAuditError, match=f"PEFT method {method} .* is not supported yet"):
        select_modules(model, "query@0")


def test_dora_is_refused(tiny_tokenizer):
    config = LoraConfig(r=4, target_modules=["query"], use_dora=True)
    model = get_peft_model(make_tiny_model(tiny_tokenizer.vocab_size), config)
    with pytest.raises(GradAuditError, match="DoRA .* is not supported yet"):
        select_modules(model, "query@0:lora_A")


def test_layout_locates_an_adapter_part_at_the_module_it_wraps(peft_model):
    lay = layout(peft_model)
    assert lay.locate(part(0, "query", "lora_A")) == ("query", 0)
    assert lay.locate(part(1, "value", "lora_B")) == ("value", 1)
    assert lay.component_name("query", 0) == f"{PREFIX}.0.attention.self.query"


def test_an_adapter_part_reports_its_rank_scaling_and_dropout(peft_model):
    found = lora_part(peft_model, part(0, "query", "lora_A"))
    assert (found.wrapped, found.part, found.adapter) == (
        f"{PREFIX}.0.attention.self.query",
        "lora_A",
        "default",
    )
    assert (found.rank, found.scaling, found.dropout) == (4, 2.0, 0.0)  # scaling alpha / r
    assert lora_part(peft_model, f"{PREFIX}.0.attention.self.key") is None


def test_module_labels_keep_the_adapter_part_so_reports_never_name_the_frozen_base(peft_model):
    names = select_modules(peft_model, ["query@0-1:lora_A", "value@0:lora_B"])
    assert modules_label(names) == "query@0-1:lora_A, value@0:lora_B"
