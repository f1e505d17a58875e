"""Configuration: YAML in, frozen dataclasses out, every key checked.

The file is read with a safe YAML loader (PyYAML's `SafeLoader`, which builds
only plain data, plus a check that refuses duplicate keys: YAML would let a
second `smtp:` block silently replace the first). `from_dict` then checks each
key against the schema below and builds immutable dataclasses.

Anything unknown, mistyped or out of range is refused with a `ConfigError`
whose message starts with the dotted path of the key at fault
(`smtp.timeouts.connect: ...`, `ips[1].address: ...`), so an operator can find
it. A key takes its default only when it is absent, never because its value
was bad.

Durations are float seconds and sizes int bytes once loaded, whatever unit the
file used. docs/CONFIG.md documents every key; conf/mailengine.yaml is the
shipped default.
"""
from __future__ import annotations

import datetime
import difflib
import ipaddress
import math
import os
import re
import socket
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field, fields, is_dataclass
from decimal import Decimal
from types import MappingProxyType
from typing import Any, TypeVar

import yaml  # type: ignore[import-untyped, unused-ignore]

DEFAULT_PATH = "/etc/mailengine/mailengine.yaml"
ENV_VAR = "MAILENGINE_CONFIG"

TLS_MODES = ("none", "opportunistic", "required", "verify")
LOG_LEVELS = ("debug", "info", "warning", "error")


class ConfigError(ValueError):
    """A config problem. The message starts with the dotted path of the key at fault.

    `key` is that path ("" for problems with the file itself); `file` is the
    file `load` read, or None for `from_dict`.
    """

    def __init__(self, message: str, *, key: str = "", file: str | None = None) -> None:
        super().__init__(message)
        self.key = key
        self.file = file


# --- the schema -----------------------------------------------------------


@dataclass(frozen=True)
class IpConfig:
    """One sending IP: the address outbound connections bind to, and its EHLO name."""

    address: str
    helo: str


@dataclass(frozen=True)
class Timeouts:
    """Seconds to wait at each SMTP step; defaults from RFC 5321 section 4.5.3.2."""

    connect: float = 30.0
    banner: float = 300.0
    ehlo: float = 300.0
    starttls: float = 120.0
    tls_handshake: float = 60.0
    mail: float = 300.0
    rcpt: float = 300.0
    data: float = 120.0
    data_block: float = 180.0
    final_dot: float = 600.0
    rset: float = 60.0
    quit: float = 10.0
    # Deadlines over several steps, however the server paces its bytes:
    setup: float = 600.0  # connect, banner, EHLO, STARTTLS, handshake, EHLO again
    transaction: float = 1800.0  # MAIL FROM to the reply after the message (and RSET)


@dataclass(frozen=True)
class SmtpConfig:
    """How to talk to destination servers."""

    port: int = 25
    tls: str = "opportunistic"
    tls_broken_ttl: float = 3600.0
    ca_file: str | None = None
    max_reply_lines: int = 100
    max_line_length: int = 4096
    # EHLO keywords the engine acts as if the server had not offered (lower case), as
    # Postfix's smtp_discard_ehlo_keywords: a workaround for a server whose PIPELINING or
    # CHUNKING is broken, and how the benchmarks emulate a naive client.
    discard_ehlo_keywords: tuple[str, ...] = ()
    timeouts: Timeouts = field(default_factory=Timeouts)


@dataclass(frozen=True)
class PoolConfig:
    """Connection reuse, per destination (sending IP, MX host, port, TLS mode)."""

    max_connections: int = 10
    max_messages: int = 100
    idle_timeout: float = 60.0
    connect_backoff: float = 30.0


@dataclass(frozen=True)
class DnsConfig:
    """The resolver for MX lookups; no nameservers means the system resolver."""

    nameservers: tuple[str, ...] = ()
    port: int = 53
    timeout: float = 5.0
    cache_size: int = 10000


