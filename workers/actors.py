"""Dramatiq actors: drain dirty marks, fan out on a backlog, reconcile.

At-least-once delivery means any of these may run twice or concurrently: every one of them is
idempotent (a drain consumes only marks it committed a recompute for; SKIP LOCKED keeps two
drainers on different marks). Arguments are validated first; a message that cannot be right
raises :class:`MalformedMessage`, which is in ``throws``: it is logged and dead-lettered, never
retried. Database errors propagate and are retried with backoff; the marks stay in the table.
"""

from __future__ import annotations

import json
import logging
import time

import dramatiq
import redis
from django.conf import settings
from django.db import close_old_connections
from dramatiq.middleware import CurrentMessage

from counts.api import (
    LOCKED_RETRY_MS,
    drain,
    drain_labels,
    first_line,
    next_due_seconds,
    pending_summary,
    reconcile,
    reconciled,
)
from workers import debounce, metrics
from workers.encoding import DEAD_LETTER_ACTOR
from workers.errors import MalformedMessage
from workers.names import QUEUE, RECOMPUTE_ACTOR

logger = logging.getLogger("workers.drain")

#: The queue every counts actor uses.

#: A backlog worth this many batches per extra drainer is worth fanning out for.
FANOUT_BATCHES = 10

_RETRIES = {"max_retries": 20, "min_backoff": 500, "max_backoff": 60_000}


class _dead_letter_on_malformed:
    """Log a malformed message at ERROR with the reason before it is dead-lettered.

    Dramatiq logs exceptions listed in ``throws`` at INFO only; an operator must see these.
    """

    def __enter__(self):
        return self

    def __exit__(self, exc_type, exc, tb):
        if exc_type is not None and issubclass(exc_type, MalformedMessage):
            logger.error("dead-lettering malformed message: %s", exc)
        return False


#: When to come back for deferred work: just after the longest a deferred mark waits.
DEFERRED_RETRY_MS = LOCKED_RETRY_MS + 100


def _known_label(label) -> str:
    """A target model's label, or an item kind's (``item:<label>``): what marks are for."""
    known = isinstance(label, str) and label in drain_labels()
    if not known:
        raise MalformedMessage(f"unknown target model {label!r}")
    return label


def _args(args, kwargs, names: tuple[str, ...]) -> list:
    """Positional-or-keyword arguments, exactly ``names``, all strings."""
    values = list(args)
    for name in names[len(values) :]:
        if name not in kwargs:
            raise MalformedMessage(f"missing argument {name!r}")
        values.append(kwargs.pop(name))
    if len(values) != len(names) or kwargs:
        raise MalformedMessage(f"expected arguments {names}, got {args!r} {kwargs!r}")
    for name, value in zip(names, values, strict=True):
        if not isinstance(value, str) or not value:
            raise MalformedMessage(f"argument {name!r} must be a non-empty string, got {value!r}")
    return values


def _redis_quietly(action, *args, **kwargs) -> None:
    """The drain flag is an optimisation; Redis being away must not stop a drain."""
    try:
        action(*args, **kwargs)
    except redis.RedisError as exc:
        logger.warning("redis unavailable during drain: %s", exc)


def _drain(label: str):
    result = drain(
        batch_size=settings.COUNTS_DRAIN_BATCH,
        targets=[label],
        lock_timeout_ms=settings.COUNTS_LOCK_TIMEOUT_MS,
    )
    # Work put back for later (an item another drain holds, amounts for a row someone
    # holds) may be for other labels than this one: ask for a drain once it is due, or it
    # would wait for the sweep.
    for other, _rows in sorted(result.deferred.items()):
        _redis_quietly(debounce.request, [other], delay_ms=DEFERRED_RETRY_MS, force=True)
    return result


