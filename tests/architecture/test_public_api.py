"""The documented public API keeps its import paths after the move into packages."""

from __future__ import annotations

import importlib
import importlib.metadata

import pytest

import gradaudit

DOCUMENTED = {
    "gradaudit": [
        "load_model", "select_modules", "capture", "GradientSnapshot", "audit_batch",
        "audit_snapshot", "AuditConfig", "AuditResult", "Auditor", "assert_no_leakage",
        "assert_leaks", "get_attack", "Attack", "Reconstruction", "GradAuditError",
        "THREAT_MODEL", "__version__",
    ],
    "gradaudit.metrics": ["score", "canary_exposure", "METRIC_CONFIG"],
    "gradaudit.privacy": ["dp_step", "privacy_statement", "private_snapshot", "epsilon"],
    "gradaudit.attacks": ["register_attack", "attack_names"],
    "gradaudit.integrations.trainer": ["GradAuditCallback"],
    "gradaudit.integrations.accelerate": ["AccelerateAuditor"],
    "gradaudit.integrations.pytest_plugin": ["gradaudit_audit"],
    "gradaudit.cli": ["main"],
}  # fmt: skip


@pytest.mark.parametrize("module", sorted(DOCUMENTED))
def test_documented_names_import_from_their_documented_modules(module: str):
    loaded = importlib.import_module(module)
    missing = [name for name in DOCUMENTED[module] if not hasattr(loaded, name)]
    assert missing == []


def test_the_version_is_the_package_metadata_version():
    assert gradaudit.__version__ == importlib.metadata.version("gradaudit")


def test_importing_gradaudit_and_its_command_line_loads_no_torch():
    import subprocess
    import sys

    code = "import sys, gradaudit, gradaudit.cli.main; print('torch' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"


def test_every_lazy_export_is_listed_in_all():
    assert sorted(gradaudit.__all__) == sorted([*gradaudit._EXPORTS, "__version__"])


def test_no_subpackage_shadows_a_public_name_once_everything_is_imported():
    import pkgutil
    import types

    for info in pkgutil.walk_packages(gradaudit.__path__, "gradaudit."):
        if not info.name.startswith(("gradaudit.integrations", "gradaudit.__main__")):
            importlib.import_module(info.name)
    shadowed = [n for n in gradaudit.__all__ if isinstance(getattr(gradaudit, n), types.ModuleType)]
    assert shadowed == []
