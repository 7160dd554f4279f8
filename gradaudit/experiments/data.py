"""Reading labelled sentences: local TSV/CSV/JSONL files, or hub data sets by name."""

from __future__ import annotations

import csv
import json
from dataclasses import dataclass
from pathlib import Path

from gradaudit.errors import GradAuditError

TEXT_COLUMNS = ("sentence", "text")
# name -> (load_dataset arguments, split); only for machines that reach the hub.
HUB_DATASETS = {
    "glue/cola": (("glue", "cola"), "validation"),
    "glue/sst2": (("glue", "sst2"), "validation"),
    "rotten_tomatoes": (("rotten_tomatoes",), "test"),
}


@dataclass
class Examples:
    """Sentences with their labels (0 where the source has none)."""

    texts: list[str]
    labels: list[int]
    source: str

    def __len__(self) -> int:
        return len(self.texts)

    def batches(
        self, batch_size: int, limit: int | None = None
    ) -> list[tuple[list[str], list[int]]]:
        """Consecutive batches of `batch_size`, at most `limit` of them."""
        if batch_size < 1:
            raise GradAuditError(f"batch size must be at least 1, got {batch_size}")
        if limit is not None and limit < 1:
            raise GradAuditError(f"the number of batches must be at least 1, got {limit}")
        out = [
            (self.texts[i : i + batch_size], self.labels[i : i + batch_size])
            for i in range(0, len(self.texts), batch_size)
        ]
        return out[:limit] if limit is not None else out


def _is_cola(rows: list[list[str]]) -> bool:
    return bool(rows) and len(rows[0]) == 4 and rows[0][1] in ("0", "1")


def _rows_with_header(path: Path, rows: list[list[str]]) -> Examples:
    header = [h.strip().lower() for h in rows[0]]
    text_col = next((header.index(c) for c in TEXT_COLUMNS if c in header), None)
    if text_col is None:
        raise GradAuditError(
            f"{path} has no text column (looked for {', '.join(TEXT_COLUMNS)} in header "
            f"{rows[0]}): rename the column holding the sentences"
        )
    label_col = header.index("label") if "label" in header else None
    body = [r for r in rows[1:] if len(r) > text_col and r[text_col].strip()]
    return Examples(
        texts=[r[text_col].strip() for r in body],
        labels=[int(r[label_col]) if label_col is not None else 0 for r in body],
        source=str(path),
    )


def _read_table(path: Path, delimiter: str) -> Examples:
    with path.open(encoding="utf-8", newline="") as handle:
        rows = list(
            csv.reader(
                handle,
                delimiter=delimiter,
                quoting=csv.QUOTE_NONE if delimiter == "\t" else csv.QUOTE_MINIMAL,
            )
        )
    rows = [r for r in rows if r]
    if _is_cola(rows):  # CoLA's raw file: source, label, original mark, sentence; no header
        return Examples([r[3].strip() for r in rows], [int(r[1]) for r in rows], str(path))
    if not rows:
        raise GradAuditError(f"{path} is empty: pass a file with a header and a text column")
    return _rows_with_header(path, rows)


def _read_jsonl(path: Path) -> Examples:
    records = [
        json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()
    ]
    key = next((k for k in TEXT_COLUMNS if records and k in records[0]), None)
    if key is None:
        raise GradAuditError(
            f"{path} has no text field (looked for {', '.join(TEXT_COLUMNS)}): rename the field"
        )
    return Examples(
        [str(r[key]).strip() for r in records], [int(r.get("label", 0)) for r in records], str(path)
    )


def load_examples(source: str) -> Examples:
    """Examples from a local .tsv/.csv/.jsonl file or a hub name (`glue/sst2`, ...)."""
    path = Path(source)
    if path.is_file():
        suffix = path.suffix.lower()
        if suffix == ".jsonl":
            return _read_jsonl(path)
        return _read_table(path, "," if suffix == ".csv" else "\t")
    if source in HUB_DATASETS:
        import datasets

        args, split = HUB_DATASETS[source]
        data = datasets.load_dataset(*args, split=split)
        key = next(k for k in TEXT_COLUMNS if k in data.column_names)
        return Examples(list(data[key]), list(data["label"]), source)
    raise GradAuditError(
        f"data {source!r} is neither a file nor one of {', '.join(HUB_DATASETS)}: pass a path to "
        "a TSV/CSV/JSONL file with a text column"
    )
