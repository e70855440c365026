"""Declarations the engine cannot keep exact are refused at check time, with what to write.

``CachedCountField.__init__`` keeps what it was given; this module decides, for each
declaration, whether the engine can turn it into a count (``counts.spec``) whose triggers keep
it exact. A declaration it cannot keep is refused:

- by ``manage.py check`` (and every command that runs the checks: ``runserver``, ``migrate``,
  ``makemigrations``…) as Django system check errors, every one at once, each naming the
  model and field, what was given, why it is refused and what to write instead;
- by the engine itself: graph building (``counts.spec.resolve_all``) leaves a refused
  declaration out instead of failing at start-up, so the checks can run and report;
- by :func:`refuse_unsupported`, which raises before triggers are written into a migration
  (``counts.migrations_writer.pending_migrations`` calls it) or installed by one
  (``SyncCountTriggers.database_forwards`` is to call it), so that even a run with
  ``--skip-checks`` cannot install triggers that would break the application's writes.

Every id, with what it refuses, is in :data:`CHECKS`.
"""

from __future__ import annotations

from dataclasses import dataclass

from django.apps import apps
from django.core import checks
from django.core.exceptions import FieldDoesNotExist, FieldError
from django.db.models import Count, F, Q
from django.db.models.query import QuerySet

from counts.errors import DeclarationError, first_line
from counts.lookups import f_refs, lookups
from counts.names import FRESHNESS_FIELD, count_fields

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


def _q_source(q) -> str:
    """A ``Q`` (or a dict of lookups) as the code that writes it: ``Q(a__isnull=True)``."""
    if isinstance(q, dict):
        return "Q(" + ", ".join(f"{k}={_value_source(v)}" for k, v in q.items()) + ")"
    parts = []
    for child in q.children:
        if isinstance(child, Q):
            parts.append(_q_source(child))
        elif isinstance(child, tuple) and len(child) == 2:
            parts.append(f"Q({child[0]}={_value_source(child[1])})")
        else:
            parts.append(f"Q({child!r})")
    if len(parts) == 1 or (q.connector == Q.AND and all(p.startswith("Q(") for p in parts)):
        inner = [p[2:-1] for p in parts if p.startswith("Q(")]
        text = f"Q({', '.join(inner)})" if len(inner) == len(parts) else parts[0]
    else:
        text = "(" + f" {'&' if q.connector == Q.AND else '|'} ".join(parts) + ")"
    return f"~{text}" if q.negated else text


def _value_source(value) -> str:
    if isinstance(value, F):
        return f"F({value.name!r})"
    return repr(value)


def _article(name: str) -> str:
    return f"{'an' if name[0] in 'AEIO' else 'a'} {name}"


def _given(value) -> str:
    """What was given, for a message: its type and value."""
    if isinstance(value, Q):
        return _q_source(value)
    return f"{type(value).__name__} {value!r}"


# -- following a lookup through model metadata ----------------------------------------------


@dataclass(frozen=True)
class _Step:
    """One relation crossed: looked up as ``part`` on ``model``, it leads to ``to``."""

    model: type
    part: str
    relation: object  # a relation field (forward, M2M) or a reverse relation object
    to: type

    @property
    def to_many(self) -> bool:
        """As ``counts.spec`` hops it: an M2M or a reverse relation can reach many rows."""
        return self.relation.many_to_many or not self.relation.concrete

    @property
    def forward(self) -> bool:
        return self.relation.concrete and not self.relation.many_to_many


@dataclass(frozen=True)
class _Walk:
    steps: tuple[_Step, ...]
    #: Why the walk stopped before the end of the lookup: None (it ended after a relation),
    #: ``("column", model, field)``, ``("unknown", model, part)`` or ``("unfollowable", step)``.
    stop: tuple | None = None


