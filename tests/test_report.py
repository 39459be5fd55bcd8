"""`neuqi report`: result JSONs → markdown table + PNG; lenient to missing keys."""

from __future__ import annotations

import json

import pytest

from neuqi.cli import main
from neuqi.errors import DataError
from neuqi.eval.report import load_results, markdown_table, new_result, write_report, write_result


def fake_results(tmp_path):
    def res(method, init, bits, bpw, wiki, c4, acc=None, **extra):
        metrics = {"wikitext2_ppl": wiki, "c4_ppl": c4}
        if acc is not None:
            metrics |= {"arc_easy_acc": acc, "arc_easy_acc_norm": acc - 0.05, "winogrande_acc": 0.5,
                        "zero_shot_avg": (acc + 0.5) / 2}
        return {"model": "smollm2", "method": method, "init": init, "bits": bits, "group_size": 128,
                "bits_per_weight": bpw, "metrics": metrics, **extra}

    records = [
        {"model": "smollm2", "method": "fp", "metrics": {"wikitext2_ppl": 19.9, "c4_ppl": 24.1, "arc_easy_acc": 0.55}},
        res("ldlq", "minmax", 2, 2.25, 900.0, 1200.0, 0.30, quant_seconds=50.0),
        res("ldlq", "minmax", 3, 3.25, 40.0, 45.0, 0.45),
        res("ldlq", "minmax", 4, 4.25, 22.0, 26.0, 0.52),
        res("ldlq", "neuqi", 2, 2.25, 120.0, 150.0, 0.35, quant_seconds=300.0),
        res("ldlq", "neuqi", 3, 3.25, 30.0, 34.0),
        {"model": "smollm2", "method": "rtn", "bits": 3, "metrics": {"wikitext2_ppl": 2600.0}},  # sparse record
    ]
    paths = []
    for i, r in enumerate(records):
        paths.append(write_result(tmp_path / "results" / f"r{i}.json", r))
    return paths


def test_table_and_png(tmp_path):
    paths = fake_results(tmp_path)
    results = load_results(paths)
    table = markdown_table(results)
    lines = table.splitlines()
    assert len(lines) == 2 + 7 and lines[2].startswith("| fp |")  # full precision first
    assert "ldlq / neuqi" in table and "| 2,600 |" in table and "120.00" in table
    assert "ARC-e acc" in table and "HellaS." not in table  # only columns with data
    assert "5.0 min" in table  # 300 s quant time
    out = write_report(results, tmp_path / "report")
    png = out["plot"].read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 10_000
    md = out["markdown"].read_text()
    assert "ppl_vs_bpw.png" in md and "arc_easy_acc_norm" in md


def test_cli_report_on_directory(tmp_path, capsys):
    fake_results(tmp_path)
    (tmp_path / "results" / "junk.json").write_text("{\"no\": 1}")
    assert main(["report", str(tmp_path / "results"), "--out", str(tmp_path / "rep")]) == 0
    assert "wrote" in capsys.readouterr().out
    assert (tmp_path / "rep" / "ppl_vs_bpw.png").is_file()


def test_missing_inputs(tmp_path):
    with pytest.raises(DataError, match="not found"):
        load_results([tmp_path / "nope.json"])
    (tmp_path / "x.json").write_text("[]")
    with pytest.raises(DataError, match="no result files with metrics"):
        load_results([tmp_path / "x.json"])
    only_fp = [{"model": "m", "metrics": {"wikitext2_ppl": 10.0}}]
    assert write_report(only_fp, tmp_path / "r")["plot"] is None  # nothing to plot, table still written


def test_new_result_schema(tmp_path):
    r = new_result("smollm2", {"wikitext2_ppl": 19.9}, method="fp", settings={"seqlen": 2048})
    assert r["schema"] == "neuqi-result/1" and r["machine"]["torch"] and r["created"]
    path = write_result(tmp_path / "a" / "r.json", r)
    assert json.loads(path.read_text())["metrics"] == {"wikitext2_ppl": 19.9}
    assert [p.name for p in path.parent.iterdir()] == ["r.json"]  # no temp file left
