"""Where migrations and models import the field from: ``counts.fields.CachedCountField``.

The field lives in ``counts.declare.field``; this path stays because every migration that adds
a count names it (``CachedCountField.deconstruct`` keeps writing it).
"""

from counts.declare.field import CachedCountField, cached_count_fields

__all__ = ["CachedCountField", "cached_count_fields"]
