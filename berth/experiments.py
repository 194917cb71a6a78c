"""Experiments: a dataset of cases (JSON Lines) sent through the router to
one exact deployment, each answer checked against its expectations.

A dataset line is ``{"name": "...", "request": {"method", "path",
"headers", "body"}, "expect": {"status", "json", "regex", "contains",
"max_ms"}}``; every ``expect`` key is optional except ``status``. The whole
file is validated before any request is sent: an error names the file, the
line and the field (``DatasetError``), and nothing is sent or recorded.

The dataset's digest is the sha256 of its canonical form (each case
re-serialised as JSON with sorted keys and no spaces, one per line), so
reformatting the file keeps the digest; changing a case changes it.
"""
from __future__ import annotations

import concurrent.futures
import hashlib
import json
import math
import pathlib
import re
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import requests

from berth import errors
from berth.shapes import timestamp
from berth.v1 import registry_pb2

METHODS = frozenset({"GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS"})
CASE_KEYS = frozenset({"name", "request", "expect"})
REQUEST_KEYS = frozenset({"method", "path", "headers", "body"})
EXPECT_KEYS = frozenset({"status", "json", "regex", "contains", "max_ms"})
MAX_CASES = 10000
MAX_NAME_LENGTH = 200
MAX_REASON_LENGTH = 1000
# Headers the runner sets itself: a case may not route elsewhere.
ROUTING_HEADERS = frozenset({"x-berth-project", "x-berth-environment", "x-berth-deployment", "host"})
DEFAULT_CONCURRENCY = 4
DEFAULT_TIMEOUT = 30.0


class DatasetError(errors.InvalidArgument):
    """A dataset that is not valid: names the file, the line and the field."""

    def __init__(self, path: str, line: int, field_: str, problem: str) -> None:
        where = f"{path}:{line}" if line else path
        super().__init__(f"{where}: {field_}: {problem}" if field_ else f"{where}: {problem}",
                         field=field_ or "dataset", reason="INVALID_DATASET",
                         metadata={"file": path, "line": str(line)})
        self.path, self.line, self.field_name = path, line, field_


@dataclass(frozen=True)
class Expect:
    status: int
    json: Any = None
    has_json: bool = False
    regex: re.Pattern[str] | None = None
    contains: str | None = None
    max_ms: float | None = None


@dataclass(frozen=True)
class Case:
    name: str
    method: str
    path: str
    headers: dict[str, str]
    body: bytes | None
    expect: Expect
    canonical: str  # the case as canonical JSON (the digest's input)


@dataclass(frozen=True)
class Dataset:
    path: str
    cases: tuple[Case, ...]
    digest: str


@dataclass(frozen=True)
class Outcome:
    name: str
    passed: bool
    status: int
    latency_ms: float
    reason: str = ""


@dataclass
class Progress:
    total: int
    done: int = 0
    failed: int = 0
    lock: threading.Lock = field(default_factory=threading.Lock)


# ---------------------------------------------------------------- parsing


def _check_keys(path: str, line: int, where: str, value: dict[str, Any], allowed: frozenset[str]) -> None:
    unknown = sorted(set(value) - allowed)
    if unknown:
        name = f"{where}.{unknown[0]}" if where else unknown[0]
        raise DatasetError(path, line, name, f"unknown key (allowed: {', '.join(sorted(allowed))})")


