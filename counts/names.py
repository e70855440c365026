"""The names the engine gives things in the application's schema, in one place below every
other module: what a declaration, a trigger, a check and a migration must agree on."""

#: The column every model with cached counts gets: when its counts last changed.
FRESHNESS_FIELD = "counts_updated_at"
#: Set on ``CachedCountField`` (and nothing else): how a module that must not import the
#: field's class (``counts.checks``, which the field's own ``check()`` calls) finds counts.
CACHED_COUNT_MARKER = "is_cached_count"


def count_fields(model) -> list:
    """The model's cached-count fields, in declaration order."""
    return [f for f in model._meta.concrete_fields if getattr(f, CACHED_COUNT_MARKER, False)]