def _relation_name(model, relation) -> str:
    """``app.Model.name`` of a relation, saying what a reverse relation is the reverse of."""
    name = f"{model._meta.label}.{relation.name}"
    remote = getattr(relation, "field", None)
    if not relation.concrete and remote is not None and hasattr(remote, "model"):
        name += f" (the reverse of {remote.model._meta.label}.{remote.name})"
    return name


def _unfollowable(relation) -> str | None:
    """Why the triggers cannot follow ``relation``, or None."""
    if isinstance(relation.related_model, str) or relation.related_model is None:
        if relation.related_model is None:
            return f"a generic relation ({type(relation).__name__})"
        return f"a relation to {relation.related_model!r}, a model that is not installed"
    if relation.many_to_many:
        return None
    if relation.concrete:
        if getattr(relation, "column", None) is None:
            return f"a multi-column relation ({type(relation).__name__})"
        return None
    remote = getattr(relation, "field", None)
    if remote is None or not remote.concrete:
        kind = type(remote if remote is not None else relation).__name__
        return f"a {'generic' if 'Generic' in kind else 'multi-column'} relation ({kind})"
    if getattr(remote, "column", None) is None:
        return f"a multi-column relation ({type(remote).__name__})"
    return None


def _walk(model, lookup: str, strict: bool) -> _Walk:
    """Follow ``lookup`` from ``model`` across relations.

    ``strict`` (a path): every part must be a field. Otherwise (a filter lookup) the first part
    that is not a field ends the walk: it is a lookup or a transform.
    """
    steps: list[_Step] = []
    current = model
    for part in lookup.split("__"):
        opts = current._meta
        try:
            f = opts.pk if part == "pk" else opts.get_field(part)
        except FieldDoesNotExist:
            if strict:
                return _Walk(tuple(steps), ("unknown", current, part))
            return _Walk(tuple(steps))
        if not f.is_relation:
            return _Walk(tuple(steps), ("column", current, f))
        if _unfollowable(f) is not None:
            step = _Step(current, part, f, None)
            return _Walk(tuple(steps), ("unfollowable", step))
        step = _Step(current, part, f, f.related_model)
        steps.append(step)
        current = f.related_model
    return _Walk(tuple(steps))


def _keys_of(step: _Step) -> list[tuple[object, type]]:
    """The foreign keys ``step`` joins by, with the model each must point at by its pk."""
    relation = step.relation
    if relation.many_to_many:
        m2m = relation if relation.concrete else relation.field
        through = m2m.remote_field.through
        if isinstance(through, str):
            return []
        opts = through._meta
        return [
            (opts.get_field(m2m.m2m_field_name()), m2m.model),
            (opts.get_field(m2m.m2m_reverse_field_name()), m2m.remote_field.model),
        ]
    if relation.concrete:
        return [(relation, step.to)]
    return [(relation.field, step.model)]


def _crossed(crossed, steps: list, roles: dict, role: str, where: str) -> None:
    """Add the steps ``crossed`` to ``steps``, and the role of each model they reach (and of
    each through model) to ``roles`` unless it has one already."""
    for step in crossed:
        steps.append(step)
        roles.setdefault(step.to, role)
        through = _through(step)
        if through is not None:
            roles.setdefault(through, f"is the through model of a relation {where}")


def _through(step: _Step):
    relation = step.relation
    if not relation.many_to_many:
        return None
    through = (relation if relation.concrete else relation.field).remote_field.through
    return None if isinstance(through, str) else through


def _key_field(model):
    """The field that holds ``model``'s key values (an MTI child's key is its parent's)."""
    pk = model._meta.pk
    while pk.is_relation and getattr(pk, "target_field", None) is not None:
        pk = pk.target_field
    return pk


def _relations_of(model) -> list[str]:
    return [
        f.name
        for f in model._meta.get_fields()
        if f.is_relation and f.related_model is not None and not isinstance(f.related_model, str)
    ]


