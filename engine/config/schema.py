"""The schema: what a loaded config is, as frozen dataclasses with their defaults.

Each default is written here once; docs/CONFIG.md documents it and
conf/mailengine.yaml shows it. The readers (engine.config.sections) check the
file against these classes; the engine reads them directly (`cfg.smtp.port`).
"""
from __future__ import annotations

import re
import socket
from collections.abc import Mapping
from dataclasses import dataclass, field, fields, replace
from types import MappingProxyType
from typing import Any

DEFAULT_PATH = "/etc/mailengine/mailengine.yaml"
ENV_VAR = "MAILENGINE_CONFIG"

TLS_MODES = ("none", "opportunistic", "required", "verify")
# What tls_policy.domains and tls_policy.providers may force: a TLS mode, MTA-STS or DANE
# (engine.tlspolicy; `dane` needs dns.trusted_ad, as tls_policy.dane does).
FORCED_TLS_POLICIES = (*TLS_MODES, "mta-sts", "dane")
LOG_LEVELS = ("debug", "info", "warning", "error")
# What intake does with a message line over 998 octets (limits.long_lines): refuse the job,
# or re-encode the parts that have one (engine.job.short_lines).
LONG_LINES = ("reject", "encode")
# The class of a refusal, on every `bounced`, `deferred` and `expired` event: a fixed list, close
# to PowerMTA's bounce categories and KumoMTA's bounce classes so that operators can map theirs
# (docs/EVENTS.md has the table; engine.categories decides). Here, not there, because the
# operator's rules (`categories.rules`) name them and config imports no engine module.
CATEGORIES = ("bad-mailbox", "inactive-mailbox", "bad-domain", "quota-issues", "invalid-sender",
              "authentication-failed", "spam-related", "blocklisted", "content-related",
              "virus-related", "policy-related", "rate-limited", "greylisted", "relaying-issues",
              "routing-errors", "no-answer-from-host", "bad-connection", "protocol-errors",
              "bad-configuration", "message-expired", "other")

# Field metadata of what is derived or said about the file rather than read from it:
# left out of `to_dict`, whose output must load back.
NOT_PLAIN: Mapping[str, Any] = MappingProxyType({"plain": False})


def _frozen_mapping() -> Mapping[str, Any]:
    return MappingProxyType({})


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
    # opportunistic: a host whose certificate did not verify is not checked again this long
    tls_unverified_ttl: float = 86400.0
    ca_file: str | None = None
    max_reply_lines: int = 100
    max_line_length: int = 4096
    # EHLO keywords the engine acts as if the server had not offered (lower case), as
    # Postfix's smtp_discard_ehlo_keywords: a workaround for a server whose PIPELINING or
    # CHUNKING is broken, and how the benchmarks emulate a naive client.
    discard_ehlo_keywords: tuple[str, ...] = ()
    timeouts: Timeouts = field(default_factory=Timeouts)


@dataclass(frozen=True)
class TlsPolicyConfig:
    """Receivers' TLS policies (MTA-STS) and the operator's exceptions per destination.
    See docs/SECURITY.md, "TLS policies"."""

    mta_sts: bool = True  # look up and apply every domain's MTA-STS policy (RFC 8461)
    mta_sts_fetch_timeout: float = 10.0  # the policy's HTTPS fetch, in all
    # The policy servers' port: 443 by RFC 8461; another only for tests and labs.
    mta_sts_https_port: int = 443
    # DANE (RFC 7672): TLSA records authenticated by the resolver (needs dns.trusted_ad).
    dane: bool = False
    domains: Mapping[str, str] = field(default_factory=_frozen_mapping)  # domain -> policy
    providers: Mapping[str, str] = field(default_factory=_frozen_mapping)  # provider -> policy

    def __post_init__(self) -> None:
        object.__setattr__(self, "domains", MappingProxyType(dict(self.domains)))
        object.__setattr__(self, "providers", MappingProxyType(dict(self.providers)))