def parse_case(path: str, line: int, text: str, seen: set[str]) -> Case:
    try:
        data = json.loads(text)
    except json.JSONDecodeError as exc:
        raise DatasetError(path, line, "", f"not valid JSON: {exc.msg} (column {exc.colno})") from None
    if not isinstance(data, dict):
        raise DatasetError(path, line, "", "a case must be a JSON object")
    _check_keys(path, line, "", data, CASE_KEYS)
    name = data.get("name")
    if not isinstance(name, str) or not name.strip() or len(name) > MAX_NAME_LENGTH or "\x00" in name:
        raise DatasetError(path, line, "name", f"required: a non-empty string of at most {MAX_NAME_LENGTH} characters")
    if name in seen:
        raise DatasetError(path, line, "name", f"{name!r} names an earlier case too: names must be unique")
    seen.add(name)
    req = data.get("request")
    if not isinstance(req, dict):
        raise DatasetError(path, line, "request", "required: an object with method and path")
    _check_keys(path, line, "request", req, REQUEST_KEYS)
    method = req.get("method", "GET")
    if not isinstance(method, str) or method.upper() not in METHODS:
        raise DatasetError(path, line, "request.method", f"{method!r} is not one of {', '.join(sorted(METHODS))}")
    target = req.get("path")
    if not isinstance(target, str) or not target.startswith("/") or any(c.isspace() for c in target):
        raise DatasetError(path, line, "request.path", "required: an absolute URL path such as '/v1/chat'")
    headers = req.get("headers", {})
    if not isinstance(headers, dict) or not all(isinstance(k, str) and isinstance(v, str) for k, v in headers.items()):
        raise DatasetError(path, line, "request.headers", "must be an object of string values")
    for key in headers:
        if key.lower() in ROUTING_HEADERS:
            raise DatasetError(path, line, f"request.headers.{key}",
                               "is set by the runner (the case goes to the deployment under test)")
    body: bytes | None = None
    if "body" in req and req["body"] is not None:
        raw = req["body"]
        body = raw.encode() if isinstance(raw, str) else json.dumps(raw).encode()
        if not isinstance(raw, str) and not any(k.lower() == "content-type" for k in headers):
            headers = {**headers, "Content-Type": "application/json"}
    exp = data.get("expect")
    if not isinstance(exp, dict):
        raise DatasetError(path, line, "expect", "required: an object with at least status")
    _check_keys(path, line, "expect", exp, EXPECT_KEYS)
    status = exp.get("status")
    if not isinstance(status, int) or isinstance(status, bool) or not 100 <= status <= 599:
        raise DatasetError(path, line, "expect.status", "required: an HTTP status between 100 and 599")
    regex = None
    if "regex" in exp:
        if not isinstance(exp["regex"], str):
            raise DatasetError(path, line, "expect.regex", "must be a string")
        try:
            regex = re.compile(exp["regex"])
        except re.error as exc:
            raise DatasetError(path, line, "expect.regex", f"not a valid regular expression: {exc}") from None
    contains = exp.get("contains")
    if contains is not None and not isinstance(contains, str):
        raise DatasetError(path, line, "expect.contains", "must be a string")
    max_ms = exp.get("max_ms")
    if max_ms is not None and (
        isinstance(max_ms, bool) or not isinstance(max_ms, int | float) or not math.isfinite(max_ms) or max_ms <= 0
    ):
        raise DatasetError(path, line, "expect.max_ms", "must be a positive number of milliseconds")
    expect = Expect(status=status, json=exp.get("json"), has_json="json" in exp, regex=regex,
                    contains=contains, max_ms=float(max_ms) if max_ms is not None else None)
    canonical = json.dumps(data, sort_keys=True, separators=(",", ":"), ensure_ascii=False)
    return Case(name=name, method=method.upper(), path=target, headers=dict(headers), body=body, expect=expect,
                canonical=canonical)


def load_dataset(path: str | pathlib.Path) -> Dataset:
    """Reads and validates the whole file; raises DatasetError on the first
    problem, naming the file, the line and the field."""
    name = str(path)
    try:
        raw = pathlib.Path(path).read_bytes()
    except OSError as exc:
        raise DatasetError(name, 0, "", f"cannot read it: {exc.strerror or exc}") from None
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        line = raw[: exc.start].count(b"\n") + 1
        raise DatasetError(name, line, "", "not UTF-8 text") from None
    cases: list[Case] = []
    seen: set[str] = set()
    for number, content in enumerate(text.splitlines(), start=1):
        if not content.strip():
            continue
        if len(cases) >= MAX_CASES:
            raise DatasetError(name, number, "", f"more than {MAX_CASES} cases")
        cases.append(parse_case(name, number, content, seen))
    if not cases:
        raise DatasetError(name, 0, "", "no cases: one JSON object per line is expected")
    digest = hashlib.sha256("".join(c.canonical + "\n" for c in cases).encode()).hexdigest()
    return Dataset(path=name, cases=tuple(cases), digest=f"sha256:{digest}")


# ---------------------------------------------------------------- matching


def json_subset(expected: Any, actual: Any) -> bool:
    """``expected`` is contained in ``actual``: objects by key (recursively),
    lists element by element at the same length, scalars equal (1 and 1.0
    equal, True and 1 not)."""
    if isinstance(expected, dict):
        return isinstance(actual, dict) and all(k in actual and json_subset(v, actual[k]) for k, v in expected.items())
    if isinstance(expected, list):
        return (isinstance(actual, list) and len(expected) == len(actual)
                and all(json_subset(e, a) for e, a in zip(expected, actual, strict=True)))
    if isinstance(expected, bool) or isinstance(actual, bool):
        return type(expected) is type(actual) and expected == actual
    return bool(expected == actual)


