"""Berth's router: HTTP ingress to the deployments an environment points at,
and the platform's own HTTP endpoints (/healthz, later the REST API)."""
