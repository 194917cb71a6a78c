"""``berth promote --canary PLAN``: the plan's parsing and its clear errors
(before anything is sent)."""
from __future__ import annotations

import pytest

from berth import errors
from berth.shapes import parse_canary_plan, parse_duration


@pytest.mark.parametrize(("plan", "steps"), [
    ("10:5m,50:10m", [(10, 300), (50, 600)]),
    ("1:30s", [(1, 30)]),
    ("5:1h, 20:90 ,99:2m", [(5, 3600), (20, 90), (99, 120)]),
])
def test_plans(plan: str, steps: list[tuple[int, int]]) -> None:
    assert parse_canary_plan(plan) == steps


@pytest.mark.parametrize(("plan", "words"), [
    ("50:1m,10:1m", "must increase"),
    ("10:1m,10:2m", "must increase"),
    ("0:1m", "outside 1-99"),
    ("100:1m", "outside 1-99"),
    ("10", "WEIGHT:DURATION"),
    ("ten:1m", "WEIGHT:DURATION"),
    ("10:5x", "not a duration"),
    ("10:0s", "no time"),
    ("", "WEIGHT:DURATION"),
])
def test_bad_plans(plan: str, words: str) -> None:
    with pytest.raises(errors.InvalidArgument) as caught:
        parse_canary_plan(plan)
    assert words in caught.value.message
    assert caught.value.field == "canary"


def test_durations() -> None:
    assert [parse_duration(t) for t in ("45", "45s", "2m", "1H")] == [45, 45, 120, 3600]
