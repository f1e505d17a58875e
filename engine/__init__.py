"""mailengine: outbound SMTP delivery over pooled, reused connections.

Nothing in this package monkey-patches at import: the worker's entry point
(`engine.worker.main`) calls `gevent.monkey.patch_all()` first thing.
"""
__version__ = "0.1.0"
