"""Debounced, dedup-keyed recompute messages.

After a transaction that left marks commits, the writer runs one small Lua script per target
model, all pipelined into a single Redis round trip: ``SET key token NX PX window+margin``,
skipped while a drainer is active for that model. Only a writer that set a key sends
``recompute_pending(key, token)``, delayed by the window, so a burst of writes shares one
message. The drainer holds a short-lived *draining* flag while it works and drains until no
marks are left; it drops the flag and then looks once more, so a writer that skipped sending
because of the flag committed its marks before that last look (no write is ever left behind).

A process also remembers the messages it sent itself (:data:`_sent_until`): for a label it sent
a debounced message for less than :data:`TRUSTED_SHARE` of a window ago, the next writers of
that process make no Redis call at all. No write is lost by that: the message was sent with
``delay=window``, so no worker takes it, frees the key or starts its drain earlier than one
window after it was sent; a write that skips Redis before the remembered deadline (the window's
first :data:`TRUSTED_SHARE`) has committed its marks by then, so the drain that message starts,
whose snapshot is younger than its start, sees them. The share left over absorbs clock skew
between the sender's host (which sets the message's eta) and the worker's (which honours it).
A message lost with a dead worker is the sweep's, as for any other writer.
"""

from __future__ import annotations

import logging
import time
import uuid
from collections.abc import Iterable

from django.conf import settings

from workers.redis_client import client, key

logger = logging.getLogger(__name__)

_REQUEST = """
if ARGV[3] == '0' and redis.call('EXISTS', KEYS[2]) == 1 then return 0 end
if redis.call('SET', KEYS[1], ARGV[1], 'NX', 'PX', ARGV[2]) then return 1 end
return 0
"""
_RELEASE = """
if redis.call('GET', KEYS[1]) == ARGV[1] then return redis.call('DEL', KEYS[1]) end
return 0
"""

DEBOUNCE = "debounce"
DRAINING = "draining"

#: Share of the debounce window during which a process trusts a message it sent itself.
TRUSTED_SHARE = 0.8

#: label -> time.monotonic() until which a message this process sent will still find its marks.
_sent_until: dict[str, float] = {}


def forget() -> None:
    """Drop what this process remembers of its own messages (tests; a fork)."""
    _sent_until.clear()


def _remember(labels: list[str], delay_ms: int) -> None:
    until = time.monotonic() + delay_ms * TRUSTED_SHARE / 1000
    for label in labels:
        _sent_until[label] = until


def _unannounced(labels: list[str]) -> list[str]:
    """The labels with no message of this process's own still to come within its window."""
    now = time.monotonic()
    return [label for label in labels if _sent_until.get(label, 0.0) <= now]


def debounce_key(label: str) -> str:
    return key(DEBOUNCE, label)


def draining_key(label: str) -> str:
    return key(DRAINING, label)


def label_of(debounce_key_: str) -> str | None:
    """The model label a debounce key stands for, or None if it is not one of ours."""
    prefix = key(DEBOUNCE, "")
    if isinstance(debounce_key_, str) and debounce_key_.startswith(prefix):
        return debounce_key_[len(prefix) :]
    return None


def request(
    labels: Iterable[str], *, delay_ms: int | None = None, force: bool = False
) -> list[str]:
    """Schedule a recompute message for each label that has none scheduled yet.

    Args:
        labels: Target model labels.
        delay_ms: Message delay; the debounce window when None.
        force: Send even while a drainer is active (the sweep's and the re-send's case).

    Returns:
        The labels a message was sent for.
    """
    from workers.actors import recompute_pending

    labels = sorted(set(labels))
    if not force:
        labels = _unannounced(labels)
    if not labels:
        return []
    window = settings.COUNTS_DEBOUNCE_MS if delay_ms is None else delay_ms
    ttl = window + settings.COUNTS_DEBOUNCE_MARGIN_MS
    token = uuid.uuid4().hex
    # EVAL, not a registered script: a pipeline checks SCRIPT EXISTS first, a second round trip.
    pipe = client().pipeline(transaction=False)
    for label in labels:
        pipe.eval(_REQUEST, 2, debounce_key(label), draining_key(label), token, ttl, int(force))
    sent = []
    for label, was_set in zip(labels, pipe.execute(), strict=True):
        if not was_set:
            continue
        try:
            recompute_pending.send_with_options(args=(debounce_key(label), token), delay=window)
        except Exception:
            # No message went out: free the key so the next writer or the sweep sends one.
            release(debounce_key(label), token)
            raise
        sent.append(label)
    if not force:
        _remember(sent, window)
    if sent:
        logger.debug("sent recompute_pending for %s (force=%s)", ", ".join(sent), force)
    return sent


def release(debounce_key_: str, token: str) -> bool:
    """Compare-and-delete: free the key only if it still holds this message's token."""
    return bool(client().eval(_RELEASE, 1, debounce_key_, token))


def reclaim(debounce_key_: str, token: str, ttl_ms: int) -> bool:
    """Set the key back to a message's token, unless another message holds it by now."""
    return bool(client().set(debounce_key_, token, nx=True, px=ttl_ms))


def hold_draining(label: str) -> None:
    client().set(draining_key(label), "1", px=settings.COUNTS_DRAINING_TTL_MS)


def drop_draining(label: str) -> None:
    client().delete(draining_key(label))


def is_scheduled(label: str) -> bool:
    return bool(client().exists(debounce_key(label)))


def is_draining(label: str) -> bool:
    return bool(client().exists(draining_key(label)))
