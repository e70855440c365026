"""Prometheus metrics: what the workers did, kept in Redis, exposed by the web at ``/metrics``.

Why Redis and not ``prometheus_client``'s multiprocess mode: the counters are incremented in
worker processes, the scheduler and the web's write path, and scraped from a web process.
Multiprocess mode shares them through files in one ``PROMETHEUS_MULTIPROC_DIR``, which only
works when every process runs on the same host and the directory is wiped at each restart;
countdown runs workers on as many hosts as needed (DESIGN §5: nothing depends on one process's
memory or disk). Redis is already shared by all of them, so each event is one pipelined
``HINCRBYFLOAT`` on a hash there, and a custom collector reads that hash at scrape time. Any web
process, on any host, serves the same cluster-wide totals. The counters are cumulative and only
reset when Redis loses its data, which Prometheus' ``rate()`` handles as a restart.

Read at scrape time, not stored: pending marks and the oldest mark's age per model (one grouped
query, ``counts.marks.pending_summary``), dead-lettered messages (the broker's own keys) and
when each process was last seen (``workers.heartbeat``). A source that does not answer is
reported by ``countdown_source_up{source=...} 0`` and the rest of the scrape still works.

Recording never raises: metrics are reporting, and a Redis outage is logged by the write path
and the sweep already.
"""

from __future__ import annotations

import bisect
import json
import logging
from collections import defaultdict

import redis
from dramatiq.middleware import Middleware
from prometheus_client.core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
)
from prometheus_client.registry import Collector, CollectorRegistry

from workers.redis_client import client, key

logger = logging.getLogger(__name__)

#: Counters kept in Redis: name (exposed with ``_total``) -> (help, label names).
COUNTERS = {
    "countdown_drain_batches": ("Non-empty drain transactions committed.", ()),
    "countdown_drain_marks": ("Dirty marks consumed by drains.", ()),
    "countdown_rows_recomputed": ("Target rows recomputed by drains.", ("model",)),
    "countdown_rows_changed": ("Target rows whose stored counts a drain changed.", ("model",)),
    "countdown_messages_sent": ("Messages sent, by actor (retries not included).", ("actor",)),
    "countdown_reconcile_runs": ("Repairing reconcile passes completed.", ()),
    "countdown_reconcile_rows_checked": ("Rows checked by reconcile passes.", ("model",)),
    "countdown_reconcile_drift": (
        "Rows found wrong by reconcile passes (and repaired), per count field.",
        ("model", "field"),
    ),
}
#: The drain latency histogram's name.
DRAIN_SECONDS = "countdown_drain_seconds"
#: Its buckets' upper bounds, in seconds (a batch of 500 marks takes tens of milliseconds).
BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)


def _field(name: str, **labels: str) -> str:
    return json.dumps([name, labels], sort_keys=True)


def _store() -> str:
    return key("metrics")


def _add(increments: dict[str, float]) -> None:
    """Add to stored counters in one round trip; a Redis outage only loses these increments."""
    increments = {k: v for k, v in increments.items() if v}
    if not increments:
        return
    try:
        pipe = client().pipeline(transaction=False)
        for field, amount in increments.items():
            pipe.hincrbyfloat(_store(), field, amount)
        pipe.execute()
    except redis.RedisError as exc:
        logger.debug("metrics not recorded: %s", exc)


def record_drain(result) -> None:
    """One committed drain batch (a ``counts.draining.DrainResult``)."""
    if result.empty:
        return
    seconds = result.ms / 1000
    index = bisect.bisect_left(BUCKETS, seconds)
    bound = str(BUCKETS[index]) if index < len(BUCKETS) else "+Inf"
    increments: dict[str, float] = defaultdict(float)
    increments[_field("countdown_drain_batches")] += 1
    increments[_field("countdown_drain_marks")] += result.marks
    increments[_field(DRAIN_SECONDS, le=bound)] += 1
    increments[_field(DRAIN_SECONDS + "_sum")] += seconds
    for label, rows in result.targets.items():
        increments[_field("countdown_rows_recomputed", model=label)] += rows
    for label, rows in result.changed.items():
        increments[_field("countdown_rows_changed", model=label)] += rows
    _add(increments)


