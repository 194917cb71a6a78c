"""Plumbing every service shares: server factory, error mapping, auth, logging."""