def check(expect: Expect, status: int, body: bytes, latency_ms: float) -> str:
    """Why an answer fails its expectations ("" when it passes); the first
    failing check is named."""
    if status != expect.status:
        return f"status {status}, expected {expect.status}"
    text = body.decode("utf-8", errors="replace")
    if expect.has_json:
        try:
            actual = json.loads(text)
        except json.JSONDecodeError:
            return "body is not JSON"
        if not json_subset(expect.json, actual):
            return f"JSON does not contain {json.dumps(expect.json)[:200]}"
    if expect.regex is not None and not expect.regex.search(text):
        return f"body does not match /{expect.regex.pattern[:200]}/"
    if expect.contains is not None and expect.contains not in text:
        return f"body does not contain {expect.contains[:200]!r}"
    if expect.max_ms is not None and latency_ms > expect.max_ms:
        return f"took {latency_ms:.0f} ms, more than {expect.max_ms:g} ms"
    return ""


# ---------------------------------------------------------------- running


def run_case(session: requests.Session, router: str, routing: dict[str, str], case: Case, timeout: float) -> Outcome:
    started = time.monotonic()
    try:
        response = session.request(case.method, router + case.path, headers={**case.headers, **routing},
                                   data=case.body, timeout=timeout)
        body = response.content
        status = response.status_code
    except requests.Timeout:
        return Outcome(case.name, False, 0, (time.monotonic() - started) * 1000, f"no answer within {timeout:g} s")
    except requests.RequestException as exc:
        return Outcome(case.name, False, 0, (time.monotonic() - started) * 1000,
                       f"request failed: {type(exc).__name__}"[:MAX_REASON_LENGTH])
    latency_ms = (time.monotonic() - started) * 1000
    reason = check(case.expect, status, body, latency_ms)
    return Outcome(case.name, not reason, status, latency_ms, reason[:MAX_REASON_LENGTH])


def run_dataset(
    dataset: Dataset, *, router: str, project: str, environment: str, deployment_id: str,
    concurrency: int = DEFAULT_CONCURRENCY, timeout: float = DEFAULT_TIMEOUT,
    on_progress: Callable[[Progress, Outcome], None] | None = None,
) -> list[Outcome]:
    """Sends every case to the deployment pinned with X-Berth-Deployment
    (the router wakes one scaled to zero), at most ``concurrency`` at once,
    each with ``timeout``. Outcomes come back in dataset order."""
    if concurrency < 1 or concurrency > 256:
        raise errors.InvalidArgument(f"--concurrency {concurrency} must be between 1 and 256", field="concurrency")
    if not (timeout > 0 and math.isfinite(timeout)):
        raise errors.InvalidArgument(f"--timeout {timeout} must be a positive number of seconds", field="timeout")
    routing = {"X-Berth-Project": project, "X-Berth-Environment": environment, "X-Berth-Deployment": deployment_id}
    progress = Progress(total=len(dataset.cases))
    local = threading.local()
    sessions: list[requests.Session] = []

    def one(case: Case) -> Outcome:
        session = getattr(local, "session", None)
        if session is None:
            session = local.session = requests.Session()
            session.trust_env = False  # the router is local: no proxy from the environment
            sessions.append(session)
        outcome = run_case(session, router.rstrip("/"), routing, case, timeout)
        with progress.lock:
            progress.done += 1
            progress.failed += 0 if outcome.passed else 1
            if on_progress is not None:
                on_progress(progress, outcome)
        return outcome

    try:
        with concurrent.futures.ThreadPoolExecutor(max_workers=concurrency) as pool:
            return list(pool.map(one, dataset.cases))
    finally:
        for session in sessions:
            session.close()


def summary(outcomes: list[Outcome]) -> dict[str, float]:
    """Pass rate and nearest-rank latency p50/p99 (the registry computes the
    same from the recorded cases)."""
    latencies = sorted(o.latency_ms for o in outcomes)

    def pct(q: float) -> float:
        return latencies[max(1, math.ceil(q / 100 * len(latencies))) - 1] if latencies else 0.0

    passed = sum(1 for o in outcomes if o.passed)
    return {"passed": passed, "total": len(outcomes), "pass_rate": passed / len(outcomes) if outcomes else 0.0,
            "latency_p50_ms": pct(50), "latency_p99_ms": pct(99)}


# ---------------------------------------------------------------- shapes (CLI JSON and REST)


