"""Shared fixtures: the real PostgreSQL (pytest-django, migrations applied) and real Redis."""
