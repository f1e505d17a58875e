"""From a file to a `Config` and back: `load`, `from_dict`, `to_dict`.

The file is read with a safe YAML loader (PyYAML's `SafeLoader`, which builds
only plain data, plus a check that refuses duplicate keys: YAML would let a
second `smtp:` block silently replace the first). `from_dict` checks the keys
that depend on each other (the IPs, their pools, the endpoints and who may
reach them) and hands every other section to its reader.
"""
from __future__ import annotations

import os
import socket
from collections.abc import Mapping
from dataclasses import fields, is_dataclass
from typing import Any

import yaml  # type: ignore[import-untyped, unused-ignore]

from engine.config import sections
from engine.config.schema import (
    DEFAULT_PATH,
    ENV_VAR,
    Config,
    ControlCurveConfig,
    DnsConfig,
    Route,
    SecurityConfig,
    TlsPolicyConfig,
    TlsRptConfig,
)
from engine.config.values import (
    ConfigError,
    boolean,
    ehlo_name,
    endpoint,
    endpoint_host,
    error,
    is_loopback_host,
    join,
    known,
    mapping,
    nonempty,
    show,
    text,
)
from engine.config.values import (
    section as reader_of,
)

# Keys renamed, by their old name: still read, with a warning that names the new one.
RENAMED = {"pools": "ip_pools"}
# Keys that no longer do anything (section, key): accepted, with a warning that says why.
RETIRED = {("throttle", "holdoff"): "a push-back is now answered once for the mail sent"
                                    " before it, whenever it comes (docs/SHAPING.md)"}

# The top-level keys a file may hold: Config's fields, less what is not read from the file
# (`control_curve` is written inside `control`).
_TOP_KEYS = [f.name for f in fields(Config) if f.name not in ("warnings", "control_curve")]

_CONTROL_CURVE = reader_of(ControlCurveConfig, {
    "enabled": boolean,
    "server_secret_key": nonempty,
    "allowed_clients": nonempty,
    "client_key": text,
})


def file_of(path: str | None = None) -> str:
    """The file `load(path)` reads: `path`, else $MAILENGINE_CONFIG, else DEFAULT_PATH."""
    return path or os.environ.get(ENV_VAR) or DEFAULT_PATH


def load(path: str | None = None) -> Config:
    """Read and validate a config file: `path`, else $MAILENGINE_CONFIG, else DEFAULT_PATH."""
    path = file_of(path)
    data = _read_yaml(path)
    try:
        return from_dict(data)
    except ConfigError as err:
        err.file = path
        raise


def from_dict(data: Mapping[str, Any] | None) -> Config:
    """Validate plain data (as YAML gives it) and build a `Config`; raises ConfigError."""
    raw, warnings = _renamed(dict(mapping(data, "")))
    raw, retired = _retired(raw)
    warnings += retired
    raw = dict(known(raw, _TOP_KEYS, ""))
    # hostname first: it is every IP's default helo; ips before ip_pools, which name them.
    if "hostname" in raw:
        hostname = ehlo_name(raw.pop("hostname"), "hostname")
    else:
        hostname = _default_hostname()
    ips = sections.ips(raw.pop("ips", None), hostname)
    ip_pools = sections.ip_pools(raw.pop("ip_pools", None), _given_as("ip_pools", data), ips)
    control = raw.pop("control", None)
    values = {key: sections.TOP_READERS[key](value, key) for key, value in raw.items()}
    if control is not None:
        values["control"], values["control_curve"] = read_control(control, "control")
    _refuse_shared_endpoints(values)
    _refuse_unknown_pools(values, ip_pools)
    _refuse_plain_remote(values)
    _refuse_untrusted_dane(values)
    _refuse_tlsrpt_without_sender(values, hostname)
    return Config(hostname=hostname, ips=ips, ip_pools=ip_pools, warnings=warnings, **values)


def to_dict(cfg: Config) -> dict[str, Any]:
    """The effective config as plain data (dict, list, str, numbers) that `from_dict` accepts."""
    plain: dict[str, Any] = _plain(cfg)
    if cfg.control_curve != ControlCurveConfig():
        plain["control"] = {"endpoint": cfg.control, "curve": _plain(cfg.control_curve)}
    return plain


