from django.apps import AppConfig, apps


class CountsConfig(AppConfig):
    """Builds and seals the dependency graph once every model is loaded.

    A declaration that cannot be turned into a count fails here, at start-up, with a
    ``DeclarationError`` naming the model and field — never in a request or a worker. Then
    every admin of a model with counts gets their columns and "Recompute now"
    (``counts.admin.augment``).
    """

    name = "counts"
    verbose_name = "Cached counts"
    default_auto_field = "django.db.models.BigAutoField"

    def ready(self) -> None:
        from counts import notice
        from counts.graph import Graph
        from counts.spec import resolve_all

        self.graph = Graph.build(resolve_all(apps.get_models()))
        notice.install(self.graph)
        if apps.is_installed("django.contrib.admin"):
            from django.contrib.admin import autodiscover

            from counts.admin import augment

            autodiscover()  # every app's admin registered (a no-op when already done)
            augment()


def graph():
    """The sealed dependency graph of every cached count in the project."""
    return apps.get_app_config("counts").graph