def _accessor_hint(model, part: str) -> str:
    """``'post_set' is the accessor of ...; paths use 'post'`` when ``part`` is an accessor."""
    for f in model._meta.get_fields():
        if not f.is_relation or f.concrete:
            continue
        accessor = f.get_accessor_name() if hasattr(f, "get_accessor_name") else None
        if accessor == part and f.name != part:
            return (
                f" ({part!r} is the attribute Python reads the related rows from; lookups and"
                f" paths name the relation {f.name!r})"
            )
    return ""


# -- the refusals ---------------------------------------------------------------------------


def _check_path(model, field, errors: list) -> _Walk | None:
    """E001, E004, E005, E006, E007 for the path; the walk when it can be followed."""
    label = model._meta.label
    path = field.count_path
    relations = ", ".join(_relations_of(model)) or "none"
    if not path or not isinstance(path, str):
        given = "nothing" if path is None or path == "" else _given(path)
        errors.append(
            _error(
                field,
                "counts.E001",
                f"CachedCountField needs a path to the rows it counts: a string of relation"
                f" names joined by '__'; got {given}.",
                f'Name the relation whose rows it counts, e.g. CachedCountField("<relation>");'
                f" relations of {label}: {relations}.",
            )
        )
        return None
    walk = _walk(model, path, strict=True)
    stop = walk.stop
    if stop and stop[0] == "unknown":
        where, part = stop[1], stop[2]
        where_relations = ", ".join(_relations_of(where)) or "none"
        errors.append(
            _error(
                field,
                "counts.E004",
                f"path {path!r}: {part!r} is not a field of {where._meta.label}"
                f"{_accessor_hint(where, part)}.",
                f"A path names relations only (a condition such as __isnull goes in"
                f" filter=Q(...)); relations of {where._meta.label}: {where_relations}.",
            )
        )
        return None
    if stop and stop[0] == "column":
        where, column = stop[1], stop[2]
        counted = "__".join(s.part for s in walk.steps)
        example = (
            f"CachedCountField({counted!r}, filter=Q({counted}__{column.name}__gt=0))"
            if counted
            else f'CachedCountField("<relation>") (relations of {label}: {relations})'
        )
        errors.append(
            _error(
                field,
                "counts.E005",
                f"path {path!r} must end at a relation, not at the column"
                f" {where._meta.label}.{column.name}: a CachedCountField counts rows; sums,"
                " averages and other aggregates of a column are not supported.",
                f"End the path at the relation whose rows are counted and put a condition on"
                f" the column in filter=, e.g. {example}.",
            )
        )
        return None
    if stop and stop[0] == "unfollowable":
        step = stop[1]
        errors.append(_unfollowable_error(field, path, step))
        return None
    if not any(step.to_many for step in walk.steps):
        last = walk.steps[-1]
        errors.append(
            _error(
                field,
                "counts.E006",
                f"path {path!r} must cross at least one to-many relation:"
                f" {_relation_name(last.model, last.relation)} is"
                f" {_article(type(last.relation).__name__)}, so each {label} row reaches at"
                f" most one {last.to._meta.label}; there is nothing to count.",
                "Start the path with a reverse foreign key or a many-to-many relation"
                f" (relations of {label}: {relations}); a foreign key can end a path after"
                " one, with distinct=True to count the distinct rows it points at.",
            )
        )
        return None
    return walk


def _unfollowable_error(field, lookup: str, step: _Step) -> checks.Error:
    return _error(
        field,
        "counts.E007",
        f"{lookup!r} crosses {_relation_name(step.model, step.relation)}, which is"
        f" {_unfollowable(step.relation)}: the engine's triggers follow foreign keys and"
        " many-to-many relations only.",
        "Count along a ForeignKey, OneToOneField or ManyToManyField (each joined by its"
        " primary key).",
    )