@dataclass(frozen=True)
class TlsRptConfig:
    """TLS reporting (RFC 8460): sessions counted per policy domain, a daily report to the
    domains that ask for one (`_smtp._tls` TXT). See docs/SECURITY.md, "TLS-RPT"."""

    enabled: bool = False  # count sessions and send reports
    organization: str = ""  # the report's organization-name; empty: the config's hostname
    contact: str = ""  # the report's contact-info; empty: the `sender` address
    sender: str = ""  # the From of mailed reports; empty: tlsrpt-noreply@<hostname>
    period: float = 86400.0  # seconds a report covers (a UTC day; shorter only for tests)
    retry: float = 1800.0  # seconds before a rua that failed is tried again
    give_up: float = 3 * 86400.0  # a report not sent by then is dropped, with a log line
    https_timeout: float = 30.0  # one POST to an https rua, in all


@dataclass(frozen=True)
class PoolConfig:
    """Connection reuse, per destination (sending IP, MX host, port, TLS mode).

    `max_connections` and `max_messages` are also every provider's defaults in
    shaping (see `SendingLimits`)."""

    max_connections: int = 10
    # A connection retires after max_messages or max_age seconds, whichever comes first;
    # each one draws its own term up to a tenth below these (engine.pool_terms). 0 age: none.
    max_messages: int = 1000
    max_age: float = 300.0
    idle_timeout: float = 60.0
    connect_backoff: float = 30.0
    # TCP keepalive on every SMTP connection: a peer gone without a FIN (host down, NAT
    # state dropped) is found after idle + interval x count seconds of silence. 0 idle: off.
    keepalive_idle: float = 15.0
    keepalive_interval: float = 5.0
    keepalive_count: int = 3
    # A connection idle at least this long answers an RSET within reuse_check_timeout
    # before it is reused (a half-open one would hold the next MAIL for timeouts.mail).
    reuse_check_after: float = 2.0
    reuse_check_timeout: float = 10.0
    # Idle connections one worker keeps across all its destinations (engine.pools): past
    # it, the one idle longest is closed.
    max_idle: int = 1000


@dataclass(frozen=True)
class DnsConfig:
    """The resolver for MX lookups; no nameservers means the system resolver."""

    nameservers: tuple[str, ...] = ()
    port: int = 53
    timeout: float = 5.0
    # ~0.8 KB an answer; 10,000 domains need 30,000 (MX, A of the MX host, MTA-STS TXT).
    cache_size: int = 50000
    # Queries out at once per worker (engine.mx): a burst to many new domains waits its turn.
    max_in_flight: int = 32
    # The nameservers validate DNSSEC and their AD bit is believed (Postfix's
    # smtp_dns_support_level = dnssec): only a validating resolver on this host or reached
    # over a path the operator trusts. DANE needs it.
    trusted_ad: bool = False


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
    # Of a worker's max_in_flight, the share retries may hold: the rest is kept for first
    # attempts, so a deferral window ending cannot fill every slot (engine.dispatch).
    retry_share: float = 0.5
    long_lines: str = "reject"  # one of LONG_LINES


@dataclass(frozen=True)
class RetryConfig:
    """Waits between attempts (the last repeats) and how long a recipient may wait in all."""

    schedule: tuple[float, ...] = (60.0, 300.0, 900.0, 1800.0, 3600.0, 7200.0, 14400.0)
    max_age: float = 5 * 86400.0
    # Each wait moved by up to +-this fraction (engine.retry), so recipients deferred together
    # do not all come due in the same second; a wait shaping set is only lengthened by it.
    jitter: float = 0.1


