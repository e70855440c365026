from counts.draining import recompute_rows
from project.monitoring.models import Detection, Occurrence, Project
from tests.truth import assert_all_counts_exact, drain_all

BOX = [0, 0, 1, 1]


def test_recount_while_item_marks_pending(world):
    drain_all()
    Detection.objects.create(source_image=world.i1, bbox=BOX)
    Occurrence.objects.filter(pk=world.o2.pk).update(determination_score=0.95)
    Project.objects.filter(pk=world.p1.pk).update(default_filters_score_threshold=0.3)
    recompute_rows({"monitoring.deployment": [world.d1.pk, world.d2.pk]})
    drain_all()
    assert_all_counts_exact()


def test_recount_while_item_marks_pending2(world):
    drain_all()
    Detection.objects.create(source_image=world.i1, bbox=BOX)
    recompute_rows({"monitoring.deployment": [world.d1.pk, world.d2.pk]})
    Detection.objects.create(source_image=world.i1, bbox=BOX)
    recompute_rows({"monitoring.deployment": [world.d1.pk, world.d2.pk]})
    drain_all()
    assert_all_counts_exact()