def on_reconciled(sender, report, **kwargs) -> None:
    """A reconcile pass finished (``counts.signals.reconciled``); dry runs repair nothing."""
    if report.dry_run:
        return
    increments: dict[str, float] = {_field("countdown_reconcile_runs"): 1}
    for label, model in report.models.items():
        increments[_field("countdown_reconcile_rows_checked", model=label)] = model.checked
        for name, rows in model.drift.items():
            increments[_field("countdown_reconcile_drift", model=label, field=name)] = rows
    _add(increments)


class CountMessages(Middleware):
    """Count messages as the broker accepts them, once each.

    A delayed message is enqueued twice under one id (into the delay queue with its ``eta``,
    then into the queue when due) and a retry is a re-enqueue: only the first enqueue counts.
    """

    def after_enqueue(self, broker, message, delay) -> None:
        if message.options.get("retries") or ("eta" in message.options and not delay):
            return
        _add({_field("countdown_messages_sent", actor=message.actor_name): 1})


def _stored() -> dict[str, dict[tuple, float]]:
    """``{name: {label values: value}}`` from the Redis hash."""
    out: dict[str, dict[tuple, float]] = defaultdict(dict)
    for field, value in client().hgetall(_store()).items():
        name, labels = json.loads(field)
        out[name][tuple(sorted(labels.items()))] = float(value)
    return out


class CountsCollector(Collector):
    """Everything above, read at scrape time."""

    def collect(self):
        up = GaugeMetricFamily(
            "countdown_source_up", "Whether a source answered this scrape.", labels=["source"]
        )
        for source, read in (("postgresql", self._pending), ("redis", self._redis)):
            try:
                families = list(read())
            except Exception as exc:  # a scrape reports what it can; the rest says why not
                logger.warning("metrics: %s did not answer: %s", source, exc)
                up.add_metric([source], 0)
                continue
            up.add_metric([source], 1)
            yield from families
        yield up

    def _pending(self):
        from counts.marks import pending_summary

        marks = GaugeMetricFamily(
            "countdown_pending_marks", "Dirty marks waiting, per target model.", labels=["model"]
        )
        oldest = GaugeMetricFamily(
            "countdown_pending_oldest_seconds",
            "Age of the oldest waiting mark, per target model.",
            labels=["model"],
        )
        due = GaugeMetricFamily(
            "countdown_pending_oldest_due_seconds",
            "How long the oldest due mark has waited, per target model: what staleness alerts"
            " should watch (marks put back for a held row are not due until their retry time).",
            labels=["model"],
        )
        for row in pending_summary():
            marks.add_metric([row.label], row.marks)
            oldest.add_metric([row.label], row.oldest_seconds)
            due.add_metric([row.label], row.oldest_due_seconds)
        yield from (marks, oldest, due)

    def _redis(self):
        from workers import heartbeat
        from workers.hooks import queue_sizes

        stored = _stored()
        for name, (doc, labels) in COUNTERS.items():
            family = CounterMetricFamily(name, doc, labels=list(labels))
            for label_items, value in sorted(stored.get(name, {}).items()):
                values = dict(label_items)
                family.add_metric([values.get(name, "") for name in labels], value)
            yield family
        yield self._histogram(stored)
        dead = GaugeMetricFamily(
            "countdown_dead_letters", "Messages in the dead-letter set.", labels=["queue"]
        )
        dead.add_metric(["counts"], queue_sizes()["dead"])
        yield dead
        seen = GaugeMetricFamily(
            "countdown_process_last_seen_seconds",
            "Seconds since each scheduler/worker process was last seen.",
            labels=["process"],
        )
        for process, age in sorted(heartbeat.last_seen().items()):
            seen.add_metric([process], age)
        yield seen

    @staticmethod
    def _histogram(stored) -> HistogramMetricFamily:
        per_bucket = {dict(k).get("le"): v for k, v in stored.get(DRAIN_SECONDS, {}).items()}
        cumulative, buckets = 0.0, []
        for bound in [*(str(b) for b in BUCKETS), "+Inf"]:
            cumulative += per_bucket.get(bound, 0.0)
            buckets.append((bound, cumulative))
        total = sum(stored.get(DRAIN_SECONDS + "_sum", {}).values())
        family = HistogramMetricFamily(
            DRAIN_SECONDS, "Duration of one committed drain transaction (seconds)."
        )
        family.add_metric([], buckets, sum_value=total)
        return family


#: What ``/metrics`` serves: only the collector above (per-process web metrics would describe
#: whichever gunicorn worker answered the scrape, not the system).
REGISTRY = CollectorRegistry(auto_describe=False)
REGISTRY.register(CountsCollector())