@dataclass(frozen=True)
class ProviderLimits:
    """Limits for one provider, or one sending IP x provider; None inherits.

    Its fields are `SendingLimits`' (by name): each one given overrides it."""

    max_connections: int | None = None
    max_messages: int | None = None
    rate: float | None = None
    hourly: int | None = None
    connection_rate: float | None = None
    cluster_rate: float | None = None  # shaping.providers only: see ShapingConfig
    cluster_connections: int | None = None  # shaping.providers only: see ShapingConfig
    cluster_hourly: int | None = None  # shaping.providers only: see ShapingConfig


@dataclass(frozen=True)
class PoolClusterLimits:
    """Cluster-wide limits of one IP group (`ip_pools`) x one provider: what the group's
    IPs on every host send to it together. 0 = none."""

    cluster_rate: float = 0.0  # messages per second
    cluster_hourly: int = 0  # messages per hour


@dataclass(frozen=True)
class ShapingConfig:
    """Pacing per sending IP x provider. `pool` gives the connection defaults."""

    rate: float = 0.0  # messages per second, 0 = unlimited
    hourly: int = 0  # messages per hour, 0 = unlimited
    connection_rate: float = 0.0  # new connections per second, 0 = unlimited
    max_wait: float = 10.0  # longer waits for a turn go back to the spool
    # A provider's state unused this long (and nothing to keep) is dropped (engine.
    # shaping_idle), made anew when mail comes again; 0 = kept for the worker's life.
    forget_after: float = 300.0
    # Messages per second to a provider from every host of the cluster together (Redis:
    # `cluster`, engine.cluster_rate); 0 = no cluster-wide limit. Per provider in practice.
    cluster_rate: float = 0.0
    # Connections open at once to a provider from every host of the cluster together
    # (engine.cluster_connections); 0 = no cluster-wide limit. Per provider in practice.
    cluster_connections: int = 0
    # Messages per hour (the last 60 minutes, as `hourly`) to a provider from every host of
    # the cluster together (engine.cluster_hourly); 0 = none. Per provider in practice.
    cluster_hourly: int = 0
    providers: Mapping[str, ProviderLimits] = field(default_factory=_frozen_mapping)
    ips: Mapping[str, Mapping[str, ProviderLimits]] = field(default_factory=_frozen_mapping)
    # Per IP group (an `ip_pools` name), per provider: cluster-wide limits of the pool's IPs
    # together (`shaping.ip_pools.<pool>.<provider>`), on top of the provider's own.
    ip_pools: Mapping[str, Mapping[str, PoolClusterLimits]] = field(
        default_factory=_frozen_mapping)


@dataclass(frozen=True)
class SendingLimits:
    """The limits of one sending IP x one provider, resolved. 0 means unlimited.

    Built by `of` from the config: `pool` and `shaping` give the defaults, then
    `shaping.providers.<provider>`, then `shaping.ips.<ip>.<provider>`. Every
    field is required: the defaults are those sections', written once there.
    """

    max_connections: int  # open connections across the provider's MX hosts
    max_messages: int  # per connection
    rate: float  # messages per second: the most the adaptive rate may reach
    hourly: int  # messages per hour
    connection_rate: float  # new connections per second
    cluster_rate: float  # messages per second from every host of the cluster together
    cluster_connections: int  # connections open at once from every host together
    cluster_hourly: int  # messages per hour from every host of the cluster together

    @classmethod
    def of(cls, pool: PoolConfig, shaping: ShapingConfig, ip: str,
           provider: str) -> SendingLimits:
        """The limits of sending IP `ip` x `provider`."""
        limits = cls(max_connections=pool.max_connections, max_messages=pool.max_messages,
                     rate=shaping.rate, hourly=shaping.hourly,
                     connection_rate=shaping.connection_rate,
                     cluster_rate=shaping.cluster_rate,
                     cluster_connections=shaping.cluster_connections,
                     cluster_hourly=shaping.cluster_hourly)
        for given in (shaping.providers.get(provider), shaping.ips.get(ip, {}).get(provider)):
            if given is not None:
                limits = replace(limits, **{f.name: getattr(given, f.name) for f in fields(given)
                                            if getattr(given, f.name) is not None})
        return limits


