"""Reading one value: each reader takes (value, dotted path) and returns the checked value.

A bad value raises `ConfigError` whose message starts with the path, so the
operator can find the key. The readers of whole sections are built from these in
engine.config.sections; the factories here (`integer(1)`, `duration(positive=True)`,
`tuple_of(reader)`, `section(cls, readers)`...) return readers.
"""
from __future__ import annotations

import datetime
import difflib
import ipaddress
import math
import re
from collections.abc import Callable, Iterable, Mapping, Sequence
from decimal import Decimal
from typing import Any, TypeVar

from engine.config.names import is_hostname

T = TypeVar("T")
Reader = Callable[[Any, str], Any]


class ConfigError(ValueError):
    """A config problem. The message starts with the dotted path of the key at fault.

    `key` is that path ("" for problems with the file itself); `file` is the
    file `load` read, or None for `from_dict`.
    """

    def __init__(self, message: str, *, key: str = "", file: str | None = None) -> None:
        super().__init__(message)
        self.key = key
        self.file = file


def error(path: str, problem: str) -> ConfigError:
    return ConfigError(f"{path or '(top level)'}: {problem}", key=path)


def show(value: Any) -> str:
    """`value` as the operator wrote it, cut short."""
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


def join(path: str, key: str) -> str:
    return f"{path}.{key}" if path else key


# --- structure ---------------------------------------------------------------


def mapping(value: Any, path: str) -> Mapping[str, Any]:
    """A YAML mapping with string keys; an empty section (`smtp:` alone) is {}."""
    if value is None:
        return {}
    if not isinstance(value, Mapping):
        raise error(path, f"must be a mapping (got {show(value)})")
    for key in value:
        if not isinstance(key, str):
            raise error(join(path, str(key)), "keys must be strings (quote it)")
    return value


def sequence(value: Any, path: str) -> Sequence[Any]:
    """A YAML list; an empty key (`nameservers:` alone) is []."""
    if value is None:
        return []
    if not isinstance(value, list | tuple):
        raise error(path, f"must be a list (got {show(value)})")
    return value


def known(data: Mapping[str, Any], names: Iterable[str], path: str) -> Iterable[tuple[str, Any]]:
    """The items of `data`, refusing any key not in `names` with a did-you-mean."""
    names = list(names)
    for key in data:
        if key not in names:
            raise error(join(path, key), f"unknown key{_suggest(key, names)}")
    return data.items()


def _suggest(key: str, names: list[str]) -> str:
    close = difflib.get_close_matches(key, names, n=1)
    return f" (did you mean {close[0]}?)" if close else f" (known keys: {', '.join(names)})"


def section(cls: type[T], readers: Mapping[str, Reader]) -> Callable[[Any, str], T]:
    """A reader for a mapping of `readers`' keys, built into dataclass `cls`."""
    def read(value: Any, path: str) -> T:
        data = mapping(value, path)
        return cls(**{k: readers[k](v, join(path, k)) for k, v in known(data, readers, path)})
    return read


def tuple_of(read: Reader, nonempty: bool = False) -> Reader:
    def read_all(value: Any, path: str) -> tuple[Any, ...]:
        items = sequence(value, path)
        if nonempty and not items:
            raise error(path, "must list at least one value")
        return tuple(read(item, f"{path}[{i}]") for i, item in enumerate(items))
    return read_all


def optional(read: Reader) -> Reader:
    return lambda value, path: None if value is None else read(value, path)


def refuse_repeats(values: Sequence[str], path: str) -> None:
    """`path` has a `{}` where the index goes: "ips[{}].address"."""
    first: dict[str, int] = {}
    for i, value in enumerate(values):
        if value in first:
            also = path.format(first[value])
            raise error(path.format(i), f"{value} is listed twice (also {also})")
        first[value] = i


# --- scalars -----------------------------------------------------------------


def integer(low: int, high: int | None = None) -> Reader:
    def read(value: Any, path: str) -> int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise error(path, f"must be an integer (got {show(value)})")
        if value < low or (high is not None and value > high):
            bounds = f">= {low}" if high is None else f"from {low} to {high}"
            raise error(path, f"must be {bounds} (got {value})")
        return value
    return read


PORT = integer(1, 65535)


def number(low: float, high: float | None = None, above: bool = False) -> Reader:
    """A real number: `low` <= value (< if `above`) <= `high`."""
    def read(value: Any, path: str) -> float:
        is_number = isinstance(value, int | float) and not isinstance(value, bool)
        if not is_number or not math.isfinite(value):
            raise error(path, f"must be a number (got {show(value)})")
        if value < low or (above and value == low) or (high is not None and value > high):
            bounds = f"{'>' if above else '>='} {low}"
            bounds += f" and <= {high}" if high is not None else ""
            raise error(path, f"must be {bounds} (got {value})")
        return float(value)
    return read


def boolean(value: Any, path: str) -> bool:
    if not isinstance(value, bool):
        raise error(path, f"must be true or false (got {show(value)})")
    return value


def text(value: Any, path: str) -> str:
    if not isinstance(value, str):
        raise error(path, f"must be a string (got {show(value)})")
    return value


