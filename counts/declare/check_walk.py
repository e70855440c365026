"""Following a declaration's lookups through model metadata, as the checks see them, and
writing what was given back as code for their messages.

Lenient where ``counts.declare.spec.walk`` is strict: a check must say *where* a path stops
(an unknown part, a column, a relation the triggers cannot follow) to name what to write
instead, while the spec only ever walks declarations the checks accepted.
"""

from __future__ import annotations

from dataclasses import dataclass

from django.core.exceptions import FieldDoesNotExist
from django.db.models import F, Q


def q_source(q) -> str:
    """A ``Q`` (or a dict of lookups) as the code that writes it: ``Q(a__isnull=True)``."""
    if isinstance(q, dict):
        return "Q(" + ", ".join(f"{k}={value_source(v)}" for k, v in q.items()) + ")"
    parts = []
    for child in q.children:
        if isinstance(child, Q):
            parts.append(q_source(child))
        elif isinstance(child, tuple) and len(child) == 2:
            parts.append(f"Q({child[0]}={value_source(child[1])})")
        else:
            parts.append(f"Q({child!r})")
    if len(parts) == 1 or (q.connector == Q.AND and all(p.startswith("Q(") for p in parts)):
        inner = [p[2:-1] for p in parts if p.startswith("Q(")]
        text = f"Q({', '.join(inner)})" if len(inner) == len(parts) else parts[0]
    else:
        text = "(" + f" {'&' if q.connector == Q.AND else '|'} ".join(parts) + ")"
    return f"~{text}" if q.negated else text


def value_source(value) -> str:
    if isinstance(value, F):
        return f"F({value.name!r})"
    return repr(value)


def article(name: str) -> str:
    return f"{'an' if name[0] in 'AEIO' else 'a'} {name}"


def given(value) -> str:
    """What was given, for a message: its type and value."""
    if isinstance(value, Q):
        return q_source(value)
    return f"{type(value).__name__} {value!r}"


@dataclass(frozen=True)
class Step:
    """One relation crossed: looked up as ``part`` on ``model``, it leads to ``to``."""

    model: type
    part: str
    relation: object  # a relation field (forward, M2M) or a reverse relation object
    to: type

    @property
    def to_many(self) -> bool:
        """As ``counts.declare.spec`` hops it: an M2M or a reverse relation can reach many rows."""
        return self.relation.many_to_many or not self.relation.concrete

    @property
    def forward(self) -> bool:
        return self.relation.concrete and not self.relation.many_to_many


@dataclass(frozen=True)
class Walk:
    steps: tuple[Step, ...]
    #: Why the walk stopped before the end of the lookup: None (it ended after a relation),
    #: ``("column", model, field)``, ``("unknown", model, part)`` or ``("unfollowable", step)``.
    stop: tuple | None = None


def relation_name(model, relation) -> str:
    """``app.Model.name`` of a relation, saying what a reverse relation is the reverse of."""
    name = f"{model._meta.label}.{relation.name}"
    remote = getattr(relation, "field", None)
    if not relation.concrete and remote is not None and hasattr(remote, "model"):
        name += f" (the reverse of {remote.model._meta.label}.{remote.name})"
    return name


def unfollowable(relation) -> str | None:
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


def walk_lookup(model, lookup: str, strict: bool) -> Walk:
    """Follow ``lookup`` from ``model`` across relations.

    ``strict`` (a path): every part must be a field. Otherwise (a filter lookup) the first part
    that is not a field ends the walk: it is a lookup or a transform.
    """
    steps: list[Step] = []
    current = model
    for part in lookup.split("__"):
        opts = current._meta
        try:
            f = opts.pk if part == "pk" else opts.get_field(part)
        except FieldDoesNotExist:
            if strict:
                return Walk(tuple(steps), ("unknown", current, part))
            return Walk(tuple(steps))
        if not f.is_relation:
            return Walk(tuple(steps), ("column", current, f))
        if unfollowable(f) is not None:
            step = Step(current, part, f, None)
            return Walk(tuple(steps), ("unfollowable", step))
        step = Step(current, part, f, f.related_model)
        steps.append(step)
        current = f.related_model
    return Walk(tuple(steps))


def keys_of(step: Step) -> list[tuple[object, type]]:
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


def crossed(crossed, steps: list, roles: dict, role: str, where: str) -> None:
    """Add the steps ``crossed`` to ``steps``, and the role of each model they reach (and of
    each through model) to ``roles`` unless it has one already."""
    for step in crossed:
        steps.append(step)
        roles.setdefault(step.to, role)
        through = through_of(step)
        if through is not None:
            roles.setdefault(through, f"is the through model of a relation {where}")


def through_of(step: Step):
    relation = step.relation
    if not relation.many_to_many:
        return None
    through = (relation if relation.concrete else relation.field).remote_field.through
    return None if isinstance(through, str) else through


def key_field(model):
    """The field that holds ``model``'s key values (an MTI child's key is its parent's)."""
    pk = model._meta.pk
    while pk.is_relation and getattr(pk, "target_field", None) is not None:
        pk = pk.target_field
    return pk


def relations_of(model) -> list[str]:
    return [
        f.name
        for f in model._meta.get_fields()
        if f.is_relation and f.related_model is not None and not isinstance(f.related_model, str)
    ]


def accessor_hint(model, part: str) -> str:
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


def expression_text(expression) -> str:
    """``an Exists expression (over app.Model)``: what an expression in a filter is."""
    text = f"{article(type(expression).__name__)} expression"
    query = getattr(expression, "query", None)
    model = getattr(query, "model", None)
    return f"{text} (over {model._meta.label})" if model is not None else text
