"""Debounced, dedup-keyed recompute messages.

After a transaction that left marks commits, the writer runs one small Lua script per target
model, all pipelined into a single Redis round trip: ``SET key token NX PX window+margin``,
skipped while a drainer is active for that model. Only a writer that set a key sends
``recompute_pending(key, token)``, delayed by the window, so a burst of writes shares one
message. The drainer holds a short-lived *draining* flag while it works and drains until no
marks are left; it drops the flag and then looks once more, so a writer that skipped sending
because of the flag committed its marks before that last look (no write is ever left behind).

A writer that finds a message already on its way, or a drainer at work, remembers until when
that one will still find its marks (:data:`_covered_until`), and its next writes to that label
make no Redis call at all until then. The values in Redis say how long that is:

- a debounce key holds ``<uuid>.<due>``, ``due`` being the wall-clock millisecond before which
  no worker takes the message: the sender computes it *before* setting the key and sends the
  message with ``delay=window`` after, so the message's eta is no earlier. A write committed
  before ``due`` is seen by the drain the message starts, whose snapshot is younger than that.
- the draining flag holds the wall-clock millisecond before which its drainer promised not to
  make its last look (:func:`hold_draining`; :func:`drop_draining` waits the promise out before
  dropping the flag, and the last look comes after that), so a write committed before the
  promise is seen by that look or an earlier batch.

A writer trusts either only until :data:`SKEW_SHARE` of a window before it, which absorbs
clock skew between hosts (the same skew the message's eta already depends on). A key written by
a failed drain's retry (``reclaim``) holds a due time in the past and buys no trust. A drainer
that stops without its last look keeps its promises all the same: a failed one's retry, and a
drainer past its time budget's fresh message, start after its last hold and linger a window
before their own last look, so that look comes after every promise (at most a window from a
hold) the first one made. A message lost with a dead worker, a sender that set the key and
failed to send, a Redis restart: each leaves the marks to the redelivery or the sweep, as for
any writer.
"""

from __future__ import annotations

import logging
import threading
import time
import uuid
from collections.abc import Iterable

import dramatiq
from django.conf import settings

from workers.names import RECOMPUTE_ACTOR
from workers.redis_client import client, key

logger = logging.getLogger(__name__)

#: Returns 1 when it set the key (the caller sends), else the value that stopped it: the draining
#: flag's promise (not when forced) or the debounce key's token.
_REQUEST = """
if ARGV[3] == '0' then
  local promise = redis.call('GET', KEYS[2])
  if promise then return 'd' .. promise end
end
if redis.call('SET', KEYS[1], ARGV[1], 'NX', 'PX', ARGV[2]) then return 1 end
return 'k' .. (redis.call('GET', KEYS[1]) or '')
"""
_RELEASE = """
if redis.call('GET', KEYS[1]) == ARGV[1] then return redis.call('DEL', KEYS[1]) end
return 0
"""

DEBOUNCE = "debounce"
DRAINING = "draining"
#: Set by a drainer at every look, for ``COUNTS_RESCUE_AFTER_S``: a drainer of the model is at
#: work. The scheduler's evidence of progress (``workers.schedule``), written by the process
#: doing the work, not by the broker's bookkeeping of messages.
WORKING = "working"

#: Share of the debounce window a writer keeps off the due time of a message or a drainer's
#: promise before trusting it (clock skew between hosts).
SKEW_SHARE = 0.2
#: label -> time.monotonic() until which a message or drainer already there finds this
#: process's marks.
_covered_until: dict[str, float] = {}
#: (label, thread) -> wall-clock ms that thread's drainer promised not to look for the last time
#: before (per thread: a second drainer of the label in this process keeps its own promises).
_promised: dict[tuple[str, int], int] = {}


def forget() -> None:
    """Drop what this process remembers of messages and promises (tests; a fork)."""
    _covered_until.clear()
    _promised.clear()


def _now_ms() -> int:
    return int(time.time() * 1000)


def _cover(label: str, until_ms: int, window_ms: int) -> None:
    """Remember that writes to ``label`` committed before wall-clock ``until_ms`` are covered."""
    left_ms = until_ms - window_ms * SKEW_SHARE - _now_ms()
    if left_ms > 0:
        _covered_until[label] = max(
            _covered_until.get(label, 0.0), time.monotonic() + left_ms / 1000
        )


