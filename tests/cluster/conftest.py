"""The cluster tests run on a real multi-node swarm built by
tests/support/swarm.py (module-scoped: swept first, always torn down)."""
from tests.support.swarm import swarm_cluster  # noqa: F401 - the fixture, for every module here
