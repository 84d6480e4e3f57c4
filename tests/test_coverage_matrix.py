"""The coverage matrix (scripts/coverage_matrix.py): the table in docs/coverage.md and the README's
summary line are the ones generated from docs/coverage.json, no architecture trains with an update different from single-process DP-SGD
(each is equal or refused with a reason), and a few rows re-run live give the recorded result."""

from __future__ import annotations

import json

import pytest
import torch

from tests.distributed_harness import ROOT


def _script():
    from scripts import coverage_matrix  # a package, so spawned ranks can import its worker

    return coverage_matrix


def _recorded() -> dict:
    return json.loads((ROOT / "docs" / "coverage.json").read_text())


def _between_markers(script, path) -> str:
    text = path.read_text()
    return text[text.index(script.START) + len(script.START) : text.index(script.END)].strip()


def test_coverage_page_and_readme_line_are_generated_from_the_recorded_matrix():
    script, recorded = _script(), _recorded()
    table = _between_markers(script, ROOT / "docs" / "coverage.md")
    assert table == script.render_table(recorded["rows"], recorded["versions"])
    summary = _between_markers(script, ROOT / "README.md")
    assert summary == script.render_summary(recorded["rows"], recorded["versions"])


def test_no_architecture_trains_with_a_different_update():
    rows = _recorded()["rows"]
    assert not [r["case"] for r in rows if r["status"] == "different"]
    assert all(r.get("reason") for r in rows if r["status"] == "unsupported")
    equal = {r["case"] for r in rows if r["status"] == "equal"}
    expected = {"llama", "qwen2", "qwen3", "mistral", "phi3", "gemma", "gemma2", "gemma3_text"}
    assert expected | {"gpt2 (gpt2_tp_plan)", "bert (classifier)", "roberta (classifier)"} <= equal


LIVE = ["starcoder2", "roberta (classifier)", "mixtral"]


def test_rows_rerun_live_give_the_recorded_result(tmp_path):
    import transformers

    script, recorded = _script(), _recorded()
    rows = {r["case"]: r for r in script.run_matrix(LIVE, str(tmp_path))}
    same_versions = recorded["versions"]["transformers"] == transformers.__version__
    for case in LIVE:
        row, old = rows[case], next(r for r in recorded["rows"] if r["case"] == case)
        print(case, row.get("error", row.get("reason")))
        assert row["status"] != "different", row
        if same_versions and torch.__version__.startswith(recorded["versions"]["torch"]):
            assert row["status"] == old["status"], (row, old)
            if row["status"] == "unsupported":
                assert row["reason"] == old["reason"]


@pytest.mark.parametrize("case", ["llama", "gemma2", "qwen3_moe"])
def test_tiny_configs_are_tiny(case):
    model, _, _ = _script().build(case)
    assert sum(p.numel() for p in model.parameters()) < 200_000
