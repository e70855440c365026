"""Declarations the engine cannot keep exact are refused at check time, with what to write.

``CachedCountField.__init__`` keeps what it was given; this module decides, for each
declaration, whether the engine can turn it into a count (``counts.declare.spec``) whose triggers
keep it exact. A declaration it cannot keep is refused:

- by ``manage.py check`` (and every command that runs the checks: ``runserver``, ``migrate``,
  ``makemigrations``…) as Django system check errors, every one at once, each naming the
  model and field, what was given, why it is refused and what to write instead;
- by the engine itself: graph building (``counts.declare.spec.resolve_all``) leaves a refused
  declaration out instead of failing at start-up, so the checks can run and report;
- by ``counts.declare.refusals.refuse_unsupported``, which raises before triggers are written
  into a migration (``counts.management.migrations_writer.pending_migrations`` calls it) or
  installed by one (``SyncCountTriggers.database_forwards`` calls it), so that even a run with
  ``--skip-checks`` cannot install triggers that would break the application's writes.

Every id, with what it refuses, is in :data:`CHECKS`.
"""

from __future__ import annotations

from django.core import checks
from django.core.exceptions import FieldDoesNotExist, FieldError
from django.db.models import Count, Q
from django.db.models.query import QuerySet

from counts.base.errors import first_line
from counts.base.names import FRESHNESS_FIELD
from counts.declare.check_walk import (
    Step,
    Walk,
    accessor_hint,
    article,
    crossed,
    expression_text,
    given,
    key_field,
    keys_of,
    q_source,
    relation_name,
    relations_of,
    unfollowable,
    walk_lookup,
)
from counts.declare.lookups import f_refs, lookups

#: Every refusal, by check id.
CHECKS = {
    "counts.E001": "no path, or a path that is not a string",
    "counts.E002": "filter= is not a Q object",
    "counts.E003": "exclude= is not supported (negate in the filter: filter=~Q(...))",
    "counts.E004": "a part of the path is not a relation of the model it is looked up on",
    "counts.E005": "the path ends at a column: sums and other aggregates are not supported",
    "counts.E006": "the path crosses no to-many relation",
    "counts.E007": "a relation the triggers cannot follow (generic, multi-column, not installed)",
    "counts.E008": "a foreign key with to_field (not pointing at the primary key)",
    "counts.E009": "a model the count reads has a primary key that is not an integer",
    "counts.E010": "the filter does not resolve from the model",
    "counts.E011": "the filter holds an expression instead of lookups",
    "counts.E012": "the model's own counts_updated_at is not a DateTimeField",
}

#: Primary keys the engine can hold in its marks and ledgers (``bigint``).
INTEGER_KEYS = frozenset(
    {
        "AutoField",
        "BigAutoField",
        "SmallAutoField",
        "IntegerField",
        "BigIntegerField",
        "SmallIntegerField",
        "PositiveIntegerField",
        "PositiveBigIntegerField",
        "PositiveSmallIntegerField",
    }
)


def _error(field, check_id: str, msg: str, hint: str) -> checks.Error:
    if not msg.endswith((".", ")")):
        msg += "."
    return checks.Error(msg, hint=hint, obj=field, id=check_id)


# -- the refusals ---------------------------------------------------------------------------


def _check_path(model, field, errors: list) -> Walk | None:
    """E001, E004, E005, E006, E007 for the path; the walk when it can be followed."""
    label = model._meta.label
    path = field.count_path
    relations = ", ".join(relations_of(model)) or "none"
    if not path or not isinstance(path, str):
        shown = "nothing" if path is None or path == "" else given(path)
        errors.append(
            _error(
                field,
                "counts.E001",
                f"CachedCountField needs a path to the rows it counts: a string of relation"
                f" names joined by '__'; got {shown}.",
                f'Name the relation whose rows it counts, e.g. CachedCountField("<relation>");'
                f" relations of {label}: {relations}.",
            )
        )
        return None
    walk = walk_lookup(model, path, strict=True)
    if walk.stop:
        errors.append(_stop_error(model, field, walk, relations))
        return None
    if not any(step.to_many for step in walk.steps):
        last = walk.steps[-1]
        errors.append(
            _error(
                field,
                "counts.E006",
                f"path {path!r} must cross at least one to-many relation:"
                f" {relation_name(last.model, last.relation)} is"
                f" {article(type(last.relation).__name__)}, so each {label} row reaches at"
                f" most one {last.to._meta.label}; there is nothing to count.",
                "Start the path with a reverse foreign key or a many-to-many relation"
                f" (relations of {label}: {relations}); a foreign key can end a path after"
                " one, with distinct=True to count the distinct rows it points at.",
            )
        )
        return None
    return walk


