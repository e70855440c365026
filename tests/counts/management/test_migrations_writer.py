"""Migrations keep schema and count triggers in sync, and a new count is one declaration.

``manage.py makemigrations`` (extended by the counts app) must find nothing to do on a clean
tree: not for the schema, not for the triggers. Then, without touching the real models, a
thirteenth count is declared and resolved on the side, to show that the dependency graph, the
triggers, the migration with its backfill and the aggregate all follow from the declaration
alone.
"""

from __future__ import annotations

from io import StringIO

import pytest
from django.apps import apps
from django.core.management import call_command
from django.db import connection, migrations
from django.db.migrations.loader import MigrationLoader
from django.db.migrations.writer import MigrationWriter

from counts.apps import graph
from counts.base.errors import MigrationError
from counts.compile.compiled import CompiledTrigger
from counts.compile.triggers import compile_triggers
from counts.declare.field import CachedCountField
from counts.declare.graph import Graph
from counts.declare.resolve import resolve, resolve_all
from counts.management import migrations_writer as writer_module
from counts.management.migrations_writer import (
    fingerprint,
    installed_after,
    mode_changes,
    pending_migrations,
    trigger_operations,
)
from counts.operate.status import trigger_states
from counts.operations import BackfillCounts, SyncCountTriggers
from counts.run.target_truth import _count_expression
from tests.engine_app.models import Shelf
from tests.truth import LABELS, mismatches, triggers_off


def reviews_per_shelf():
    """One more count, declared on the engine's test app but never added to the model class
    (which other tests share). On the test app, so a count added to the domain never collides
    with it."""
    field = CachedCountField("books__reviews")
    field.set_attributes_from_name("reviews_count")
    return resolve(Shelf, field)


@pytest.fixture
def grown_graph():
    return Graph.build([*resolve_all(apps.get_models()), reviews_per_shelf()])


@pytest.mark.django_db
def test_makemigrations_finds_nothing_pending():
    out = StringIO()
    call_command("makemigrations", "--check", "--dry-run", stdout=out)  # SystemExit if pending
    assert "No changes detected" in out.getvalue()
    assert "Count triggers" not in out.getvalue()
    assert pending_migrations() == []


def test_counts_makemigrations_check_agrees():
    out = StringIO()
    call_command("counts", "makemigrations", "--check", stdout=out)
    assert "in sync" in out.getvalue()


def routes_of(g) -> set:
    return {
        (table, r.target.label, r.chain, r.columns) for table, rs in g.routes.items() for r in rs
    }


def test_a_new_count_adds_routes_from_every_table_on_its_path(grown_graph):
    added = routes_of(grown_graph) - routes_of(graph())
    assert {(table, target) for table, target, _chain, _cols in added} == {
        ("counts_testapp_review", "counts_testapp.shelf")
    }
    # The books on the path were already watched for the shelf; the reviews below are new.
    assert grown_graph.targets_of_table("counts_testapp_review") >= {"counts_testapp.shelf"}


def test_a_new_count_adds_triggers_and_leaves_the_others_alone(grown_graph):
    before = {(t.table, t.operation): t.sql for t in compile_triggers(graph())}
    after = {(t.table, t.operation): t.sql for t in compile_triggers(grown_graph)}
    changed = {key for key in after if before.get(key) != after[key]}
    # Reviews of a shelf's books are kept through the books, as items: the reviews' triggers
    # already mark their book for the tags' counts, and the books' own triggers already mark
    # a book that moves shelves (for the shelf's long books and authors): nothing new to watch.
    assert changed == {
        ("counts_testapp_shelf", "own"),  # the shelf's new cached column is guarded too
        ("counts_testapp_shelf", "made"),
    }
    assert set(before) == set(after)
    assert "'item:counts_testapp.book'" in after[("counts_testapp_book", "update")]