def _uncovered(labels: list[str]) -> list[str]:
    """The labels with no message or drainer known to be coming for this process's marks."""
    now = time.monotonic()
    return [label for label in labels if _covered_until.get(label, 0.0) <= now]


def _covering_ms(reply: bytes | str) -> int | None:
    """The wall-clock ms until which what stopped a request (``_REQUEST``'s reply) covers
    writes: a drainer's promise, or the due time in a debounce key's token."""
    text = reply.decode() if isinstance(reply, bytes) else str(reply)
    kind, value = text[:1], text[1:]
    if kind == "k":
        value = value.rpartition(".")[2]
    return int(value) if value.isdigit() else None


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
    labels = sorted(set(labels))
    if not force:
        labels = _uncovered(labels)
    if not labels:
        return []
    window = settings.COUNTS_DEBOUNCE_MS if delay_ms is None else delay_ms
    ttl = window + settings.COUNTS_DEBOUNCE_MARGIN_MS
    # Due time first, then the key, then the message: its eta is no earlier than the due time.
    due = _now_ms() + window
    token = f"{uuid.uuid4().hex}.{due}"
    # EVAL, not a registered script: a pipeline checks SCRIPT EXISTS first, a second round trip.
    pipe = client().pipeline(transaction=False)
    for label in labels:
        pipe.eval(_REQUEST, 2, debounce_key(label), draining_key(label), token, ttl, int(force))
    sent = []
    for label, reply in zip(labels, pipe.execute(), strict=True):
        if reply != 1:
            covered = None if force else _covering_ms(reply)
            if covered is not None:
                _cover(label, covered, settings.COUNTS_DEBOUNCE_MS)
            continue
        try:
            send(args=(debounce_key(label), token), delay=window)
        except Exception:
            # No message went out: free the key so the next writer or the sweep sends one.
            release(debounce_key(label), token)
            raise
        sent.append(label)
    if not force:
        for label in sent:
            _cover(label, due, window)
    if sent:
        logger.debug("sent recompute_pending for %s (force=%s)", ", ".join(sent), force)
    return sent


def send(args: tuple, delay: int) -> None:
    """Send one drain message. The actor is looked up by name in the broker (every process
    that runs Django declares it: ``workers.apps``), so this module need not import it."""
    dramatiq.get_broker().get_actor(RECOMPUTE_ACTOR).send_with_options(args=args, delay=delay)


def release(debounce_key_: str, token: str) -> bool:
    """Compare-and-delete: free the key only if it still holds this message's token."""
    return bool(client().eval(_RELEASE, 1, debounce_key_, token))


def reclaim(debounce_key_: str, token: str, ttl_ms: int) -> bool:
    """Set the key back to a message's token, unless another message holds it by now."""
    return bool(client().set(debounce_key_, token, nx=True, px=ttl_ms))


def hold_draining(label: str, promise_ms: int = 0) -> None:
    """Raise (or renew) the draining flag, promising writers not to make the last look within
    ``promise_ms`` from now (remembered first, so a failed call over-waits rather than breaks
    the promise). A drainer that will not linger promises nothing. The same round trip says
    the model has a drainer at work (:func:`working`)."""
    until = 0
    if promise_ms > 0:
        until = _now_ms() + promise_ms
        mine = (label, threading.get_ident())
        _promised[mine] = max(_promised.get(mine, 0), until)
    pipe = client().pipeline(transaction=False)
    pipe.set(draining_key(label), str(until), px=settings.COUNTS_DRAINING_TTL_MS)
    pipe.set(key(WORKING, label), "1", px=settings.COUNTS_RESCUE_AFTER_S * 1000)
    pipe.execute()


def drop_draining(label: str) -> None:
    """Drop the flag once this process's promise is due; the caller's last look comes after."""
    wait_ms = _promised.pop((label, threading.get_ident()), 0) - _now_ms()
    if wait_ms > 0:
        time.sleep(wait_ms / 1000)
    client().delete(draining_key(label))


def is_scheduled(label: str) -> bool:
    return bool(client().exists(debounce_key(label)))


def is_draining(label: str) -> bool:
    return bool(client().exists(draining_key(label)))


def working(labels: list[str]) -> set[str]:
    """Which of ``labels`` a drainer looked at within the last ``COUNTS_RESCUE_AFTER_S``."""
    if not labels:
        return set()
    found = client().mget([key(WORKING, label) for label in labels])
    return {label for label, value in zip(labels, found, strict=True) if value is not None}
