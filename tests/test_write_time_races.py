"""Races of marks computed at write time, which the first engine lost: now exact.

A mark trigger that climbed from its own rows to the targets read other tables (a capture's
station, its capture sets) in the writer's snapshot. A concurrent writer changing those rows
marked the targets it moved between, and a drain could recount them after that writer
committed but before this one did; this writer's marks then named the targets it saw, not the
new ones, which stayed one off until reconcile. Two connections replay each interleaving.

Triggers now record only their own rows ("this capture changed"), and the drain reads where the
capture belongs in its own, later snapshot, crediting against the capture's ledger
(``counts.items``).
"""

from __future__ import annotations

import psycopg
import pytest
from django.db import connection

from tests.truth import assert_all_counts_exact, drain_all

pytestmark = pytest.mark.django_db(transaction=True)


def raw() -> psycopg.Connection:
    """A second client of the test database, with a transaction of its own."""
    db = connection.settings_dict
    return psycopg.connect(
        host=db["HOST"] or "127.0.0.1", port=db["PORT"] or 5432, user=db["USER"], dbname=db["NAME"]
    )


def insert_valid_detection(conn, image_id: int) -> None:
    conn.execute(
        "INSERT INTO monitoring_detection (source_image_id, bbox, created_at, updated_at)"
        " VALUES (%s, '[1, 2, 3, 4]', now(), now())",
        [image_id],
    )


def test_a_detection_on_a_capture_being_moved_reaches_its_new_station(make_world, marks):
    world = make_world()
    mover, detector = raw(), raw()
    try:
        mover.execute(
            "UPDATE monitoring_sourceimage SET deployment_id = %s, event_id = NULL WHERE id = %s",
            [world.d2.pk, world.i3.pk],
        )
        insert_valid_detection(detector, world.i3.pk)  # FK check: KEY SHARE, no wait
        mover.commit()
        drain_all()  # station B recounted without the uncommitted detection
        detector.commit()  # its marks name station A, where it saw the capture
        drain_all()
    finally:
        mover.close()
        detector.close()
    assert_all_counts_exact()


def test_a_first_detection_racing_a_membership_reaches_the_new_set(make_world, marks):
    world = make_world()
    joiner, detector = raw(), raw()
    try:
        joiner.execute(  # i3 (no detection yet) joins the empty set c3
            "INSERT INTO monitoring_sourceimagecollection_images"
            " (sourceimagecollection_id, sourceimage_id) VALUES (%s, %s)",
            [world.c3.pk, world.i3.pk],
        )
        insert_valid_detection(detector, world.i3.pk)
        joiner.commit()
        drain_all()  # c3 recounted: i3 has no committed detection yet
        detector.commit()  # its marks name c1, the only set it saw i3 in
        drain_all()
    finally:
        joiner.close()
        detector.close()
    assert_all_counts_exact()
