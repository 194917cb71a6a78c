"""Watch: snapshot, ordered changes, and resuming with since_revision."""
from __future__ import annotations

from collections import Counter

import pytest

from berth.v1 import registry_pb2
from services.registry import changes as changes_module
from services.registry.changes import ChangeLog
from services.registry.storage import ChangeRow, utcnow
from tests.registry.conftest import collect_until


def moves(events):  # type: ignore[no-untyped-def]
    return [(e.revision, e.environment.name, e.environment.sequence)
            for e in events if e.WhichOneof("change") == "environment"]


def test_resume_neither_misses_nor_repeats(registry):
    _, key = registry.create_project("shop")
    dep = registry.call("Deploy", registry_pb2.DeployRequest(image="app:1"), key).deployment
    stream = registry.watch()
    marker = collect_until(stream, lambda e: e.snapshot_complete)[-1]
    assert not marker.resumed
    registry.call("Promote", registry_pb2.PromoteRequest(deployment_id=dep.id, target_environment="staging"), key)
    seen = collect_until(stream, lambda e: e.WhichOneof("change") == "environment" and e.environment.name == "staging")
    stream.cancel()  # the client goes away; moves continue meanwhile
    last = seen[-1].revision

    v2 = registry.call("Deploy", registry_pb2.DeployRequest(image="app:2"), key).deployment
    registry.call("Promote", registry_pb2.PromoteRequest(deployment_id=v2.id, target_environment="staging"), key)
    registry.call("Rollback", registry_pb2.RollbackRequest(environment="staging"), key)

    resumed = registry.watch(since_revision=last)
    replay = collect_until(resumed, lambda e: e.snapshot_complete)
    assert replay[-1].resumed
    assert all(e.revision > last for e in replay[:-1])
    assert moves(replay) == [(last + 1, "preview", 2), (last + 2, "staging", 2), (last + 3, "staging", 3)]
    # ...then live changes, once each.
    registry.call("Promote", registry_pb2.PromoteRequest(deployment_id=v2.id, target_environment="staging"), key)
    live = collect_until(resumed, lambda e: e.WhichOneof("change") == "environment")
    resumed.cancel()
    assert moves(live) == [(last + 4, "staging", 4)]

    # Resuming from the newest revision: nothing to replay.
    current = registry.service.current_revision()
    quiet = registry.watch(since_revision=current)
    assert [e.snapshot_complete and e.resumed for e in collect_until(quiet, lambda e: e.snapshot_complete)] == [True]
    quiet.cancel()


def test_unknown_revision_gets_a_full_snapshot(registry):
    _, key = registry.create_project("shop")
    dep = registry.call("Deploy", registry_pb2.DeployRequest(image="app:1"), key).deployment
    # A revision from the future (another database): a snapshot to replace the table with.
    stream = registry.watch(since_revision=10_000)
    events = collect_until(stream, lambda e: e.snapshot_complete)
    stream.cancel()
    assert not events[-1].resumed
    assert {e.environment.name for e in events if e.WhichOneof("change") == "environment"} == {
        "preview", "staging", "production"}
    assert [e.binding.deployment.id for e in events if e.WhichOneof("change") == "binding"] == [dep.id]


def test_restarted_registry_resumes_from_the_table(database_url):
    from tests.registry.conftest import Registry

    first = Registry(database_url)
    try:
        _, key = first.create_project("shop")
        first.call("Deploy", registry_pb2.DeployRequest(image="app:1"), key)
        old = first.service.current_revision() - 1
        latest = first.service.current_revision()
    finally:
        first.close()
    second = Registry(database_url)
    try:
        # Up to date before the restart: nothing missed, no snapshot needed.
        stream = second.watch(since_revision=latest)
        assert [e.resumed for e in collect_until(stream, lambda e: e.snapshot_complete)] == [True]
        stream.cancel()
        # Behind: the changes table (the database's replay log) still holds
        # what the first process committed -> resumed, not a snapshot.
        stream = second.watch(since_revision=old)
        events = collect_until(stream, lambda e: e.snapshot_complete)
        stream.cancel()
        assert events[-1].resumed and events[-1].revision == latest
        assert {e.revision for e in events[:-1]} == {latest}
        assert {e.WhichOneof("change") for e in events[:-1]} == {"environment", "binding"}
    finally:
        second.close()


