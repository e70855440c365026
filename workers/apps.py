from django.apps import AppConfig


class WorkersConfig(AppConfig):
    """Subscribes the message sender to the engine's after-commit notice."""

    name = "workers"
    verbose_name = "Count workers"

    def ready(self) -> None:
        # Function-local on purpose: this module is read while Django populates the app
        # registry; the engine and the actors (declared here, so every process can send a
        # drain message by its actor's name: ``workers.debounce.send``) need it populated.
        from counts.api import marks_committed, reconciled, status_extras
        from workers import (
            actors,  # noqa: F401  (declares the actors)
            heartbeat,
            hooks,
            metrics,
            queued,
        )

        marks_committed.connect(hooks.on_marks_committed, dispatch_uid="workers.debounce")
        status_extras.connect(queued.queue_depths, dispatch_uid="workers.queue_depths")
        status_extras.connect(heartbeat.status_section, dispatch_uid="workers.heartbeat")
        reconciled.connect(metrics.on_reconciled, dispatch_uid="workers.metrics")
