"""The supervisor's CURVE: the producers' sockets, the control socket, one ZAP handler.

`security.curve` makes ingest and events CURVE servers that admit the producers'
keys; `control.curve` makes the control socket one that admits the operators' keys
(engine.auth.CurveServer each, with its own key pair and list). Both are checked by
the one ZAP handler of the supervisor's ZeroMQ context (engine.zap), started before
the first CURVE socket binds. A reload (SIGHUP) reads both lists of keys again; a
new key pair, or CURVE turned on or off, takes a restart (logged).
"""
from __future__ import annotations

import logging

import zmq

from engine import auth, logs
from engine import config as config_mod
from engine.config import Config
from engine.sockets import Secure
from engine.zap import Zap

log = logging.getLogger("mailengine.supervisor")


class Curve:
    """The CURVE servers `cfg` asks for (none, either or both) and their ZAP handler."""

    def __init__(self, cfg: Config) -> None:
        # Keys first: a missing key is a ConfigError, raised before anything is touched.
        self.public = auth.CurveServer(cfg.security.curve) \
            if cfg.security.curve.enabled else None
        self.control = auth.CurveServer(cfg.control_curve, "control.curve", "control") \
            if cfg.control_curve.enabled else None
        self._zap: Zap | None = None

    def start(self, ctx: zmq.Context) -> None:
        """The ZAP handler, with each server's list; call before binding any socket."""
        if self.public is None and self.control is None:
            return
        self._zap = Zap(ctx)
        self._zap.start()
        for server, event in ((self.public, "curve_enabled"),
                              (self.control, "control_curve_enabled")):
            if server is not None:
                server.start(self._zap)
                log.info(logs.kv(event, clients=len(server.clients),
                                 allowed_clients=server.folder))

    def secure_public(self) -> Secure | None:
        """What makes ingest and events CURVE servers; None without security.curve."""
        return self.public.secure if self.public is not None else None

    def secure_control(self) -> Secure | None:
        """What makes the control socket a CURVE server; None without control.curve."""
        return self.control.secure if self.control is not None else None

    def reload(self, old: Config, new: Config) -> None:
        """SIGHUP: the lists of keys read again (a bad one keeps the old list); a changed
        key pair or on/off is only logged (it takes a restart)."""
        old_sec, new_sec = old.security, new.security
        if (new_sec.curve.enabled, new_sec.curve.server_secret_key, new_sec.allow_plain_remote) \
                != (old_sec.curve.enabled, old_sec.curve.server_secret_key,
                    old_sec.allow_plain_remote):
            log.warning(logs.kv("reload_needs_restart", key="security"))
        old_cc, new_cc = old.control_curve, new.control_curve
        if (new_cc.enabled, new_cc.server_secret_key) != (old_cc.enabled, old_cc.server_secret_key):
            log.warning(logs.kv("reload_needs_restart", key="control.curve"))
        _reload_clients(self.public, new_sec.curve.allowed_clients)
        _reload_clients(self.control, new_cc.allowed_clients)

    def stop(self) -> None:
        """Before the context is destroyed."""
        if self._zap is not None:
            self._zap.stop()
            self._zap = None


def _reload_clients(server: auth.CurveServer | None, folder: str) -> None:
    """A new allow-list of CURVE clients takes effect at once; a bad one is ignored."""
    if server is None:
        return
    try:
        count = server.reload_clients(folder)
    except config_mod.ConfigError as err:
        log.error(logs.kv("curve_clients_unchanged", error=err, section=server.where))
        return
    log.info(logs.kv("curve_clients_reloaded", clients=count, section=server.where))