def _check_filter(model, field, errors: list) -> list[tuple[str, _Walk]]:
    """E002, E003, E011, E010, E007 for the filter; the walks of its lookups and F() refs."""
    label = model._meta.label
    q, exclude = field.count_filter, field.count_exclude
    if exclude is not None:
        negated = f"~{_q_source(exclude) if isinstance(exclude, Q | dict) else 'Q(...)'}"
        written = f"{_q_source(q)} & {negated}" if isinstance(q, Q) else negated
        errors.append(
            _error(
                field,
                "counts.E003",
                f"CachedCountField takes no exclude=; got exclude={_given(exclude)}.",
                f"Negate the condition in filter=: filter={written}.",
            )
        )
    if q is None:
        return []
    if not isinstance(q, Q):
        if isinstance(q, dict):
            example = _q_source(q)
        else:
            example = f"Q({field.count_path or '<relation>'}__<column>__<lookup>=<value>)"
        errors.append(
            _error(
                field,
                "counts.E002",
                f"filter= takes a Q object; got {_given(q)}.",
                f"Write filter={example}.",
            )
        )
        return []
    walks, expressions = [], []
    for child in lookups(q):
        if not (isinstance(child, tuple) and len(child) == 2 and isinstance(child[0], str)):
            expressions.append(child)
            continue
        lookup, value = child
        walks.append((lookup, _walk(model, lookup, strict=False)))
        for ref in f_refs(value):
            walks.append((ref, _walk(model, ref, strict=False)))
    for expression in expressions:
        errors.append(
            _error(
                field,
                "counts.E011",
                f"filter= holds {_expression(expression)}, not a lookup:"
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
                f"filter={_q_source(q)} does not resolve on {label}: {first_line(exc)}",
                f"Lookups in filter= start from {label}, like the filter of Count(), e.g."
                f" Q({field.count_path if isinstance(field.count_path, str) else '<relation>'}"
                "__<column>__<lookup>=<value>).",
            )
        )
    return walks


def _expression(expression) -> str:
    """``an Exists expression (over app.Model)``: what an expression in a filter is."""
    text = f"{_article(type(expression).__name__)} expression"
    query = getattr(expression, "query", None)
    model = getattr(query, "model", None)
    return f"{text} (over {model._meta.label})" if model is not None else text


def _check_keys(model, field, path: _Walk | None, filters, errors: list) -> None:
    """E008 and E009 over every model and foreign key the count reads."""
    roles: dict[type, str] = {model: "holds the count"}
    steps: list[_Step] = []
    if path is not None and path.steps:
        last = path.steps[-1]
        # A path ending in a forward foreign key counts the rows holding it (unless distinct);
        # it crosses a to-many relation first, so there is a step before it.
        ends_forward = last.forward and not field.count_distinct and len(path.steps) > 1
        counted = path.steps[-2].to if ends_forward else last.to
        roles.setdefault(counted, "is the model counted")
        _crossed(path.steps, steps, roles, "is on the count's path", "on the path")
    for _, walk in filters:
        _crossed(walk.steps, steps, roles, "is read by the count's filter", "in the filter")
    seen = set()
    for step in steps:
        for fk, points_at in _keys_of(step):
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
        key = _key_field(other)
        if key.get_internal_type() in INTEGER_KEYS:
            continue
        kind = type(key).__name__
        errors.append(
            _error(
                field,
                "counts.E009",
                f"{other._meta.label} {role} and its primary key"
                f" {other._meta.label}.{key.name} is {_article(kind)}: the engine keeps the"
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
                f" {_article(type(own).__name__)}: the engine"
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
    otherwise let through: ``counts.migrations_writer.pending_migrations`` (``makemigrations``,
    ``counts makemigrations``) and ``SyncCountTriggers.database_forwards`` (``migrate``: a
    migration written before a declaration was refused must not install its triggers).
    """
    errors = refused(models)
    if errors:
        raise RefusedDeclarations(errors)


__all__ = ["CHECKS", "declaration_errors", "refuse_unsupported", "refused"]
