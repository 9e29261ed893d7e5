"""Test-only helpers that must be importable by worker processes (Ray actors that fail on purpose):
never imported by product code."""