@dataclass(frozen=True)
class ThrottleRule:
    """A reply that means "slow down": every field given must match.

    engine.classify.throttle_rule does the matching; `pattern` is `text`
    compiled (case-insensitive), once, when the rule is built.
    """

    name: str = "custom"
    provider: str | None = None
    code: int | None = None
    enhanced: str | None = None  # glob, e.g. "4.7.*"
    text: str | None = None  # regular expression, searched, case-insensitive
    suspend: float = 0.0  # seconds to stop sending to the provider; 0: only slow down
    pattern: re.Pattern[str] | None = field(init=False, repr=False, compare=False,
                                            metadata=NOT_PLAIN)

    def __post_init__(self) -> None:
        pattern = re.compile(self.text, re.IGNORECASE) if self.text else None
        object.__setattr__(self, "pattern", pattern)


@dataclass(frozen=True)
class ThrottleConfig:
    """How the allowed rate is found and adapts when providers push back (engine.rate)."""

    slow_start: bool = True  # a provider with no learned rate starts at start_rate and grows
    start_rate: float = 20.0  # messages/s where slow start begins
    growth: float = 5.0  # slow start: messages/s each clean reply adds at least (see engine.rate)
    decrease: float = 0.5  # on push-back, the allowed rate drops to this times itself (at most)
    increase: float = 0.5  # messages/s added back per second of clean sending, at least
    min_rate: float = 0.05  # never below this many messages per second
    probe_interval: float = 1.0  # after a push-back, one probe message every this long
    probe_every: float = 5.0  # clean at the learned limit this long: probe above it
    pushback_after: int = 2  # transactions refused in a row that are push-back (behaviour)
    remember: float = 86400.0  # a learned rate survives a restart for this long
    block_suspend: float = 3600.0  # a block of the sending IP stops sending for this long
    retry_after: float = 0.0  # a throttled recipient waits at least this long (0: its turn)
    default_rules: bool = True  # the shipped rules (engine.classify) after `rules`
    rules: tuple[ThrottleRule, ...] = ()


@dataclass(frozen=True)
class CategoryRule:
    """A refusal's category (one of CATEGORIES) when every field given matches.

    engine.categories does the matching; `pattern` is `text` compiled
    (case-insensitive), once, when the rule is built.
    """

    category: str
    provider: str | None = None
    code: int | None = None
    enhanced: str | None = None  # glob, e.g. "5.7.*"
    text: str | None = None  # regular expression, searched, case-insensitive
    pattern: re.Pattern[str] | None = field(init=False, repr=False, compare=False,
                                            metadata=NOT_PLAIN)

    def __post_init__(self) -> None:
        pattern = re.compile(self.text, re.IGNORECASE) if self.text else None
        object.__setattr__(self, "pattern", pattern)


@dataclass(frozen=True)
class CategoriesConfig:
    """How refusals are classed (engine.categories): the operator's rules first."""

    default_rules: bool = True  # the shipped rules (engine.categories) after `rules`
    rules: tuple[CategoryRule, ...] = ()


DEFAULT_WARMUP = (50, 100, 200, 400, 800, 1500, 2500, 4000, 6000, 9000, 13000, 18000, 25000,
                  35000, 50000, 70000, 100000)


@dataclass(frozen=True)
class WarmupConfig:
    """Daily caps per provider for new sending IPs."""

    schedule: tuple[int, ...] = DEFAULT_WARMUP
    ips: Mapping[str, str] = field(default_factory=_frozen_mapping)


@dataclass(frozen=True)
class CurveConfig:
    """ZeroMQ CURVE on `ingest` and `events`: encryption, and only listed clients get in."""

    enabled: bool = False
    server_secret_key: str = "/etc/mailengine/keys/server.key_secret"
    allowed_clients: str = "/etc/mailengine/keys/clients"


