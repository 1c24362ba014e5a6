"""The results schema (`harness.output.schema`): written and read by one declaration.

Round trips through the writer and the reader, `reports.load_results`' DataFrames
and dtypes on the recorded sample, the refusal of another schema version, the one
clean rule, and the terminal summary against the report's headline.
"""

from __future__ import annotations

import json
import re
import shutil
from html import unescape
from pathlib import Path
from typing import Any

import pandas as pd
import pytest
from rich.console import Console

from harness.measure.checks import MAX_ERROR_RATE, MIN_DELIVERY, failure_rate, is_clean
from harness.names import REPO
from harness.output import results, schema
from harness.placement import profiles
from loadtests import latency
from reports import load_results, page, terminal, write_report
from reports.__main__ import main as reports_main
from reports.load import load_run
from reports.stats import LevelPoint
from reports.summary import HEADLINE, THROUGHPUT, summarize

SAMPLE = Path(__file__).parent / "data" / "results-sample"

MODEL = {
    "placement": "host=0;dpu=1;loadgen=1",
    "dpu_profile": "bluefield3",
    "dpu_speed": 0.5,
    "dma_latency_us": 1.0,
    "dma_gbps": 504.1,
    "dpu_cores": 1,
}


def _result(level: str, offered: float | None, **over: Any) -> dict[str, Any]:
    """A results.csv row as the runner makes it, every number within 6 significant digits."""
    args: dict[str, Any] = dict(
        mesh="dpumesh",
        stack="dpumesh@dpu_speed=0.5",
        mode="local",
        workmodel="default.json",
        rep=2,
        level=level,
        users=8,
        offered_rps=offered,
        summary=latency.LatencySummary(10, 1500.5, 1000, 2000, 3000, 4000, 5000, 900),
        sidecar={"achieved_rps": 49.75, "requests": 250, "failures": 1, "window_s": 5.0},
        usage={
            "cpu_host_ms_per_req": 1.5,
            "cpu_offload_ms_per_req": 0.25,
            "cpu_loadgen_ms_per_req": 0.125,
            "cpu_total_ms_per_req": 1.875,
            "vcpu_host_per_1000rps": 1.5,
            "vcpu_offload_per_1000rps": 0.25,
            "vcpu_total_per_1000rps": 1.75,
            "window_s": 4.5,
            "requests": 240,
            "rss_host_mb": 100.0,
            "rss_offload_mb": 30.5,
        },
        downstream_calls_per_req=2.0,
        cross_node_per_req=None,
        nodes=0,
        mtls=False,
        dpu_model=MODEL,
        checks_ok=True,
        failed_checks=[],
    )
    return results.result_row(**{**args, **over})


def _roles() -> list[dict[str, Any]]:
    role = {
        "role_class": "host",
        "cpu_s": 1.0,
        "cpu_ms_per_req": 2.0,
        "vcpu_per_1000rps": None,  # no rate: not measurable
        "rss_mean_mb": 10.0,
        "rss_max_mb": 11.0,
        "pss_mean_mb": None,
        "processes": 3,
        "notes": ["a", "b"],
    }
    usage = {"window_s": 5.0, "roles": {"app": role, "sidecar": {**role, "processes": 0}}}
    return results.role_rows("dpumesh", "dpumesh", 1, "closed-8", usage)


FAULT = {
    "mesh": "envoy",
    "stack": "envoy",
    "mode": "local",
    "workmodel": "default.json",
    "fault": "pause:sidecar",
    "kind": "pause",
    "target": "sidecar-s1",
    "service": "s1",
    "pid": 4242,
    "injected_at_s": 3.012,
    "pause_s": 3.0,
    "offered_rps": 80.0,
    "run_s": 16,
    "requests": 1200,
    "failed": 12,
    "failed_by_status": "503:12",
    "failed_after_fault": 12,
    "worst_ms": None,
    "recovery_s": None,  # did not recover within the run
    "recovered": False,
    "blast_radius": "s1",
    "restarts": "",
    "loadgen_ok": True,
}