def read_control(value: Any, path: str) -> tuple[str, ControlCurveConfig]:
    """`control`: the endpoint, or `{endpoint, curve: {...}}` (CURVE on a tcp control
    socket: its key pair and the operators' public keys, docs/OPERATIONS.md)."""
    if not isinstance(value, Mapping):
        return endpoint(value, path), ControlCurveConfig()
    data = dict(known(mapping(value, path), ("endpoint", "curve"), path))
    where = endpoint(data.get("endpoint", Config.control), join(path, "endpoint"))
    curve = _CONTROL_CURVE(data.get("curve", {}), join(path, "curve"))
    if curve.enabled and where.startswith("inproc://"):
        raise error(join(join(path, "curve"), "enabled"), "CURVE needs a tcp:// or ipc:// endpoint")
    return where, curve


def _renamed(raw: dict[str, Any]) -> tuple[dict[str, Any], tuple[str, ...]]:
    """`raw` with old key names read as the new ones, and a warning for each."""
    warnings = []
    for old, new in RENAMED.items():
        if old not in raw:
            continue
        if new in raw:
            raise error(old, f"the old name of {new}; give one of them, not both")
        raw[new] = raw.pop(old)
        warnings.append(f"{old}: is now called {new}; rename the key "
                        "(the old name is still accepted)")
    return raw, tuple(warnings)


def _retired(raw: dict[str, Any]) -> tuple[dict[str, Any], tuple[str, ...]]:
    """`raw` without the retired keys it holds, and a warning for each."""
    warnings = []
    for (section, key), why in RETIRED.items():
        values = raw.get(section)
        if isinstance(values, Mapping) and key in values:
            raw[section] = {k: v for k, v in values.items() if k != key}
            warnings.append(f"{section}.{key}: no longer used: {why}; remove the key")
    return raw, tuple(warnings)


def _given_as(key: str, data: Mapping[str, Any] | None) -> str:
    """The name `key` has in the file: its old name if the file used that (for error paths)."""
    old = next((o for o, new in RENAMED.items() if new == key), None)
    return old if old is not None and data is not None and old in data else key


def _default_hostname() -> str:
    fqdn = socket.getfqdn()
    try:
        return ehlo_name(fqdn, "hostname")
    except ConfigError:
        raise error("hostname", f"this machine's name {fqdn!r} is not a valid EHLO name; "
                                "set hostname") from None


def _refuse_shared_endpoints(values: Mapping[str, Any]) -> None:
    """Two sockets bound to one endpoint would fail at start with a vaguer error."""
    seen: dict[str, str] = {}
    for key in ("ingest", "events", "control"):
        endpoint = values.get(key, getattr(Config, key))  # a class attribute holds the default
        if endpoint in seen:
            raise error(key, f"same endpoint as {seen[endpoint]}: {endpoint}")
        seen[endpoint] = key


def _refuse_unknown_pools(values: Mapping[str, Any], ip_pools: Mapping[str, Any]) -> None:
    """`shaping.ip_pools` names IP groups of `ip_pools` (or `default`: every IP, unless
    the config defines its own)."""
    shaping = values.get("shaping")
    known_pools = set(ip_pools) | {"default"}
    for pool in shaping.ip_pools if shaping is not None else ():
        if pool not in known_pools:
            listed = ", ".join(sorted(known_pools)) or "none"
            raise error(f"shaping.ip_pools.{pool}",
                        f"no IP group {pool} in ip_pools (there are: {listed})")


def _refuse_untrusted_dane(values: Mapping[str, Any]) -> None:
    """DANE believes the resolver's AD bit: without a resolver said to validate, an attacker
    on the path could forge TLSA records as easily as strip them."""
    policy = values.get("tls_policy") or TlsPolicyConfig()
    dns = values.get("dns") or DnsConfig()
    if dns.trusted_ad:
        return
    forced = [f"tls_policy.{table}.{name}" for table in ("domains", "providers")
              for name, how in getattr(policy, table).items() if how == "dane"]
    if policy.dane or forced:
        raise error("tls_policy.dane" if policy.dane else forced[0],
                    "DANE needs a validating resolver the engine trusts: set"
                    " dns.trusted_ad: true (and dns.nameservers to that resolver, e.g. a local"
                    " unbound), or turn DANE off (docs/SECURITY.md)")


