"""`scan` and `bench` on decoders: Conv1D read as nn.Linear, the decoder grid, texts as labels."""

from __future__ import annotations

import pytest
from _decoders import decoder_tokenizer, tiny_gpt2, tiny_llama
from conftest import make_tiny_model

from gradaudit.errors import GradAuditError
from gradaudit.experiments.bench import DATASET_FILES, BenchGrid, run_bench
from gradaudit.experiments.scan import scan
from gradaudit.model.batch import make_batch
from gradaudit.model.selection import select_modules

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def test_scan_reads_conv1d_gradients_with_the_input_width_and_no_exact_label():
    model, tokenizer = tiny_gpt2(), decoder_tokenizer()
    batch = make_batch(model, tokenizer, ["the movie was very good", "a boring film"])
    rows = {r.module: r for r in scan(model, batch, select_modules(model, "all@0"))}
    attention = rows["transformer.h.0.attn.c_attn"]
    assert attention.width == 48  # the input width, not the 144 outputs of query, key, value
    # the last token of each text predicts nothing, so its input never reaches the loss
    assert (attention.tokens, attention.rank, attention.label) == (8, 6, "span")
    assert rows["transformer.h.0.mlp.c_proj"].width == 4 * 48
    llama = tiny_llama()
    batch = make_batch(llama, tokenizer, ["the movie was very good"])
    (row,) = scan(llama, batch, select_modules(llama, "query@0"))
    assert row.label == "span"  # RoPE and RMSNorm: not BERT's per-token layer-0 input


def test_the_decoder_grid_is_its_components_at_the_decoder_depths():
    grid = BenchGrid.for_model(tiny_llama())
    assert grid.components == ["query", "key", "value", "attn_output", "ffn_gate", "ffn_in",
                               "ffn_out"]  # fmt: skip
    assert grid.layers == [0, 1] and grid.batch_sizes == [1, 4, 8, 16]
    assert grid.attacks == ["gradmatch", "causal"]
    quick = BenchGrid.for_model(tiny_gpt2(), quick=True)
    assert quick.components == ["qkv", "ffn_in"] and quick.layers == [1]
    encoder = BenchGrid.for_model(make_tiny_model(40))
    assert encoder == BenchGrid() and "ffn_gate" not in encoder.components


def test_bench_runs_a_causal_lm_on_labelled_data(tmp_path):
    rows = "sentence\tlabel\nthe movie was good\t1\na boring plot\t0\n"
    for relative in DATASET_FILES.values():
        path = tmp_path / relative
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(rows)
    model, tokenizer = tiny_llama(), decoder_tokenizer()
    grid = BenchGrid(
        datasets=["sst2"], components=["ffn_gate"], layers=[1], attacks=["gradmatch"],
        batch_sizes=[2], sentences=2, budgets={"gradmatch": 0.005},
    )  # fmt: skip
    result = run_bench(model, tokenizer, tmp_path, grid)
    (row,) = result["rows"]
    assert row["error"] is None and 0 <= row["rouge1"] <= 1
    with pytest.raises(GradAuditError, match="unknown component 'ffn_gate'"):
        run_bench(make_tiny_model(40), tokenizer, tmp_path, grid)
