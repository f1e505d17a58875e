"""Configuration: YAML in, frozen dataclasses out, every key checked.

The file is read with a safe YAML loader, then every key is checked against the
schema and built into immutable dataclasses that the engine reads directly
(`cfg.smtp.timeouts.connect`, `cfg.ip_pools`).

Anything unknown, mistyped or out of range is refused with a `ConfigError`
whose message starts with the dotted path of the key at fault
(`smtp.timeouts.connect: ...`, `ips[1].address: ...`), so an operator can find
it. A key takes its default only when it is absent, never because its value
was bad. A key under its old name still loads, with a warning in
`Config.warnings` that names the new one.

Durations are float seconds and sizes int bytes once loaded, whatever unit the
file used. docs/CONFIG.md documents every key; conf/mailengine.yaml is the
shipped default.

The parts: `schema` (the dataclasses and their defaults, each written once),
`values` (reading one value: durations, sizes, numbers, addresses...), `names`
(the DNS name grammar, shared with engine.address and engine.mx), `sections`
(the reader of each section) and `loader` (`load`, `file_of`, `from_dict`, `to_dict`).
This package imports no other engine module.
"""
from __future__ import annotations

from engine.config.loader import RENAMED, file_of, from_dict, load, to_dict
from engine.config.schema import (
    CATEGORIES,
    DEFAULT_PATH,
    DEFAULT_WARMUP,
    ENV_VAR,
    LOG_LEVELS,
    LONG_LINES,
    TLS_MODES,
    CategoriesConfig,
    CategoryRule,
    ClusterConfig,
    ClusterHostConfig,
    Config,
    ControlCurveConfig,
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
    SendingLimits,
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
    ConfigError,
    endpoint_host,
    is_loopback_host,
    parse_duration,
    parse_size,
)

__all__ = [
    "CATEGORIES",
    "DEFAULT_PATH",
    "DEFAULT_WARMUP",
    "ENV_VAR",
    "LOG_LEVELS",
    "LONG_LINES",
    "RENAMED",
    "TLS_MODES",
    "CategoriesConfig",
    "CategoryRule",
    "ClusterConfig",
    "ClusterHostConfig",
    "Config",
    "ConfigError",
    "ControlCurveConfig",
    "CurveConfig",
    "DkimConfig",
    "DkimDomainConfig",
    "DkimKeyConfig",
    "DnsConfig",
    "IpConfig",
    "LimitsConfig",
    "PoolClusterLimits",
    "PoolConfig",
    "ProviderLimits",
    "RetryConfig",
    "Route",
    "SecurityConfig",
    "SendingLimits",
    "ShapingConfig",
    "SmtpConfig",
    "StatsdConfig",
    "ThrottleConfig",
    "ThrottleRule",
    "Timeouts",
    "TlsPolicyConfig",
    "TlsRptConfig",
    "WarmupConfig",
    "endpoint_host",
    "file_of",
    "from_dict",
    "is_loopback_host",
    "load",
    "parse_duration",
    "parse_size",
    "to_dict",
]