@dataclass(frozen=True)
class Route:
    """A fixed next hop for a domain; `port` None means `smtp.port`."""

    host: str
    port: int | None = None

    def __str__(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return host if self.port is None else f"{host}:{self.port}"


@dataclass(frozen=True)
class StatsdConfig:
    """Where metrics go."""

    enabled: bool = True
    host: str = "127.0.0.1"
    port: int = 8125
    prefix: str = "mailengine"


@dataclass(frozen=True)
class LimitsConfig:
    """What intake accepts, and how much one worker holds at once."""

    max_message_size: int = 50 * 1024 * 1024
    max_recipients: int = 1000
    max_in_flight: int = 1000


@dataclass(frozen=True)
class RetryConfig:
    """Waits between attempts (the last repeats) and how long a recipient may wait in all."""

    schedule: tuple[float, ...] = (60.0, 300.0, 900.0, 1800.0, 3600.0, 7200.0, 14400.0)
    max_age: float = 5 * 86400.0


@dataclass(frozen=True)
class ProviderLimits:
    """Limits for one provider, or one sending IP x provider; None inherits."""

    max_connections: int | None = None
    max_messages: int | None = None
    rate: float | None = None
    hourly: int | None = None
    connection_rate: float | None = None


@dataclass(frozen=True)
class ShapingConfig:
    """Pacing per sending IP x provider. `pool` gives the connection defaults."""

    rate: float = 0.0  # messages per second, 0 = unlimited
    hourly: int = 0  # messages per hour, 0 = unlimited
    connection_rate: float = 0.0  # new connections per second, 0 = unlimited
    max_wait: float = 10.0  # longer waits for a turn go back to the spool
    providers: Mapping[str, ProviderLimits] = field(default_factory=lambda: _frozen_mapping())
    ips: Mapping[str, Mapping[str, ProviderLimits]] = field(
        default_factory=lambda: _frozen_mapping())


@dataclass(frozen=True)
class ThrottleRuleConfig:
    """A reply meaning "slow down": every field given must match."""

    name: str = "custom"
    provider: str | None = None
    code: int | None = None
    enhanced: str | None = None  # glob, e.g. "4.7.*"
    text: str | None = None  # regular expression, case-insensitive
    suspend: float = 0.0


@dataclass(frozen=True)
class ThrottleConfig:
    """How the allowed rate adapts when providers push back."""

    decrease: float = 0.5
    increase: float = 0.5
    min_rate: float = 0.05
    start_rate: float = 10.0
    holdoff: float = 2.0
    retry_after: float = 60.0
    default_rules: bool = True
    rules: tuple[ThrottleRuleConfig, ...] = ()


DEFAULT_WARMUP = (50, 100, 200, 400, 800, 1500, 2500, 4000, 6000, 9000, 13000, 18000, 25000,
                  35000, 50000, 70000, 100000)


@dataclass(frozen=True)
class WarmupConfig:
    """Daily caps per provider for new sending IPs."""

    schedule: tuple[int, ...] = DEFAULT_WARMUP
    ips: Mapping[str, str] = field(default_factory=lambda: _frozen_mapping())


@dataclass(frozen=True)
class CurveConfig:
    """ZeroMQ CURVE on `ingest` and `events`: encryption, and only listed clients get in."""

    enabled: bool = False
    server_secret_key: str = "/etc/mailengine/keys/server.key_secret"
    allowed_clients: str = "/etc/mailengine/keys/clients"


@dataclass(frozen=True)
class SecurityConfig:
    """Who may submit jobs, and where mail may not go. See docs/SECURITY.md."""

    curve: CurveConfig = field(default_factory=CurveConfig)
    allow_plain_remote: bool = False  # non-loopback ingest/events/control without CURVE
    allow_private_destinations: bool = False  # MX hosts at loopback, private... addresses
    allowed_destinations: tuple[str, ...] = ()  # networks allowed although not public


def _frozen_mapping() -> Mapping[str, Any]:
    return MappingProxyType({})


@dataclass(frozen=True, kw_only=True)
class Config:
    """The whole configuration. Build it with `load` or `from_dict`, which validate.

    A pool named `default`, of every address in `ips`, always exists unless
    the config defines its own `default`.
    """

    ingest: str = "tcp://127.0.0.1:5570"
    events: str = "tcp://127.0.0.1:5571"
    control: str = "ipc:///run/mailengine/control.sock"
    run_dir: str = "/run/mailengine"
    events_log: str = "/var/log/mailengine/events.jsonl"
    spool: str = "/var/spool/mailengine"
    hostname: str = field(default_factory=socket.getfqdn)
    log_level: str = "info"
    drain_timeout: float = 60.0
    ips: tuple[IpConfig, ...]
    pools: Mapping[str, tuple[str, ...]] = field(default_factory=_frozen_mapping)
    smtp: SmtpConfig = field(default_factory=SmtpConfig)
    pool: PoolConfig = field(default_factory=PoolConfig)
    dns: DnsConfig = field(default_factory=DnsConfig)
    routes: Mapping[str, Route] = field(default_factory=_frozen_mapping)
    statsd: StatsdConfig = field(default_factory=StatsdConfig)
    limits: LimitsConfig = field(default_factory=LimitsConfig)
    retry: RetryConfig = field(default_factory=RetryConfig)
    providers: Mapping[str, str] = field(default_factory=_frozen_mapping)
    shaping: ShapingConfig = field(default_factory=ShapingConfig)
    throttle: ThrottleConfig = field(default_factory=ThrottleConfig)
    warmup: WarmupConfig = field(default_factory=WarmupConfig)
    security: SecurityConfig = field(default_factory=SecurityConfig)

    def __post_init__(self) -> None:
        # Frozen all the way down: copy mappings into read-only proxies.
        pools = dict(self.pools)
        pools.setdefault("default", tuple(ip.address for ip in self.ips))
        object.__setattr__(self, "pools", MappingProxyType(pools))
        object.__setattr__(self, "routes", MappingProxyType(dict(self.routes)))
        object.__setattr__(self, "providers", MappingProxyType(dict(self.providers)))


# --- public entry points --------------------------------------------------


def load(path: str | None = None) -> Config:
    """Read and validate a config file: `path`, else $MAILENGINE_CONFIG, else DEFAULT_PATH."""
    path = path or os.environ.get(ENV_VAR) or DEFAULT_PATH
    data = _read_yaml(path)
    try:
        return from_dict(data)
    except ConfigError as err:
        err.file = path
        raise


def from_dict(data: Mapping[str, Any] | None) -> Config:
    """Validate plain data (as YAML gives it) and build a `Config`; raises ConfigError."""
    raw = dict(_known(_mapping(data, ""), [f.name for f in fields(Config)], ""))
    # hostname first: it is every IP's default helo; ips before pools, which name them.
    if "hostname" in raw:
        hostname = _ehlo_name(raw.pop("hostname"), "hostname")
    else:
        hostname = _default_hostname()
    ips = _ips(raw.pop("ips", None), hostname)
    pools = _pools(raw.pop("pools", None), ips)
    values = {key: _TOP_READERS[key](value, key) for key, value in raw.items()}
    _refuse_shared_endpoints(values)
    _refuse_plain_remote(values)
    return Config(hostname=hostname, ips=ips, pools=pools, **values)


def to_dict(cfg: Config) -> dict[str, Any]:
    """The effective config as plain data (dict, list, str, numbers) that `from_dict` accepts."""
    return {f.name: _plain(getattr(cfg, f.name)) for f in fields(cfg)}


_DURATION = re.compile(r"(\d+(?:\.\d+)?)\s*(ms|s|m|h|d)")
_SECONDS = {"ms": Decimal("0.001"), "s": Decimal(1), "m": Decimal(60), "h": Decimal(3600),
            "d": Decimal(86400)}
_DURATION_HINT = '(use seconds, or a number with a unit ms, s, m, h or d, e.g. "30s")'

_SIZE = re.compile(r"(\d+(?:\.\d+)?)\s*(B|KB|MB|GB|KiB|MiB|GiB)")
_BYTES = {"B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "KiB": 2**10, "MiB": 2**20, "GiB": 2**30}
_SIZE_HINT = '(use bytes, or a number with a unit B, KB, MB, GB, KiB, MiB or GiB, e.g. "50MiB")'


def parse_duration(value: Any, path: str) -> float:
    """Seconds from a number (of seconds) or a string with a unit: "500ms", "30s", "5m", "4d"."""
    if isinstance(value, str):
        match = _DURATION.fullmatch(value.strip())
        if not match:
            raise _error(path, f"not a duration: {_show(value)} {_DURATION_HINT}")
        return float(Decimal(match.group(1)) * _SECONDS[match.group(2)])
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise _error(path, f"must be a duration (got {_show(value)}) {_DURATION_HINT}")
    if not math.isfinite(value) or value < 0:
        raise _error(path, f"must be >= 0 seconds (got {value})")
    return float(value)


def parse_size(value: Any, path: str) -> int:
    """Bytes from an int or a string with a unit: "512KB", "10MB", "50MiB", "1GB"."""
    if isinstance(value, str):
        match = _SIZE.fullmatch(value.strip())
        if not match:
            raise _error(path, f"not a size: {_show(value)} {_SIZE_HINT}")
        return int(Decimal(match.group(1)) * _BYTES[match.group(2)])
    if isinstance(value, bool) or not isinstance(value, int):
        raise _error(path, f"must be a size (got {_show(value)}) {_SIZE_HINT}")
    if value < 0:
        raise _error(path, f"must be >= 0 bytes (got {value})")
    return value


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
                    None, None, f"duplicate key {_show(key)}", key_node.start_mark)
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


# --- generic readers: each takes (value, dotted path) and returns the checked value

T = TypeVar("T")
Reader = Callable[[Any, str], Any]


def _error(path: str, problem: str) -> ConfigError:
    return ConfigError(f"{path or '(top level)'}: {problem}", key=path)


def _show(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


def _join(path: str, key: str) -> str:
    return f"{path}.{key}" if path else key


def _mapping(value: Any, path: str) -> Mapping[str, Any]:
    """A YAML mapping with string keys; an empty section (`smtp:` alone) is {}."""
    if value is None:
        return {}
    if not isinstance(value, Mapping):
        raise _error(path, f"must be a mapping (got {_show(value)})")
    for key in value:
        if not isinstance(key, str):
            raise _error(_join(path, str(key)), "keys must be strings (quote it)")
    return value


def _sequence(value: Any, path: str) -> Sequence[Any]:
    """A YAML list; an empty key (`nameservers:` alone) is []."""
    if value is None:
        return []
    if not isinstance(value, list | tuple):
        raise _error(path, f"must be a list (got {_show(value)})")
    return value


def _known(data: Mapping[str, Any], known: Iterable[str], path: str) -> Iterable[tuple[str, Any]]:
    """The items of `data`, refusing any key not in `known` with a did-you-mean."""
    names = list(known)
    for key in data:
        if key not in names:
            raise _error(_join(path, key), f"unknown key{_suggest(key, names)}")
    return data.items()


def _suggest(key: str, names: list[str]) -> str:
    close = difflib.get_close_matches(key, names, n=1)
    return f" (did you mean {close[0]}?)" if close else f" (known keys: {', '.join(names)})"


def _section(cls: type[T], readers: Mapping[str, Reader]) -> Callable[[Any, str], T]:
    """A reader for a mapping of `readers`' keys, built into dataclass `cls`."""
    def read(value: Any, path: str) -> T:
        data = _mapping(value, path)
        return cls(**{k: readers[k](v, _join(path, k)) for k, v in _known(data, readers, path)})
    return read


def _integer(low: int, high: int | None = None) -> Reader:
    def read(value: Any, path: str) -> int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise _error(path, f"must be an integer (got {_show(value)})")
        if value < low or (high is not None and value > high):
            bounds = f">= {low}" if high is None else f"from {low} to {high}"
            raise _error(path, f"must be {bounds} (got {value})")
        return value
    return read


_PORT = _integer(1, 65535)


def _boolean(value: Any, path: str) -> bool:
    if not isinstance(value, bool):
        raise _error(path, f"must be true or false (got {_show(value)})")
    return value


def _text(value: Any, path: str) -> str:
    if not isinstance(value, str):
        raise _error(path, f"must be a string (got {_show(value)})")
    return value


def _nonempty(value: Any, path: str) -> str:
    if not _text(value, path):
        raise _error(path, "must not be empty")
    return str(value)


def _optional(read: Reader) -> Reader:
    return lambda value, path: None if value is None else read(value, path)


def _choice(*options: str) -> Reader:
    def read(value: Any, path: str) -> str:
        if value not in options:  # works for non-strings too: they are never equal
            raise _error(path, f"must be one of {', '.join(options)} (got {_show(value)})")
        return str(value)
    return read


def _matching(pattern: str, what: str) -> Reader:
    compiled = re.compile(pattern)

    def read(value: Any, path: str) -> str:
        if not compiled.fullmatch(_text(value, path)):
            raise _error(path, f"must be {what} (got {_show(value)})")
        return str(value)
    return read


def _duration(positive: bool = False) -> Reader:
    def read(value: Any, path: str) -> float:
        seconds = parse_duration(value, path)
        if positive and seconds == 0:
            raise _error(path, "must be more than 0 seconds")
        return seconds
    return read


def _size(value: Any, path: str) -> int:
    size = parse_size(value, path)
    if size == 0:
        raise _error(path, "must be more than 0 bytes")
    return size


def _tuple_of(read: Reader, nonempty: bool = False) -> Reader:
    def read_all(value: Any, path: str) -> tuple[Any, ...]:
        items = _sequence(value, path)
        if nonempty and not items:
            raise _error(path, "must list at least one value")
        return tuple(read(item, f"{path}[{i}]") for i, item in enumerate(items))
    return read_all


# --- addresses and names ----------------------------------------------------

_LABEL = r"[A-Za-z0-9](?:[A-Za-z0-9-]{0,61}[A-Za-z0-9])?"
_HOSTNAME = re.compile(rf"{_LABEL}(?:\.{_LABEL})*")


def _ip_address(value: Any, path: str) -> str:
    """An IPv4 or IPv6 address as text, normalised ("2001:DB8::01" -> "2001:db8::1")."""
    if not isinstance(value, str):
        # Unquoted IPv6 like 1:2:3:4:5:6:7:8 reads as a YAML 1.1 base-60 integer.
        raise _error(path, f"must be an IP address as a string (got {_show(value)}; quote it)")
    try:
        return str(ipaddress.ip_address(value))
    except ValueError:
        raise _error(path, f"not an IP address: {_show(value)}") from None


def _is_hostname(value: str) -> bool:
    return len(value) <= 253 and _HOSTNAME.fullmatch(value) is not None


def _ehlo_name(value: Any, path: str) -> str:
    """A host name, or an RFC 5321 address literal: "[192.0.2.1]", "[IPv6:2001:db8::1]"."""
    name = _text(value, path)
    if _is_hostname(name) or _is_address_literal(name):
        return name
    raise _error(path, f"not a host name or address literal like [192.0.2.1]: {_show(value)}")


def _is_address_literal(name: str) -> bool:
    if not (name.startswith("[") and name.endswith("]")):
        return False
    inner = name[1:-1]
    version = 6 if inner[:5].lower() == "ipv6:" else 4
    try:
        return ipaddress.ip_address(inner[5:] if version == 6 else inner).version == version
    except ValueError:
        return False


def _host(value: Any, path: str) -> str:
    """A host name or an IP address (normalised)."""
    name = _text(value, path)
    try:
        return str(ipaddress.ip_address(name))
    except ValueError:
        pass
    if not _is_hostname(name):
        raise _error(path, f"not a host name or IP address: {_show(value)}")
    return name.lower()


def _endpoint(value: Any, path: str) -> str:
    if not re.fullmatch(r"(tcp|ipc|inproc)://.+", _text(value, path)):
        raise _error(path, f"must be a ZeroMQ endpoint starting with tcp://, ipc:// or inproc:// "
                           f"(got {_show(value)})")
    return str(value)


def _refuse_shared_endpoints(values: Mapping[str, Any]) -> None:
    """Two sockets bound to one endpoint would fail at start with a vaguer error."""
    seen: dict[str, str] = {}
    for key in ("ingest", "events", "control"):
        endpoint = values.get(key, getattr(Config, key))  # a class attribute holds the default
        if endpoint in seen:
            raise _error(key, f"same endpoint as {seen[endpoint]}: {endpoint}")
        seen[endpoint] = key


def _refuse_plain_remote(values: Mapping[str, Any]) -> None:
    """A socket other machines can reach must be authenticated (docs/SECURITY.md).

    Without CURVE, anyone who reaches `ingest` may submit mail (an open relay), and
    anyone who reaches `events` reads every recipient. CURVE covers ingest and events;
    `control` has no authentication, so it stays local unless allow_plain_remote.
    """
    security = values.get("security") or SecurityConfig()
    if security.allow_plain_remote:
        return
    for key in ("ingest", "events", "control"):
        if security.curve.enabled and key != "control":
            continue
        endpoint = values.get(key, getattr(Config, key))
        host = endpoint_host(endpoint)
        if host is None or is_loopback_host(host):
            continue
        fix = "bind it to 127.0.0.1 or an ipc:// path, "
        fix += "" if key == "control" else "enable security.curve, "
        raise _error(key, f"{endpoint} can be reached from other machines, and without "
                          f"authentication anyone who reaches it {_EXPOSURE[key]}; {fix}"
                          "or set security.allow_plain_remote: true (docs/SECURITY.md)")


_EXPOSURE = {"ingest": "may submit mail", "events": "reads every event",
             "control": "reads the engine's status"}


def endpoint_host(endpoint: str) -> str | None:
    """The host part of a tcp:// endpoint ("*", an address, a name or an interface);
    None for ipc:// and inproc://, which only this machine can reach."""
    if not endpoint.startswith("tcp://"):
        return None
    host = endpoint[len("tcp://"):].rpartition(":")[0] or endpoint[len("tcp://"):]
    return host.split(";")[-1]  # "source;address" forms: the address binds


def is_loopback_host(host: str) -> bool:
    """True for a host only this machine can reach: a loopback address, localhost, lo."""
    if host.lower() in ("localhost", "lo"):
        return True
    try:
        address = ipaddress.ip_address(host.strip("[]"))
    except ValueError:
        return False  # "*", another interface or a host name: assume reachable
    mapped = getattr(address, "ipv4_mapped", None)
    return bool((mapped or address).is_loopback)


def _refuse_repeats(values: Sequence[str], path: str) -> None:
    """`path` has a `{}` where the index goes: "ips[{}].address"."""
    first: dict[str, int] = {}
    for i, value in enumerate(values):
        if value in first:
            also = path.format(first[value])
            raise _error(path.format(i), f"{value} is listed twice (also {also})")
        first[value] = i


def _default_hostname() -> str:
    fqdn = socket.getfqdn()
    try:
        return _ehlo_name(fqdn, "hostname")
    except ConfigError:
        raise _error("hostname", f"this machine's name {fqdn!r} is not a valid EHLO name; "
                                 "set hostname") from None


# --- sections that need more than one key's worth of checking -------------


def _ips(value: Any, hostname: str) -> tuple[IpConfig, ...]:
    items = _sequence(value, "ips")
    if not items:
        raise _error("ips", "required: at least one sending IP, e.g. [{address: 203.0.113.10}]")
    ips = tuple(_ip(item, f"ips[{i}]", hostname) for i, item in enumerate(items))
    _refuse_repeats([ip.address for ip in ips], "ips[{}].address")
    return ips


def _ip(value: Any, path: str, hostname: str) -> IpConfig:
    if isinstance(value, str | int):  # int: an unquoted IPv6 that YAML read as base 60
        value = {"address": value}  # shorthand: `- 203.0.113.10`
    data = dict(_known(_mapping(value, path), ("address", "helo"), path))
    if "address" not in data:
        raise _error(f"{path}.address", "required")
    address = _ip_address(data["address"], f"{path}.address")
    helo = _ehlo_name(data["helo"], f"{path}.helo") if "helo" in data else hostname
    return IpConfig(address=address, helo=helo)


_POOL_NAME = re.compile(r"[A-Za-z0-9_-]+")


def _pools(value: Any, ips: tuple[IpConfig, ...]) -> dict[str, tuple[str, ...]]:
    addresses = {ip.address for ip in ips}
    pools = {}
    for name, members in _mapping(value, "pools").items():
        if not _POOL_NAME.fullmatch(name):
            raise _error(f"pools.{name}" if name else "pools",
                         f"pool names are letters, digits, _ and - (got {_show(name)})")
        pools[name] = _pool(members, f"pools.{name}", addresses)
    return pools


def _pool(value: Any, path: str, addresses: set[str]) -> tuple[str, ...]:
    members = _tuple_of(_ip_address, nonempty=True)(value, path)
    for i, address in enumerate(members):
        if address not in addresses:
            raise _error(f"{path}[{i}]", f"{address} is not in ips")
    _refuse_repeats(members, path + "[{}]")
    return tuple(members)


_BRACKETED = re.compile(r"\[([^\]]+)\](?::(.*))?")
_ROUTE_HINT = 'must be "host", "host:port" or "[IPv6]:port"'


def _routes(value: Any, path: str) -> dict[str, Route]:
    routes: dict[str, Route] = {}
    for domain, target in _mapping(value, path).items():
        where = _join(path, domain)
        key = domain.lower()
        if key != "*" and not _is_hostname(key):
            raise _error(where, 'not a domain name (IDN in its xn-- form), nor "*"')
        if key in routes:
            raise _error(where, f"{key} is listed twice")
        routes[key] = _route(target, where)
    return routes


def _route(value: Any, path: str) -> Route:
    if not isinstance(value, str) or not value:
        raise _error(path, f"{_ROUTE_HINT} (got {_show(value)})")
    bracketed = _BRACKETED.fullmatch(value)
    if bracketed:
        host, port = _ip_address(bracketed.group(1), path), bracketed.group(2)
    elif value.count(":") > 1:
        raise _error(path, f"IPv6 goes in brackets, e.g. [2001:db8::1]:25 (got {_show(value)})")
    else:
        name, colon, port_text = value.partition(":")
        host, port = _host(name, path), (port_text if colon else None)
    return Route(host=host, port=None if port is None else _route_port(port, path))


def _route_port(text: str, path: str) -> int:
    if not text.isdigit():
        raise _error(path, f"port must be a number (got {_show(text)})")
    return int(_PORT(int(text), path))


# --- the readers of each section ---------------------------------------------

_TIMEOUTS = _section(Timeouts, {f.name: _duration(positive=True) for f in fields(Timeouts)})


def _ehlo_keywords(value: Any, path: str) -> tuple[str, ...]:
    """EHLO keywords (RFC 5321 4.1.1.1: letters, digits and '-'), lower-cased."""
    read = _matching(r"[A-Za-z0-9][A-Za-z0-9-]*", "an EHLO keyword such as PIPELINING")
    keywords = tuple(k.lower() for k in _tuple_of(read)(value, path))
    _refuse_repeats(keywords, path + "[{}]")
    return keywords


_SMTP = _section(SmtpConfig, {
    "port": _PORT,
    "tls": _choice(*TLS_MODES),
    "tls_broken_ttl": _duration(),
    "ca_file": _optional(_nonempty),
    "max_reply_lines": _integer(1),
    "max_line_length": _integer(512),  # RFC 5321 4.5.3.1.5: replies may be 512 octets
    "discard_ehlo_keywords": _ehlo_keywords,
    "timeouts": _TIMEOUTS,
})

_POOL = _section(PoolConfig, {
    "max_connections": _integer(1),
    "max_messages": _integer(1),
    "idle_timeout": _duration(),
    "connect_backoff": _duration(),
})


def _nameservers(value: Any, path: str) -> tuple[str, ...]:
    servers: tuple[str, ...] = _tuple_of(_ip_address)(value, path)
    _refuse_repeats(servers, path + "[{}]")
    return servers


_DNS = _section(DnsConfig, {
    "nameservers": _nameservers,
    "port": _PORT,
    "timeout": _duration(positive=True),
    "cache_size": _integer(0),
})

_STATSD = _section(StatsdConfig, {
    "enabled": _boolean,
    "host": _host,
    "port": _PORT,
    "prefix": _matching(r"[A-Za-z0-9_-]+(\.[A-Za-z0-9_-]+)*",
                        "letters, digits, _ and - in dot-separated parts"),
})

_LIMITS = _section(LimitsConfig, {
    "max_message_size": _size,
    "max_recipients": _integer(1),
    "max_in_flight": _integer(1),
})

_RETRY = _section(RetryConfig, {
    "schedule": _tuple_of(_duration(positive=True), nonempty=True),
    "max_age": _duration(),
})


def _number(low: float, high: float | None = None, above: bool = False) -> Reader:
    """A real number: `low` <= value (< if `above`) <= `high`."""
    def read(value: Any, path: str) -> float:
        number = isinstance(value, int | float) and not isinstance(value, bool)
        if not number or not math.isfinite(value):
            raise _error(path, f"must be a number (got {_show(value)})")
        if value < low or (above and value == low) or (high is not None and value > high):
            bounds = f"{'>' if above else '>='} {low}"
            bounds += f" and <= {high}" if high is not None else ""
            raise _error(path, f"must be {bounds} (got {value})")
        return float(value)
    return read


_PROVIDER_LIMITS = _section(ProviderLimits, {
    "max_connections": _optional(_integer(1)),
    "max_messages": _optional(_integer(1)),
    "rate": _optional(_number(0)),
    "hourly": _optional(_integer(0)),
    "connection_rate": _optional(_number(0)),
})
_PROVIDER_NAME = re.compile(r"[a-z0-9][a-z0-9_.-]*")


def _provider_name(name: str, path: str) -> str:
    if not _PROVIDER_NAME.fullmatch(name):
        raise _error(path, "provider names are lowercase letters, digits, '.', '_' and '-'")
    return name


def _per_provider(value: Any, path: str) -> Mapping[str, ProviderLimits]:
    return MappingProxyType({
        _provider_name(name, _join(path, name)): _PROVIDER_LIMITS(limits, _join(path, name))
        for name, limits in _mapping(value, path).items()})


def _per_ip(value: Any, path: str) -> Mapping[str, Mapping[str, ProviderLimits]]:
    return MappingProxyType({_ip_address(ip, _join(path, ip)): _per_provider(v, _join(path, ip))
                             for ip, v in _mapping(value, path).items()})


_SHAPING = _section(ShapingConfig, {
    "rate": _number(0),
    "hourly": _integer(0),
    "connection_rate": _number(0),
    "max_wait": _duration(),
    "providers": _per_provider,
    "ips": _per_ip,
})


def _regex(value: Any, path: str) -> str:
    text = _nonempty(value, path)
    try:
        re.compile(text)
    except re.error as err:
        raise _error(path, f"not a regular expression: {err}") from None
    return text


_RULE_FIELDS = _section(ThrottleRuleConfig, {
    "name": _nonempty,
    "provider": _optional(lambda v, p: _provider_name(_text(v, p), p)),
    "code": _optional(_integer(400, 599)),
    "enhanced": _optional(_matching(r"[245*?]\.[0-9*?]{1,3}\.[0-9*?]{1,3}",
                                    'an enhanced status or glob, e.g. "4.7.*"')),
    "text": _optional(_regex),
    "suspend": _duration(),
})


def _rule(value: Any, path: str) -> ThrottleRuleConfig:
    rule = _RULE_FIELDS(value, path)
    if rule.code is None and rule.enhanced is None and rule.text is None:
        raise _error(path, "a rule needs at least one of code, enhanced or text")
    return rule


_THROTTLE = _section(ThrottleConfig, {
    "decrease": _number(0, 1, above=True),
    "increase": _number(0),
    "min_rate": _number(0, above=True),
    "start_rate": _number(0, above=True),
    "holdoff": _duration(),
    "retry_after": _duration(),
    "default_rules": _boolean,
    "rules": _tuple_of(_rule),
})


def _iso_date(value: Any, path: str) -> str:
    text = value.isoformat() if isinstance(value, datetime.date) else value
    try:
        return datetime.date.fromisoformat(_text(text, path)).isoformat()
    except ValueError:
        raise _error(path, f"must be a date like 2026-11-30 (got {_show(value)})") from None


_WARMUP = _section(WarmupConfig, {
    "schedule": _tuple_of(_integer(1), nonempty=True),
    "ips": lambda v, p: MappingProxyType({_ip_address(ip, _join(p, ip)): _iso_date(d, _join(p, ip))
                                          for ip, d in _mapping(v, p).items()}),
})


def _providers(value: Any, path: str) -> Mapping[str, str]:
    table = {}
    for suffix, name in _mapping(value, path).items():
        where = _join(path, suffix)
        if not _is_hostname(suffix):
            raise _error(where, "must be an MX host name suffix, e.g. mx.example.net")
        table[suffix.lower()] = _provider_name(_text(name, where), where)
    return table

def _network(value: Any, path: str) -> str:
    """A network in CIDR form ("10.20.0.0/16"); a bare address is a /32 or /128."""
    text = _text(value, path)
    try:
        return str(ipaddress.ip_network(text.strip()))
    except ValueError as err:
        raise _error(path, f"not a network like 10.20.0.0/16 or fd00::/8: {_show(value)}"
                           f" ({err})") from None


_CURVE = _section(CurveConfig, {
    "enabled": _boolean,
    "server_secret_key": _nonempty,
    "allowed_clients": _nonempty,
})

_SECURITY = _section(SecurityConfig, {
    "curve": _CURVE,
    "allow_plain_remote": _boolean,
    "allow_private_destinations": _boolean,
    "allowed_destinations": _tuple_of(_network),
})

_TOP_READERS: dict[str, Reader] = {
    "ingest": _endpoint,
    "events": _endpoint,
    "control": _endpoint,
    "run_dir": _nonempty,
    "events_log": _text,  # "" turns the file off
    "spool": _nonempty,
    "log_level": _choice(*LOG_LEVELS),
    "drain_timeout": _duration(),
    "smtp": _SMTP,
    "pool": _POOL,
    "dns": _DNS,
    "routes": _routes,
    "statsd": _STATSD,
    "limits": _LIMITS,
    "retry": _RETRY,
    "providers": _providers,
    "shaping": _SHAPING,
    "throttle": _THROTTLE,
    "warmup": _WARMUP,
    "security": _SECURITY,
}


# --- back to plain data ------------------------------------------------------


def _plain(value: Any) -> Any:
    if isinstance(value, Route):
        return str(value)  # the same "host:port" form the file uses
    if is_dataclass(value) and not isinstance(value, type):
        return {f.name: _plain(getattr(value, f.name)) for f in fields(value)}
    if isinstance(value, Mapping):
        return {key: _plain(item) for key, item in value.items()}
    if isinstance(value, tuple):
        return [_plain(item) for item in value]
    return value
