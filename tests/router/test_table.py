"""Pure tests of route resolution."""
from __future__ import annotations

import pytest

from services.router.table import (
    BindingEntry,
    EndpointSet,
    EnvironmentEntry,
    Route,
    RouteError,
    RoutingTable,
    parse_host,
)


def make_table() -> RoutingTable:
    t = RoutingTable()
    t.upsert_environment(EnvironmentEntry("env-prod", "p-1", "shop", "production", "dep-2"))
    t.upsert_environment(EnvironmentEntry("env-stg", "p-1", "shop", "staging", "dep-3"))
    t.upsert_environment(EnvironmentEntry("env-prev", "p-1", "shop", "preview", ""))
    t.upsert_environment(EnvironmentEntry("env-other", "p-2", "blog", "production", "dep-9"))
    t.upsert_binding(BindingEntry("p-1", "env-prod", "dep-2", "active", True), "shop")
    t.upsert_binding(BindingEntry("p-1", "env-prod", "dep-1", "active", False), "shop")
    t.upsert_binding(BindingEntry("p-1", "env-stg", "dep-3", "active", True), "shop")
    t.upsert_binding(BindingEntry("p-1", "env-stg", "dep-old", "terminated", False), "shop")
    t.upsert_binding(BindingEntry("p-2", "env-other", "dep-9", "active", True), "blog")
    return t


@pytest.mark.parametrize(
    "project, environment",
    [("shop", "production"), ("p-1", "production"), ("shop", "env-prod"), ("p-1", "env-prod"), ("SHOP", "Production")],
)
def test_resolves_by_name_or_id(project: str, environment: str) -> None:
    route = make_table().resolve(project, environment)
    assert route == Route("p-1", "shop", "env-prod", "production", "dep-2")
    assert route.binding_key == ("env-prod", "dep-2")


def test_environment_id_of_another_project_is_not_found() -> None:
    with pytest.raises(RouteError) as err:
        make_table().resolve("shop", "env-other")
    assert (err.value.status, err.value.code) == (404, "environment_not_found")


def test_unknown_project_and_environment() -> None:
    table = make_table()
    with pytest.raises(RouteError) as err:
        table.resolve("nope", "production")
    assert (err.value.status, err.value.code) == (404, "project_not_found")
    assert "nope" in err.value.message
    with pytest.raises(RouteError) as err:
        table.resolve("shop", "qa")
    assert (err.value.status, err.value.code) == (404, "environment_not_found")
    assert "'qa'" in err.value.message and "'shop'" in err.value.message


def test_environment_without_deployment_says_so() -> None:
    with pytest.raises(RouteError) as err:
        make_table().resolve("shop", "preview")
    assert err.value.status == 404
    assert err.value.code == "no_deployment"
    assert "no deployment yet" in err.value.message


def test_pin_bound_in_that_environment() -> None:
    assert make_table().resolve("shop", "production", "dep-1") == Route(
        "p-1", "shop", "env-prod", "production", "dep-1"
    )


def test_pin_falls_back_to_an_active_binding_elsewhere_in_the_project() -> None:
    # dep-3 serves staging only: pinning it while addressing production goes there.
    assert make_table().resolve("shop", "production", "dep-3") == Route("p-1", "shop", "env-stg", "staging", "dep-3")


@pytest.mark.parametrize("deployment", ["dep-unknown", "dep-9"])
def test_pin_unbound_or_foreign_is_not_found(deployment: str) -> None:
    with pytest.raises(RouteError) as err:
        make_table().resolve("shop", "staging", deployment)
    assert (err.value.status, err.value.code) == (404, "deployment_not_bound")


def test_pin_of_a_terminated_deployment_says_so_and_how_to_start_it() -> None:
    with pytest.raises(RouteError) as err:
        make_table().resolve("shop", "staging", "dep-old")
    assert (err.value.status, err.value.code) == (503, "deployment_terminated")
    assert "berth deployment start dep-old" in err.value.message and err.value.deployment_id == "dep-old"


def test_pointer_at_a_terminated_deployment_is_answered_at_once() -> None:
    t = make_table()
    t.upsert_binding(BindingEntry("p-1", "env-prod", "dep-2", "terminated", True), "shop")
    with pytest.raises(RouteError) as err:
        t.resolve("shop", "production")
    assert (err.value.status, err.value.code) == (503, "deployment_terminated")
    assert "berth rollback --environment production" in err.value.message


def test_failed_pointer_falls_back_to_an_active_previous_binding_even_without_replicas() -> None:
    t = make_table()
    t.upsert_environment(EnvironmentEntry("env-prod", "p-1", "shop", "production", "dep-2",
                                          previous_deployment_id="dep-1"))
    endpoints = EndpointSet()
    endpoints._status = {("env-prod", "dep-2"): "failed", ("env-prod", "dep-1"): "scaled_to_zero"}
    route = t.resolve("shop", "production", endpoints=endpoints)
    assert (route.deployment_id, route.fallback) == ("dep-1", True)  # woken by the proxy like any binding
    # ...but never to a terminated one: the failed pointer's own route then.
    t.upsert_binding(BindingEntry("p-1", "env-prod", "dep-1", "terminated", False), "shop")
    assert t.resolve("shop", "production", endpoints=endpoints).deployment_id == "dep-2"


def test_pin_works_even_when_environment_has_no_pointer() -> None:
    t = make_table()
    t.upsert_binding(BindingEntry("p-1", "env-prev", "dep-5", "active", False), "shop")
    assert t.resolve("shop", "preview", "dep-5").deployment_id == "dep-5"


def test_live_changes_move_pointer_rename_and_delete() -> None:
    t = make_table()
    t.upsert_environment(EnvironmentEntry("env-prod", "p-1", "shop", "production", "dep-1"))
    assert t.resolve("shop", "production").deployment_id == "dep-1"
    t.upsert_environment(EnvironmentEntry("env-stg", "p-1", "shop", "qa", "dep-3"))
    assert t.resolve("shop", "qa").environment_id == "env-stg"
    with pytest.raises(RouteError):
        t.resolve("shop", "staging")
    t.delete_environment("env-stg")
    with pytest.raises(RouteError):
        t.resolve("shop", "env-stg")
    assert not [k for k in t.bindings if k[0] == "env-stg"]


@pytest.mark.parametrize(
    "host, domain, expected",
    [
        ("staging.shop.localhost", "localhost", ("shop", "staging")),
        ("staging.shop.localhost:8080", "localhost", ("shop", "staging")),
        ("Staging.Shop.Example.COM", "example.com", ("shop", "staging")),
        ("shop.localhost", "localhost", None),
        ("localhost:8080", "localhost", None),
        ("staging.shop.example.org", "example.com", None),
        ("127.0.0.1:8080", "localhost", None),
        ("[::1]:8080", "localhost", None),
    ],
)
def test_parse_host(host: str, domain: str, expected: tuple[str, str] | None) -> None:
    assert parse_host(host, domain) == expected
