"""A declaration becomes a spec: its path walked, the columns it reads, how it is kept.

``counts.declare.spec`` walks paths into hops; ``counts.declare.checks`` refuses what cannot be
kept exact; ``counts.declare.modes`` says how each count is kept. This module joins them, once
per declaration, for the graph (``counts.declare.graph``).
"""

from __future__ import annotations

import logging
from dataclasses import replace

from counts.base.errors import DeclarationError
from counts.declare.checks import declaration_errors
from counts.declare.classify import classify, fold_into_items
from counts.declare.field import CachedCountField, cached_count_fields
from counts.declare.lookups import f_refs, lookups
from counts.declare.spec import FORWARD, REVERSE, Chain, CountSpec, table_of, walk

logger = logging.getLogger(__name__)


def _add_read(reads: dict[Chain, set[str]], chain: Chain, column: str | None) -> None:
    for i in range(len(chain) + 1):
        reads.setdefault(chain[:i], set())
    # A hop's link column is read on whichever side holds it.
    for i, hop in enumerate(chain):
        holder = chain[: i + 1] if hop.kind == REVERSE else chain[:i]
        reads[holder].add(hop.column)
    if column is not None:
        reads[chain].add(column)


def resolve(model, count_field: CachedCountField) -> CountSpec:
    """Turn one declaration into a :class:`CountSpec`, or explain why it cannot be one.

    A declaration ``counts.declare.checks`` refuses raises a :class:`DeclarationError` carrying
    every check error (id, message and hint).
    """

    label = f"{model._meta.label_lower}.{count_field.name}"
    errors = declaration_errors(model, count_field)
    if errors:
        raise DeclarationError(label, " ".join(f"({e.id}) {e.msg} {e.hint}" for e in errors))
    if not count_field.count_path:
        raise DeclarationError(label, "CachedCountField needs a path to the rows it counts")
    try:
        path_chain, path_column = walk(model, count_field.count_path)
    except DeclarationError as exc:
        raise DeclarationError(label, str(exc)) from None
    if path_column is not None or not path_chain:
        raise DeclarationError(label, f"path {count_field.count_path!r} must end at a relation")
    ends_forward = path_chain[-1].kind == FORWARD and not path_chain[-1].m2m
    if ends_forward and len(path_chain) == 1:
        raise DeclarationError(label, "path must cross at least one to-many relation")
    counted = path_chain[:-1] if ends_forward and not count_field.count_distinct else path_chain

    reads: dict[Chain, set[str]] = {}
    _add_read(reads, path_chain, None)
    below, elsewhere = False, False
    if count_field.count_filter is not None:
        for lookup, value in lookups(count_field.count_filter):
            chain, column = walk(model, lookup)
            _add_read(reads, chain, column)
            refs = list(f_refs(value))
            for ref in refs:
                _add_read(reads, *walk(model, ref))
            under_path = lookup.startswith(count_field.count_path + "__") and not refs
            below |= under_path and any(h.to_many for h in chain[len(counted) :])
            elsewhere |= not under_path
    probes = below and not elsewhere and counted == path_chain
    spec = CountSpec(
        target=table_of(model),
        name=count_field.name,
        column=count_field.column,
        path=count_field.count_path,
        filter=count_field.count_filter,
        distinct=count_field.count_distinct,
        counted=counted,
        path_chain=path_chain,
        reads={chain: frozenset(cols) for chain, cols in reads.items()},
        probes=probes,
    )

    return replace(spec, mode=classify(spec))


def resolve_all(models) -> list[CountSpec]:
    """Specs for every cached count on the given models, in a stable order.

    A refused declaration (``counts.declare.checks``) is left out, never raised: start-up goes on,
    so ``manage.py check`` can report every refused declaration at once, and nothing is compiled
    for it (``counts.declare.refusals.refuse_unsupported`` stops the migrations that would install
    triggers while any is refused). Proxies and multi-table children are skipped: a count is
    kept once, on the model whose table holds its column.
    """
    specs = []
    for model in sorted(models, key=lambda m: m._meta.label_lower):
        if model._meta.proxy:
            continue
        for f in cached_count_fields(model):
            if f.model is not model:
                continue
            try:
                specs.append(resolve(model, f))
            except DeclarationError as exc:
                logger.warning("cached count refused, not kept (see manage.py check): %s", exc)
    return fold_into_items(specs)
