"""Berth scheduler: runs replicas of bindings on Docker and reports what runs."""
