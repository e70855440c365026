"""Declarations become frozen specs, and specs a pure dependency graph — no database involved.

These tests run without database access (pytest-django would refuse it), which is itself part
of the contract: the spec and graph modules read model metadata only. They pin down what each
kind of relation turns into, which columns each table is watched on, and that a declaration
the engine cannot honour fails at start-up with a message naming the model and field.
"""

from __future__ import annotations

import pytest
from django.apps import apps
from django.db.models import F, Q

from counts.apps import graph
from counts.base.errors import DeclarationError
from counts.base.names import FRESHNESS_FIELD, OPERATIONS
from counts.compile.triggers import compile_mark_triggers
from counts.declare.field import CachedCountField, cached_count_fields
from counts.declare.graph import ROOT, Graph
from counts.declare.resolve import resolve, resolve_all
from counts.declare.spec import FORWARD, REVERSE, walk
from project.monitoring.models import (
    Deployment,
    Event,
    SourceImage,
    SourceImageCollection,
)
from tests.engine_app.models import Author

THROUGH = "monitoring_sourceimagecollection_images"


def spec(key: str):
    return next(s for s in graph().specs if s.key == key)


def hops(chain) -> list[tuple[str, str, str]]:
    return [(h.kind, h.child.db_table, h.column) for h in chain]


def declared(path, name="probe_count", **kwargs) -> CachedCountField:
    """A declaration resolved on the side, never added to a model class."""
    field = CachedCountField(path, **kwargs)
    field.set_attributes_from_name(name)
    return field


def domain_specs():
    return [s for s in graph().specs if s.target.label.startswith("monitoring.")]


#: DESIGN.md §1: the domain's counts, by target model.
DOMAIN_COUNTS = {
    "monitoring.deployment": {
        "events_count",
        "occurrences_count",
        "captures_count",
        "detections_count",
        "taxa_count",
    },
    "monitoring.event": {"captures_count", "detections_count", "occurrences_count"},
    "monitoring.sourceimage": {"detections_count"},
    "monitoring.sourceimagecollection": {
        "source_images_count",
        "source_images_with_detections_count",
        "source_images_processed_count",
    },
}


def test_the_domain_declares_the_twelve_counts_of_its_design():
    """At least these: a count added later is a declaration, not a change to this test."""
    declared = {}
    for s in domain_specs():
        declared.setdefault(s.target.label, set()).add(s.name)
    assert all(names <= declared.get(label, set()) for label, names in DOMAIN_COUNTS.items())
    assert sum(len(names) for names in DOMAIN_COUNTS.values()) == 12
    event = [f.name for f in cached_count_fields(Event)]
    assert event[:3] == ["captures_count", "detections_count", "occurrences_count"]


def test_every_counted_model_gets_a_freshness_column():
    for model in (Deployment, Event, SourceImage, SourceImageCollection):
        assert model._meta.get_field(FRESHNESS_FIELD).null
    assert FRESHNESS_FIELD not in {f.name for f in Author._meta.get_fields()}  # no counts


def test_declaration_deconstructs_to_what_was_declared():
    field = SourceImageCollection._meta.get_field("source_images_with_detections_count")
    _name, path, args, kwargs = field.deconstruct()
    assert path == "counts.fields.CachedCountField" and args == []
    assert kwargs == {
        "path": "images",
        "filter": Q(images__detections__bbox__isnull=False),
        "db_default": 0,  # recorded: the column's database default is schema
    }
    taxa = Deployment._meta.get_field("taxa_count").deconstruct()[3]
    assert taxa["distinct"] is True and "default" not in taxa and "editable" not in taxa


def test_reverse_fk_chains_follow_the_child_columns():
    s = spec("monitoring.deployment.detections_count")
    assert hops(s.counted) == [
        (REVERSE, "monitoring_sourceimage", "deployment_id"),
        (REVERSE, "monitoring_detection", "source_image_id"),
    ]
    detections = s.counted
    assert s.reads[detections] == {"bbox", "source_image_id"}


def test_m2m_crosses_the_through_table_from_either_side():
    forward, _ = walk(SourceImageCollection, "images")
    backward, _ = walk(SourceImage, "collections")
    assert hops(forward) == [
        (REVERSE, THROUGH, "sourceimagecollection_id"),
        (FORWARD, "monitoring_sourceimage", "sourceimage_id"),
    ]
    assert hops(backward) == [
        (REVERSE, THROUGH, "sourceimage_id"),
        (FORWARD, "monitoring_sourceimagecollection", "sourceimagecollection_id"),
    ]
    assert forward[1].m2m and backward[1].m2m and not forward[1].to_many


def test_a_setting_reached_by_f_is_read_with_the_link_to_it():
    s = spec("monitoring.deployment.occurrences_count")
    project = next(c for c in s.reads if c and c[-1].child.db_table == "monitoring_project")
    assert s.reads[project] == {"default_filters_score_threshold"}
    assert s.reads[()] == {"project_id"}  # moving the station changes its threshold


def test_lookups_that_are_not_fields_read_nothing_more():
    chain, column = walk(SourceImageCollection, "images__detections__isnull")
    assert column is None and chain[-1].child.db_table == "monitoring_detection"
    processed = spec("monitoring.sourceimagecollection.source_images_processed_count")
    assert processed.reads[chain] == {"source_image_id"}  # any detection, bbox or not


