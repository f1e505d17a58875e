"""The readers of each section of the file, built from engine.config.values.

`TOP_READERS` maps each top-level key to its reader, except the keys that need
another one's value (`hostname`, `ips`, `ip_pools`: see engine.config.loader).
"""
from __future__ import annotations

import re
import urllib.parse
from collections.abc import Mapping
from dataclasses import fields
from types import MappingProxyType
from typing import Any

from engine.config.names import is_hostname
from engine.config.schema import (
    CATEGORIES,
    FORCED_TLS_POLICIES,
    LOG_LEVELS,
    LONG_LINES,
    TLS_MODES,
    CategoriesConfig,
    CategoryRule,
    ClusterConfig,
    ClusterHostConfig,
    CurveConfig,
    DkimConfig,
    DkimDomainConfig,
    DkimKeyConfig,
    DnsConfig,
    IpConfig,
    LimitsConfig,
    PoolClusterLimits,
    PoolConfig,
    ProviderLimits,
    RetryConfig,
    Route,
    SecurityConfig,
    ShapingConfig,
    SmtpConfig,
    StatsdConfig,
    ThrottleConfig,
    ThrottleRule,
    Timeouts,
    TlsPolicyConfig,
    TlsRptConfig,
    WarmupConfig,
)
from engine.config.values import (
    PORT,
    Reader,
    boolean,
    choice,
    duration,
    ehlo_name,
    endpoint,
    error,
    host,
    integer,
    ip_address,
    iso_date,
    join,
    known,
    mapping,
    matching,
    network,
    nonempty,
    number,
    optional,
    refuse_repeats,
    regex,
    section,
    sequence,
    show,
    size,
    text,
    tuple_of,
)

# --- sending IPs and their pools ---------------------------------------------------


def ips(value: Any, hostname: str) -> tuple[IpConfig, ...]:
    items = sequence(value, "ips")
    if not items:
        raise error("ips", "required: at least one sending IP, e.g. [{address: 203.0.113.10}]")
    result = tuple(_ip(item, f"ips[{i}]", hostname) for i, item in enumerate(items))
    refuse_repeats([ip.address for ip in result], "ips[{}].address")
    return result


def _ip(value: Any, path: str, hostname: str) -> IpConfig:
    if isinstance(value, str | int):  # int: an unquoted IPv6 that YAML read as base 60
        value = {"address": value}  # shorthand: `- 203.0.113.10`
    data = dict(known(mapping(value, path), ("address", "helo"), path))
    if "address" not in data:
        raise error(f"{path}.address", "required")
    address = ip_address(data["address"], f"{path}.address")
    helo = ehlo_name(data["helo"], f"{path}.helo") if "helo" in data else hostname
    return IpConfig(address=address, helo=helo)


_POOL_NAME = re.compile(r"[A-Za-z0-9_-]+")


def ip_pools(value: Any, path: str, ips: tuple[IpConfig, ...]) -> dict[str, tuple[str, ...]]:
    """`path`: the key the file used (`ip_pools`, or `pools`, its old name)."""
    addresses = {ip.address for ip in ips}
    pools = {}
    for name, members in mapping(value, path).items():
        if not _POOL_NAME.fullmatch(name):
            raise error(join(path, name) if name else path,
                        f"pool names are letters, digits, _ and - (got {show(name)})")
        pools[name] = _ip_pool(members, join(path, name), addresses)
    return pools


def _ip_pool(value: Any, path: str, addresses: set[str]) -> tuple[str, ...]:
    members = tuple_of(ip_address, nonempty=True)(value, path)
    for i, address in enumerate(members):
        if address not in addresses:
            raise error(f"{path}[{i}]", f"{address} is not in ips")
    refuse_repeats(members, path + "[{}]")
    return tuple(members)


# --- routes ----------------------------------------------------------------------

_BRACKETED = re.compile(r"\[([^\]]+)\](?::(.*))?")
_ROUTE_HINT = 'must be "host", "host:port" or "[IPv6]:port"'


