"""Table-driven tests of the pure convergence plan."""
from __future__ import annotations

import pytest

from services.scheduler.plan import (
    ContainerStatus,
    Create,
    CreateReason,
    DesiredReplicas,
    ObservedReplica,
    RemoveReason,
    plan,
)

A = ("env-a", "dep-1")
B = ("env-b", "dep-2")
H1, H2 = "hash-1", "hash-2"


def rep(key, index, *, h=H1, status=ContainerStatus.RUNNING, ready=True, gen=0, cid=None):
    cid = cid or f"{key[0]}-{key[1]}-{index}-g{gen}"
    return ObservedReplica(
        container_id=cid, name=cid, key=key, index=index, generation=gen, spec_hash=h, status=status, ready=ready
    )


def removed(p):
    return [(r.container_id, r.reason) for r in p.removes]


def created(p):
    return [(c.key, c.index, c.generation, c.reason) for c in p.creates]


CASES = [
    pytest.param(
        [DesiredReplicas(A, 3, H1)],
        [],
        [(A, 0, 0, CreateReason.MISSING), (A, 1, 0, CreateReason.MISSING), (A, 2, 0, CreateReason.MISSING)],
        [],
        id="creates-missing-lowest-first",
    ),
    pytest.param(
        [DesiredReplicas(A, 3, H1)],
        [rep(A, 0), rep(A, 2)],
        [(A, 1, 0, CreateReason.MISSING)],
        [],
        id="fills-the-gap",
    ),
    pytest.param(
        [DesiredReplicas(A, 1, H1)],
        [rep(A, 0), rep(A, 1), rep(A, 2)],
        [],
        [("env-a-dep-1-2-g0", RemoveReason.SCALE_DOWN), ("env-a-dep-1-1-g0", RemoveReason.SCALE_DOWN)],
        id="scale-down-highest-index-first",
    ),
    pytest.param(
        [DesiredReplicas(A, 0, H1)],
        [rep(A, 0)],
        [],
        [("env-a-dep-1-0-g0", RemoveReason.SCALE_DOWN)],
        id="scale-to-zero",
    ),
    pytest.param(
        [DesiredReplicas(A, 1, H2)],
        [rep(A, 0, h=H1)],
        [(A, 0, 1, CreateReason.REPLACE)],
        [],
        id="drift-starts-new-first-keeps-old",
    ),
    pytest.param(
        [DesiredReplicas(A, 1, H2)],
        [rep(A, 0, h=H1), rep(A, 0, h=H2, gen=1, ready=False)],
        [],
        [],
        id="drift-waits-while-new-not-ready",
    ),
    pytest.param(
        [DesiredReplicas(A, 1, H2)],
        [rep(A, 0, h=H1), rep(A, 0, h=H2, gen=1, ready=True)],
        [],
        [("env-a-dep-1-0-g0", RemoveReason.REPLACED)],
        id="drift-stops-old-once-new-ready",
    ),
    pytest.param(
        [DesiredReplicas(A, 2, H1)],
        [rep(A, 0), rep(A, 1, status=ContainerStatus.EXITED, ready=False)],
        [(A, 1, 1, CreateReason.RECREATE)],
        [("env-a-dep-1-1-g0", RemoveReason.EXITED)],
        id="exited-is-removed-and-recreated",
    ),
    pytest.param(
        [DesiredReplicas(A, 1, H1)],
        [rep(A, 0, status=ContainerStatus.CREATED, ready=False)],
        [(A, 0, 1, CreateReason.RECREATE)],
        [("env-a-dep-1-0-g0", RemoveReason.NEVER_STARTED)],
        id="never-started-leftover-is-replaced",
    ),
    pytest.param(
        [DesiredReplicas(A, 1, H1)],
        [rep(A, 0), rep(B, 0)],
        [],
        [("env-b-dep-2-0-g0", RemoveReason.ORPHAN)],
        id="binding-absent-from-table-is-removed",
    ),
    pytest.param(
        [DesiredReplicas(A, 1, H1)],
        [rep(A, 0, gen=0, ready=False), rep(A, 0, gen=1, ready=True)],
        [],
        [("env-a-dep-1-0-g0", RemoveReason.DUPLICATE)],
        id="duplicate-keeps-the-ready-one",
    ),
    pytest.param(
        [DesiredReplicas(A, 2, None)],
        [rep(A, 0, h=H1)],
        [],
        [],
        id="unresolved-spec-keeps-what-runs-creates-nothing",
    ),
    pytest.param(
        [DesiredReplicas(A, 2, H1), DesiredReplicas(B, 1, H2)],
        [rep(A, 0), rep(A, 1), rep(B, 0, h=H2)],
        [],
        [],
        id="converged-is-empty",
    ),
]


