"""mailengine: outbound SMTP delivery over pooled, reused connections.

Nothing in this package monkey-patches at import: the worker's entry point,
`bin/mailengine-worker`, calls `gevent.monkey.patch_all()` first thing.
docs/ARCHITECTURE.md shows how the parts fit together.
"""
__version__ = "0.1.0"