def _routes(value: Any, path: str) -> dict[str, Route]:
    routes: dict[str, Route] = {}
    for domain, target in mapping(value, path).items():
        where = join(path, domain)
        key = domain.lower()
        if key != "*" and not is_hostname(key):
            raise error(where, 'not a domain name (IDN in its xn-- form), nor "*"')
        if key in routes:
            raise error(where, f"{key} is listed twice")
        routes[key] = _route(target, where)
    return routes


def _route(value: Any, path: str) -> Route:
    if not isinstance(value, str) or not value:
        raise error(path, f"{_ROUTE_HINT} (got {show(value)})")
    bracketed = _BRACKETED.fullmatch(value)
    if bracketed:
        address, port = ip_address(bracketed.group(1), path), bracketed.group(2)
    elif value.count(":") > 1:
        raise error(path, f"IPv6 goes in brackets, e.g. [2001:db8::1]:25 (got {show(value)})")
    else:
        name, colon, port_text = value.partition(":")
        address, port = host(name, path), (port_text if colon else None)
    return Route(host=address, port=None if port is None else _route_port(port, path))


def _route_port(digits: str, path: str) -> int:
    if not digits.isdigit():
        raise error(path, f"port must be a number (got {show(digits)})")
    return int(PORT(int(digits), path))


# --- smtp, pool, dns, statsd, limits, retry ------------------------------------------

_TIMEOUTS = section(Timeouts, {f.name: duration(positive=True) for f in fields(Timeouts)})


def _ehlo_keywords(value: Any, path: str) -> tuple[str, ...]:
    """EHLO keywords (RFC 5321 4.1.1.1: letters, digits and '-'), lower-cased."""
    read = matching(r"[A-Za-z0-9][A-Za-z0-9-]*", "an EHLO keyword such as PIPELINING")
    keywords = tuple(k.lower() for k in tuple_of(read)(value, path))
    refuse_repeats(keywords, path + "[{}]")
    return keywords


_SMTP = section(SmtpConfig, {
    "port": PORT,
    "tls": choice(*TLS_MODES),
    "tls_broken_ttl": duration(),
    "tls_unverified_ttl": duration(),
    "ca_file": optional(nonempty),
    "max_reply_lines": integer(1),
    "max_line_length": integer(512),  # RFC 5321 4.5.3.1.5: replies may be 512 octets
    "discard_ehlo_keywords": _ehlo_keywords,
    "timeouts": _TIMEOUTS,
})

def _forced_policy(value: Any, path: str) -> str:
    read: str = choice(*FORCED_TLS_POLICIES)(value, path)
    return read


def _policy_domains(value: Any, path: str) -> Mapping[str, str]:
    table = {}
    for domain, policy in mapping(value, path).items():
        where = join(path, domain)
        name = domain.rstrip(".").lower()
        if not is_hostname(name) or "." not in name:
            raise error(where, "must be a domain name, e.g. example.com")
        if name in table:
            raise error(where, f"{name} is listed twice")
        table[name] = _forced_policy(policy, where)
    return table


def _policy_providers(value: Any, path: str) -> Mapping[str, str]:
    return {_provider_name(name, join(path, name)): _forced_policy(policy, join(path, name))
            for name, policy in mapping(value, path).items()}


_TLS_POLICY = section(TlsPolicyConfig, {
    "mta_sts": boolean,
    "mta_sts_fetch_timeout": duration(positive=True),
    "mta_sts_https_port": PORT,
    "dane": boolean,
    "domains": _policy_domains,
    "providers": _policy_providers,
})

_TLSRPT = section(TlsRptConfig, {
    "enabled": boolean,
    "organization": matching(r"[ -~]{0,200}", "printable ASCII, up to 200 characters"),
    "contact": matching(r"[ -~]{0,200}", "printable ASCII, up to 200 characters"),
    "sender": matching(r"([A-Za-z0-9.!#$%&'*+/=?^_`{|}~-]{1,64}@[A-Za-z0-9]([A-Za-z0-9-]*"
                       r"[A-Za-z0-9])?(\.[A-Za-z0-9]([A-Za-z0-9-]*[A-Za-z0-9])?)+)?",
                       "an ASCII address such as tlsrpt-noreply@mta.example.com (or empty)"),
    "period": duration(positive=True),
    "retry": duration(positive=True),
    "give_up": duration(positive=True),
    "https_timeout": duration(positive=True),
})

