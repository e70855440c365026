"""The counts engine's own test app (app label ``counts_testapp``).

Installed only when tests run (``COUNTS_TEST_APP``, set under pytest by ``project.settings``), so
production databases never get its tables. Its models are small and have one cached count per
shape the engine supports, so the engine's behaviour is pinned on shapes it owns rather than on
the monitoring domain's twelve counts. Its migrations, the count-trigger one included, are
written by ``manage.py makemigrations`` like any app's.
"""
