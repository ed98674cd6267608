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


def test_eval_names_the_line_of_a_malformed_event_log(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    log = tmp_path / "dump.jsonl"
    log.write_text(
        '{"user":"u","item":"a","type":"click","ts":1700000000000}\n{"user":"u","item":"b"}\n'
    )
    assert main(["eval", "--data", str(log), "--methods", "pop"]) == 2
    assert "dump.jsonl:2:" in capsys.readouterr().err


@pytest.mark.parametrize("method", ["metarec:", "metarec:nope", "metarec:knn+", "knn"])
def test_eval_rejects_unknown_parts_of_metarec(
    method: str, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(["eval", "--data", "synthetic-small", "--methods", method]) == 2
    err = capsys.readouterr().err
    assert "metarec:PART" in err and "pop-first-100000" in err


def test_methods_for_builds_one_factory_per_named_part() -> None:
    from metarec.config import Settings
    from metarec.evaluation.command import methods_for

    chosen = methods_for(Settings.from_env({}), ["pop", "metarec:knn", "metarec:user+bias"])
    assert list(chosen) == ["pop", "metarec:knn", "metarec:user+bias"]
    assert chosen["metarec:user+bias"].keywords["components"] == ["user", "bias"]  # type: ignore[attr-defined]


@pytest.mark.slow
def test_eval_compares_parts_of_metarec_on_an_event_log(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from metarec.data.registry import load_dataset

    # The synthetic stream, dumped as a team would dump its events topic.
    ds = load_dataset("synthetic-small")
    log = tmp_path / "events.csv"
    rows = [f"{e.user},{e.item},{e.type},{e.ts},{e.domain}" for e in ds.events]
    log.write_text("user,item,type,ts,domain\n" + "\n".join(rows) + "\n")
    code = main(
        [
            "eval",
            "--data",
            str(log),
            "--seeds",
            "1",
            "--methods",
            "pop,metarec:knn,metarec:pop-first-100000",
            "--json",
            str(tmp_path / "r.json"),
            "--out",
            str(tmp_path / "out"),
            "--no-progress",
        ]
    )
    assert code == 0, capsys.readouterr().err
    result = json.loads((tmp_path / "r.json").read_text())
    assert set(result) >= {"pop", "metarec:knn", "metarec:pop-first-100000"}
    # Neighbour votes alone rank differently from popularity alone.
    assert result["metarec:knn"]["all"]["hr10"] != result["metarec:pop-first-100000"]["all"]["hr10"]