_POOL = section(PoolConfig, {
    "max_connections": integer(1),
    "max_messages": integer(1),
    "max_age": duration(),
    "idle_timeout": duration(),
    "connect_backoff": duration(),
    "keepalive_idle": duration(),
    "keepalive_interval": duration(positive=True),
    "keepalive_count": integer(1),
    "reuse_check_after": duration(),
    "reuse_check_timeout": duration(positive=True),
    "max_idle": integer(0),
})


def _nameservers(value: Any, path: str) -> tuple[str, ...]:
    servers: tuple[str, ...] = tuple_of(ip_address)(value, path)
    refuse_repeats(servers, path + "[{}]")
    return servers


_DNS = section(DnsConfig, {
    "nameservers": _nameservers,
    "port": PORT,
    "timeout": duration(positive=True),
    "cache_size": integer(0),
    "max_in_flight": integer(1),
    "trusted_ad": boolean,
})

_STATSD = section(StatsdConfig, {
    "enabled": boolean,
    "host": host,
    "port": PORT,
    "prefix": matching(r"[A-Za-z0-9_-]+(\.[A-Za-z0-9_-]+)*",
                       "letters, digits, _ and - in dot-separated parts"),
})

_LIMITS = section(LimitsConfig, {
    "max_message_size": size,
    "max_recipients": integer(1),
    "max_in_flight": integer(1),
    "retry_share": number(0.0, 1.0, above=True),
    "long_lines": choice(*LONG_LINES),
})

_RETRY = section(RetryConfig, {
    "schedule": tuple_of(duration(positive=True), nonempty=True),
    "max_age": duration(),
    "jitter": number(0.0, 0.5),
})


# --- providers, shaping, throttle, warmup --------------------------------------------

_PROVIDER_NAME = re.compile(r"[a-z0-9][a-z0-9_.-]*")


def _provider_name(name: str, path: str) -> str:
    if not _PROVIDER_NAME.fullmatch(name):
        raise error(path, "provider names are lowercase letters, digits, '.', '_' and '-'")
    return name


def _providers(value: Any, path: str) -> Mapping[str, str]:
    table = {}
    for suffix, name in mapping(value, path).items():
        where = join(path, suffix)
        if not is_hostname(suffix):
            raise error(where, "must be an MX host name suffix, e.g. mx.example.net")
        table[suffix.lower()] = _provider_name(text(name, where), where)
    return table


_PROVIDER_LIMITS = section(ProviderLimits, {
    "max_connections": optional(integer(1)),
    "max_messages": optional(integer(1)),
    "rate": optional(number(0)),
    "hourly": optional(integer(0)),
    "connection_rate": optional(number(0)),
    "cluster_rate": optional(number(0)),
    "cluster_connections": optional(integer(0)),
    "cluster_hourly": optional(integer(0)),
})


def _per_provider(value: Any, path: str) -> Mapping[str, ProviderLimits]:
    return MappingProxyType({
        _provider_name(name, join(path, name)): _PROVIDER_LIMITS(limits, join(path, name))
        for name, limits in mapping(value, path).items()})


def _per_ip(value: Any, path: str) -> Mapping[str, Mapping[str, ProviderLimits]]:
    table = MappingProxyType({ip_address(ip, join(path, ip)): _per_provider(v, join(path, ip))
                              for ip, v in mapping(value, path).items()})
    for ip, providers in table.items():
        for name, limits in providers.items():
            for key in ("cluster_rate", "cluster_hourly"):  # one figure for every host
                if getattr(limits, key) is not None:
                    raise error(join(join(join(path, ip), name), key),
                                "cluster-wide: set it under shaping.providers or"
                                " shaping.ip_pools")
            if limits.cluster_connections is not None:  # one figure for every host
                raise error(join(join(join(path, ip), name), "cluster_connections"),
                            "cluster-wide: set it under shaping.providers")
    return table


