from django.apps import AppConfig


class EngineTestAppConfig(AppConfig):
    """A second app with counts: its triggers live in its own migrations."""

    name = "tests.engine_app"
    label = "counts_testapp"
    verbose_name = "Counts engine test app"
    default_auto_field = "django.db.models.BigAutoField"
