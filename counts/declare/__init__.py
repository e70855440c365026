"""Declarations become data: fields, their checks, specs, how each count is kept, the graph.

Pure: nothing here touches the database. The graph is built once per state (the app's, sealed by
``counts.apps``) with its item kinds and jobs, and passed to the layers above.
"""
