"""Nobody but the engine changes a cached column or ``counts_updated_at``.

Every counted model is tried the way its users write it: an instance loaded before a drain and
saved after it (an admin edit, a DRF update, a long ML job holding the row), an admin change
form opened before the recompute and submitted after it, ``bulk_update`` of stale instances,
``queryset.update()`` and raw SQL naming a cached column, and a raw insert with made-up counts.
Each ends in the independent truth of ``tests.truth``.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import timedelta
from html.parser import HTMLParser

import pytest
from django.contrib import admin
from django.contrib.auth.models import User
from django.db import connection

from counts.apps import graph
from counts.compile.guards import compile_guards
from counts.declare.field import cached_count_fields
from project.monitoring.models import (
    Deployment,
    Detection,
    Event,
    SourceImage,
    SourceImageCollection,
)
from tests.truth import assert_all_counts_exact, cached, drain_all

BOX = [10, 10, 20, 20]


@dataclass(frozen=True)
class Case:
    """One counted model: which row to hold, what its users edit, what changes its counts."""

    model: type
    row: str  # attribute of the world
    edit: str  # an ordinary field a user changes
    value: object  # its new value, or a function of the held instance

    def apply_edit(self, held) -> None:
        setattr(held, self.edit, self.value(held) if callable(self.value) else self.value)

    def grow(self, w) -> None:
        """A write elsewhere that changes this row's counts (its marks then get drained)."""
        if self.model is Deployment or self.model is Event:
            SourceImage.objects.create(
                deployment=w.d1, event=w.e1, timestamp=w.i1.timestamp, path="new.jpg"
            )
        elif self.model is SourceImage:
            Detection.objects.create(source_image=w.i2, bbox=BOX)
        else:  # i3 is in c1 and had no detection: c1 gains an image with detections
            Detection.objects.create(source_image=w.i3, bbox=BOX)

    def table(self) -> str:
        return self.model._meta.db_table

    def columns(self) -> list[str]:
        return [f.column for f in cached_count_fields(self.model)]


CASES = [
    Case(Deployment, "d1", "name", "Station A (renamed)"),
    Case(Event, "e1", "end", lambda night: night.start + timedelta(hours=9)),
    Case(SourceImage, "i2", "path", "a/2-renamed.jpg"),
    Case(SourceImageCollection, "c1", "name", "June (renamed)"),
]
IDS = [c.model.__name__ for c in CASES]


def stored(case: Case, pk: int) -> dict:
    return cached(case.table())[pk]


@pytest.fixture(params=CASES, ids=IDS)
def case(request):
    return request.param


def held_then_recomputed(case: Case, world):
    """The row as loaded before a write and its drain: counts and freshness now stale."""
    held = case.model.objects.get(pk=getattr(world, case.row).pk)
    case.grow(world)
    drain_all()
    fresh = case.model.objects.get(pk=held.pk)
    assert any(getattr(held, c) != getattr(fresh, c) for c in case.columns()), "not stale"
    return held, fresh


def test_a_stale_instance_saved_after_a_drain_keeps_the_fresh_counts(case, world, marks):
    held, fresh = held_then_recomputed(case, world)
    case.apply_edit(held)
    held.save()
    reloaded = case.model.objects.get(pk=held.pk)
    assert getattr(reloaded, case.edit) == getattr(held, case.edit), "the edit itself is saved"
    assert reloaded.counts_updated_at == fresh.counts_updated_at
    assert marks.rows() == []  # nothing to repair: the counts never went wrong
    assert_all_counts_exact()


def test_bulk_update_of_stale_instances_keeps_the_fresh_counts(case, world, marks):
    held, _fresh = held_then_recomputed(case, world)
    for column in case.columns():
        setattr(held, column, 12345)
    fields = [case.edit, *[f.name for f in cached_count_fields(case.model)], "counts_updated_at"]
    case.model.objects.bulk_update([held], fields)
    assert 12345 not in stored(case, held.pk).values()
    assert_all_counts_exact()


def test_queryset_update_of_a_cached_column_changes_nothing(case, world, marks):
    pk = getattr(world, case.row).pk
    before = stored(case, pk)
    column = case.columns()[0]
    assert case.model.objects.filter(pk=pk).update(**{column: 777}) == 1
    assert stored(case, pk) == before
    assert_all_counts_exact()


def test_raw_sql_writing_cached_columns_changes_nothing(case, world, marks):
    pk = getattr(world, case.row).pk
    before = stored(case, pk)
    sets = ", ".join(f"{c} = {c} + 5" for c in case.columns())
    with connection.cursor() as cursor:
        cursor.execute(
            f"UPDATE {case.table()} SET {sets}, counts_updated_at = now() - interval '9 days'"
            " WHERE id = %s",
            [pk],
        )
    assert stored(case, pk) == before
    with connection.cursor() as cursor:
        cursor.execute(f"SELECT counts_updated_at FROM {case.table()} WHERE id = %s", [pk])
        assert cursor.fetchone()[0] == case.model.objects.get(pk=pk).counts_updated_at
    assert_all_counts_exact()


