"""Reports from hand-made audits: the documented schema, privacy, HTML content, CLI, bad input."""

from __future__ import annotations

import base64
import json
import re
import stat
from html.parser import HTMLParser
from pathlib import Path

import pytest
from _audits import LOW, REFERENCES, SHUFFLED, audit_of

from gradaudit import AuditResult, GradAuditError, assert_no_leakage
from gradaudit.cli.main import main
from gradaudit.model.families import locate_name, modules_label
from gradaudit.privacy import privacy_statement
from gradaudit.report import SCHEMA_VERSION, build_report, read_report, write_report
from gradaudit.report.html import plots

SCHEMA_DOC = Path(__file__).resolve().parents[2] / "docs" / "report-schema.md"
QUERY = "bert.encoder.layer.{}.attention.self.query"
FFN_IN = "bert.encoder.layer.{}.intermediate.dense"


def training_audits() -> list[AuditResult]:
    """Two steps x four single-module audits under DP, plus one audit that failed."""
    audits = [
        audit_of(texts, module=module.format(layer), step=step, epsilon=eps)
        for step, eps, texts in ((10, 0.5, SHUFFLED), (20, 0.9, LOW))
        for module in (QUERY, FFN_IN)
        for layer in (0, 2)
    ]
    failed = AuditResult(modules=[QUERY.format(5)], attack="gradmatch", batch_size=2, step=20,
                         error="GradAuditError: nothing to attack")  # fmt: skip
    return [*audits, failed]


def dp_report(redact: bool = False) -> dict:
    privacy = privacy_statement(
        noise_multiplier=1.1, sample_rate=0.01, steps=20, delta=1e-5, clip=1.0, dataset_size=1000
    )
    return build_report(
        training_audits(),
        config={"command": "test"},
        redact=redact,
        epsilon=privacy["epsilon"],
        privacy=privacy,
    )


# --- the schema document -------------------------------------------------------------------


def documented_tables() -> dict[str, dict[str, str]]:
    """Section title -> {key: type} from the tables of docs/report-schema.md."""
    tables: dict[str, dict[str, str]] = {}
    section = None
    for line in SCHEMA_DOC.read_text(encoding="utf-8").splitlines():
        if line.startswith("## "):
            section = line[3:].strip()
        row = re.match(r"\| `(\w+)` \| ([^|]+(?:\\\|[^|]+)*) \|", line)
        if row and section:
            tables.setdefault(section, {})[row.group(1)] = row.group(2).replace("\\|", "|").strip()
    return tables


def matches(value, type_text: str) -> bool:
    """Whether a JSON value has a documented type such as `float | null` or `list[string]`."""
    for option in (t.strip() for t in type_text.split("|")):
        item = re.fullmatch(r"list\[(\w+)\]", option)
        if item and isinstance(value, list) and all(matches(v, item.group(1)) for v in value):
            return True
        if {
            "null": value is None,
            "bool": isinstance(value, bool),
            "int": isinstance(value, int) and not isinstance(value, bool),
            "float": isinstance(value, (int, float)) and not isinstance(value, bool),
            "string": isinstance(value, str),
            "object": isinstance(value, dict),
        }.get(option, False):
            return True
    return False


def check_object(obj: dict, table: dict[str, str], where: str) -> None:
    assert set(obj) == set(table), f"{where}: keys differ from docs/report-schema.md"
    for key, type_text in table.items():
        assert matches(obj[key], type_text), f"{where}.{key} = {obj[key]!r} is not {type_text}"


def test_report_json_matches_the_documented_schema(tmp_path):
    tables = documented_tables()
    assert set(tables) == {"Top level", "Summary entry", "Audit", "Sentence", "Privacy"}
    write_report(tmp_path, dp_report())
    report = json.loads((tmp_path / "report.json").read_text())
    assert report["schema_version"] == SCHEMA_VERSION
    check_object(report, tables["Top level"], "report")
    check_object(report["privacy"], tables["Privacy"], "privacy")
    for key, entry in report["summary"].items():
        check_object(entry, tables["Summary entry"], f"summary[{key}]")
    for i, audit in enumerate(report["audits"]):
        check_object(audit, tables["Audit"], f"audits[{i}]")
        for sentence in audit["sentences"]:
            check_object(sentence, tables["Sentence"], f"audits[{i}].sentences")
    assert sum(len(a["sentences"]) for a in report["audits"]) == 16


# --- files ---------------------------------------------------------------------------------


