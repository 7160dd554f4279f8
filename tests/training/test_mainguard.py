"""The missing `if __name__ == "__main__":` guard, found before the attack worker is spawned.

Scripts are run as Python runs a script (`runpy.run_path` with run_name "__main__", which
makes them `sys.modules["__main__"]`, as the spawned worker would find them).
"""

from __future__ import annotations

import runpy
import textwrap
from pathlib import Path

import pytest

from gradaudit import GradAuditError

CHECK = "from gradaudit.training.mainguard import unguarded_main_line\n"


def run_script(folder: Path, body: str) -> dict:
    path = folder / "train.py"
    path.write_text(textwrap.dedent(body))
    return runpy.run_path(str(path), run_name="__main__")


@pytest.mark.parametrize(
    ("body", "line"),
    [
        (CHECK + "FOUND = unguarded_main_line()\n", 2),
        (CHECK + "def main():\n    return unguarded_main_line()\n\nFOUND = main()\n", 5),
        (CHECK + "if __name__ == '__main__':\n    FOUND = unguarded_main_line()\n", None),
        (CHECK + 'if "__main__" == __name__ and True:\n    FOUND = unguarded_main_line()\n', None),
        (
            CHECK + "def main():\n    return unguarded_main_line()\n\n"
            "if __name__ == '__main__':\n    FOUND = main()\nelse:\n    FOUND = main()\n",
            None,
        ),
        (CHECK + "if __name__ != '__main__':\n    pass\nFOUND = unguarded_main_line()\n", 4),
    ],
    ids=["top-level", "main-called-unguarded", "guarded", "guard-reversed", "guarded-main", "ne"],
)
def test_unguarded_line_is_found(tmp_path, body, line):
    found = run_script(tmp_path, body)["FOUND"]
    assert found == (None if line is None else (tmp_path / "train.py", line))


def test_auditor_refuses_an_unguarded_script_before_spawning(tmp_path, tokenizer):
    """A background Auditor built from an unguarded script's top level: one error naming the
    line and the fix, before training (no worker was started); inline attacks need no guard."""
    import conftest

    body = f"""
        import multiprocessing
        from gradaudit import Auditor, AuditConfig
        make_model, tokenizer, out = MAKE_MODEL, TOKENIZER, {str(tmp_path / "a")!r}
        model = make_model(tokenizer.vocab_size)

        config = AuditConfig(attack="gradmatch", output_dir=out, background=BACKGROUND)
        auditor = Auditor(model, config, tokenizer=tokenizer)
        auditor.close()
        WORKERS = multiprocessing.active_children()
        """
    path = tmp_path / "train.py"
    path.write_text(textwrap.dedent(body))
    common = {"MAKE_MODEL": conftest.make_tiny_model, "TOKENIZER": tokenizer}
    with pytest.raises(GradAuditError) as error:
        runpy.run_path(str(path), {**common, "BACKGROUND": True}, run_name="__main__")
    message = str(error.value)
    assert message.startswith("train.py runs training from its top level (line 8) outside")
    assert '`if __name__ == "__main__":`' in message and "background=False" in message
    assert not (tmp_path / "a").exists()  # refused before anything was written
    inline = runpy.run_path(str(path), {**common, "BACKGROUND": False}, run_name="__main__")
    assert inline["WORKERS"] == [] and (tmp_path / "a" / "report.json").is_file()