def _refuse_tlsrpt_without_sender(values: Mapping[str, Any], hostname: str) -> None:
    """Mailed TLS-RPT reports come from `tlsrpt.sender`, by default an address at the
    hostname: a name without a dot (a bare host name, an address literal) makes none."""
    tlsrpt = values.get("tlsrpt") or TlsRptConfig()
    if tlsrpt.enabled and not tlsrpt.sender and ("." not in hostname
                                                 or hostname.startswith("[")):
        raise error("tlsrpt.sender", f"set it: the default, tlsrpt-noreply@{hostname}, is no"
                    " address mail can come from (hostname is not a domain name)")


_EXPOSURE = {"ingest": "may submit mail", "events": "reads every event",
             "control": "reads the engine's status"}


def _refuse_plain_remote(values: Mapping[str, Any]) -> None:
    """A socket other machines can reach must be authenticated (docs/SECURITY.md).

    Without CURVE, anyone who reaches `ingest` may submit mail (an open relay), and
    anyone who reaches `events` reads every recipient. `security.curve` covers ingest
    and events, `control.curve` the control socket.
    """
    security = values.get("security") or SecurityConfig()
    if security.allow_plain_remote:
        return
    control_curve = values.get("control_curve") or ControlCurveConfig()
    for key in ("ingest", "events", "control"):
        if security.curve.enabled if key != "control" else control_curve.enabled:
            continue
        endpoint = values.get(key, getattr(Config, key))
        host = endpoint_host(endpoint)
        if host is None or is_loopback_host(host):
            continue
        fix = "bind it to 127.0.0.1 or an ipc:// path, "
        fix += "enable control.curve, " if key == "control" else "enable security.curve, "
        raise error(key, f"{endpoint} can be reached from other machines, and without "
                         f"authentication anyone who reaches it {_EXPOSURE[key]}; {fix}"
                         "or set security.allow_plain_remote: true (docs/SECURITY.md)")


# --- reading the file ------------------------------------------------------


class _StrictLoader(yaml.SafeLoader):  # type: ignore[misc, unused-ignore]
    """SafeLoader that refuses a key given twice in one mapping."""

    def construct_mapping(self, node: Any, deep: bool = False) -> Any:
        seen: set[Any] = set()
        for key_node, _ in node.value if isinstance(node, yaml.MappingNode) else ():
            if key_node.tag == "tag:yaml.org,2002:merge":
                continue  # `<<: *anchor` merges may be overridden: that is their point
            key = self.construct_object(key_node, deep=True)
            if _hashable(key) and key in seen:
                raise yaml.constructor.ConstructorError(
                    None, None, f"duplicate key {show(key)}", key_node.start_mark)
            if _hashable(key):
                seen.add(key)
        return super().construct_mapping(node, deep)


def _hashable(value: Any) -> bool:
    try:
        hash(value)
    except TypeError:
        return False
    return True


def _read_yaml(path: str) -> Any:
    try:
        with open(path, "rb") as stream:  # bytes: YAML detects the encoding itself
            return yaml.load(stream, Loader=_StrictLoader)
    except OSError as err:
        raise ConfigError(f"{path}: cannot read: {err.strerror or err}", file=path) from err
    except yaml.MarkedYAMLError as err:
        raise _yaml_error(path, err) from err
    except yaml.YAMLError as err:
        raise ConfigError(f"{path}: YAML error: {err}", file=path) from err


def _yaml_error(path: str, err: yaml.MarkedYAMLError) -> ConfigError:
    mark = err.problem_mark or err.context_mark
    where = f"{path}:{mark.line + 1}" if mark else path
    column = f" (column {mark.column + 1})" if mark else ""
    problem = " ".join(p for p in (err.context, err.problem) if p)
    return ConfigError(f"{where}: YAML syntax error: {problem}{column}", file=path)


# --- back to plain data ------------------------------------------------------


def _plain(value: Any) -> Any:
    if isinstance(value, Route):
        return str(value)  # the same "host:port" form the file uses
    if is_dataclass(value) and not isinstance(value, type):
        return {f.name: _plain(getattr(value, f.name)) for f in fields(value)
                if f.metadata.get("plain", True)}
    if isinstance(value, Mapping):
        return {key: _plain(item) for key, item in value.items()}
    if isinstance(value, tuple):
        return [_plain(item) for item in value]
    return value