def _waited_for_deferred(label: str, deadline: float) -> bool:
    """Wait for work put back a moment ago (an item or row another drain held), due within a
    second, rather than leave it to the sweep; False when none is due that soon (a row held
    for longer, an admin form left open, is the sweep's)."""
    due = next_due_seconds(label)
    if due is None or time.monotonic() + due >= deadline or due > DEFERRED_RETRY_MS / 1000:
        return False
    time.sleep(due + 0.01)
    return True


def _fan_out(label: str) -> None:
    """A full batch means a backlog: send more drainers for it, one per few batches of it."""
    backlog = sum(p.marks for p in pending_summary() if p.label == label)
    helpers = min(settings.COUNTS_FANOUT, backlog // (FANOUT_BATCHES * settings.COUNTS_DRAIN_BATCH))
    for _ in range(helpers):
        drain_backlog.send(label)
    if helpers:
        logger.info("fanned out %s to %d more drainers (%d marks)", label, helpers, backlog)


def drain_label(label: str, *, fan_out: bool) -> int:
    """Drain ``label``'s marks until quiet for a debounce window, or the time budget ends.

    Lingering one window after the queue runs dry is what keeps a burst to a handful of
    messages: writers see the draining flag and send nothing while this drainer is there to
    pick their marks up. Returns the number of non-empty batches.
    """
    deadline = time.monotonic() + settings.COUNTS_DRAIN_BUDGET_S
    linger = settings.COUNTS_DEBOUNCE_MS / 1000 if fan_out else 0
    poll = min(0.2, linger / 5) if linger else 0
    batches, fanned, quiet_until, waits_left = 0, not fan_out, None, 3
    while True:
        # Promise writers a window, or what is left of the linger: they need not ask Redis
        # while this drainer is sure to look again.
        left = linger if quiet_until is None else max(0.0, quiet_until - time.monotonic())
        _redis_quietly(debounce.hold_draining, label, promise_ms=int(left * 1000))
        result = _drain(label)
        # Idle: no marks, or only rows someone else holds (marked again, due a little later:
        # the sweep sends for them then; spinning on them here would help nobody).
        if result.idle:
            quiet_until = quiet_until or time.monotonic() + linger
            if time.monotonic() < quiet_until:
                time.sleep(poll)
                continue
            # Drop the flag, then look once more: a writer that saw the flag and sent nothing
            # committed its marks before this last look.
            _redis_quietly(debounce.drop_draining, label)
            result = _drain(label)
            if result.idle:
                if waits_left and _waited_for_deferred(label, deadline):
                    waits_left -= 1
                    quiet_until = None
                    continue
                return batches
        quiet_until = None
        batches += 1
        metrics.record_drain(result)
        logger.info("drained %s", json.dumps({"target": label, **result.as_log()}))
        if not fanned and result.marks >= settings.COUNTS_DRAIN_BATCH:
            fanned = True
            _fan_out(label)
        if time.monotonic() > deadline:
            # Hand over to a fresh message so one long backlog never pins a worker thread.
            _redis_quietly(debounce.request, [label], delay_ms=0, force=True)
            return batches
        if not result.more:
            # The batch saw no other due mark: the quiet window starts now, not after one more
            # batch that would find nothing.
            quiet_until = time.monotonic() + linger
            time.sleep(poll)


@dramatiq.actor(
    actor_name=RECOMPUTE_ACTOR, queue_name=QUEUE, throws=(MalformedMessage,), **_RETRIES
)
def recompute_pending(*args, **kwargs) -> None:
    """Free the debounce key, then drain its model's marks (see ``workers.debounce``)."""
    with _dead_letter_on_malformed():
        key, token = _args(args, kwargs, ("key", "token"))
        label = _known_label(debounce.label_of(key))
    close_old_connections()
    # Raise the draining flag, then free the key: a write committing from here on either sees
    # the flag (and this drainer will find its marks) or sets the key and gets a message.
    _redis_quietly(debounce.hold_draining, label, promise_ms=settings.COUNTS_DEBOUNCE_MS)
    _redis_quietly(debounce.release, key, token)
    try:
        drain_label(label, fan_out=True)
    except Exception as exc:
        if _will_retry() and not _keep_for_retry(key, token):
            # Another message holds the key by now (a sweep that took this one for lost, its
            # worker slow to answer, forced its own over it): that message drains these marks.
            # Retrying this one too would leave two retrying side by side, one more per attempt.
            logger.warning(
                "drain of %s failed (%s); the message sent since takes over", label, first_line(exc)
            )
            return
        raise


def _keep_for_retry(key: str, token: str) -> bool:
    """Take the debounce key back for this message's retry, which frees it again when it
    starts: writers (whom the draining flag held back so far) see a message scheduled and send
    none, so a failing drain does not collect one more message per debounce window. False when
    another message holds the key by now; True (retry) when Redis cannot say."""
    ttl = _RETRIES["max_backoff"] + settings.COUNTS_DEBOUNCE_MARGIN_MS
    try:
        return debounce.reclaim(key, token, ttl)
    except redis.RedisError as exc:
        logger.warning("redis unavailable during drain: %s", exc)
        return True


def _will_retry() -> bool:
    """Whether the Retries middleware will retry the message being processed if it fails."""
    message = CurrentMessage.get_current_message()
    return message is not None and message.options.get("retries", 0) < _RETRIES["max_retries"]


@dramatiq.actor(queue_name=QUEUE, throws=(MalformedMessage,), **_RETRIES)
def drain_backlog(*args, **kwargs) -> None:
    """One more drainer for a large backlog; SKIP LOCKED keeps it off the others' marks."""
    with _dead_letter_on_malformed():
        (label,) = _args(args, kwargs, ("label",))
        _known_label(label)
    close_old_connections()
    drain_label(label, fan_out=False)


#: Labels whose rescue drains are failing, so each failure is logged once, not every sweep.
_rescues_failing: set[str] = set()


@dramatiq.actor(queue_name=QUEUE, throws=(MalformedMessage,), max_retries=0)
def rescue_drain(*args, **kwargs) -> None:
    """The scheduler's drain for a model whose due marks wait with no drainer at work.

    Never retried: if it fails, the next sweep sends another while the marks still wait, so a
    failing drain costs one message per sweep, not a growing pile of retries, and the first
    sweep after the cause is gone drains. A failure is logged once until a rescue succeeds
    (not dead-lettered: nothing is wrong with the message).
    """
    with _dead_letter_on_malformed():
        (label,) = _args(args, kwargs, ("label",))
        _known_label(label)
    close_old_connections()
    try:
        drain_label(label, fan_out=True)
    except Exception as exc:
        if label not in _rescues_failing:
            _rescues_failing.add(label)
            logger.warning(
                "rescue drain of %s failed (%s); the next sweep tries again", label, first_line(exc)
            )
        return
    if label in _rescues_failing:
        _rescues_failing.discard(label)
        logger.warning("rescue drain of %s succeeded again", label)


@dramatiq.actor(
    queue_name=QUEUE, throws=(MalformedMessage,), time_limit=6 * 3600 * 1000, max_retries=3
)
def reconcile_counts(*args, **kwargs) -> None:
    """A full reconcile pass; drift found is logged per field and repaired."""
    with _dead_letter_on_malformed():
        if args or kwargs:
            raise MalformedMessage(f"reconcile_counts takes no arguments, got {args!r} {kwargs!r}")
    close_old_connections()
    report = reconcile()
    reconciled.send(sender=reconcile_counts, report=report)
    level = logging.WARNING if report.drifted_rows else logging.INFO
    logger.log(level, "reconciled %s", json.dumps(report.as_dict()))


@dramatiq.actor(
    actor_name=DEAD_LETTER_ACTOR, queue_name=QUEUE, throws=(MalformedMessage,), max_retries=0
)
def dead_letter(reason: str) -> None:
    """The stand-in for a payload that did not decode (``workers.encoding``): dead-letter it."""
    with _dead_letter_on_malformed():
        raise MalformedMessage(reason)