def test_a_path_ending_in_a_forward_fk_counts_holders_or_distinct_targets():
    taxa = spec("monitoring.deployment.taxa_count")
    assert taxa.counted == taxa.path_chain  # distinct determinations
    plain = resolve(Deployment, declared("occurrences__determination"))
    assert plain.counted == plain.path_chain[:-1]  # occurrences that have one


def test_joins_that_can_repeat_a_counted_row_require_distinct():
    def needs(key):
        s = spec(key)
        siblings = [o for o in graph().specs if o.join_signature == s.join_signature]
        return s.needs_distinct(frozenset().union(*(o.join_signature for o in siblings)))

    assert not needs("monitoring.sourceimagecollection.source_images_count")
    assert not needs("monitoring.deployment.detections_count")  # rows below, but counted there
    assert not needs("monitoring.deployment.events_count")
    assert needs("monitoring.deployment.taxa_count")


def test_conditions_below_the_counted_rows_become_exists_probes_not_joins():
    with_detections = spec("monitoring.sourceimagecollection.source_images_with_detections_count")
    processed = spec("monitoring.sourceimagecollection.source_images_processed_count")
    plain = spec("monitoring.sourceimagecollection.source_images_count")
    assert with_detections.probes and processed.probes and not plain.probes
    # Probing counts join only the path, so all three share one subquery and no DISTINCT.
    assert with_detections.join_signature == plain.join_signature
    assert not with_detections.needs_distinct(plain.join_signature)
    # Counting the rows the condition is on (valid detections) needs no probe.
    assert not spec("monitoring.deployment.detections_count").probes
    # A condition compared with a setting of the target is joined, not probed.
    assert not spec("monitoring.deployment.occurrences_count").probes


@pytest.mark.parametrize(
    "path, kwargs, message",
    [
        ("nothing", {}, "'nothing' is not a field"),
        ("name", {}, "must end at a relation"),
        ("project", {}, "must cross at least one to-many relation"),
        (None, {}, "needs a path"),
    ],
)
def test_impossible_declarations_fail_naming_model_and_field(path, kwargs, message):
    with pytest.raises(DeclarationError, match=message) as exc:
        resolve(Deployment, declared(path, **kwargs))
    assert str(exc.value).startswith("monitoring.deployment.probe_count: ")


def test_a_filter_must_be_a_q():
    # Kept as given at import; refused when resolved (and by ``manage.py check``: counts.E002).
    field = declared("events", filter={"events__end__isnull": True})
    with pytest.raises(DeclarationError, match="Q object"):
        resolve(Deployment, field)


def test_graph_watches_each_table_for_the_right_operations():
    routes = graph().routes
    assert "monitoring_taxon" not in routes  # a taxon's own columns are never read
    project = routes["monitoring_project"]
    assert {r.reached_by for r in project} == {FORWARD}
    assert not any(r.on_insert_delete for r in project) and all(r.on_update for r in project)
    root = [r for r in routes["monitoring_deployment"] if r.reached_by == ROOT]
    assert [(r.target.label, r.columns) for r in root] == [
        ("monitoring.deployment", frozenset({"project_id"}))
    ]
    assert all(r.on_insert_delete for r in routes[THROUGH])


def test_cached_columns_are_never_watched_so_drains_mark_nothing():
    cached = {f.column for m in apps.get_models() for f in cached_count_fields(m)}
    cached.add(FRESHNESS_FIELD)
    watched = {c for rs in graph().routes.values() for r in rs for c in r.columns}
    assert not cached & watched


def test_graph_is_a_pure_function_of_the_declarations():
    specs = resolve_all(apps.get_models())
    assert Graph.build(specs) == graph()
    assert Graph.build(list(reversed(specs))).routes == graph().routes  # order-independent


def test_the_notice_names_exactly_what_each_trigger_can_mark():
    """Per table and operation, the watcher announces the targets the trigger writes marks for.

    Announcing more sends useless messages (inserting a project reaches no count); announcing
    less leaves counts stale until the sweep.
    """
    labels = sorted(graph().targets)
    kinds = graph().kinds
    compiled = {(t.table, t.operation): t.sql for t in compile_mark_triggers(graph())}
    for table in graph().routes:
        for op in OPERATIONS:
            sql = compiled.get((table, op), "")
            marked = {label for label in [*labels, *kinds] if f"'{label}'" in sql}
            assert graph().targets_of_operation(table, op) == marked, (table, op)
    assert graph().targets_of_operation("monitoring_project", "insert") == frozenset()
    assert graph().targets_of_operation("monitoring_project", "update") == {
        "item:monitoring.occurrence"
    }


def test_f_references_in_a_filter_are_followed_from_the_model():
    s = resolve(
        Event,
        declared(
            "captures",
            filter=Q(captures__timestamp__gte=F("deployment__project__created_at")),
        ),
    )
    chains = {tuple(h.child.db_table for h in c): cols for c, cols in s.reads.items()}
    assert chains[("monitoring_deployment", "monitoring_project")] == {"created_at"}
    assert chains[("monitoring_sourceimage",)] == {"event_id", "timestamp"}