@dataclass(frozen=True)
class ControlCurveConfig:
    """CURVE on the control socket (`control.curve`): encryption, and only the listed
    operators' keys get in; over tcp the queue-changing commands then run too.

    `client_key` is the key pair `mailengine status` and `queue` use on this host when
    given no `--curve-client-key` (an operator's, kept 0600 or 0640)."""

    enabled: bool = False
    server_secret_key: str = "/etc/mailengine/keys/control.key_secret"
    allowed_clients: str = "/etc/mailengine/keys/operators"
    client_key: str = ""


@dataclass(frozen=True)
class SecurityConfig:
    """Who may submit jobs, and where mail may not go. See docs/SECURITY.md."""

    curve: CurveConfig = field(default_factory=CurveConfig)
    allow_plain_remote: bool = False  # non-loopback ingest/events/control without CURVE
    allow_private_destinations: bool = False  # MX hosts at loopback, private... addresses
    allowed_destinations: tuple[str, ...] = ()  # networks allowed although not public


# The header fields DKIM signs by default (each instance present; engine.dkim), and those
# signed once more than present so none can be added in transit (RFC 6376 8.15).
DKIM_HEADERS = (
    "from", "sender", "reply-to", "subject", "date", "message-id", "to", "cc",
    "mime-version", "content-type", "content-transfer-encoding", "content-id",
    "content-description", "in-reply-to", "references", "list-id", "list-help",
    "list-unsubscribe", "list-unsubscribe-post", "list-subscribe", "list-post", "list-owner",
    "list-archive", "feedback-id",
)
DKIM_OVERSIGN = ("from", "to", "subject")


@dataclass(frozen=True)
class DkimKeyConfig:
    """One private key of a signing domain, and the UTC dates (inclusive) it signs."""

    selector: str
    key_file: str
    not_before: str | None = None  # "2026-11-30"
    not_after: str | None = None


@dataclass(frozen=True)
class DkimDomainConfig:
    """A signing domain: its keys (the newest valid one of each algorithm signs)."""

    keys: tuple[DkimKeyConfig, ...]
    unsigned_ok: bool = False  # no key valid: send unsigned rather than defer


@dataclass(frozen=True)
class DkimConfig:
    """DKIM signing (engine.dkim), by the domain of the From header."""

    enabled: bool = True
    domains: Mapping[str, DkimDomainConfig] = field(default_factory=_frozen_mapping)
    subdomains: bool = True  # a domain's keys also sign for its subdomains
    esp: str | None = None  # a domain of `domains` whose keys also sign every message
    headers: tuple[str, ...] = DKIM_HEADERS
    oversign: tuple[str, ...] = DKIM_OVERSIGN
    expiry: float = 0.0  # x= this long after t= (0: no x= tag)


@dataclass(frozen=True)
class ClusterHostConfig:
    """A host of the cluster as `mailengine status --cluster` and `queue --cluster` reach
    it (`cluster.hosts`): its control endpoint and, for a tcp one with control.curve,
    that host's control public key (its control.key)."""

    name: str
    control: str
    curve_server_key: str = ""


@dataclass(frozen=True)
class ClusterConfig:
    """Several engine hosts sharing limits and de-duplication through one Redis
    (engine.cluster; docs/SCALING.md). No `redis`: this host alone, as without a cluster."""

    redis: str = ""  # redis://[user:password@]host[:port][/db], rediss://..., unix://path
    host: str = ""  # this host's name in the cluster; "" = `hostname`
    prefix: str = "mailengine"  # of every key the engine writes in Redis
    timeout: float = 0.5  # connecting to Redis, and each command
    retry: float = 5.0  # while Redis is unreachable, it is tried again this often
    duplicate_window: float = 86400.0  # a job id accepted anywhere is a duplicate this long
    lease: float = 1.0  # a cluster-wide rate's turns are leased at most this far ahead
    poll: float = 1.0  # a worker reads the suspensions other hosts published this often
    # A worker's cluster connection slots stop counting this long after its last word to
    # Redis (a host killed -9); renewed every `poll` (a third of it at most) meanwhile.
    connection_lease: float = 10.0
    # A provider's limit learned from a push-back is shared this long (the lowest of the
    # hosts'): a worker that learned nothing of it starts there; 0 = not shared.
    ceiling_expiry: float = 3600.0
    # The hosts `status --cluster` and `queue --cluster` ask (this one too, if wanted).
    # Only the commands read it: not compared, so a reload changing it is no restart.
    hosts: tuple[ClusterHostConfig, ...] = field(default=(), compare=False)


