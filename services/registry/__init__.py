"""The registry: projects, API keys, environments, deployments, bindings and
promotion history — Berth's source of truth for what should serve."""
