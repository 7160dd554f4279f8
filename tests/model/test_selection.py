import pytest

from gradaudit import GradAuditError, select_modules
from gradaudit.model.selection import parse_layers


def test_presets_name_the_bert_components_of_each_layer(tiny_model):
    assert select_modules(tiny_model, "query@0") == ["bert.encoder.layer.0.attention.self.query"]
    assert select_modules(tiny_model, ["ffn_out@0-1"]) == [
        "bert.encoder.layer.0.output.dense",
        "bert.encoder.layer.1.output.dense",
    ]
    assert select_modules(tiny_model, "attn_output@last") == [
        "bert.encoder.layer.1.attention.output.dense"
    ]


def test_ffn_out_does_not_also_select_the_attention_output(tiny_model):
    names = select_modules(tiny_model, "ffn_out@all")
    assert not any("attention" in n for n in names)


def test_layer_preset_selects_every_linear_module_of_the_layer(tiny_model):
    names = select_modules(tiny_model, "layer@1")
    assert len(names) == 6
    assert all(n.startswith("bert.encoder.layer.1.") for n in names)


def test_result_is_ordered_and_deduplicated_across_specs(tiny_model):
    names = select_modules(tiny_model, ["value@1", "*.layer.0.attention.self.query", "query@0,1"])
    assert names == [
        "bert.encoder.layer.0.attention.self.query",
        "bert.encoder.layer.1.attention.self.query",
        "bert.encoder.layer.1.attention.self.value",
    ]


def test_glob_over_a_container_keeps_its_linear_members(tiny_model):
    names = select_modules(tiny_model, "bert.encoder.layer.0.attention.*")
    assert len(names) == 4


def test_layer_lists_parse_ranges_commas_last_and_all():
    assert parse_layers("0,4", 6) == [0, 4]
    assert parse_layers("1-3", 6) == [1, 2, 3]
    assert parse_layers("last", 6) == [5]
    assert parse_layers("all", 3) == [0, 1, 2]
    with pytest.raises(GradAuditError, match="out of range"):
        parse_layers("7", 6)
    with pytest.raises(GradAuditError, match="bad layer list"):
        parse_layers("x", 6)


def test_unmatched_spec_names_the_closest_modules(tiny_model):
    with pytest.raises(
        GradAuditError, match="closest names: bert.encoder.layer.0.attention.self.query"
    ):
        select_modules(tiny_model, "bert.encoder.layer.0.attention.self.qeury")


def test_non_linear_and_frozen_modules_are_refused_with_the_fix(tiny_model):
    with pytest.raises(GradAuditError, match="not nn.Linear"):
        select_modules(tiny_model, "bert.embeddings.LayerNorm")
    tiny_model.bert.encoder.layer[0].attention.self.key.weight.requires_grad_(False)
    with pytest.raises(GradAuditError, match="frozen"):
        select_modules(tiny_model, "key@0")


def test_unknown_component_lists_the_valid_ones(tiny_model):
    with pytest.raises(GradAuditError, match="choose one of query"):
        select_modules(tiny_model, "mlp@0")