@dataclass(frozen=True, kw_only=True)
class Config:
    """The whole configuration. Build it with `load` or `from_dict`, which validate.

    `ip_pools` are the named groups of sending IPs a job may choose (`pool` is the
    SMTP connection pool's settings): one named `default`, of every address in
    `ips`, always exists unless the config defines its own `default`.

    `warnings` are what the file should change although it loads (an old key
    name), each starting with the key's dotted path as errors do; they are not
    part of the config (not compared, not in `to_dict`).
    """

    ingest: str = "tcp://127.0.0.1:5570"
    events: str = "tcp://127.0.0.1:5571"
    control: str = "ipc:///run/mailengine/control.sock"
    # Written in the file as `control: {endpoint: ..., curve: {...}}` (engine.config.loader).
    control_curve: ControlCurveConfig = field(default_factory=ControlCurveConfig,
                                              metadata=NOT_PLAIN)
    run_dir: str = "/run/mailengine"
    events_log: str = "/var/log/mailengine/events.jsonl"
    spool: str = "/var/spool/mailengine"
    hostname: str = field(default_factory=socket.getfqdn)
    log_level: str = "info"
    drain_timeout: float = 60.0
    ips: tuple[IpConfig, ...]
    ip_pools: Mapping[str, tuple[str, ...]] = field(default_factory=_frozen_mapping)
    smtp: SmtpConfig = field(default_factory=SmtpConfig)
    tls_policy: TlsPolicyConfig = field(default_factory=TlsPolicyConfig)
    tlsrpt: TlsRptConfig = field(default_factory=TlsRptConfig)
    pool: PoolConfig = field(default_factory=PoolConfig)
    dns: DnsConfig = field(default_factory=DnsConfig)
    routes: Mapping[str, Route] = field(default_factory=_frozen_mapping)
    statsd: StatsdConfig = field(default_factory=StatsdConfig)
    limits: LimitsConfig = field(default_factory=LimitsConfig)
    retry: RetryConfig = field(default_factory=RetryConfig)
    providers: Mapping[str, str] = field(default_factory=_frozen_mapping)
    shaping: ShapingConfig = field(default_factory=ShapingConfig)
    throttle: ThrottleConfig = field(default_factory=ThrottleConfig)
    categories: CategoriesConfig = field(default_factory=CategoriesConfig)
    warmup: WarmupConfig = field(default_factory=WarmupConfig)
    security: SecurityConfig = field(default_factory=SecurityConfig)
    dkim: DkimConfig = field(default_factory=DkimConfig)
    cluster: ClusterConfig = field(default_factory=ClusterConfig)
    warnings: tuple[str, ...] = field(default=(), compare=False, metadata=NOT_PLAIN)

    def __post_init__(self) -> None:
        # Frozen all the way down: copy mappings into read-only proxies.
        ip_pools = dict(self.ip_pools)
        ip_pools.setdefault("default", tuple(ip.address for ip in self.ips))
        object.__setattr__(self, "ip_pools", MappingProxyType(ip_pools))
        object.__setattr__(self, "routes", MappingProxyType(dict(self.routes)))
        object.__setattr__(self, "providers", MappingProxyType(dict(self.providers)))
        object.__setattr__(self, "warnings", tuple(self.warnings))