def _stop_error(model, field, walk: Walk, relations: str) -> checks.Error:
    """E004, E005 or E007: why the path cannot be followed to its end."""
    label, path, stop = model._meta.label, field.count_path, walk.stop
    if stop[0] == "unknown":
        where, part = stop[1], stop[2]
        where_relations = ", ".join(relations_of(where)) or "none"
        return _error(
            field,
            "counts.E004",
            f"path {path!r}: {part!r} is not a field of {where._meta.label}"
            f"{accessor_hint(where, part)}.",
            f"A path names relations only (a condition such as __isnull goes in"
            f" filter=Q(...)); relations of {where._meta.label}: {where_relations}.",
        )
    if stop[0] == "column":
        where, column = stop[1], stop[2]
        counted = "__".join(s.part for s in walk.steps)
        example = (
            f"CachedCountField({counted!r}, filter=Q({counted}__{column.name}__gt=0))"
            if counted
            else f'CachedCountField("<relation>") (relations of {label}: {relations})'
        )
        return _error(
            field,
            "counts.E005",
            f"path {path!r} must end at a relation, not at the column"
            f" {where._meta.label}.{column.name}: a CachedCountField counts rows; sums,"
            " averages and other aggregates of a column are not supported.",
            f"End the path at the relation whose rows are counted and put a condition on"
            f" the column in filter=, e.g. {example}.",
        )
    return _unfollowable_error(field, path, stop[1])


def _unfollowable_error(field, lookup: str, step: Step) -> checks.Error:
    return _error(
        field,
        "counts.E007",
        f"{lookup!r} crosses {relation_name(step.model, step.relation)}, which is"
        f" {unfollowable(step.relation)}: the engine's triggers follow foreign keys and"
        " many-to-many relations only.",
        "Count along a ForeignKey, OneToOneField or ManyToManyField (each joined by its"
        " primary key).",
    )


def _check_exclude(field, errors: list) -> None:
    """E003: ``exclude=``, with the filter that says the same."""
    q, exclude = field.count_filter, field.count_exclude
    if exclude is None:
        return
    negated = f"~{q_source(exclude) if isinstance(exclude, Q | dict) else 'Q(...)'}"
    written = f"{q_source(q)} & {negated}" if isinstance(q, Q) else negated
    errors.append(
        _error(
            field,
            "counts.E003",
            f"CachedCountField takes no exclude=; got exclude={given(exclude)}.",
            f"Negate the condition in filter=: filter={written}.",
        )
    )


def _not_q_error(field) -> checks.Error:
    """E002: a filter that is not a ``Q``, with the ``Q`` to write instead."""
    q = field.count_filter
    if isinstance(q, dict):
        example = q_source(q)
    else:
        example = f"Q({field.count_path or '<relation>'}__<column>__<lookup>=<value>)"
    return _error(
        field,
        "counts.E002",
        f"filter= takes a Q object; got {given(q)}.",
        f"Write filter={example}.",
    )


def _check_filter(model, field, errors: list) -> list[tuple[str, Walk]]:
    """E002, E003, E011, E010, E007 for the filter; the walks of its lookups and F() refs."""
    label = model._meta.label
    q = field.count_filter
    _check_exclude(field, errors)
    if q is None:
        return []
    if not isinstance(q, Q):
        errors.append(_not_q_error(field))
        return []
    walks, expressions = [], []
    for child in lookups(q):
        if not (isinstance(child, tuple) and len(child) == 2 and isinstance(child[0], str)):
            expressions.append(child)
            continue
        lookup, value = child
        walks.append((lookup, walk_lookup(model, lookup, strict=False)))
        for ref in f_refs(value):
            walks.append((ref, walk_lookup(model, ref, strict=False)))
    for expression in expressions:
        errors.append(
            _error(
                field,
                "counts.E011",
                f"filter= holds {expression_text(expression)}, not a lookup:"
                " the engine derives which tables and columns a count reads from the filter's"
                " lookups (name=value), and cannot see inside an expression.",
                "Write the condition as lookups across relations, e.g."
                f" Q({field.count_path or '<relation>'}__<child>__isnull=False); a condition"
                " below the counted rows is evaluated as an EXISTS probe.",
            )
        )
    for lookup, walk in walks:
        if walk.stop and walk.stop[0] == "unfollowable":
            errors.append(_unfollowable_error(field, lookup, walk.stop[1]))
    if expressions:
        return walks
    try:
        QuerySet(model=model).filter(q)
    except (FieldError, FieldDoesNotExist, LookupError, TypeError, ValueError) as exc:
        errors.append(
            _error(
                field,
                "counts.E010",
                f"filter={q_source(q)} does not resolve on {label}: {first_line(exc)}",
                f"Lookups in filter= start from {label}, like the filter of Count(), e.g."
                f" Q({field.count_path if isinstance(field.count_path, str) else '<relation>'}"
                "__<column>__<lookup>=<value>).",
            )
        )
    return walks