_POOL_CLUSTER_LIMITS = section(PoolClusterLimits, {
    "cluster_rate": number(0),
    "cluster_hourly": integer(0),
})


def _per_pool(value: Any, path: str) -> Mapping[str, Mapping[str, PoolClusterLimits]]:
    """`shaping.ip_pools`: pool -> provider -> cluster limits. The pool names are checked
    against `ip_pools` once both are read (engine.config.loader)."""
    return MappingProxyType({
        pool: MappingProxyType({
            _provider_name(name, join(join(path, pool), name)):
                _POOL_CLUSTER_LIMITS(limits, join(join(path, pool), name))
            for name, limits in mapping(providers, join(path, pool)).items()})
        for pool, providers in mapping(value, path).items()})


_SHAPING = section(ShapingConfig, {
    "rate": number(0),
    "hourly": integer(0),
    "connection_rate": number(0),
    "cluster_rate": number(0),
    "cluster_connections": integer(0),
    "cluster_hourly": integer(0),
    "max_wait": duration(),
    "forget_after": duration(),
    "providers": _per_provider,
    "ips": _per_ip,
    "ip_pools": _per_pool,
})

_RULE_FIELDS = section(ThrottleRule, {
    "name": nonempty,
    "provider": optional(lambda v, p: _provider_name(text(v, p), p)),
    "code": optional(integer(400, 599)),
    "enhanced": optional(matching(r"[245*?]\.[0-9*?]{1,3}\.[0-9*?]{1,3}",
                                  'an enhanced status or glob, e.g. "4.7.*"')),
    "text": optional(regex),
    "suspend": duration(),
})


def _rule(value: Any, path: str) -> ThrottleRule:
    rule = _RULE_FIELDS(value, path)
    if rule.code is None and rule.enhanced is None and rule.text is None:
        raise error(path, "a rule needs at least one of code, enhanced or text")
    return rule


_THROTTLE = section(ThrottleConfig, {
    "slow_start": boolean,
    "start_rate": number(0, above=True),
    "growth": number(0, 1000, above=True),
    "decrease": number(0, 1, above=True),
    "increase": number(0),
    "min_rate": number(0, above=True),
    "probe_interval": duration(positive=True),
    "probe_every": duration(positive=True),
    "pushback_after": integer(1),
    "remember": duration(),
    "block_suspend": duration(),
    "retry_after": duration(),
    "default_rules": boolean,
    "rules": tuple_of(_rule),
})

_CATEGORY_RULE_FIELDS = section(CategoryRule, {
    "category": choice(*CATEGORIES),
    "provider": optional(lambda v, p: _provider_name(text(v, p), p)),
    "code": optional(integer(200, 599)),
    "enhanced": optional(matching(r"[245*?]\.[0-9*?]{1,3}\.[0-9*?]{1,3}",
                                  'an enhanced status or glob, e.g. "5.7.*"')),
    "text": optional(regex),
})


def _category_rule(value: Any, path: str) -> CategoryRule:
    if isinstance(value, Mapping) and "category" not in value:
        raise error(f"{path}.category", f"required: one of {', '.join(CATEGORIES)}")
    rule = _CATEGORY_RULE_FIELDS(value, path)
    if rule.code is None and rule.enhanced is None and rule.text is None:
        raise error(path, "a rule needs at least one of code, enhanced or text")
    return rule


_CATEGORIES = section(CategoriesConfig, {
    "default_rules": boolean,
    "rules": tuple_of(_category_rule),
})

_WARMUP = section(WarmupConfig, {
    "schedule": tuple_of(integer(1), nonempty=True),
    "ips": lambda v, p: MappingProxyType({ip_address(ip, join(p, ip)): iso_date(d, join(p, ip))
                                          for ip, d in mapping(v, p).items()}),
})


