"""The engine's ground floor: names, SQL quoting, errors, what a mark means, checkpoints.

Nothing here imports another part of the engine, so every layer above may use it
(``docs/engine.md`` §7, "The layers").
"""
