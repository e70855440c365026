"""A writer in a process of its own, for the recovery tests: single-row commits until told to stop.

Run as ``python -m tests.writer_process STOP_FILE SEED IMAGE_ID... -- SET_ID...`` with the
environment of :func:`tests.worker_harness.worker_subprocess_env`. Each iteration is one
committed transaction through the ORM (a detection created, moved or deleted; a capture added
to or removed from a set), so every commit runs the real write path: triggers, the after-commit
notice and its Redis call (which may time out while Redis is frozen: the write still commits).
On the way out it prints ``last commit <wall-clock seconds>``.
"""

from __future__ import annotations

import os
import random
import sys
import time
from pathlib import Path


def main(argv: list[str]) -> None:
    import django

    os.environ.setdefault("DJANGO_SETTINGS_MODULE", "project.settings")
    django.setup()
    from project.monitoring.models import Detection, SourceImage, SourceImageCollection

    stop, seed, rest = Path(argv[0]), int(argv[1]), argv[2:]
    split = rest.index("--")
    image_ids, set_ids = [int(x) for x in rest[:split]], [int(x) for x in rest[split + 1 :]]
    rng = random.Random(seed)
    last = time.time()
    while not stop.exists():
        image = SourceImage(pk=rng.choice(image_ids))
        roll = rng.random()
        if roll < 0.4:
            Detection.objects.create(source_image=image, bbox=None if roll < 0.1 else [1, 2, 3, 4])
        elif roll < 0.55:
            # A capture moved by a queryset update (another writer may have deleted it).
            moved = Detection.objects.filter(source_image=image).values_list("pk")[:1]
            Detection.objects.filter(pk__in=moved).update(source_image_id=rng.choice(image_ids))
        elif roll < 0.65:
            Detection.objects.filter(
                pk__in=Detection.objects.filter(source_image=image)[:1]
            ).delete()
        elif roll < 0.85:
            SourceImageCollection(pk=rng.choice(set_ids)).images.add(image)
        else:
            SourceImageCollection(pk=rng.choice(set_ids)).images.remove(image)
        last = time.time()
        time.sleep(0.01)
    print(f"last commit {last:.3f}", flush=True)


if __name__ == "__main__":
    main(sys.argv[1:])