def _write_run(root: Path) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    out = results.ResultsDir(root)
    rows = [
        _result("closed-8", None),
        _result("open-50", 50.0, checks_ok=False, failed_checks=["a", "b"]),
        _result("open-80", 80.0, summary=latency.summarize(latency.new_histogram()), usage=None),
    ]
    for row in rows:
        out.append_result(row)
    roles = _roles()
    out.append_roles(roles)
    out.append_fault(FAULT)
    out.write_meta({"config": {"slo_p99_ms": 100.0}})
    return rows, roles


def _records(df: pd.DataFrame) -> list[dict[str, Any]]:
    """DataFrame rows as dicts of Python values, NaN/NA as None."""
    return [
        {k: None if pd.isna(v) else v for k, v in rec.items()}
        for rec in df.astype(object).to_dict("records")
    ]


def test_a_results_directory_round_trips_through_the_schema(tmp_path: Path) -> None:
    rows, roles = _write_run(tmp_path)
    assert schema.read_table(tmp_path, schema.RESULTS) == rows
    assert schema.read_table(tmp_path, schema.ROLES) == roles
    assert schema.read_table(tmp_path, schema.FAULTS) == [FAULT]
    assert rows[2]["p50_us"] is None and rows[2]["cpu_host_ms_per_req"] is None  # empty cells
    loaded = load_results(tmp_path)
    assert _records(loaded.results) == rows
    assert _records(loaded.roles) == roles
    assert loaded.faults is not None and _records(loaded.faults) == [FAULT]
    assert loaded.meta["schema_version"] == schema.SCHEMA_VERSION
    assert loaded.meta["config"] == {"slo_p99_ms": 100.0}


def test_floats_are_written_to_six_significant_digits(tmp_path: Path) -> None:
    out = results.ResultsDir(tmp_path)
    out.append_result(_result("open-50", 50.0, sidecar={"achieved_rps": 49.876543, "requests": 3}))
    out.append_result(_result("open-50", 50.0, downstream_calls_per_req=12_345_678.9))
    first, second = schema.read_table(tmp_path, schema.RESULTS)
    assert first["achieved_rps"] == 49.8765 and first["duration_s"] is None
    assert second["downstream_calls_per_req"] == 12_345_679  # large values in full


@pytest.mark.parametrize(
    ("change", "message"),
    [
        (lambda r: r.pop("checks"), "missing checks"),
        (lambda r: r.update(colour="blue"), "not a column: colour"),
        (lambda r: r.update(p99_us="12"), "p99_us is float"),
        (lambda r: r.update(requests=True), "requests is int"),
        (lambda r: r.update(checks_ok=None), "checks_ok may not be empty"),
        (lambda r: r.update(rep=1.0), "rep is int"),
    ],
)
def test_the_writer_refuses_a_row_that_is_not_of_its_table(
    tmp_path: Path, change: Any, message: str
) -> None:
    row = _result("closed-8", None)
    change(row)
    with pytest.raises(ValueError, match=message):
        results.ResultsDir(tmp_path).append_result(row)
    assert not (tmp_path / schema.RESULTS_CSV).exists()  # a bad row writes nothing


def test_the_reader_names_the_file_line_and_column(tmp_path: Path) -> None:
    _write_run(tmp_path)
    path = tmp_path / schema.RESULTS_CSV
    lines = path.read_text().splitlines()
    cells = lines[2].split(",")
    cells[schema.RESULTS.names.index("p99_us")] = "fast"
    path.write_text("\n".join([*lines[:2], ",".join(cells), *lines[3:]]) + "\n")
    with pytest.raises(schema.ResultsError, match=r"results\.csv:3: p99_us: could not convert"):
        load_results(tmp_path)
    cells[schema.RESULTS.names.index("p99_us")] = ""
    cells[schema.RESULTS.names.index("checks_ok")] = "yes"
    path.write_text("\n".join([*lines[:2], ",".join(cells)]) + "\n")
    with pytest.raises(schema.ResultsError, match="checks_ok: 'yes' is not true or false"):
        load_results(tmp_path)
    path.write_text(lines[0].replace(",stack,", ",") + "\n")
    with pytest.raises(schema.ResultsError, match="missing: stack; unknown: none"):
        load_results(tmp_path)


