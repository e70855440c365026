"""The monitoring domain of DESIGN §1: relations, deletion rules, names and indexes.

Every cached count is defined over these relations, so what a deletion removes or merely
detaches decides what the counts must say afterwards. These tests pin the contract on the real
database (cascades run in Django's collector, the SET_NULLs as its updates) and check that every
foreign key column leads an index: the count triggers probe each of them with ``= ANY(ids)``,
and an unindexed one would turn every write into a sequential scan.
"""

import re
from datetime import UTC, datetime

import pytest
from django.apps import apps
from django.db import IntegrityError, connection, models, transaction

from project.monitoring.models import (
    Deployment,
    Detection,
    Event,
    Occurrence,
    Project,
    SourceImage,
    SourceImageCollection,
    Taxon,
)

pytestmark = pytest.mark.django_db

NIGHT = datetime(2023, 6, 1, 21, 0, tzinfo=UTC)


@pytest.fixture
def world():
    """Two projects, each with one station, a night, two captures, detections and a set."""

    def build(tag: str) -> dict:
        project = Project.objects.create(name=f"Project {tag}", default_filters_score_threshold=0.6)
        deployment = Deployment.objects.create(project=project, name=f"Station {tag}")
        event = Event.objects.create(deployment=deployment, start=NIGHT)
        images = [
            SourceImage.objects.create(
                deployment=deployment, event=event, timestamp=NIGHT, path=f"{tag}/{i}.jpg"
            )
            for i in range(2)
        ]
        taxon = Taxon.objects.create(name=f"Actias luna {tag}")
        occurrence = Occurrence.objects.create(
            deployment=deployment, event=event, determination=taxon, determination_score=0.9
        )
        detections = [
            Detection.objects.create(
                source_image=images[0], bbox=[1, 2, 30, 40], occurrence=occurrence, score=0.8
            ),
            Detection.objects.create(source_image=images[1], bbox=None),
        ]
        collection = SourceImageCollection.objects.create(project=project, name=f"Set {tag}")
        collection.images.add(*images)
        return {
            "project": project,
            "deployment": deployment,
            "event": event,
            "images": images,
            "taxon": taxon,
            "occurrence": occurrence,
            "detections": detections,
            "collection": collection,
        }

    return {"a": build("a"), "b": build("b")}


def _exists(obj) -> bool:
    return type(obj)._base_manager.filter(pk=obj.pk).exists()


def test_related_names_reach_each_level(world):
    a = world["a"]
    assert list(a["project"].deployments.all()) == [a["deployment"]]
    assert list(a["project"].collections.all()) == [a["collection"]]
    assert list(a["deployment"].events.all()) == [a["event"]]
    assert set(a["deployment"].captures.all()) == set(a["images"])
    assert set(a["event"].captures.all()) == set(a["images"])
    assert list(a["deployment"].occurrences.all()) == [a["occurrence"]]
    assert list(a["event"].occurrences.all()) == [a["occurrence"]]
    assert list(a["images"][0].detections.all()) == [a["detections"][0]]
    assert list(a["occurrence"].detections.all()) == [a["detections"][0]]
    assert list(a["taxon"].occurrences.all()) == [a["occurrence"]]


def test_deleting_a_project_removes_everything_below_it_and_nothing_else(world):
    a, b = world["a"], world["b"]
    a["project"].delete()
    for key in ("deployment", "event", "occurrence", "collection"):
        assert not _exists(a[key]), key
    assert not any(_exists(x) for x in a["images"] + a["detections"])
    assert _exists(a["taxon"]), "taxa are shared vocabulary, not project data"
    for key in ("project", "deployment", "event", "occurrence", "collection"):
        assert _exists(b[key]), key
    assert b["collection"].images.count() == 2


def test_deleting_a_station_removes_its_nights_captures_detections_and_occurrences(world):
    a = world["a"]
    a["deployment"].delete()
    assert not _exists(a["event"])
    assert not _exists(a["occurrence"])
    assert not any(_exists(x) for x in a["images"] + a["detections"])
    assert _exists(a["project"])
    assert _exists(a["collection"]), "a set outlives the captures it held"
    assert a["collection"].images.count() == 0


def test_deleting_a_night_keeps_its_captures_and_occurrences_detached(world):
    a = world["a"]
    a["event"].delete()
    for image in a["images"]:
        image.refresh_from_db()
        assert image.event is None
    a["occurrence"].refresh_from_db()
    assert a["occurrence"].event is None
    assert a["deployment"].captures.count() == 2
    assert a["deployment"].occurrences.count() == 1


def test_deleting_a_capture_removes_its_detections_and_set_memberships(world):
    a = world["a"]
    image = a["images"][0]
    image.delete()
    assert not _exists(a["detections"][0])
    assert _exists(a["detections"][1]), "the other capture's null marker stays"
    assert _exists(a["occurrence"]), "an occurrence may outlive one of its detections"
    assert list(a["collection"].images.all()) == [a["images"][1]]


def test_deleting_an_occurrence_detaches_its_detections(world):
    a = world["a"]
    a["occurrence"].delete()
    detection = a["detections"][0]
    detection.refresh_from_db()
    assert detection.occurrence is None
    assert detection.bbox == [1, 2, 30, 40]


def test_deleting_a_taxon_leaves_occurrences_undetermined(world):
    a = world["a"]
    a["taxon"].delete()
    a["occurrence"].refresh_from_db()
    assert a["occurrence"].determination is None
    assert a["occurrence"].determination_score == 0.9