def run_json(r: registry_pb2.ExperimentRun) -> dict[str, Any]:
    """An experiment run as the CLI's JSON and the REST API show it (with
    ``cases`` only when the run carries them)."""
    data: dict[str, Any] = {
        "id": r.id, "name": r.name, "deployment_id": r.deployment_id, "dataset_digest": r.dataset_digest,
        "total": r.total, "passed": r.passed, "pass_rate": r.pass_rate,
        "latency_p50_ms": r.latency_p50_ms, "latency_p99_ms": r.latency_p99_ms,
        "actor": r.actor, "created_at": timestamp(r, "created_at"),
    }
    if r.cases:
        data["cases"] = [{"name": c.name, "passed": c.passed, "status": c.status, "latency_ms": c.latency_ms,
                          "reason": c.reason} for c in r.cases]
    return data


def gate_json(g: registry_pb2.EnvironmentGate) -> dict[str, Any]:
    return {"environment": g.environment_name, "environment_id": g.environment_id, "experiment": g.experiment,
            "threshold": g.threshold, "dataset_digest": g.dataset_digest, "actor": g.actor,
            "updated_at": timestamp(g, "updated_at")}


# ---------------------------------------------------------------- gates in berth.toml


@dataclass(frozen=True)
class GateSpec:
    """``[gates.ENV]`` of berth.toml: ``experiment``, ``threshold`` and
    ``dataset`` (a path relative to the file)."""

    environment: str
    experiment: str
    threshold: float
    dataset: Dataset


GATE_KEYS = frozenset({"experiment", "threshold", "dataset"})
# The registry's name rule (a DNS label): checked here too, so no gate of the file is set before a bad one.
EXPERIMENT_NAME = re.compile(r"^[a-z](?:[a-z0-9-]{0,38}[a-z0-9])?$")


def _line_of(text: str, table: str, key: str = "") -> int:
    """The line of ``[table]`` (or of ``key`` inside it) in a TOML text; 0
    when not found (an inline table, say)."""
    lines = text.splitlines()
    header = next((i for i, line in enumerate(lines) if line.strip().replace(" ", "") == f"[{table}]"), None)
    if header is None:
        return 0
    if not key:
        return header + 1
    for i in range(header + 1, len(lines)):
        stripped = lines[i].strip()
        if stripped.startswith("["):
            break
        if stripped.split("=", 1)[0].strip() == key:
            return i + 1
    return header + 1


def load_gates(path: pathlib.Path) -> list[GateSpec]:
    """Every ``[gates.ENV]`` table of a berth.toml, validated whole (each
    dataset read and digested) before anything is applied; an error names
    the file, the line and the field."""
    import tomllib

    name = str(path)
    try:
        text = path.read_text()
        data = tomllib.loads(text)
    except OSError as exc:
        raise DatasetError(name, 0, "", f"cannot read it: {exc.strerror or exc}") from None
    except tomllib.TOMLDecodeError as exc:
        raise DatasetError(name, 0, "", f"not valid TOML: {exc}") from None
    gates = data.get("gates", {})
    if not isinstance(gates, dict) or not gates:
        raise DatasetError(name, 0, "gates", "no [gates.ENVIRONMENT] table: nothing to apply")
    specs = []
    for env, table in gates.items():
        where = f"gates.{env}"
        line = _line_of(text, where)
        if not isinstance(table, dict):
            raise DatasetError(name, line, where, "must be a table with experiment, threshold and dataset")
        unknown = sorted(set(table) - GATE_KEYS)
        if unknown:
            raise DatasetError(name, _line_of(text, where, unknown[0]), f"{where}.{unknown[0]}",
                               "unknown key (allowed: dataset, experiment, threshold)")
        experiment = table.get("experiment")
        if not isinstance(experiment, str) or not EXPERIMENT_NAME.match(experiment):
            raise DatasetError(name, _line_of(text, where, "experiment"), f"{where}.experiment",
                               "required: the experiment's name (lowercase letters, digits and dashes, "
                               "starting with a letter)")
        threshold = table.get("threshold")
        if isinstance(threshold, bool) or not isinstance(threshold, int | float) or not 0 < threshold <= 1:
            raise DatasetError(name, _line_of(text, where, "threshold"), f"{where}.threshold",
                               "required: a pass rate above 0 and at most 1")
        dataset_path = table.get("dataset")
        if not isinstance(dataset_path, str) or not dataset_path:
            raise DatasetError(name, _line_of(text, where, "dataset"), f"{where}.dataset",
                               "required: the dataset file (relative to berth.toml)")
        specs.append(GateSpec(environment=str(env), experiment=experiment, threshold=float(threshold),
                              dataset=load_dataset(path.parent / dataset_path)))
    return specs