@pytest.mark.parametrize(("version", "shown"), [(None, 1), (2, 2), (4, 4), ("3", 3)])
def test_a_directory_of_another_schema_version_is_refused_in_one_line(
    tmp_path: Path, capsys: pytest.CaptureFixture, version: Any, shown: int
) -> None:
    _write_run(tmp_path)
    meta = json.loads((tmp_path / schema.META_JSON).read_text())
    if version is None:  # written before the schema existed: version 1
        del meta["schema_version"]
    else:
        meta["schema_version"] = version
    (tmp_path / schema.META_JSON).write_text(json.dumps(meta))
    expected = (
        f"{tmp_path}: results of schema version {shown}; "
        f"this code reads version {schema.SCHEMA_VERSION}"
    )
    with pytest.raises(schema.ResultsError) as caught:
        load_results(tmp_path)
    assert str(caught.value).startswith(expected) and "\n" not in str(caught.value)
    assert reports_main([str(tmp_path)]) == 1
    err = capsys.readouterr().err
    assert err.startswith(f"error: {expected}") and err.count("\n") == 1


def test_a_directory_without_meta_json_is_refused(tmp_path: Path) -> None:
    _write_run(tmp_path)
    (tmp_path / schema.META_JSON).unlink()
    with pytest.raises(schema.ResultsError, match=r"meta\.json: unreadable"):
        load_results(tmp_path)


def test_load_results_on_the_recorded_sample_has_the_documented_columns_and_dtypes() -> None:
    run = load_results(SAMPLE)
    for frame, table in ((run.results, schema.RESULTS), (run.roles, schema.ROLES)):
        assert tuple(frame.columns) == table.names
        assert {c: str(t) for c, t in frame.dtypes.items()} == table.dtypes
        assert len(frame) > 0
    assert run.faults is None  # not a fault benchmark's directory
    assert run.meta["schema_version"] == schema.SCHEMA_VERSION
    assert schema.RESULTS.dtypes["offered_rps"] == "float64"  # the documented mapping
    assert schema.RESULTS.dtypes["cpu_window_requests"] == "Int64"
    assert schema.RESULTS.dtypes["rep"] == "int64"
    assert schema.RESULTS.dtypes["checks_ok"] == "boolean"
    assert schema.RESULTS.dtypes["stack"] == "string"
    closed = run.results[run.results["level"].str.startswith("closed-")]
    assert closed["offered_rps"].isna().all()  # an empty cell is NaN


def test_the_faults_table_loads_with_its_dtypes(tmp_path: Path) -> None:
    _write_run(tmp_path)
    faults = load_results(tmp_path).faults
    assert faults is not None and tuple(faults.columns) == schema.FAULTS.names
    assert {c: str(t) for c, t in faults.dtypes.items()} == schema.FAULTS.dtypes


def test_the_dpu_model_columns_hold_every_value_a_sweep_varies() -> None:
    names = {c.name for c in schema.DPU_MODEL}
    assert set(profiles.KEYS) <= names
    assert all(c.name in schema.RESULTS.names for c in schema.DPU_MODEL)


def test_the_readme_notebook_example_runs_on_the_sample(capsys: pytest.CaptureFixture) -> None:
    text = (REPO / "README.md").read_text(encoding="utf-8")
    block = re.search(r"```python\n(from reports import load_results\n.*?)```", text, re.S)
    assert block is not None, "README has no load_results example"
    code = block.group(1)
    assert len([line for line in code.splitlines() if line.strip()]) == 5
    exec(code.replace('"results/latest"', repr(str(SAMPLE))), {})
    assert "p99_us" in capsys.readouterr().out


# --- the one clean rule (DESIGN §5) -----------------------------------------------------

SLO_MS = 5.0
CLEAN_CASES = [
    # offered, achieved, requests, failures, p99 µs, checks ok -> clean
    ((100, 98.0, 1000, 1, 5000, True), True),  # every limit exactly met
    ((100, 97.9, 1000, 0, 1000, True), False),  # not delivered
    ((100, 100.0, 1000, 2, 1000, True), False),  # errors above 0.1 %
    ((100, 100.0, 1000, 0, 5001, True), False),  # p99 over the SLO
    ((100, 100.0, 1000, 0, 1000, False), False),  # a self-check failed
    ((100, 100.0, 0, 0, 1000, True), False),  # nothing measured
    ((0, 0.0, 10, 0, 1000, True), False),  # no offered rate
]