def test_the_changes_table_replays_what_it_keeps(registry):
    shop, key = registry.create_project("shop")
    for n in range(4):
        registry.call("Deploy", registry_pb2.DeployRequest(image=f"app:{n}"), key)
    other, other_key = registry.create_project("other")
    registry.call("Deploy", registry_pb2.DeployRequest(image="other:1"), other_key)
    current = registry.service.current_revision()
    log = ChangeLog(registry.service._sessions)

    assert log.replay(current) == []
    assert log.replay(current + 1) is None  # newer than any revision issued: another database's
    tail = log.replay(current - 3)
    assert tail is not None and sorted({c.revision for c in tail}) == [current - 2, current - 1, current]
    assert [(c.revision, c.kind, c.action) for c in tail if c.kind == "environment"] == [
        (current - 2, "environment", "moved"), (current - 1, "environment", "created"),
        (current - 1, "environment", "created"), (current - 1, "environment", "created"),
        (current, "environment", "moved"),
    ]
    mine = log.replay(current - 3, project_id=shop)
    assert mine is not None and {c.project_id for c in mine} == {shop} and {c.revision for c in mine} == {current - 2}
    moved = next(c for c in mine if c.kind == "environment")
    assert (moved.payload.name, moved.detail.sequence, moved.detail.deployment_id) == (
        "preview", 4, moved.payload.deployment_id)

    assert log.prune(keep=2) > 0  # the newest 2 revisions stay
    assert log.replay(current - 2) is not None and log.replay(current - 3) is None


def test_a_row_of_a_kind_this_version_does_not_know_is_passed_over(registry):
    """A newer registry sharing the database may write kinds this one does
    not know: they are left out, and the tailer moves past them."""
    _, key = registry.create_project("shop")
    current = registry.service.current_revision()
    with registry.service._sessions() as session, session.begin():
        session.add(ChangeRow(revision=current + 1, position=0, project_id="prj_000000000000", kind="from_the_future",
                              action="", payload=b"\x00", created_at=utcnow()))
    log = ChangeLog(registry.service._sessions)
    assert log.after(current) == ([], current + 1)
    before = log.after(current - 1)
    assert {c.revision for c in before[0]} == {current} and before[1] == current + 1


@pytest.mark.parametrize("batch_rows", [2, 4])
def test_the_tailer_reads_whole_revisions_in_order(registry, monkeypatch, batch_rows):
    """Batches end on a revision boundary (one revision larger than a batch
    comes whole), so the hub never publishes half a transaction."""
    monkeypatch.setattr(changes_module, "TAIL_BATCH_ROWS", batch_rows)
    _, key = registry.create_project("shop")  # three environments: one revision of 3 rows
    for n in range(4):
        registry.call("Deploy", registry_pb2.DeployRequest(image=f"app:{n}"), key)  # 2 or 3 rows each
    log = ChangeLog(registry.service._sessions)
    everything = log.replay(0)
    assert everything is not None
    rows_per_revision = Counter(c.revision for c in everything)
    read: list = []  # type: ignore[type-arg]
    revision = 0
    for _ in range(100):
        batch, newest = log.after(revision)
        if newest == revision:
            break
        assert batch and newest == batch[-1].revision > revision
        assert all(rows_per_revision[r] == n for r, n in Counter(c.revision for c in batch).items())
        read.extend(batch)
        revision = newest
    assert [(c.revision, c.kind, c.project_id) for c in read] == [(c.revision, c.kind, c.project_id) for c in everything]
    # Both paths were taken: a revision larger than a batch of 2, and a
    # batch of 4 cut back to the last whole revision.
    assert max(rows_per_revision.values()) > 2 and len(everything) > batch_rows