# --- security ------------------------------------------------------------------------

_CURVE = section(CurveConfig, {
    "enabled": boolean,
    "server_secret_key": nonempty,
    "allowed_clients": nonempty,
})

_SECURITY = section(SecurityConfig, {
    "curve": _CURVE,
    "allow_plain_remote": boolean,
    "allow_private_destinations": boolean,
    "allowed_destinations": tuple_of(network),
})


# --- dkim ----------------------------------------------------------------------------

_HEADER_NAME = matching(r"[!-9;-~]+", "a header field name such as List-Unsubscribe")
# RFC 6376 3.1: a selector is DNS labels (engine.dkim.is_selector: this package imports
# no other engine module).
_SELECTOR = re.compile(r"[A-Za-z0-9](?:[A-Za-z0-9-]*[A-Za-z0-9])?"
                       r"(?:\.[A-Za-z0-9](?:[A-Za-z0-9-]*[A-Za-z0-9])?)*")


def _selector(value: Any, path: str) -> str:
    name = text(value, path)
    if not _SELECTOR.fullmatch(name) or len(name) > 63:
        raise error(path, f"a selector is DNS labels: letters, digits and - (got {show(value)})")
    return name


_DKIM_KEY = section(DkimKeyConfig, {
    "selector": _selector,
    "key_file": nonempty,
    "not_before": optional(iso_date),
    "not_after": optional(iso_date),
})


def _dkim_key(value: Any, path: str) -> DkimKeyConfig:
    data = mapping(value, path)
    for required in ("selector", "key_file"):
        if required not in data:
            raise error(join(path, required), "required")
    key = _DKIM_KEY(data, path)
    if key.not_before and key.not_after and key.not_after < key.not_before:
        raise error(join(path, "not_after"), f"before not_before ({key.not_before})")
    return key


def _dkim_keys(value: Any, path: str) -> tuple[DkimKeyConfig, ...]:
    keys: tuple[DkimKeyConfig, ...] = tuple_of(_dkim_key, nonempty=True)(value, path)
    refuse_repeats([k.selector for k in keys], path + "[{}].selector")
    return keys


_DKIM_DOMAIN_FIELDS = section(DkimDomainConfig, {"keys": _dkim_keys, "unsigned_ok": boolean})


def _dkim_domains(value: Any, path: str) -> Mapping[str, DkimDomainConfig]:
    domains: dict[str, DkimDomainConfig] = {}
    for domain, entry in mapping(value, path).items():
        where = join(path, domain)
        key = domain.lower().rstrip(".")
        if not is_hostname(key) or "." not in key:
            raise error(where, "not a domain name (IDN in its xn-- form)")
        if key in domains:
            raise error(where, f"{key} is listed twice")
        if "keys" not in mapping(entry, where):
            raise error(join(where, "keys"), "required: at least one {selector, key_file}")
        domains[key] = _DKIM_DOMAIN_FIELDS(entry, where)
    return MappingProxyType(domains)


def _header_names(value: Any, path: str) -> tuple[str, ...]:
    names = tuple(n.lower() for n in tuple_of(_HEADER_NAME)(value, path))
    refuse_repeats(names, path + "[{}]")
    return names


_DKIM_FIELDS = section(DkimConfig, {
    "enabled": boolean,
    "domains": _dkim_domains,
    "subdomains": boolean,
    "esp": optional(lambda v, p: text(v, p).lower().rstrip(".")),
    "headers": _header_names,
    "oversign": _header_names,
    "expiry": duration(),
})


def _dkim(value: Any, path: str) -> DkimConfig:
    cfg = _DKIM_FIELDS(value, path)
    if cfg.esp is not None and cfg.esp not in cfg.domains:
        raise error(join(path, "esp"), f"{cfg.esp} is not in dkim.domains (its keys sign)")
    if "from" not in cfg.headers:
        raise error(join(path, "headers"), "must include from (RFC 6376 5.4)")
    for i, name in enumerate(cfg.oversign):
        if name not in cfg.headers:
            raise error(f"{path}.oversign[{i}]", f"{name} is not in dkim.headers")
    return cfg


