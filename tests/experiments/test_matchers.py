"""Unit tests of the dataset parser and the matchers (berth/experiments.py)
and of the registry's pure gate rules (services/registry/domain.py)."""
from __future__ import annotations

import json
import pathlib

import pytest

from berth import errors
from berth.experiments import DatasetError, Expect, check, json_subset, load_dataset
from services.registry import domain


def write(tmp_path: pathlib.Path, *lines: object, name: str = "cases.jsonl") -> pathlib.Path:
    path = tmp_path / name
    path.write_text("".join((line if isinstance(line, str) else json.dumps(line)) + "\n" for line in lines))
    return path


GOOD = {"name": "hello", "request": {"method": "GET", "path": "/hello"}, "expect": {"status": 200}}


@pytest.mark.parametrize(("expected", "actual", "result"), [
    ({"a": 1}, {"a": 1, "b": 2}, True),
    ({"a": {"b": [1, 2]}}, {"a": {"b": [1, 2], "c": 0}}, True),
    ({"a": 1}, {"a": 2}, False),
    ({"a": 1}, {"b": 1}, False),
    ({"a": [1]}, {"a": [1, 2]}, False),  # lists compare whole, element by element
    ([{"id": 1}], [{"id": 1, "x": 0}], True),
    (1, 1.0, True),
    (True, 1, False),
    (None, None, True),
    ({"a": None}, {}, False),
    ("x", {"x": 1}, False),
])
def test_json_subset(expected: object, actual: object, result: bool) -> None:
    assert json_subset(expected, actual) is result


@pytest.mark.parametrize(("expect", "status", "body", "ms", "reason"), [
    (Expect(status=200), 200, b"anything", 5.0, ""),
    (Expect(status=200), 500, b"", 5.0, "status 500, expected 200"),
    (Expect(status=200, json={"ok": True}, has_json=True), 200, b'{"ok": true, "n": 1}', 1.0, ""),
    (Expect(status=200, json={"ok": True}, has_json=True), 200, b'{"ok": false}', 1.0, 'JSON does not contain {"ok": true}'),
    (Expect(status=200, json=None, has_json=True), 200, b"not json", 1.0, "body is not JSON"),
    (Expect(status=200, regex=__import__("re").compile(r"v=\d+")), 200, b"v=42", 1.0, ""),
    (Expect(status=200, regex=__import__("re").compile(r"v=\d+")), 200, b"v=x", 1.0, r"body does not match /v=\d+/"),
    (Expect(status=200, contains="ok 7"), 200, b"ok 7\n", 1.0, ""),
    (Expect(status=200, contains="ok 7"), 200, b"ok 8\n", 1.0, "body does not contain 'ok 7'"),
    (Expect(status=200, max_ms=100), 200, b"", 99.0, ""),
    (Expect(status=200, max_ms=100), 200, b"", 150.0, "took 150 ms, more than 100 ms"),
    (Expect(status=404), 404, b"", 1.0, ""),
])
def test_check(expect: Expect, status: int, body: bytes, ms: float, reason: str) -> None:
    assert check(expect, status, body, ms) == reason


def test_dataset_loads_and_digest_ignores_formatting(tmp_path: pathlib.Path) -> None:
    other = {"name": "post", "request": {"method": "post", "path": "/v1/chat", "body": {"message": "hi"}},
             "expect": {"status": 200, "json": {"ok": True}, "regex": "o.", "contains": "ok", "max_ms": 2000}}
    a = load_dataset(write(tmp_path, GOOD, other, name="a.jsonl"))
    assert [c.name for c in a.cases] == ["hello", "post"]
    assert a.cases[1].method == "POST" and a.cases[1].body == b'{"message": "hi"}'
    assert a.cases[1].headers == {"Content-Type": "application/json"}
    assert a.digest.startswith("sha256:") and len(a.digest) == 71
    # the same cases, keys reordered and spaced, blank lines: the same digest
    spaced = json.dumps({"expect": {"status": 200}, "request": {"path": "/hello", "method": "GET"}, "name": "hello"},
                        indent=None, separators=(" , ", " : "))
    b = load_dataset(write(tmp_path, spaced, "", other, name="b.jsonl"))
    assert b.digest == a.digest
    changed = load_dataset(write(tmp_path, GOOD, {**other, "expect": {"status": 201}}, name="c.jsonl"))
    assert changed.digest != a.digest