def nonempty(value: Any, path: str) -> str:
    if not text(value, path):
        raise error(path, "must not be empty")
    return str(value)


def choice(*options: str) -> Reader:
    def read(value: Any, path: str) -> str:
        if value not in options:  # works for non-strings too: they are never equal
            raise error(path, f"must be one of {', '.join(options)} (got {show(value)})")
        return str(value)
    return read


def matching(pattern: str, what: str) -> Reader:
    compiled = re.compile(pattern)

    def read(value: Any, path: str) -> str:
        if not compiled.fullmatch(text(value, path)):
            raise error(path, f"must be {what} (got {show(value)})")
        return str(value)
    return read


def regex(value: Any, path: str) -> str:
    """A regular expression, as its text (it must compile)."""
    pattern = nonempty(value, path)
    try:
        re.compile(pattern)
    except re.error as err:
        raise error(path, f"not a regular expression: {err}") from None
    return pattern


def iso_date(value: Any, path: str) -> str:
    """A date as "2026-11-30" (YAML reads an unquoted one as a date: taken too)."""
    given = value.isoformat() if isinstance(value, datetime.date) else value
    try:
        return datetime.date.fromisoformat(text(given, path)).isoformat()
    except ValueError:
        raise error(path, f"must be a date like 2026-11-30 (got {show(value)})") from None


# --- durations and sizes -------------------------------------------------------

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
            raise error(path, f"not a duration: {show(value)} {_DURATION_HINT}")
        return float(Decimal(match.group(1)) * _SECONDS[match.group(2)])
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise error(path, f"must be a duration (got {show(value)}) {_DURATION_HINT}")
    if not math.isfinite(value) or value < 0:
        raise error(path, f"must be >= 0 seconds (got {value})")
    return float(value)


def parse_size(value: Any, path: str) -> int:
    """Bytes from an int or a string with a unit: "512KB", "10MB", "50MiB", "1GB"."""
    if isinstance(value, str):
        match = _SIZE.fullmatch(value.strip())
        if not match:
            raise error(path, f"not a size: {show(value)} {_SIZE_HINT}")
        return int(Decimal(match.group(1)) * _BYTES[match.group(2)])
    if isinstance(value, bool) or not isinstance(value, int):
        raise error(path, f"must be a size (got {show(value)}) {_SIZE_HINT}")
    if value < 0:
        raise error(path, f"must be >= 0 bytes (got {value})")
    return value


def duration(positive: bool = False) -> Reader:
    def read(value: Any, path: str) -> float:
        seconds = parse_duration(value, path)
        if positive and seconds == 0:
            raise error(path, "must be more than 0 seconds")
        return seconds
    return read


def size(value: Any, path: str) -> int:
    """A size in bytes, more than 0."""
    nbytes = parse_size(value, path)
    if nbytes == 0:
        raise error(path, "must be more than 0 bytes")
    return nbytes


# --- addresses and names ----------------------------------------------------


def ip_address(value: Any, path: str) -> str:
    """An IPv4 or IPv6 address as text, normalised ("2001:DB8::01" -> "2001:db8::1")."""
    if not isinstance(value, str):
        # Unquoted IPv6 like 1:2:3:4:5:6:7:8 reads as a YAML 1.1 base-60 integer.
        raise error(path, f"must be an IP address as a string (got {show(value)}; quote it)")
    try:
        return str(ipaddress.ip_address(value))
    except ValueError:
        raise error(path, f"not an IP address: {show(value)}") from None


def network(value: Any, path: str) -> str:
    """A network in CIDR form ("10.20.0.0/16"); a bare address is a /32 or /128."""
    given = text(value, path)
    try:
        return str(ipaddress.ip_network(given.strip()))
    except ValueError as err:
        raise error(path, f"not a network like 10.20.0.0/16 or fd00::/8: {show(value)}"
                          f" ({err})") from None


def ehlo_name(value: Any, path: str) -> str:
    """A host name, or an RFC 5321 address literal: "[192.0.2.1]", "[IPv6:2001:db8::1]"."""
    name = text(value, path)
    if is_hostname(name) or _is_address_literal(name):
        return name
    raise error(path, f"not a host name or address literal like [192.0.2.1]: {show(value)}")


def _is_address_literal(name: str) -> bool:
    if not (name.startswith("[") and name.endswith("]")):
        return False
    inner = name[1:-1]
    version = 6 if inner[:5].lower() == "ipv6:" else 4
    try:
        return ipaddress.ip_address(inner[5:] if version == 6 else inner).version == version
    except ValueError:
        return False


def host(value: Any, path: str) -> str:
    """A host name or an IP address (normalised)."""
    name = text(value, path)
    try:
        return str(ipaddress.ip_address(name))
    except ValueError:
        pass
    if not is_hostname(name):
        raise error(path, f"not a host name or IP address: {show(value)}")
    return name.lower()


def endpoint(value: Any, path: str) -> str:
    if not re.fullmatch(r"(tcp|ipc|inproc)://.+", text(value, path)):
        raise error(path, f"must be a ZeroMQ endpoint starting with tcp://, ipc:// or inproc:// "
                          f"(got {show(value)})")
    return str(value)


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
