"""``metarec eval`` end to end on a small synthetic stream."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from metarec.cli import main

pytest.importorskip("tensorflow")


@pytest.mark.slow
def test_eval_end_to_end_full_metarec_beats_popularity(
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    out = tmp_path / "out"
    code = main(
        [
            "eval",
            "--data",
            "synthetic-small",
            "--seeds",
            "1",
            "--methods",
            "pop,metarec",
            "--json",
            str(tmp_path / "r.json"),
            "--out",
            str(out),
            "--no-progress",
        ]
    )
    assert code == 0
    printed = capsys.readouterr().out
    assert "| metarec" in printed
    result = json.loads((tmp_path / "r.json").read_text())
    methods = result
    for name in ("pop", "metarec"):
        for bucket in ("1", "2-5", "6-10", "11-20", "21+", "first20", "all"):
            cell = methods[name][bucket]
            assert set(cell) >= {"hr10", "hr10_ci", "ndcg10", "ndcg10_ci"}
    assert methods["metarec"]["all"]["hr10"] > methods["pop"]["all"]["hr10"]
    assert methods["metarec"]["all"]["ndcg10"] > methods["pop"]["all"]["ndcg10"]
    assert (out / "results.md").read_text().startswith("|") or "metarec" in (
        out / "results.md"
    ).read_text()
    assert (out / "hr_by_event.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_eval_rejects_unknown_methods(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["eval", "--data", "synthetic-small", "--methods", "pop,nope"]) == 2
    assert "nope" in capsys.readouterr().err
