from django.apps import AppConfig


class WorkersConfig(AppConfig):
    """Subscribes the message sender to the engine's after-commit notice."""

    name = "workers"
    verbose_name = "Count workers"

    def ready(self) -> None:
        from counts.notice import marks_committed
        from counts.signals import reconciled, status_extras
        from workers import heartbeat, hooks, metrics

        marks_committed.connect(hooks.on_marks_committed, dispatch_uid="workers.debounce")
        status_extras.connect(hooks.queue_depths, dispatch_uid="workers.queue_depths")
        status_extras.connect(heartbeat.status_section, dispatch_uid="workers.heartbeat")
        reconciled.connect(metrics.on_reconciled, dispatch_uid="workers.metrics")