def test_deleting_a_set_keeps_its_captures(world):
    a = world["a"]
    a["collection"].delete()
    assert all(_exists(x) for x in a["images"])
    assert a["images"][0].collections.count() == 0


def test_set_membership_is_editable_from_both_sides(world):
    a, b = world["a"], world["b"]
    image = a["images"][0]
    other = SourceImageCollection.objects.create(project=a["project"], name="Other")
    image.collections.add(other)
    assert list(other.images.all()) == [image]
    assert set(image.collections.all()) == {a["collection"], other}
    a["collection"].images.remove(image)
    assert list(image.collections.all()) == [other]
    b["images"][0].collections.add(other)
    assert other.images.count() == 2
    other.images.clear()
    assert image.collections.count() == 0
    image.collections.set([a["collection"], b["collection"]])
    assert a["collection"].images.count() == 2
    assert b["collection"].images.filter(pk=image.pk).exists()


def test_a_capture_joins_a_set_once():
    project = Project.objects.create(name="P")
    deployment = Deployment.objects.create(project=project, name="S")
    image = SourceImage.objects.create(deployment=deployment, timestamp=NIGHT, path="x.jpg")
    collection = SourceImageCollection.objects.create(project=project, name="C")
    collection.images.add(image)
    collection.images.add(image)
    assert collection.images.count() == 1
    through = SourceImageCollection.images.through
    with pytest.raises(IntegrityError), transaction.atomic():
        through.objects.create(sourceimagecollection=collection, sourceimage=image)


def test_defaults_new_rows_start_from():
    project = Project.objects.create(name="P")
    assert project.default_filters_score_threshold == 0.5
    deployment = Deployment.objects.create(project=project, name="S")
    deployment.refresh_from_db()
    assert (deployment.captures_count, deployment.events_count, deployment.taxa_count) == (0, 0, 0)
    event = Event.objects.create(deployment=deployment, start=NIGHT)
    assert event.end is None
    image = SourceImage.objects.create(deployment=deployment, timestamp=NIGHT, path="p.jpg")
    assert image.event is None
    occurrence = Occurrence.objects.create(deployment=deployment)
    assert (occurrence.event, occurrence.determination, occurrence.determination_score) == (
        None,
        None,
        None,
    )
    assert Detection.objects.create(source_image=image).bbox is None


def test_taxon_names_are_unique():
    Taxon.objects.create(name="Actias luna")
    with pytest.raises(IntegrityError), transaction.atomic():
        Taxon.objects.create(name="Actias luna")


def test_str_names_what_a_user_recognises(world):
    a = world["a"]
    assert str(a["project"]) == "Project a"
    assert str(a["deployment"]) == "Station a"
    assert str(a["event"]) == "Station a · 2023-06-01"  # the station's name, not its id
    assert str(a["images"][0]) == "a/0.jpg"
    assert str(a["taxon"]) == "Actias luna a"
    assert str(a["occurrence"]) == f"Occurrence #{a['occurrence'].pk}"
    assert str(a["detections"][0]) == f"Detection #{a['detections'][0].pk}"
    assert str(a["collection"]) == "Set a"


def _leading_index_columns(table: str) -> set[str]:
    """Columns that lead some index of ``table``, read from ``pg_indexes``."""
    with connection.cursor() as cursor:
        cursor.execute("SELECT indexdef FROM pg_indexes WHERE tablename = %s", [table])
        definitions = [row[0] for row in cursor.fetchall()]
    leading = set()
    for definition in definitions:
        columns = re.search(r"USING \w+ \((.*)\)", definition).group(1)
        leading.add(columns.split(",")[0].split()[0].strip('"'))
    return leading


def _foreign_keys():
    for model in apps.get_app_config("monitoring").get_models():
        for field in model._meta.local_fields:
            if isinstance(field, models.ForeignKey):
                yield model._meta.db_table, field.column
    through = SourceImageCollection.images.through._meta
    for field in through.local_fields:
        if isinstance(field, models.ForeignKey):
            yield through.db_table, field.column


def test_every_foreign_key_column_leads_an_index():
    keys = list(_foreign_keys())
    assert ("monitoring_sourceimagecollection_images", "sourceimage_id") in keys
    assert ("monitoring_sourceimagecollection_images", "sourceimagecollection_id") in keys
    assert len(keys) == 12
    missing = [(t, c) for t, c in keys if c not in _leading_index_columns(t)]
    assert missing == []


@pytest.mark.parametrize(
    ("model", "field", "rule"),
    [
        (Deployment, "project", models.CASCADE),
        (Event, "deployment", models.CASCADE),
        (SourceImage, "deployment", models.CASCADE),
        (SourceImage, "event", models.SET_NULL),
        (Detection, "source_image", models.CASCADE),
        (Detection, "occurrence", models.SET_NULL),
        (Occurrence, "deployment", models.CASCADE),
        (Occurrence, "event", models.SET_NULL),
        (Occurrence, "determination", models.SET_NULL),
        (SourceImageCollection, "project", models.CASCADE),
    ],
)
def test_declared_deletion_rules_match_the_design(model, field, rule):
    remote = model._meta.get_field(field).remote_field
    assert remote.on_delete is rule
    assert model._meta.get_field(field).null is (rule is models.SET_NULL)