def _check_keys(model, field, path: Walk | None, filters, errors: list) -> None:
    """E008 and E009 over every model and foreign key the count reads."""
    roles: dict[type, str] = {model: "holds the count"}
    steps: list[Step] = []
    if path is not None and path.steps:
        last = path.steps[-1]
        # A path ending in a forward foreign key counts the rows holding it (unless distinct);
        # it crosses a to-many relation first, so there is a step before it.
        ends_forward = last.forward and not field.count_distinct and len(path.steps) > 1
        counted = path.steps[-2].to if ends_forward else last.to
        roles.setdefault(counted, "is the model counted")
        crossed(path.steps, steps, roles, "is on the count's path", "on the path")
    for _, walk in filters:
        crossed(walk.steps, steps, roles, "is read by the count's filter", "in the filter")
    seen = set()
    for step in steps:
        for fk, points_at in keys_of(step):
            target = fk.target_field
            if fk in seen or target is None or target == points_at._meta.pk:
                continue
            seen.add(fk)
            errors.append(
                _error(
                    field,
                    "counts.E008",
                    f"{fk.model._meta.label}.{fk.name} points at"
                    f" {points_at._meta.label}.{target.name}"
                    f" (to_field={target.name!r}), not at its primary key"
                    f" {points_at._meta.label}.{points_at._meta.pk.name}: the engine joins"
                    " every relation a count crosses by primary key, so this count would"
                    " follow the wrong rows.",
                    f"Remove to_field= from {fk.model._meta.label}.{fk.name} so that it"
                    " points at the primary key, or count along a relation that does.",
                )
            )
    for other, role in roles.items():
        key = key_field(other)
        if key.get_internal_type() in INTEGER_KEYS:
            continue
        kind = type(key).__name__
        errors.append(
            _error(
                field,
                "counts.E009",
                f"{other._meta.label} {role} and its primary key"
                f" {other._meta.label}.{key.name} is {article(kind)}: the engine keeps the"
                " ids of the rows it marks and counts as integers (its triggers write them to"
                f" bigint[] columns), so writes to {other._meta.db_table} would fail. Keys"
                " that are not integers are not supported.",
                f"Give {other._meta.label} an integer primary key (the default"
                f" BigAutoField) and keep the {kind} as a unique field, or remove this count.",
            )
        )


def _check_freshness(model, field, errors: list) -> None:
    try:
        own = model._meta.get_field(FRESHNESS_FIELD)
    except FieldDoesNotExist:
        return
    if own.get_internal_type() != "DateTimeField":
        errors.append(
            _error(
                field,
                "counts.E012",
                f"{model._meta.label}.{FRESHNESS_FIELD} is declared by the model as"
                f" {article(type(own).__name__)}: the engine"
                " gives every model with cached counts a nullable DateTimeField of that name"
                " (when its counts last changed) and writes it on every recompute.",
                f"Rename or remove {model._meta.label}.{FRESHNESS_FIELD}.",
            )
        )


def declaration_errors(model, field) -> list[checks.Error]:
    """Every reason the engine refuses ``field`` (a ``CachedCountField``) on ``model``;
    empty when it can keep the count exact."""
    if model is None or model._meta.abstract:
        return []
    errors: list[checks.Error] = []
    path = _check_path(model, field, errors)
    filters = _check_filter(model, field, errors)
    _check_keys(model, field, path, filters, errors)
    _check_freshness(model, field, errors)
    if path is not None and not errors:
        # Whatever the engine accepts, Django must be able to aggregate as declared.
        try:
            QuerySet(model=model).annotate(
                _counts_probe=Count(
                    field.count_path, filter=field.count_filter, distinct=field.count_distinct
                )
            )
        except (FieldError, FieldDoesNotExist, LookupError, TypeError, ValueError) as exc:
            errors.append(
                _error(
                    field,
                    "counts.E010",
                    f"Count({field.count_path!r}, filter=...) does not resolve on"
                    f" {model._meta.label}: {first_line(exc)}",
                    "Write the path and filter as for Count() on the model.",
                )
            )
    return errors
