from django.apps import AppConfig, apps

from counts.declare import field
from counts.declare.graph import Graph, app_graph
from counts.declare.resolve import resolve_all
from counts.run import notice


class CountsConfig(AppConfig):
    """Builds and seals the dependency graph once every model is loaded.

    A declaration the engine cannot keep exact is left out of the graph here, never raised:
    ``CachedCountField.check()`` (``counts.declare.checks``) reports it — with every other refused
    declaration, as ``counts.E0xx`` system check errors naming the model and field — from
    ``manage.py check`` and every command that runs the checks, and
    ``counts.declare.refusals.refuse_unsupported`` keeps any trigger from being written or installed
    while one is refused. Then every admin of a model with counts gets their columns and
    "Recompute now" (``counts.admin.augment``).
    """

    name = "counts"
    verbose_name = "Cached counts"
    default_auto_field = "django.db.models.BigAutoField"

    def ready(self) -> None:

        self.graph = Graph.build(resolve_all(apps.get_models()))
        notice.install(self.graph)
        # Function-local on purpose: the exact read's modules read the app registry, which is
        # populated only now (as the admin's below).
        from counts.run.exact import apply_exact

        field.read_counts_with(apply_exact)
        if apps.is_installed("django.contrib.admin"):
            # Function-local on purpose: admin modules import models, which this module (read
            # while Django populates the registry) must not; ready() runs once it is populated.
            from django.contrib.admin import autodiscover

            from counts.admin import augment

            autodiscover()  # every app's admin registered (a no-op when already done)
            augment()


#: The sealed dependency graph of every cached count in the project (one lookup, the
#: declarations' own: ``counts.declare.graph.app_graph``).
graph = app_graph
