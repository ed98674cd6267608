"""The README stays true to the code: its configuration table is the generated one."""

from __future__ import annotations

from pathlib import Path

from metarec.config import markdown_table

README = Path(__file__).resolve().parents[1] / "README.md"


def test_readme_configuration_table_matches_the_settings() -> None:
    assert markdown_table().strip() in README.read_text()