@pytest.mark.parametrize(("case", "clean"), CLEAN_CASES)
def test_the_clean_rule_at_its_edges(case: tuple[Any, ...], clean: bool) -> None:
    offered, achieved, requests, failures, p99_us, ok = case
    rate = failure_rate(requests, failures)
    assert is_clean(offered, achieved, rate, p99_us, SLO_MS, ok) is clean
    # The report judges a point by the same rule (LevelPoint.clean calls it).
    assert LevelPoint(offered, achieved, rate, p99_us / 2, p99_us, ok).clean(SLO_MS) is clean
    assert (MIN_DELIVERY, MAX_ERROR_RATE) == (0.98, 0.001)  # DESIGN §5


def test_without_an_slo_latency_is_not_judged() -> None:
    assert is_clean(100, 100.0, 0.0, 1e9, None, True)
    assert not is_clean(100, 100.0, 0.0, 1e9, SLO_MS, True)


# --- the terminal summary is the report's headline --------------------------------------


def _headline_rows(html: str) -> dict[str, str]:
    """The report's headline table: stack -> the row's text (tags stripped)."""
    table = html.split("<h3>Headline at level", 1)[1].split("</table>", 1)[0]
    rows = {}
    for row in re.findall(r"<tr>(.*?)</tr>", table.split("<tbody>", 1)[1]):
        cells = [
            unescape(re.sub(r"<[^>]+>", " ", c)) for c in re.findall(r"<td[^>]*>(.*?)</td>", row)
        ]
        rows[cells[0].strip()] = " ".join(" ".join(cells).split())
    return rows


def test_terminal_summary_and_report_headline_agree_on_the_sample(tmp_path: Path) -> None:
    copy = tmp_path / "results-sample"
    shutil.copytree(SAMPLE, copy)
    console = Console(record=True, width=80)
    shown = terminal.print_summary(copy, console)  # what a run prints at its end
    report = summarize(load_run(copy))  # what write_report puts in the headline
    assert shown.level == report.level and list(shown.stacks) == list(report.stacks)
    for label, stack in shown.stacks.items():
        for m in HEADLINE:
            assert stack.values[m.key] == report.stacks[label].values[m.key], (label, m.key)
        assert stack.vs == report.stacks[label].vs
    assert any(s.vs for s in shown.stacks.values())  # the sample has baselines to compare

    html = _headline_rows(write_report([copy]).read_text(encoding="utf-8"))
    out = console.export_text()
    assert all(len(line) <= 80 for line in out.splitlines())
    assert f"Latency and CPU at level {report.level}: {report.headline.why}." in " ".join(
        out.split()
    )
    lines = terminal.lines(shown)
    for line in lines:
        row = html[line.stack]
        for m in HEADLINE:
            cell = line.cell(m.key)
            if line.baseline is None:
                e = report.stacks[line.stack].values[m.key]
                assert cell == page.bounded(e, zero_is_na=m is THROUGHPUT)
                assert cell in row, (line.stack, m.key, cell, row)
            elif cell != "—":
                assert f"{cell} vs {line.baseline}" in row, (line.stack, m.key, cell, row)
            assert cell in out


def test_the_faults_report_reads_the_typed_table(tmp_path: Path) -> None:
    _write_run(tmp_path)
    timeline = {
        **{k: FAULT[k] for k in ("mesh", "fault", "target", "offered_rps", "pause_s")},
        "recovery_s": None,
        "bucket_ms": 100,
        "t_s": [-0.1, 0.0, 0.1],
        "rps": [80.0, 0.0, 0.0],
        "errors_per_s": [0.0, 10.0, 10.0],
        "worst_ms": [1.0, 2.0, 3.0],
    }
    results.ResultsDir(tmp_path).write_json(results.FAULTS_JSON, {"timelines": [timeline]})
    text = write_report([tmp_path]).read_text(encoding="utf-8")
    row = "<td>pause:sidecar</td><td>sidecar-s1</td><td class='num'>1200</td>"
    assert row in text and "<td class='num'>503:12</td>" in text
    assert "<td class='num'>n/a</td><td class='num'>not within the run</td>" in text