def test_a_new_count_gets_a_trigger_migration_in_its_app_with_only_what_changed(
    grown_graph, monkeypatch
):
    """The migration holds the changed triggers and their old versions (what it needs to apply
    and reverse, not the whole set twice), in the app whose tables and count it is about."""
    before = {(t.table, t.name): t.as_dict() for t in compile_triggers(graph())}
    monkeypatch.setattr(apps.get_app_config("counts"), "graph", grown_graph)
    [(app_label, migration)] = pending_migrations()
    assert (app_label, migration.name) == ("counts_testapp", "0023_count_triggers")
    sync, backfill = migration.operations
    assert isinstance(sync, SyncCountTriggers) and isinstance(backfill, BackfillCounts)
    after = {(t.table, t.name): t.as_dict() for t in compile_triggers(grown_graph)}
    changed = {key for key in after if before.get(key) != after[key]}
    assert {(row["table"], row["name"]) for row in sync.triggers} == changed
    previous = {(row["table"], row["name"]): row for row in sync.previous}
    assert previous == {key: before[key] for key in changed}
    assert list(sync.counts) == ["counts_testapp.shelf.reviews_count"]
    assert backfill.targets == ["counts_testapp.shelf"]
    assert ("counts_testapp", "0022_count_triggers") in migration.dependencies
    assert not [d for d in migration.dependencies if d[0] == "monitoring"]
    # What the first writer wrote instead: the app's whole set after, and before.
    whole = [SyncCountTriggers(triggers=app_rows(after), previous=app_rows(before)), backfill]
    assert size_of(migration) < 0.5 * size_of(migration, whole)


def app_rows(triggers: dict) -> list[dict]:
    return [row for (table, _), row in triggers.items() if table.startswith("counts_testapp_")]


def size_of(migration, operations=None) -> int:
    """Bytes of the migration file, or of the same migration holding ``operations``."""
    if operations is not None:
        attrs = {"operations": operations, "dependencies": migration.dependencies}
        migration = type("Migration", (migrations.Migration,), attrs)(migration.name, "x")
    return len(MigrationWriter(migration).as_string())


def test_replaying_the_trigger_migrations_gives_the_compiled_set_with_owning_apps():
    installed = installed_after(MigrationLoader(None, ignore_no_migrations=True))
    compiled = {(t.table, t.name): t.as_dict() for t in compile_triggers(graph())}
    assert {key: row for key, (_app, row) in installed.triggers.items()} == compiled
    owners = {app for app, _row in installed.triggers.values()}
    assert owners == {"monitoring", "counts_testapp"}
    for (table, _name), (app, _row) in installed.triggers.items():
        assert table.startswith(f"{app}_"), "a trigger lives in its table's app's migrations"


@pytest.mark.django_db
def test_a_new_count_is_computed_by_the_aggregate_it_declares(library):
    spec = reviews_per_shelf()
    computed = dict(
        Shelf.objects.annotate(n=_count_expression(spec, spec.join_signature)).values_list(
            "pk", "n"
        )
    )
    with connection.cursor() as cursor:
        cursor.execute(
            "SELECT s.id, (SELECT count(*) FROM counts_testapp_review r JOIN"
            " counts_testapp_book b ON b.id = r.book_id WHERE b.shelf_id = s.id)"
            " FROM counts_testapp_shelf s"
        )
        assert computed == dict(cursor.fetchall())
    assert computed == {library.fiction.pk: 3, library.poetry.pk: 0, library.science.pk: 1}


def installed_triggers() -> dict[tuple[str, str], str]:
    with connection.cursor() as cursor:
        cursor.execute(
            "SELECT c.relname, t.tgname, obj_description(t.oid, 'pg_trigger')"
            " FROM pg_trigger t JOIN pg_class c ON c.oid = t.tgrelid"
            " WHERE t.tgname LIKE 'counts\\_%%' AND NOT t.tgisinternal"
        )
        return {(table, name): comment for table, name, comment in cursor.fetchall()}


@pytest.mark.django_db
def test_trigger_migrations_reverse_to_nothing_and_reapply_exactly():
    """Reversing every trigger sync, newest first, leaves no count trigger; applying them again
    in order installs exactly the compiled set. After each step back, what is installed is what
    replaying the syncs before it says.

    DDL is transactional in PostgreSQL: the test transaction's rollback undoes all of it.
    """
    ops = list(trigger_operations(MigrationLoader(None, ignore_no_migrations=True)))
    for i in reversed(range(len(ops))):
        with connection.schema_editor() as editor:
            ops[i][1].database_backwards(ops[i][0], editor, None, None)
        replay = installed_after_first(ops[:i])
        assert installed_triggers() == replay, f"after reversing sync #{i} ({ops[i][0]})"
    assert installed_triggers() == {}
    for app_label, op in ops:
        with connection.schema_editor() as editor:
            op.database_forwards(app_label, editor, None, None)
    assert installed_triggers() == {(t.table, t.name): t.hash for t in compile_triggers(graph())}
    assert {s["state"] for s in trigger_states()} == {"INSTALLED"}


def installed_after_first(ops) -> dict[tuple[str, str], str]:
    """``{(table, name): hash}`` that applying ``ops`` in order installs."""
    from counts.management.migrations_writer import Installed

    state = Installed()
    for app_label, op in ops:
        state.apply(app_label, op)
    return {key: CompiledTrigger(**row).hash for key, (_app, row) in state.triggers.items()}


