"""`scan`: rank, tokens and a leakage label per linear module, without an attack."""

from __future__ import annotations

import copy
import json

import pytest
import torch
from conftest import make_tiny_model, make_tiny_tokenizer

from gradaudit.experiments.scan import ScanRow, scan, to_json, to_table
from gradaudit.model.batch import make_batch
from gradaudit.model.families import layout
from gradaudit.model.selection import select_modules

WORDS = "the a movie film plot was is good bad very boring funny and not".split()


@pytest.fixture(scope="module")
def tiny(tmp_path_factory: pytest.TempPathFactory):
    """A random 2-layer BERT of width 48 over this file's words, and its tokenizer."""
    tokenizer = make_tiny_tokenizer(tmp_path_factory.mktemp("vocab"), WORDS)
    return make_tiny_model(len(tokenizer.get_vocab()), hidden=48), tokenizer


def test_scan_labels_known_cases(tiny):
    model, tokenizer = tiny
    batch = make_batch(model, tokenizer, ["the movie was good", "a very boring plot"], [1, 0])
    rows = {r.module: r for r in scan(model, batch, select_modules(model, "all@all"))}
    lay = layout(model)
    tokens = int(batch["attention_mask"].sum())
    assert rows[lay.component_name("query", 0)].label == "exact"
    assert rows[lay.component_name("ffn_in", 0)].label == "span"
    for component in ("query", "attn_output", "ffn_in", "ffn_out"):
        row = rows[lay.component_name(component, 1)]
        assert row.label == "rank-limited", component
        assert row.rank <= 2  # one [CLS] per sentence
    assert rows[lay.component_name("key", 1)].label == "span"
    assert all(r.tokens == tokens for r in rows.values())
    assert 0 < rows[lay.component_name("ffn_in", 0)].param_share < 1


def test_scan_outputs(tiny):
    model, tokenizer = tiny
    batch = make_batch(model, tokenizer, ["the movie was good"], [1])
    rows = scan(model, batch, select_modules(model, "query@all"))
    table = to_table(rows)
    assert "rank-limited" in table and "exact" in table
    assert [r["label"] for r in json.loads(to_json(rows))] == ["exact", "rank-limited"]


@pytest.mark.slow
def test_scan_minilm_labels(minilm):
    model, tokenizer = minilm
    batch = make_batch(model, tokenizer, ["a gripping film .", "dull and slow"], [1, 0])
    rows = scan(model, batch, select_modules(model, "all@all"))
    assert len(rows) == 36
    assert {r.label for r in rows} >= {"exact", "span", "rank-limited"}


def test_table_shows_weaker_directions_above_rounding_next_to_the_rank():
    # SST-2 dev sentences 0-3 at MiniLM's query@2 read this way: rank 71 at the largest gap,
    # 74 (the batch's tokens) counting the weaker directions that still clear the rounding.
    row = ScanRow("layer.2.query", 71, 74, 74, 384, 384, 0.007, True, "span")
    same = ScanRow("layer.0.query", 70, 70, 74, 384, 384, 0.007, True, "exact")
    lines = to_table([row, same]).splitlines()
    assert " 71 (74) " in lines[1]
    assert "(" not in lines[2]
    assert json.loads(to_json([row]))[0]["rank_above_rounding"] == 74


def _lora(model, rank: int, b_rank: int):
    """`model` with LoRA of rank `rank` on query, each lora_B a seeded matrix of rank `b_rank`
    (as training makes it: PEFT starts it at zero)."""
    from peft import LoraConfig, get_peft_model

    wrapped = get_peft_model(copy.deepcopy(model), LoraConfig(r=rank, target_modules=["query"]))
    generator = torch.Generator().manual_seed(0)
    for name, param in wrapped.named_parameters():
        if "lora_B" in name:
            left = torch.randn(param.shape[0], b_rank, generator=generator)
            param.data = left @ torch.randn(b_rank, param.shape[1], generator=generator)
    return wrapped


def test_scan_labels_lora_a_by_its_regime_rank_against_r_and_the_tokens(tiny):
    model, tokenizer = tiny
    batch = make_batch(model, tokenizer, ["the movie was good", "a very boring plot"], [1, 0])
    # With r above the tokens, lora_A's gradient has the rank of the wrapped query's own.
    (plain,) = scan(model, batch, select_modules(model, "query@0"))
    full = (plain.rank, 16, "exact")
    cases = {(4, 4): (4, 4, "partial"), (16, 16): full, (16, 2): (2, 2, "partial")}
    for (rank, b_rank), expected in cases.items():
        wrapped = _lora(model, rank, b_rank)
        (row,) = scan(wrapped, batch, select_modules(wrapped, "query@0:lora_A"))
        assert row.tokens == 12 and (row.rank, row.bound, row.label) == expected
    assert "slice of the inputs' span" in to_table([row])
