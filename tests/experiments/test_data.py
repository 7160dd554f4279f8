import pytest

from gradaudit import GradAuditError
from gradaudit.experiments.data import load_examples


def test_tsv_with_sentence_header(tmp_path):
    p = tmp_path / "d.tsv"
    p.write_text('sentence\tlabel\nit \'s a "charming" film . \t1\nboring \t0\n')
    ex = load_examples(str(p))
    assert ex.texts == ['it \'s a "charming" film .', "boring"] and ex.labels == [1, 0]


def test_headerless_cola_layout(tmp_path):
    p = tmp_path / "cola.tsv"
    p.write_text("gj04\t1\t\tThe sailors rode.\ngj04\t0\t*\tRode sailors the.\n")
    ex = load_examples(str(p))
    assert ex.texts == ["The sailors rode.", "Rode sailors the."] and ex.labels == [1, 0]


def test_csv_and_jsonl_with_text_column_and_no_label(tmp_path):
    csv_path = tmp_path / "d.csv"
    csv_path.write_text('text,other\n"hello, world",x\n')
    assert load_examples(str(csv_path)).texts == ["hello, world"]
    jsonl = tmp_path / "d.jsonl"
    jsonl.write_text('{"text": "one", "label": 1}\n{"text": "two"}\n')
    ex = load_examples(str(jsonl))
    assert ex.texts == ["one", "two"] and ex.labels == [1, 0]


def test_file_without_text_column_is_refused(tmp_path):
    p = tmp_path / "d.tsv"
    p.write_text("body\tlabel\nhello\t1\n")
    with pytest.raises(GradAuditError, match="no text column"):
        load_examples(str(p))


def test_unknown_source_names_the_fix():
    with pytest.raises(GradAuditError, match="neither a file nor one of"):
        load_examples("no/such/file.tsv")


def test_batches_split_in_order_with_a_limit(tmp_path):
    p = tmp_path / "d.tsv"
    p.write_text("text\n" + "".join(f"s{i}\n" for i in range(5)))
    batches = load_examples(str(p)).batches(2, limit=2)
    assert [b[0] for b in batches] == [["s0", "s1"], ["s2", "s3"]]


def test_real_sst2_file_reads_all_rows(sst2_path):
    ex = load_examples(str(sst2_path))
    assert len(ex) == 872 and set(ex.labels) == {0, 1}
