"""Berth: a deployment control plane. Client library and CLI."""

__version__ = "0.1.0"
