"""The read-only REST API (``/api/v2/…``) over the models with cached counts."""
