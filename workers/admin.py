"""Hide django-dramatiq's task list: it stays empty here, so it would only mislead.

It is filled by django-dramatiq's AdminMiddleware, which the settings leave out on purpose (a
row per task would make it the busiest table of the database at 10⁶ writes a day). Operators
read the backlog from the engine's pending-marks page and ``manage.py counts status``.
"""

from django.contrib import admin
from django_dramatiq.models import Task

if admin.site.is_registered(Task):
    admin.site.unregister(Task)
