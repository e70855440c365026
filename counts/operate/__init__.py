"""Operators' passes over whole tables: "Recompute now", reconcile, rebuild, a new count's
backfill, their progress, and the status operators read."""
