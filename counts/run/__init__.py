"""The engine at run time: the mark queue, the after-commit notice, and the drain transaction
with its items, multiplicities, locks and target writes."""