def test_three_files_written_private(tmp_path):
    out = tmp_path / "new" / "run"
    assert write_report(out, dp_report()) == out / "report.json"
    assert stat.S_IMODE(out.stat().st_mode) == 0o700
    assert sorted(p.name for p in out.iterdir()) == ["report.html", "report.json", "report.md"]
    for path in out.iterdir():
        assert stat.S_IMODE(path.stat().st_mode) == 0o600


def test_assumptions_appear_in_every_format(tmp_path):
    report = dp_report()
    write_report(tmp_path, report)
    statement = report["privacy"]["statement"]
    for name in ("report.json", "report.md", "report.html"):
        path = tmp_path / name
        text = visible_text(path) if name == "report.html" else path.read_text(encoding="utf-8")
        assert report["threat_model"] in text, name
        assert statement in text, name
        for value in report["metric_config"].values():
            assert value in text, name


def test_without_dp_the_reports_say_so(tmp_path):
    write_report(tmp_path, build_report([audit_of(LOW)], config={}))
    for name in ("report.md", "report.html"):
        assert "None stated: no differential-privacy accounting" in (tmp_path / name).read_text()


# --- HTML ----------------------------------------------------------------------------------


class PageParser(HTMLParser):
    def __init__(self) -> None:
        super().__init__()
        self.images: list[str] = []
        self.ids: set[str] = set()
        self.links: list[str] = []
        self.text: list[str] = []
        self.marked = 0

    def handle_starttag(self, tag, attrs):
        attrs = dict(attrs)
        if "id" in attrs:
            self.ids.add(attrs["id"])
        if tag == "img":
            self.images.append(attrs["src"])
        self.links += [attrs[k] for k in ("href", "src") if k in attrs and tag != "img"]
        self.marked += tag == "mark"

    def handle_data(self, data):
        self.text.append(data)


def parse(path: Path) -> PageParser:
    parser = PageParser()
    parser.feed(path.read_text(encoding="utf-8"))
    return parser


def visible_text(path: Path) -> str:
    return "".join(parse(path).text)


def test_html_embeds_every_plot_and_lists_every_audit(tmp_path):
    report = dp_report()
    write_report(tmp_path, report)
    page = parse(tmp_path / "report.html")
    # ROUGE per step, ε per step, and ROUGE-1/ROUGE-2 layer x component heatmaps.
    assert len(page.images) == len(plots(report)) == 4
    for src in page.images:
        prefix = "data:image/png;base64,"
        assert src.startswith(prefix)
        assert base64.b64decode(src[len(prefix) :]).startswith(b"\x89PNG\r\n\x1a\n")
    assert page.links == []  # self-contained: no scripts, styles or links to fetch
    assert {f"audit-{i}" for i in range(len(report["audits"]))} <= page.ids
    text = "".join(page.text)
    assert "Worst case over 9 audit(s):" in text and "ROUGE-1 1.000" in text
    assert "GradAuditError: nothing to attack" in text
    for label in ("query@0", "query@2", "ffn_in@0", "ffn_in@2"):
        assert label in text
    assert REFERENCES[1] in text and SHUFFLED[1] in text
    assert page.marked > 0  # recovered words highlighted


def test_plots_follow_the_audits():
    untimed = build_report([audit_of(LOW), audit_of(SHUFFLED)], config={})
    (only,) = plots(untimed)  # one module, no steps, no ε: ROUGE per audit only
    assert "ROUGE" in only[0]
    assert plots(build_report([], config={})) == []


def test_redacted_report_holds_no_text_in_any_format(tmp_path):
    write_report(tmp_path, dp_report(redact=True))
    words = {"charming", "journey", "boring", "affecting", "music", "bank"}
    for name in ("report.json", "report.md", "report.html"):
        text = (tmp_path / name).read_text(encoding="utf-8").lower()
        assert not {w for w in words if w in text}, name
    assert "text redacted" in (tmp_path / "report.html").read_text().lower()
    assert "Text redacted" in (tmp_path / "report.md").read_text()


def test_redaction_removes_the_token_set_an_attack_reports_and_keeps_the_rest_of_its_info(
    tmp_path,
):
    # A decoder's layer-0 audit reports the batch's token set: training text as token ids.
    audit = audit_of(SHUFFLED)
    audit.info = {"token_set": [12, 345, 6789], "unsure": [(0, 3)], "module": "q_proj"}
    assert "token_set" not in audit.redact().info
    assert audit.redact().info["module"] == "q_proj" and "token_set" in audit.info
    write_report(tmp_path, build_report([audit], config={}, redact=True))
    (saved,) = read_report(tmp_path)["audits"]
    assert "token_set" not in saved["info"] and saved["info"]["module"] == "q_proj"
    write_report(tmp_path, build_report([audit], config={}))
    assert main(["report", str(tmp_path), "--redact"]) == 0
    (saved,) = read_report(tmp_path)["audits"]
    assert "token_set" not in saved["info"] and saved["info"]["unsure"] == [[0, 3]]