@pytest.mark.parametrize(("desired", "observed", "creates", "removes"), CASES)
def test_plan_table(desired, observed, creates, removes):
    p = plan(desired, observed, snapshot_complete=True)
    assert created(p) == creates
    assert removed(p) == removes


def test_nothing_is_removed_before_the_snapshot_is_complete():
    observed = [rep(B, 0), rep(A, 3), rep(A, 0, status=ContainerStatus.EXITED, ready=False)]
    p = plan([DesiredReplicas(A, 1, H1)], observed, snapshot_complete=False)
    assert p.removes == ()
    assert created(p) == [(A, 0, 1, CreateReason.RECREATE)]


def test_restart_backoff_defers_recreation_until_due():
    """A start failure (no container to carry labels): the in-memory timer."""
    observed = [rep(A, 0, status=ContainerStatus.EXITED, ready=False)]
    desired = [DesiredReplicas(A, 1, H1)]
    early = plan(desired, observed, snapshot_complete=True, now=10.0, not_before={("env-a", "dep-1", 0): 12.0})
    assert removed(early) == []  # the exited container is kept while the slot waits
    assert early.creates == ()
    assert early.deferred == (("env-a", "dep-1", 0),)
    due = plan(desired, observed, snapshot_complete=True, now=12.5, not_before={("env-a", "dep-1", 0): 12.0})
    assert removed(due) == [("env-a-dep-1-0-g0", RemoveReason.EXITED)]
    assert due.creates == (Create(A, 0, 1, CreateReason.RECREATE, restarts=1, crashes=0),)


def test_crash_backoff_comes_from_the_exited_container():
    """The backoff and the counts live on the container (labels + finish
    time), so a restarted scheduler derives the same decision."""
    crashed = ObservedReplica(
        container_id="c0", name="c0", key=A, index=0, generation=4, spec_hash=H1,
        status=ContainerStatus.EXITED, restarts=4, next_crashes=3, not_before=100.0,
    )
    older = ObservedReplica(
        container_id="c-old", name="c-old", key=A, index=0, generation=2, spec_hash=H1,
        status=ContainerStatus.DEAD, restarts=2, next_crashes=1, not_before=50.0,
    )
    desired = [DesiredReplicas(A, 1, H1)]
    held = plan(desired, [crashed, older], snapshot_complete=True, now=99.0)
    assert removed(held) == [("c-old", RemoveReason.EXITED)]  # the latest record stays
    assert held.creates == () and held.deferred == (("env-a", "dep-1", 0),)
    due = plan(desired, [crashed], snapshot_complete=True, now=100.5)
    assert removed(due) == [("c0", RemoveReason.EXITED)]
    assert due.creates == (Create(A, 0, 5, CreateReason.RECREATE, restarts=5, crashes=3),)
    # Scaled away while held: removed, not recreated.
    gone = plan([DesiredReplicas(A, 0, H1)], [crashed], snapshot_complete=True, now=99.0)
    assert removed(gone) == [("c0", RemoveReason.SCALE_DOWN)] and gone.creates == ()


def test_drift_replacement_keeps_the_restart_count():
    stale = ObservedReplica(
        container_id="s", name="s", key=A, index=0, generation=1, spec_hash=H1,
        status=ContainerStatus.RUNNING, ready=True, restarts=2,
    )
    p = plan([DesiredReplicas(A, 1, H2)], [stale], snapshot_complete=True)
    assert p.creates == (Create(A, 0, 2, CreateReason.REPLACE, restarts=2, crashes=0),)


def test_only_managed_input_is_acted_on():
    """The plan acts only on what it is given: the reconciler feeds it this
    instance's berth.managed containers, so a foreign container cannot
    appear in any action."""
    observed = [rep(A, 0)]
    p = plan([DesiredReplicas(A, 0, H1)], observed, snapshot_complete=True)
    assert {r.container_id for r in p.removes} <= {o.container_id for o in observed}


def test_plan_is_idempotent_after_applying_it():
    desired = [DesiredReplicas(A, 2, H2)]
    observed = [rep(A, 0, h=H1), rep(A, 1, h=H2), rep(A, 2, h=H2), rep(B, 0)]
    first = plan(desired, observed, snapshot_complete=True)
    # Apply: drop removed, add created (then they become ready).
    gone = {r.container_id for r in first.removes}
    state = [o for o in observed if o.container_id not in gone]
    state += [rep(c.key, c.index, h=H2, gen=c.generation, cid=f"new-{c.index}") for c in first.creates]
    second = plan(desired, state, snapshot_complete=True)
    gone = {r.container_id for r in second.removes}
    state = [o for o in state if o.container_id not in gone]
    assert second.creates == ()
    assert plan(desired, state, snapshot_complete=True).empty
    assert sorted((o.index, o.spec_hash) for o in state) == [(0, H2), (1, H2)]


