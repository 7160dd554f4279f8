"""`gradaudit bench` on a tiny model: the grid runs end to end and writes its outputs."""

import json

import pytest
from conftest import make_tiny_model

from gradaudit.attacks.gradmatch import GradMatchAttack
from gradaudit.attacks.registry import register_attack
from gradaudit.errors import GradAuditError
from gradaudit.experiments.bench import (
    DATASET_FILES,
    BenchGrid,
    render_table,
    run_bench,
    write_bench,
)

pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture
def data_dir(tmp_path):
    rows = "sentence\tlabel\nthe movie was good\t1\na boring plot\t0\ni love the music\t1\n"
    for relative in DATASET_FILES.values():
        path = tmp_path / "data" / relative
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(rows)
    return tmp_path / "data"


def test_bench_grid_scores_every_cell_and_attack_and_writes_heatmaps(
    tiny_tokenizer, data_dir, tmp_path
):
    model = make_tiny_model(tiny_tokenizer.vocab_size)
    grid = BenchGrid(
        datasets=["sst2"], components=["query", "ffn_in"], layers=[0, 1],
        attacks=["span", "gradmatch"], batch_sizes=[1], sentences=2, budgets={"gradmatch": 0.01},
    )  # fmt: skip
    result = run_bench(model, tiny_tokenizer, data_dir, grid)
    assert len(result["rows"]) == 2 * 2 * 2 * 2  # cells x sentences x attacks
    cells = {(c["component"], c["layer"], c["attack"]): c for c in result["cells"]}
    assert len(cells) == 8
    assert cells[("query", 0, "span")]["rouge1"] == 1.0  # exact mode at layer 0, B = 1
    assert all(c["seconds"] is not None or c["errors"] for c in cells.values())
    table = render_table(result)
    assert "faster" in table and "query@0" in table
    written = write_bench(tmp_path / "out", result)
    names = sorted(p.name for p in written)
    assert "bench.json" in names and "heatmap_span_B1_rouge1.png" in names
    saved = json.loads((tmp_path / "out" / "bench.json").read_text())
    assert saved["grid"]["budgets"] == {"gradmatch": 0.01}
    span_rows = [r for r in saved["rows"] if r["attack"] == "span" and r["error"] is None]
    assert span_rows and all(r["info"]["regime"] for r in span_rows)  # the attack's info kept


def test_quick_grid_is_a_small_subset_and_full_covers_the_paper():
    quick, full = BenchGrid.quick(), BenchGrid()
    assert len(quick.cells(6)) < len(full.cells(6))
    assert set(full.datasets) == {"cola", "sst2", "rotten_tomatoes"}
    assert ("full", None) in full.cells(6) and ("layer", 5) in full.cells(6)


def test_unknown_dataset_is_refused(tiny_tokenizer, data_dir):
    model = make_tiny_model(tiny_tokenizer.vocab_size)
    with pytest.raises(GradAuditError, match="unknown data set"):
        run_bench(model, tiny_tokenizer, data_dir, BenchGrid(datasets=["imdb"]))


def test_table_says_slower_where_an_attack_took_longer_than_gradmatch():
    cell = {"dataset": "sst2", "component": "query", "layer": 2, "batch_size": 1,
            "rouge1": 1.0, "rouge2": 1.0, "token_recall": 1.0}  # fmt: skip
    result = {
        "grid": {"attacks": ["gradmatch", "span"], "budgets": {}},
        "cells": [{**cell, "attack": "gradmatch", "seconds": 8.0},
                  {**cell, "attack": "span", "seconds": 10.0}],
    }  # fmt: skip
    span_line = render_table(result).splitlines()[-1]
    assert span_line.endswith("1.2x slower") and "faster" not in span_line


