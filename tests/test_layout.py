"""The dependency rules of docs/ARCHITECTURE.md ("The code's layout"), checked on the source.

Why a test: an import in the wrong direction is one line in a diff and easy to miss, and
once the core imports Kafka or the library imports its own services, the pure core can no
longer be used (or tested) alone.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
#: The pure core: numpy (and faiss, river) only; the shared settings and errors too.
CORE = sorted(
    [
        *(ROOT / "metarec" / "core").glob("*.py"),
        ROOT / "metarec" / "config.py",
        ROOT / "metarec" / "errors.py",
    ]
)
IO_AND_FRAMEWORKS = ("confluent_kafka", "redis", "tensorflow", "matplotlib", "kafka")
#: Only the local demo runs the producer in-process; nothing in the library runs the
#: consumer service, which it finds through an entry point (metarec.cli).
MAY_IMPORT_PRODUCER = {"demo"}


def imported(path: Path) -> set[str]:
    """Top-level names of every module ``path`` imports, at any depth of the file."""
    names: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            names.update(alias.name.split(".")[0] for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and not node.level:
            names.add(node.module.split(".")[0])
    return names


def imported_metarec(path: Path) -> set[str]:
    """The ``metarec.*`` modules ``path`` imports, as dotted names."""
    names: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if (
            isinstance(node, ast.ImportFrom)
            and node.module
            and not node.level
            and node.module.startswith("metarec.")
        ):
            names.add(node.module)
        elif isinstance(node, ast.Import):
            names.update(a.name for a in node.names if a.name.startswith("metarec."))
    return names


def library_modules() -> list[Path]:
    return sorted((ROOT / "metarec").rglob("*.py"))


@pytest.mark.parametrize("path", CORE, ids=lambda p: p.stem)
def test_the_core_imports_no_io_and_no_framework(path: Path) -> None:
    bad = imported(path) & set(IO_AND_FRAMEWORKS)
    assert not bad, f"{path.relative_to(ROOT)} (core) imports {sorted(bad)}"
    # Nor anything of the packages built on it.
    outer = {
        m
        for m in imported_metarec(path)
        if m.split(".")[1] in {"services", "training", "evaluation", "local", "client"}
    }
    assert not outer, f"{path.relative_to(ROOT)} (core) imports {sorted(outer)}"


@pytest.mark.parametrize("group", ["core", "training", "services", "evaluation", "data", "local"])
def test_tests_mirror_the_package_layout(group: str) -> None:
    modules = {p.stem for p in (ROOT / "metarec" / group).glob("*.py")} - {"__init__"}
    tests = {p.stem.removeprefix("test_") for p in (ROOT / "tests" / group).glob("test_*.py")}
    assert tests - modules <= {"schema", "cluster_integration"}, (
        f"tests/{group}/ has tests of modules that metarec/{group}/ does not have: "
        f"{sorted(tests - modules)}"
    )


@pytest.mark.parametrize("path", library_modules(), ids=lambda p: p.stem)
def test_the_library_never_imports_its_services(path: Path) -> None:
    names = imported(path)
    assert "consumer" not in names, f"{path.name} imports the consumer service"
    if path.stem not in MAY_IMPORT_PRODUCER:
        assert "producer" not in names, f"{path.name} imports the producer package"


def test_the_checks_see_imports() -> None:
    # The rules above pass vacuously if the parser finds nothing: it must find these.
    assert {"confluent_kafka", "metarec"} <= imported(ROOT / "consumer" / "app.py")
    assert "producer" in imported(ROOT / "metarec" / "local" / "demo.py")
