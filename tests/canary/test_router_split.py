"""The router's canary split (services/router/table.py): the share of new
requests the candidate takes, pinning, a candidate binding not yet known,
and the watch's reading of a canary off the registry's Environment."""
from __future__ import annotations

import pytest

from berth import enums
from berth.v1 import common_pb2
from services.router.table import BindingEntry, EnvironmentEntry, RoutingTable, canary_pick
from services.router.watchers import environment_entry


def _table(weight: int, *, candidate_bound: bool = True) -> RoutingTable:
    table = RoutingTable()
    table.upsert_environment(EnvironmentEntry(
        id="env_1", project_id="prj_1", project_name="shop", name="staging", deployment_id="dep_stable",
        sequence=3, canary_deployment_id="dep_cand", canary_weight=weight,
    ))
    table.upsert_binding(BindingEntry("prj_1", "env_1", "dep_stable", "active", True), "shop")
    if candidate_bound:
        table.upsert_binding(BindingEntry("prj_1", "env_1", "dep_cand", "active", False), "shop")
    return table


@pytest.mark.parametrize("weight", [1, 5, 10, 33, 50, 90, 99])
def test_split_matches_weight(weight: int) -> None:
    table = _table(weight)
    served = [table.resolve("shop", "staging").deployment_id for _ in range(2000)]
    share = served.count("dep_cand") / len(served) * 100
    print(f"weight {weight}: candidate took {share:.2f}% of 2000")
    assert abs(share - weight) <= 1.0
    # Every second request (a caller that resolves twice per request keeps the ratio).
    odd = [canary_pick(i, weight) for i in range(1, 4000, 2)]
    assert abs(sum(odd) / len(odd) * 100 - weight) <= 1.0


def test_pinning_wins_and_unbound_candidate_gets_nothing() -> None:
    table = _table(50)
    assert {table.resolve("shop", "staging", "dep_stable").deployment_id for _ in range(50)} == {"dep_stable"}
    assert {table.resolve("shop", "staging", "dep_cand").deployment_id for _ in range(50)} == {"dep_cand"}
    lone = _table(50, candidate_bound=False)
    assert {lone.resolve("shop", "staging").deployment_id for _ in range(100)} == {"dep_stable"}
    # The candidate's binding arrives: the split starts.
    lone.upsert_binding(BindingEntry("prj_1", "env_1", "dep_cand", "active", False), "shop")
    assert {lone.resolve("shop", "staging").deployment_id for _ in range(100)} == {"dep_stable", "dep_cand"}
    # Weight 0 (aborted): all stable.
    zero = _table(0)
    assert {zero.resolve("shop", "staging").deployment_id for _ in range(100)} == {"dep_stable"}


def test_watch_reads_canary_from_environment() -> None:
    def env(state: str, weight: int) -> common_pb2.Environment:
        return common_pb2.Environment(
            id="env_1", project_id="prj_1", project_name="shop", name="staging", deployment_id="dep_stable",
            canary=common_pb2.Canary(candidate_deployment_id="dep_cand", candidate_weight=weight,
                                     state=enums.number(common_pb2.Canary.State, state)),
        )
    assert environment_entry(env("running", 10)).canary_weight == 10
    assert environment_entry(env("paused", 10)).canary_deployment_id == "dep_cand"
    assert environment_entry(env("aborted", 0)).canary_weight == 0
    assert environment_entry(env("promoted", 100)).canary_weight == 0
    plain = environment_entry(common_pb2.Environment(id="env_1", deployment_id="dep_stable"))
    assert plain.canary_weight == 0 and plain.canary_deployment_id == ""