@pytest.mark.parametrize(("line", "field", "words"), [
    ("{not json", "", "not valid JSON"),
    ([1, 2], "", "must be a JSON object"),
    ({**GOOD, "extra": 1}, "extra", "unknown key"),
    ({**GOOD, "name": ""}, "name", "required"),
    ({k: v for k, v in GOOD.items() if k != "request"}, "request", "required"),
    ({**GOOD, "request": {"method": "FETCH", "path": "/"}}, "request.method", "'FETCH' is not one of"),
    ({**GOOD, "request": {"path": "relative"}}, "request.path", "absolute URL path"),
    ({**GOOD, "request": {"path": "/", "headers": {"a": 1}}}, "request.headers", "string values"),
    ({**GOOD, "request": {"path": "/", "headers": {"X-Berth-Deployment": "dep_x"}}},
     "request.headers.X-Berth-Deployment", "set by the runner"),
    ({**GOOD, "request": {"path": "/", "timeout": 3}}, "request.timeout", "unknown key"),
    ({**GOOD, "expect": {}}, "expect.status", "required"),
    ({**GOOD, "expect": {"status": "200"}}, "expect.status", "required"),
    ({**GOOD, "expect": {"status": 200, "regex": "("}}, "expect.regex", "not a valid regular expression"),
    ({**GOOD, "expect": {"status": 200, "contains": 5}}, "expect.contains", "must be a string"),
    ({**GOOD, "expect": {"status": 200, "max_ms": -1}}, "expect.max_ms", "positive number"),
    ({**GOOD, "expect": {"status": 200, "body": "x"}}, "expect.body", "unknown key"),
])
def test_malformed_case_names_file_line_and_field(tmp_path: pathlib.Path, line: object, field: str, words: str) -> None:
    path = write(tmp_path, {**GOOD, "name": "first"}, {**GOOD, "name": "second"}, line)
    with pytest.raises(DatasetError) as caught:
        load_dataset(path)
    error = caught.value
    assert isinstance(error, errors.InvalidArgument)
    assert error.line == 3 and error.path == str(path) and error.field_name == field
    assert error.message.startswith(f"{path}:3: {field + ': ' if field else ''}")
    assert words in error.message


def test_duplicate_names_empty_file_and_unreadable_file(tmp_path: pathlib.Path) -> None:
    with pytest.raises(DatasetError, match=r":2: name: 'hello' names an earlier case"):
        load_dataset(write(tmp_path, GOOD, GOOD))
    with pytest.raises(DatasetError, match="no cases"):
        load_dataset(write(tmp_path, "", "  ", name="empty.jsonl"))
    with pytest.raises(DatasetError, match="cannot read it"):
        load_dataset(tmp_path / "missing.jsonl")
    bad = tmp_path / "latin1.jsonl"
    bad.write_bytes(json.dumps(GOOD).encode() + b"\n\xff\n")
    with pytest.raises(DatasetError, match=r"latin1.jsonl:2: not UTF-8"):
        load_dataset(bad)


# ---- the registry's pure rules


def case(name: str, passed: bool, ms: float) -> domain.CaseResult:
    return domain.CaseResult(name=name, passed=passed, status=200 if passed else 500, latency_ms=ms)


def test_summarize_run_computes_rate_and_nearest_rank_percentiles() -> None:
    cases = [case(f"c{i}", i % 5 != 0, float(i)) for i in range(1, 101)]
    s = domain.summarize_run(cases)
    assert (s.total, s.passed, s.pass_rate) == (100, 80, 0.8)
    assert (s.latency_p50_ms, s.latency_p99_ms) == (50.0, 99.0)
    one = domain.summarize_run([case("only", True, 7.0)])
    assert (one.pass_rate, one.latency_p50_ms, one.latency_p99_ms) == (1.0, 7.0, 7.0)


@pytest.mark.parametrize(("cases", "field"), [
    ([], "cases"),
    ([domain.CaseResult(name="", passed=True, status=200, latency_ms=1)], "cases[0].name"),
    ([case("a", True, 1), domain.CaseResult(name="b", passed=True, status=200, latency_ms=float("nan"))],
     "cases[1].latency_ms"),
    ([domain.CaseResult(name="a", passed=True, status=1000, latency_ms=1)], "cases[0].status"),
    ([domain.CaseResult(name="a", passed=False, status=0, latency_ms=1, reason="x" * 1001)], "cases[0].reason"),
])
def test_summarize_run_refuses_bad_cases(cases: list[domain.CaseResult], field: str) -> None:
    with pytest.raises(errors.InvalidArgument) as caught:
        domain.summarize_run(cases)
    assert caught.value.field == field


GATE = domain.Gate(environment="production", experiment="smoke", threshold=0.95, dataset_digest="sha256:" + "a" * 64)