def test_bench_in_train_mode_says_so_in_every_row_cell_and_the_table(tiny_tokenizer, data_dir):
    model = make_tiny_model(tiny_tokenizer.vocab_size)
    grid = BenchGrid(
        datasets=["sst2"], components=["query"], layers=[0], attacks=["gradmatch"],
        batch_sizes=[1], sentences=1, budgets={"gradmatch": 0.01}, train_mode=True,
    )  # fmt: skip
    result = run_bench(model, tiny_tokenizer, data_dir, grid)
    assert [r["train_mode"] for r in result["rows"]] == [True]
    assert [c["train_mode"] for c in result["cells"]] == [True]
    assert "train (dropout on)" in render_table(result)
    assert not model.training  # the model's own mode is left as it was


def test_lora_cells_audit_lora_a_of_each_rank_and_record_the_regime(tiny_tokenizer, tmp_path):
    from _tiny import SENTENCES

    rows = "sentence\tlabel\n" + "".join(f"{t}\t{y}\n" for t, y in SENTENCES * 6)
    path = tmp_path / "data" / DATASET_FILES["sst2"]
    path.parent.mkdir(parents=True)
    path.write_text(rows)
    grid = BenchGrid(
        datasets=["sst2"], components=["query"], layers=[0], attacks=["gradmatch"],
        batch_sizes=[1], sentences=1, lora_ranks=[16], full_model=False,
        budgets={"gradmatch": 0.01},
    )  # fmt: skip
    model = make_tiny_model(tiny_tokenizer.vocab_size)
    result = run_bench(model, tiny_tokenizer, tmp_path / "data", grid)
    (row,) = result["rows"]
    assert row["lora_rank"] == 16 and row["error"] is None
    assert row["regime"] == "gradient matching"
    (cell,) = result["cells"]
    assert cell["regimes"] == [row["regime"]]
    assert "query@0:lora_A r=16" in render_table(result)
    names = [p.name for p in write_bench(tmp_path / "out", result)]
    assert "heatmap_gradmatch_B1_lora16_rouge1.png" in names


def test_lora_cells_refuse_a_file_too_small_to_hold_out_training_sentences(
    tiny_tokenizer, data_dir
):
    grid = BenchGrid(datasets=["sst2"], components=["query"], layers=[0], lora_ranks=[8])
    model = make_tiny_model(tiny_tokenizer.vocab_size)
    with pytest.raises(GradAuditError, match="LoRA cells need 40"):
        run_bench(model, tiny_tokenizer, data_dir, grid)


def test_table_counts_the_batches_whose_search_ran_out_of_time():
    cell = {"dataset": "sst2", "component": "query", "layer": 2, "batch_size": 8,
            "attack": "span", "rouge1": 0.5, "rouge2": 0.2, "token_recall": 0.6,
            "seconds": 600.0, "batches": 2, "regimes": ["span"]}  # fmt: skip
    result = {"grid": {"attacks": ["span"], "budgets": {}}}
    result["cells"] = [{**cell, "out_of_time": 1}]
    assert render_table(result).endswith("span; 1 of 2 out of time")
    result["cells"] = [{**cell, "out_of_time": 0}]
    assert render_table(result).endswith("  span")


class BrokenAttack(GradMatchAttack):
    """An attack with a bug: it raises something other than a GradAuditError."""

    name = "broken"

    def _reconstruct(self, *args, **kwargs):
        raise IndexError("an attack bug")


def test_an_attack_that_crashes_costs_its_cell_not_the_run(tiny_tokenizer, data_dir, capsys):
    register_attack("broken", BrokenAttack)
    model = make_tiny_model(tiny_tokenizer.vocab_size)
    grid = BenchGrid(
        datasets=["sst2"], components=["query"], layers=[0], attacks=["broken", "span"],
        batch_sizes=[1], sentences=1,
    )  # fmt: skip
    result = run_bench(model, tiny_tokenizer, data_dir, grid)
    broken, span = sorted(result["rows"], key=lambda r: r["attack"])
    assert broken["error"].startswith("IndexError: an attack bug")
    assert span["error"] is None and span["rouge1"] == 1.0
    assert "IndexError" in capsys.readouterr().err  # the traceback is shown, not hidden
