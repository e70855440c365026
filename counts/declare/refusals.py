"""Refusing, before triggers are written or installed, what the checks refuse.

``manage.py check`` reports refused declarations (``counts.declare.checks``); a run with
``--skip-checks`` skips that report, so what writes triggers into a migration
(``counts.management.migrations_writer``) or installs them (``counts.operations``) asks here
first: triggers compiled from a refused declaration would break the application's own writes.
"""

from __future__ import annotations

from django.apps import apps
from django.core import checks

from counts.base.errors import DeclarationError
from counts.base.names import count_fields
from counts.declare.checks import declaration_errors


def declared_counts(models=None):
    """``(model, field)`` for every count declared on a concrete model's own table."""
    for model in apps.get_models() if models is None else models:
        if model._meta.proxy or model._meta.abstract:
            continue
        for f in count_fields(model):
            if f.model is model:
                yield model, f


def refused(models=None) -> list[checks.Error]:
    """The errors of every refused declaration of ``models`` (every installed model)."""
    return [e for model, f in declared_counts(models) for e in declaration_errors(model, f)]


class RefusedDeclarations(DeclarationError):
    """Some declarations are refused: no trigger may be written or installed until fixed."""

    def __init__(self, errors: list[checks.Error]) -> None:
        lines = [
            f"{len(errors)} cached count declaration problem(s); no count trigger is written"
            " or installed until they are fixed (manage.py check lists them):"
        ]
        for e in errors:
            lines.append(f"  {e.obj}: ({e.id}) {e.msg}")
            lines.append(f"    HINT: {e.hint}")
        super().__init__("counts", "\n".join(lines))
        self.errors = errors


def refuse_unsupported(models=None) -> None:
    """Raise :class:`RefusedDeclarations` when any declaration is refused.

    The guard of everything that writes or installs triggers, which ``--skip-checks`` would
    otherwise let through: ``counts.management.migrations_writer.pending_migrations``
    (``makemigrations``, ``counts makemigrations``) and ``SyncCountTriggers.database_forwards``
    (``migrate``: a
    migration written before a declaration was refused must not install its triggers).
    """
    errors = refused(models)
    if errors:
        raise RefusedDeclarations(errors)


__all__ = ["RefusedDeclarations", "declared_counts", "refuse_unsupported", "refused"]