# --- cluster -------------------------------------------------------------------------

_REDIS_SCHEMES = ("redis", "rediss", "unix")


def _redis_url(value: Any, path: str) -> str:
    """A Redis URL as redis-py reads it (`Redis.from_url`), or "" (no cluster)."""
    url = text(value, path)
    if not url:
        return url
    try:
        parts = urllib.parse.urlsplit(url)
        port = parts.port  # a port that is not a number raises
    except ValueError:
        parts, port = None, None
    if parts is None or parts.scheme not in _REDIS_SCHEMES or "://" not in url or not (
            parts.path if parts.scheme == "unix" else parts.hostname) or port == 0:
        raise error(path, "must be redis://host[:port][/db], rediss://... or unix://path"
                          " (got a value that is not; it is not shown: it may hold a password)")
    return url


def _cluster_host(value: Any, path: str) -> str:
    """This host's name in the cluster ("": the hostname): it goes into Redis keys."""
    name = text(value, path)
    if name and not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9_.-]*", name):
        raise error(path, f"letters, digits, '.', '_' and '-' (got {show(value)})")
    return name


def _cluster_host_name(value: Any, path: str) -> str:
    name = nonempty(value, path)
    if not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9_.-]*", name):
        raise error(path, f"letters, digits, '.', '_' and '-' (got {show(value)})")
    return name


def _cluster_control(value: Any, path: str) -> str:
    control = endpoint(value, path)
    if control.startswith("inproc://"):
        raise error(path, "must be tcp:// or ipc:// (inproc:// is in-process)")
    return control


_CLUSTER_HOST_FIELDS = section(ClusterHostConfig, {
    "name": _cluster_host_name,
    "control": _cluster_control,
    "curve_server_key": text,
})


def _cluster_host_entry(value: Any, path: str) -> ClusterHostConfig:
    for key in ("name", "control"):
        if key not in mapping(value, path):
            raise error(join(path, key), "missing (each host: name, control and, for a tcp"
                                         " control with CURVE, curve_server_key)")
    return _CLUSTER_HOST_FIELDS(value, path)


def _cluster_hosts(value: Any, path: str) -> tuple[ClusterHostConfig, ...]:
    """`cluster.hosts`: a list of {name, control, curve_server_key}, names unique."""
    hosts = tuple_of(_cluster_host_entry)(value, path)
    refuse_repeats([host.name for host in hosts], f"{path}[{{}}].name")
    return hosts


_CLUSTER = section(ClusterConfig, {
    "redis": _redis_url,
    "host": _cluster_host,
    "prefix": matching(r"[A-Za-z0-9_-]+(:[A-Za-z0-9_-]+)*",
                       "letters, digits, _ and - in ':'-separated parts"),
    "timeout": duration(positive=True),
    "retry": duration(positive=True),
    "duplicate_window": duration(positive=True),
    "lease": duration(positive=True),
    "poll": duration(positive=True),
    "connection_lease": duration(positive=True),
    "ceiling_expiry": duration(),
    "hosts": _cluster_hosts,
})


TOP_READERS: dict[str, Reader] = {
    "ingest": endpoint,
    "events": endpoint,
    "control": endpoint,
    "run_dir": nonempty,
    "events_log": text,  # "" turns the file off
    "spool": nonempty,
    "log_level": choice(*LOG_LEVELS),
    "drain_timeout": duration(),
    "smtp": _SMTP,
    "tls_policy": _TLS_POLICY,
    "tlsrpt": _TLSRPT,
    "pool": _POOL,
    "dns": _DNS,
    "routes": _routes,
    "statsd": _STATSD,
    "limits": _LIMITS,
    "retry": _RETRY,
    "providers": _providers,
    "shaping": _SHAPING,
    "throttle": _THROTTLE,
    "categories": _CATEGORIES,
    "warmup": _WARMUP,
    "security": _SECURITY,
    "dkim": _dkim,
    "cluster": _CLUSTER,
}