# -- the paused tier (DesiredReplicas.rest) ------------------------------------
from services.scheduler.plan import PauseReason, Rest, UnpauseReason  # noqa: E402

PAUSED = ContainerStatus.PAUSED


def paused(p):
    return [(x.container_id, x.reason) for x in p.pauses]


def unpaused(p):
    return [(x.container_id, x.reason) for x in p.unpauses]


REST_CASES = [
    pytest.param(
        DesiredReplicas(A, 1, H1, Rest.PAUSE), [rep(A, 0)],
        [("env-a-dep-1-0-g0", PauseReason.IDLE)], [], [], [],
        id="idle-pauses-the-ready-replica",
    ),
    pytest.param(
        DesiredReplicas(A, 2, H1, Rest.PAUSE), [rep(A, 0), rep(A, 1, ready=False)],
        [("env-a-dep-1-0-g0", PauseReason.IDLE)], [], [], [],
        id="idle-never-pauses-one-still-starting",
    ),
    pytest.param(
        DesiredReplicas(A, 1, H1, Rest.PAUSE), [rep(A, 0, status=PAUSED, ready=False)],
        [], [], [], [],
        id="paused-and-idle-is-converged",
    ),
    pytest.param(
        DesiredReplicas(A, 1, H1, Rest.WAKE), [rep(A, 0, status=PAUSED, ready=False)],
        [], [("env-a-dep-1-0-g0", UnpauseReason.ACTIVE)], [], [],
        id="activity-unpauses",
    ),
    pytest.param(
        DesiredReplicas(A, 1, H1, Rest.KEEP), [rep(A, 0, status=PAUSED, ready=False)],
        [], [], [], [],
        id="adopted-paused-stays-paused-until-known",
    ),
    pytest.param(
        DesiredReplicas(A, 1, H1, Rest.KEEP), [rep(A, 0)],
        [], [], [], [],
        id="adopted-running-stays-running-until-known",
    ),
    pytest.param(
        DesiredReplicas(A, 0, H1, Rest.PAUSE), [rep(A, 0, status=PAUSED, ready=False)],
        [], [], [], [("env-a-dep-1-0-g0", RemoveReason.SCALE_DOWN)],
        id="stop-window-removes-the-paused-replica",
    ),
    pytest.param(
        DesiredReplicas(A, 1, H1, Rest.PAUSE), [rep(A, 0, status=PAUSED, ready=False)],
        [], [], [], [],
        id="paused-is-a-live-replica-not-a-crash",
    ),
    pytest.param(
        DesiredReplicas(A, 1, H2, Rest.PAUSE), [rep(A, 0)],
        [], [], [(A, 0, 1, CreateReason.REPLACE)], [],
        id="stale-replica-is-replaced-not-paused",
    ),
    pytest.param(
        DesiredReplicas(A, 1, H2, Rest.PAUSE), [rep(A, 0, h=H1, status=PAUSED, ready=False), rep(A, 0, h=H2, gen=1)],
        [("env-a-dep-1-0-g1", PauseReason.IDLE)], [], [], [("env-a-dep-1-0-g0", RemoveReason.REPLACED)],
        id="replacement-ready-stale-paused-removed-new-one-paused",
    ),
    pytest.param(
        DesiredReplicas(A, 1, None, Rest.PAUSE), [rep(A, 0)],
        [("env-a-dep-1-0-g0", PauseReason.IDLE)], [], [], [],
        id="unresolvable-spec-still-pauses-what-runs",
    ),
    pytest.param(
        DesiredReplicas(A, 1, H1, Rest.WAKE), [rep(A, 0, status=PAUSED, ready=False), rep(A, 1, status=PAUSED)],
        [], [("env-a-dep-1-0-g0", UnpauseReason.ACTIVE)], [], [("env-a-dep-1-1-g0", RemoveReason.SCALE_DOWN)],
        id="wake-unpauses-wanted-indexes-only",
    ),
]


@pytest.mark.parametrize(("want", "observed", "pauses", "unpauses", "creates", "removes"), REST_CASES)
def test_paused_tier(want, observed, pauses, unpauses, creates, removes):
    p = plan([want], observed, snapshot_complete=True)
    assert paused(p) == pauses
    assert unpaused(p) == unpauses
    assert created(p) == creates
    assert removed(p) == removes
    again = plan([want], observed, snapshot_complete=True)
    assert again == p  # pure: the same inputs give the same plan


def test_paused_tier_plan_is_not_empty_with_only_a_pause():
    p = plan([DesiredReplicas(A, 1, H1, Rest.PAUSE)], [rep(A, 0)], snapshot_complete=True)
    assert not p.empty
    assert p.creates == () and p.removes == ()