# --- CLI and bad input ---------------------------------------------------------------------


def test_report_command_rerenders_and_redacts(tmp_path, capsys):
    write_report(tmp_path, dp_report())
    (tmp_path / "report.html").unlink()
    assert main(["report", str(tmp_path), "--open"]) == 0
    assert capsys.readouterr().out.strip() == str((tmp_path / "report.html").resolve())
    assert "charming" in (tmp_path / "report.html").read_text()
    assert main(["report", str(tmp_path), "--redact"]) == 0
    report = read_report(tmp_path)
    assert report["redacted"] and all(a["references"] == [] for a in report["audits"])
    assert report["summary"] == dp_report()["summary"]  # scores survive redaction
    assert "charming" not in (tmp_path / "report.html").read_text()


def test_bad_report_directories(tmp_path, capsys):
    with pytest.raises(GradAuditError, match="has no report.json"):
        read_report(tmp_path)
    assert main(["report", str(tmp_path)]) == 2
    assert "has no report.json" in capsys.readouterr().err
    newer = dp_report() | {"schema_version": SCHEMA_VERSION + 1}
    (tmp_path / "report.json").write_text(json.dumps(newer))
    with pytest.raises(GradAuditError) as info:
        read_report(tmp_path)
    message = str(info.value)
    assert f"schema_version {SCHEMA_VERSION + 1}" in message
    assert f"schema_version {SCHEMA_VERSION} that gradaudit" in message
    (tmp_path / "report.json").write_text('{"schema_version": 1}')
    with pytest.raises(GradAuditError, match="lacks threat_model"):
        read_report(tmp_path)


def test_a_report_written_before_batch_rouge1_still_renders_and_asserts(tmp_path):
    report = json.loads(json.dumps(build_report([audit_of(SHUFFLED)], config={})))
    for entry in [*report["summary"].values(), *report["audits"]]:
        del entry["batch_rouge1"]
    (tmp_path / "report.json").write_text(json.dumps(report))
    assert main(["report", str(tmp_path)]) == 0
    assert "batch ROUGE-1 -" in (tmp_path / "report.md").read_text()
    with pytest.raises(AssertionError, match="rouge1 = 1.000 > max_rouge1"):
        assert_no_leakage(tmp_path, max_rouge1=0.5)


def test_module_names_are_located_without_a_model():
    assert locate_name(QUERY.format(3)) == ("query", 3)
    assert locate_name("roberta.encoder.layer.11.output.dense") == ("ffn_out", 11)
    assert locate_name("bert.encoder.layer.1.attention.output.dense") == ("attn_output", 1)
    assert locate_name("classifier") is None
    names = [QUERY.format(i) for i in (0, 1, 2, 5)] + [FFN_IN.format(1), "classifier"]
    assert modules_label(names) == "query@0-2,5, ffn_in@1, classifier"


def test_report_command_redacts_an_audit_holding_a_field_it_does_not_know(tmp_path):
    from gradaudit.cli.main import main

    report = dp_report()
    report["audits"][0]["added_later"] = "kept"
    write_report(tmp_path, report)
    assert main(["report", str(tmp_path), "--redact"]) == 0
    audit = read_report(tmp_path)["audits"][0]
    assert audit["references"] == [] and audit["reconstructions"] == []
    assert audit["added_later"] == "kept"


def test_an_audit_with_an_unknown_field_is_a_clear_error_not_a_type_error():
    from gradaudit import AuditResult, GradAuditError

    audit = {**dp_report()["audits"][0], "added_later": 1}
    with pytest.raises(GradAuditError, match="added_later.*upgrade gradaudit"):
        AuditResult.from_dict(audit)


def test_kept_snapshots_are_named_as_holding_training_text_even_when_redacted(tmp_path):
    report = dp_report(redact=True)
    report["config"] = {**report["config"], "keep_snapshots": True}
    write_report(tmp_path, report)
    for name in ("report.md", "report.html"):
        text = (tmp_path / name).read_text()
        assert "Kept snapshots hold training text" in text and "even when this report is" in text
    write_report(tmp_path / "none", dp_report(redact=True))
    assert "Kept snapshots" not in (tmp_path / "none" / "report.md").read_text()
