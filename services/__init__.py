"""Berth's four gRPC services: registry, scheduler, secrets and router."""
