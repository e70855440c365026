"""Errors of the workers layer, in the engine's one hierarchy (``counts.base.errors``)."""

from counts.api import CountsError


class MalformedMessage(CountsError):
    """A message whose arguments cannot be what its actor expects.

    Listed in the actors' ``throws``: the Retries middleware then fails the message instead of
    retrying it, and the Redis broker moves it to the dead-letter set (``<queue>.XQ``).
    """
