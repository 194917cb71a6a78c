"""Revoking an API key takes effect on every service before RevokeApiKey
returns: real registry, secrets and scheduler servers (port 0) and a real
router's REST API over them, authenticating through the registry as they do
in production. No sleep anywhere: the very next call is refused."""
from __future__ import annotations

import threading
import time

import pytest

from berth import errors
from berth.v1 import registry_pb2, secrets_pb2
from tests.secrets.harness import Platform, platform  # noqa: F401 - the fixture


def test_a_revoked_key_is_refused_everywhere_at_once(platform: Platform):  # noqa: F811
    p = platform
    errors_path = f"/deployments/{p.scheduler.binding.deployment.id}/errors"
    # The key works on every service (and answers are warm, were anything cached).
    for i in range(3):
        assert p.set_secret(p.key).name == "TOKEN"
        assert list(p.scheduler.errors_of(p.key).errors) == []
        put = p.router.call("PUT", "/secrets", p.key, json={"name": "TOKEN", "type": "token", "value": f"r-{i}234"})
        assert put.status_code == 200, put.text
        assert p.router.call("GET", errors_path, p.key).status_code == 200

    p.revoke()

    # Immediately: writes and reads, gRPC and REST, on every service.
    with pytest.raises(errors.Unauthenticated, match="not valid"):
        p.set_secret(p.key)
    with pytest.raises(errors.Unauthenticated):
        p.secrets.call("ListSecrets", secrets_pb2.ListSecretsRequest(), p.key)
    with pytest.raises(errors.Unauthenticated):
        p.scheduler.errors_of(p.key)
    put = p.router.call("PUT", "/secrets", p.key, json={"name": "TOKEN", "type": "token", "value": "r-5678"})
    assert put.status_code == 401 and put.json()["error"]["code"] == "unauthenticated", put.text
    assert p.router.call("GET", "/secrets", p.key).status_code == 401
    assert p.router.call("GET", errors_path, p.key).status_code == 401
    with pytest.raises(errors.Unauthenticated):
        p.registry.call("ListEnvironments", registry_pb2.ListEnvironmentsRequest(), p.key)

    # Nothing the revoked key tried landed; the project's other key still works.
    versions = p.secrets.call("ListSecretVersions", secrets_pb2.ListSecretVersionsRequest(name="TOKEN"), p.owner_key)
    assert len(versions.versions) == 6
    assert p.set_secret(p.owner_key).version == 7
    assert list(p.scheduler.errors_of(p.owner_key).errors) == []
    assert p.router.call("GET", "/secrets", p.owner_key).status_code == 200


def test_no_call_started_after_the_revocation_is_accepted(platform: Platform):  # noqa: F811
    """Clients hammer the services with the key while it is revoked: every
    call that started after RevokeApiKey returned is refused (no answer is
    shared with a call that asked before the revocation)."""
    p = platform
    stop = threading.Event()
    lock = threading.Lock()
    accepted_after: list[str] = []
    accepted_before = [0]
    revoked_at = [float("inf")]

    def hammer(which: str) -> None:
        while not stop.is_set():
            started = time.monotonic()
            if which == "rest":
                ok = p.router.call("PUT", "/secrets", p.key,
                                   json={"name": "TOKEN", "type": "token", "value": "r-1234"}).status_code == 200
            else:
                try:
                    p.set_secret(p.key) if which == "secrets" else p.scheduler.errors_of(p.key)
                    ok = True
                except errors.Unauthenticated:
                    ok = False
            if not ok:
                continue
            with lock:
                if started >= revoked_at[0]:
                    accepted_after.append(f"{which} call started {started - revoked_at[0]:.4f} s after the revocation")
                else:
                    accepted_before[0] += 1

    threads = [threading.Thread(target=hammer, args=(w,), daemon=True) for w in ("secrets", "scheduler") * 3]
    threads.append(threading.Thread(target=hammer, args=("rest",), daemon=True))
    for t in threads:
        t.start()
    deadline = time.monotonic() + 10
    while accepted_before[0] < 20 and time.monotonic() < deadline:
        time.sleep(0.01)
    p.revoke()
    with lock:
        revoked_at[0] = time.monotonic()
    time.sleep(0.5)  # keep hammering a while after the revocation
    stop.set()
    for t in threads:
        t.join(15)
    assert accepted_before[0] >= 20, "the key was expected to work before its revocation"
    assert accepted_after == []