def test_check_gate() -> None:
    domain.check_gate(GATE, "dep_1", domain.RunFacts(id="run_1", pass_rate=0.95))
    domain.check_gate(GATE, "dep_1", domain.RunFacts(id="run_1", pass_rate=1.0))
    with pytest.raises(errors.FailedPrecondition) as missing:
        domain.check_gate(GATE, "dep_1", None)
    assert missing.value.reason == "GATE_NOT_PASSED" and "has no run of it" in missing.value.message
    assert missing.value.resource_name == "experiment/smoke"
    with pytest.raises(errors.FailedPrecondition) as failing:
        domain.check_gate(GATE, "dep_1", domain.RunFacts(id="run_9", pass_rate=0.8))
    assert failing.value.resource_name == "experiment_run/run_9"
    assert failing.value.metadata["pass_rate"] == "0.8" and "80.00%" in failing.value.message


def test_thresholds_digests_and_skip_reasons() -> None:
    for bad in (0.0, -0.1, 1.01, float("nan"), float("inf")):
        with pytest.raises(errors.InvalidArgument):
            domain.validate_threshold(bad)
    assert domain.validate_threshold(1.0) == 1.0
    for bad in ("", "sha256:abc", "md5:" + "a" * 64, "sha256:" + "A" * 64):
        with pytest.raises(errors.InvalidArgument):
            domain.validate_dataset_digest(bad)
    with pytest.raises(errors.InvalidArgument) as no_reason:
        domain.gate_skipped_reason(GATE, "  ")
    assert no_reason.value.field == "reason"
    assert domain.gate_skipped_reason(GATE, "hotfix") == "gate smoke >= 0.95 skipped: hotfix"


# ---- gates in berth.toml


def test_gates_from_berth_toml(tmp_path: pathlib.Path) -> None:
    from berth.experiments import load_gates

    write(tmp_path, GOOD, name="smoke.jsonl")
    toml = tmp_path / "berth.toml"
    toml.write_text('project = "shop"\n\n[gates.production]\nexperiment = "smoke"\nthreshold = 0.95\n'
                    'dataset = "smoke.jsonl"\n\n[gates.staging]\nexperiment = "smoke"\nthreshold = 1\n'
                    'dataset = "smoke.jsonl"\n')
    specs = load_gates(toml)
    assert [(s.environment, s.experiment, s.threshold) for s in specs] == [
        ("production", "smoke", 0.95), ("staging", "smoke", 1.0)]
    assert specs[0].dataset.digest == load_dataset(tmp_path / "smoke.jsonl").digest


@pytest.mark.parametrize(("body", "line", "field", "words"), [
    ('[gates.staging]\nexperiment = "smoke"\nthreshold = 1.5\ndataset = "smoke.jsonl"\n', 4,
     "gates.staging.threshold", "above 0 and at most 1"),
    ('[gates.staging]\nexperiment = "Smoke!"\nthreshold = 1\ndataset = "smoke.jsonl"\n', 3,
     "gates.staging.experiment", "experiment's name"),
    ('[gates.staging]\nexperiment = "smoke"\nthreshold = 1\n', 2, "gates.staging.dataset", "required"),
    ('[gates.staging]\nexperiment = "smoke"\nthreshold = 1\ndataset = "smoke.jsonl"\nwhen = 1\n', 6,
     "gates.staging.when", "unknown key"),
    ('[worker]\nport = 8080\n', 0, "gates", "no [gates.ENVIRONMENT] table"),
])
def test_gates_from_berth_toml_refused_naming_file_line_field(
    tmp_path: pathlib.Path, body: str, line: int, field: str, words: str
) -> None:
    from berth.experiments import load_gates

    write(tmp_path, GOOD, name="smoke.jsonl")
    toml = tmp_path / "berth.toml"
    toml.write_text('project = "shop"\n' + body)
    with pytest.raises(DatasetError) as caught:
        load_gates(toml)
    assert (caught.value.path, caught.value.line, caught.value.field_name) == (str(toml), line, field)
    assert words in caught.value.message


def test_gates_from_berth_toml_read_every_dataset_first(tmp_path: pathlib.Path) -> None:
    from berth.experiments import load_gates

    write(tmp_path, GOOD, name="smoke.jsonl")
    (tmp_path / "broken.jsonl").write_text('{"name": "a"}\n')
    toml = tmp_path / "berth.toml"
    toml.write_text('[gates.production]\nexperiment = "smoke"\nthreshold = 1\ndataset = "smoke.jsonl"\n'
                    '[gates.staging]\nexperiment = "smoke"\nthreshold = 1\ndataset = "broken.jsonl"\n')
    with pytest.raises(DatasetError, match=r"broken.jsonl:1: request: required"):
        load_gates(toml)