def test_a_row_inserted_with_made_up_counts_is_marked_and_recounted(case, world, marks):
    template = getattr(world, case.row)
    made_up = {f.attname: 41 for f in cached_count_fields(case.model)}
    copy = case.model(
        **{
            f.attname: getattr(template, f.attname)
            for f in case.model._meta.concrete_fields
            if not f.primary_key and f.attname not in made_up
        },
        **made_up,
    )
    if case.model is SourceImage:
        copy.path = "copied.jpg"
    # Raw, as loaddata saves: an ORM insert starts from 0 (CachedCountField.pre_save).
    copy.save_base(raw=True)
    assert marks.of(case.model._meta.label_lower) == {copy.pk}
    assert stored(case, copy.pk) == {c: 41 for c in case.columns()}  # until the drain
    drain_all()
    assert_all_counts_exact()


def test_a_row_inserted_with_default_counts_is_not_marked(world, marks):
    SourceImageCollection.objects.create(project=world.p1, name="new and empty")
    assert marks.rows() == []


def test_the_engine_itself_still_writes_counts(world, marks):
    """The guards let the engine's own recompute through (or every count would freeze)."""
    Detection.objects.create(source_image=world.i2, bbox=BOX)
    drain_all()
    world.i2.refresh_from_db()
    assert world.i2.detections_count == 1
    assert_all_counts_exact()


class _FormFields(HTMLParser):
    """What a browser would post back from a change form, as it was rendered."""

    def __init__(self, html: str) -> None:
        super().__init__()
        self.data: dict[str, list[str]] = {}
        self._textarea: str | None = None
        self._select: str | None = None
        self.feed(html)

    def handle_starttag(self, tag, attrs):
        a = dict(attrs)
        name = a.get("name")
        if tag == "input" and name and a.get("type") not in ("submit", "button", "file"):
            if a.get("type") in ("checkbox", "radio") and "checked" not in a:
                return
            self.data.setdefault(name, []).append(a.get("value") or "")
        elif tag == "textarea" and name:
            self._textarea = name
            self.data.setdefault(name, []).append("")
        elif tag == "select" and name:
            self._select = name
        elif tag == "option" and self._select and "selected" in a:
            self.data.setdefault(self._select, []).append(a.get("value") or "")

    def handle_data(self, data):
        if self._textarea:
            self.data[self._textarea][-1] += data

    def handle_endtag(self, tag):
        if tag == "textarea":
            self._textarea = None
        elif tag == "select":
            self._select = None


@pytest.mark.parametrize("case", CASES, ids=IDS)
def test_an_admin_form_saved_while_a_drain_commits_keeps_the_fresh_counts(
    case, world, marks, client, monkeypatch
):
    """The page was opened before the recompute; the admin reads the row again on submit, so
    the race that matters is a drain committing between that read and the save."""
    admin_user = User.objects.create_superuser("editor", password="pw-editor")
    client.force_login(admin_user)
    pk = getattr(world, case.row).pk
    url = f"/admin/{case.model._meta.app_label}/{case.model._meta.model_name}/{pk}/change/"
    page = client.get(url)
    assert page.status_code == 200
    data = _FormFields(page.content.decode()).data
    model_admin = admin.site._registry[case.model]
    save_model = model_admin.save_model
    fresh = {}

    def drain_lands_first(request, obj, form, change):
        case.grow(world)  # the counts change while the form is being saved
        drain_all()
        fresh.update(stored(case, pk))
        save_model(request, obj, form, change)

    monkeypatch.setattr(model_admin, "save_model", drain_lands_first)
    response = client.post(url, {**data, "_save": "Save"})
    assert response.status_code == 302, response.content[:2000]
    assert stored(case, pk) == fresh
    drain_all()
    assert_all_counts_exact()


def test_every_counted_table_gets_both_guards_naming_every_cached_column():
    guards = {(t.table, t.operation): t.sql for t in compile_guards(graph())}
    for label, table in graph().targets.items():
        columns = [s.column for s in graph().specs_for(label)]
        keep, made = guards[(table.db_table, "own")], guards[(table.db_table, "made")]
        assert f'BEFORE UPDATE ON "{table.db_table}" FOR EACH ROW WHEN (' in keep
        assert f'AFTER INSERT ON "{table.db_table}" FOR EACH ROW WHEN (' in made
        for column in [*columns, "counts_updated_at"]:
            assert f'OLD."{column}" IS DISTINCT FROM NEW."{column}"' in keep
            assert f'NEW."{column}" := OLD."{column}";' in keep
        assert f'ARRAY[NEW."{table.pk}"]' in made and f"'{label}'" in made
        key = guards[(table.db_table, "key")]  # and its primary key cannot change
        assert f'BEFORE UPDATE OF "{table.pk}" ON "{table.db_table}" FOR EACH ROW' in key
    keyed = {t for t, operation in guards if operation == "key"}
    assert keyed >= {t.db_table for t in graph().targets.values()}
    assert len(guards) == 2 * len(graph().targets) + len(keyed)