@pytest.mark.django_db(transaction=True)
def test_backfill_repairs_every_row_chunk_by_chunk_outside_a_transaction(make_world, marks):
    """What a trigger migration's backfill does to rows that existed before the count."""
    world = make_world()
    with triggers_off() as cursor:
        cursor.execute("UPDATE monitoring_sourceimagecollection SET source_images_count = 99")
        cursor.execute("UPDATE monitoring_event SET captures_count = 99")
    backfill = BackfillCounts(targets=["monitoring.sourceimagecollection"], chunk=1)
    with connection.schema_editor(atomic=False) as editor:
        backfill.database_forwards("monitoring", editor, None, None)
    world.c1.refresh_from_db()
    assert world.c1.source_images_count != 99
    assert not mismatches_of("monitoring_sourceimagecollection")
    assert mismatches_of("monitoring_event"), "only the named targets are backfilled"


@pytest.mark.django_db
def test_backfill_refuses_to_run_inside_one_transaction():
    refused = pytest.raises(MigrationError, match="atomic = False")
    with connection.schema_editor() as editor, refused:
        BackfillCounts(targets=["monitoring.event"]).database_forwards(
            "monitoring", editor, None, None
        )


def mismatches_of(table: str) -> list[str]:
    return [line for line in mismatches() if line.startswith(LABELS[table] + "#")]


@pytest.mark.django_db
def test_a_sync_between_two_trigger_sets_drops_what_went_and_restores_it_on_reverse():
    current = [t.as_dict() for t in compile_triggers(graph())]
    fewer = [t for t in current if t["name"] != "counts_ins_monitoring_detection"]
    sync = SyncCountTriggers(triggers=fewer, previous=current)
    with connection.schema_editor() as editor:
        sync.database_forwards("monitoring", editor, None, None)
    assert ("monitoring_detection", "counts_ins_monitoring_detection") not in installed_triggers()
    assert len(installed_triggers()) == len(current) - 1
    with connection.schema_editor() as editor:
        sync.database_backwards("monitoring", editor, None, None)
    assert {s["state"] for s in trigger_states()} == {"INSTALLED"}


@pytest.mark.django_db
def test_a_count_trigger_no_declaration_compiles_to_is_reported_unexpected():
    """What an app removed from INSTALLED_APPS without ``migrate <app> zero`` leaves behind."""
    stray = compile_triggers(graph())[0]
    with connection.cursor() as cursor:
        cursor.execute(
            stray.install_sql.replace(stray.name, "counts_ins_counts_testapp_author").replace(
                f'"{stray.table}"', '"counts_testapp_author"'
            )
        )
    states = {(s["table"], s["name"]): s["state"] for s in trigger_states()}
    assert states[("counts_testapp_author", "counts_ins_counts_testapp_author")] == "UNEXPECTED"
    assert {state for key, state in states.items() if key[0] != "counts_testapp_author"} == {
        "INSTALLED"
    }


def test_makemigrations_says_when_a_count_whose_declaration_did_not_change_is_kept_another_way(
    monkeypatch,
):
    """Installed as an item count, declared the same, kept today from its own rows (as when
    another count's declaration, or a new engine version, moved it): the trigger migration
    recomputes the column, and makemigrations says which count and how it was and will be kept."""
    spec = next(s for s in graph().specs if s.key == "monitoring.deployment.captures_count")
    assert spec.mode.mode == "own-row"
    loader = MigrationLoader(None, ignore_no_migrations=True)
    installed = installed_after(loader)
    assert installed.counts[spec.key] == fingerprint(spec, "own-row")
    installed.counts[spec.key] = fingerprint(spec, "item")
    assert mode_changes(installed) == [
        "monitoring.deployment.captures_count was kept as item and will be kept as own-row,"
        " though its declaration did not change; the migration recomputes it"
        " (see `manage.py counts status`)"
    ]
    monkeypatch.setattr(writer_module, "installed_after", lambda _loader: installed)
    [(app_label, migration)] = pending_migrations()
    assert app_label == "monitoring"
    assert migration.operations[-1].counts == [spec.key]  # its backfill
    err = StringIO()
    with pytest.raises(SystemExit):
        call_command("counts", "makemigrations", "--check", stdout=StringIO(), stderr=err)
    assert "Count kept another way: monitoring.deployment.captures_count was kept" in (
        err.getvalue()
    )
    assert mode_changes(installed_after(loader)) == [], "none on the migrations as they are"
