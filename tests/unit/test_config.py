"""engine.config: defaults, every refusal naming its key's path, units, files."""
from __future__ import annotations

import dataclasses
import re
import socket
from pathlib import Path
from typing import Any

import pytest
import yaml

from engine import cli, config
from engine.config import (
    ConfigError,
    SendingLimits,
    from_dict,
    load,
    parse_duration,
    parse_size,
    to_dict,
)
from tests.support import ROOT

SHIPPED = ROOT / "conf" / "mailengine.yaml"
EXAMPLES = sorted((ROOT / "conf" / "examples").glob("*.yaml"))


def minimal(**extra: Any) -> dict[str, Any]:
    return {"hostname": "mta.example.com", "ips": [{"address": "192.0.2.10"}], **extra}


def refused(data: Any) -> ConfigError:
    with pytest.raises(ConfigError) as info:
        from_dict(data)
    return info.value


def write(tmp_path: Path, text: str) -> str:
    path = tmp_path / "mailengine.yaml"
    path.write_text(text, encoding="utf-8")
    return str(path)


# --- defaults -----------------------------------------------------------------


def test_minimal_config_takes_documented_defaults() -> None:
    cfg = from_dict(minimal())
    assert cfg.ingest == "tcp://127.0.0.1:5570"
    assert cfg.events == "tcp://127.0.0.1:5571"
    assert cfg.control == "ipc:///run/mailengine/control.sock"
    assert cfg.run_dir == "/run/mailengine"
    assert cfg.events_log == "/var/log/mailengine/events.jsonl"
    assert cfg.spool == "/var/spool/mailengine"
    assert cfg.log_level == "info"
    assert cfg.drain_timeout == 60.0
    assert cfg.smtp.port == 25 and cfg.smtp.tls == "opportunistic"
    assert cfg.smtp.tls_broken_ttl == 3600.0 and cfg.smtp.ca_file is None
    assert (cfg.smtp.max_reply_lines, cfg.smtp.max_line_length) == (100, 4096)
    assert cfg.smtp.discard_ehlo_keywords == ()
    assert dataclasses.astuple(cfg.smtp.timeouts) == (
        30, 300, 300, 120, 60, 300, 300, 120, 180, 600, 60, 10, 600, 1800)
    assert dataclasses.astuple(cfg.pool) == (10, 1000, 300.0, 60.0, 30.0, 15.0, 5.0, 3, 2.0, 10.0,
                                              1000)
    assert dataclasses.astuple(cfg.dns) == ((), 53, 5.0, 50000, 32, False)
    assert dict(cfg.routes) == {}
    assert dataclasses.astuple(cfg.statsd) == (True, "127.0.0.1", 8125, "mailengine")
    assert dataclasses.astuple(cfg.limits) == (50 * 2**20, 1000, 1000, 0.5, "reject")
    assert cfg.retry.schedule == (60, 300, 900, 1800, 3600, 7200, 14400)
    assert cfg.retry.max_age == 5 * 86400


def test_discard_ehlo_keywords_are_lower_cased() -> None:
    cfg = config.from_dict(minimal(smtp={"discard_ehlo_keywords": ["PIPELINING", "Chunking"]}))
    assert cfg.smtp.discard_ehlo_keywords == ("pipelining", "chunking")


def test_the_brief_example_works_without_hostname() -> None:
    cfg = from_dict({"ips": [{"address": "127.0.0.2"}]})
    assert cfg.hostname == socket.getfqdn()
    assert cfg.ips[0].helo == cfg.hostname


def test_helo_defaults_to_hostname_and_can_be_set_per_ip() -> None:
    cfg = from_dict(minimal(ips=[{"address": "192.0.2.10"},
                                 {"address": "192.0.2.11", "helo": "mta2.example.com"}]))
    assert [ip.helo for ip in cfg.ips] == ["mta.example.com", "mta2.example.com"]


def test_durations_and_sizes_are_seconds_and_bytes_once_loaded() -> None:
    cfg = from_dict(minimal(pool={"idle_timeout": "500ms"}, limits={"max_message_size": "10MB"}))
    assert cfg.pool.idle_timeout == 0.5
    assert cfg.limits.max_message_size == 10_000_000


def test_empty_section_takes_all_its_defaults() -> None:
    assert from_dict(minimal(smtp=None)).smtp == config.SmtpConfig()


def test_throttle_takes_documented_defaults() -> None:
    throttle = from_dict(minimal()).throttle
    assert throttle == config.ThrottleConfig()
    assert (throttle.slow_start, throttle.start_rate, throttle.growth) == (True, 20.0, 5.0)
    assert (throttle.decrease, throttle.increase, throttle.min_rate) == (0.5, 0.5, 0.05)
    assert (throttle.probe_interval, throttle.probe_every, throttle.pushback_after) == (
        1.0, 5.0, 2)
    assert (throttle.remember, throttle.block_suspend, throttle.retry_after) == (
        86400.0, 3600.0, 0.0)
    assert throttle.default_rules and throttle.rules == ()


def test_throttle_durations_take_units() -> None:
    throttle = from_dict(minimal(throttle={
        "probe_interval": "500ms", "probe_every": "1m", "remember": "2h",
        "block_suspend": "30m", "retry_after": "10s"})).throttle
    assert (throttle.probe_interval, throttle.probe_every, throttle.remember,
            throttle.block_suspend, throttle.retry_after) == (0.5, 60.0, 7200.0, 1800.0, 10.0)
    assert from_dict(minimal(throttle={"growth": 1, "decrease": 1})).throttle.growth == 1.0


def test_throttle_holdoff_still_loads_with_a_warning_naming_it() -> None:
    """The key of the old design, retired: a file that has it still loads (a config must
    not stop an upgraded engine from starting), and says what to do."""
    cfg = from_dict(minimal(throttle={"holdoff": "2s", "decrease": 0.7}))
    assert cfg.throttle == config.ThrottleConfig(decrease=0.7)
    assert len(cfg.warnings) == 1
    assert cfg.warnings[0].startswith("throttle.holdoff: no longer used: ")
    assert cfg.warnings[0].endswith("; remove the key")


# --- ips and ip_pools --------------------------------------------------------


def test_cluster_is_off_by_default_and_reads_its_keys() -> None:
    assert from_dict(minimal()).cluster.redis == ""
    cfg = from_dict(minimal(cluster={"redis": "redis://user:pw@10.0.0.5:6380/2", "host": "mx-1",
                                     "prefix": "mail:out", "timeout": "250ms", "retry": "2s",
                                     "duplicate_window": "2d", "lease": "500ms"},
                            shaping={"providers": {"yahoo": {"cluster_rate": 300}}}))
    assert (cfg.cluster.redis, cfg.cluster.host, cfg.cluster.prefix) == \
        ("redis://user:pw@10.0.0.5:6380/2", "mx-1", "mail:out")
    assert (cfg.cluster.timeout, cfg.cluster.retry, cfg.cluster.duplicate_window,
            cfg.cluster.lease) == (0.25, 2.0, 172800.0, 0.5)
    assert SendingLimits.of(cfg.pool, cfg.shaping, "192.0.2.10", "yahoo").cluster_rate == 300
    assert SendingLimits.of(cfg.pool, cfg.shaping, "192.0.2.10", "google").cluster_rate == 0
    assert cfg.cluster.connection_lease == 10.0
    limited = from_dict(minimal(cluster={"connection_lease": "30s"}, shaping={
        "providers": {"yahoo": {"cluster_connections": 40}}}))
    assert limited.cluster.connection_lease == 30.0
    assert SendingLimits.of(limited.pool, limited.shaping, "192.0.2.10",
                            "yahoo").cluster_connections == 40
    assert SendingLimits.of(limited.pool, limited.shaping, "192.0.2.10",
                            "google").cluster_connections == 0


def test_cluster_hourly_per_provider_and_cluster_limits_per_ip_pool() -> None:
    cfg = from_dict({"hostname": "mta.example.com",
                     "ips": [{"address": "192.0.2.10"}, {"address": "192.0.2.11"}],
                     "ip_pools": {"bulk": ["192.0.2.11"]},
                     "shaping": {"cluster_hourly": 1000,
                                 "providers": {"yahoo": {"cluster_hourly": 50000}},
                                 "ip_pools": {"bulk": {"yahoo": {"cluster_rate": 100,
                                                                 "cluster_hourly": 20000}}}}})
    assert SendingLimits.of(cfg.pool, cfg.shaping, "192.0.2.10", "yahoo").cluster_hourly == 50000
    assert SendingLimits.of(cfg.pool, cfg.shaping, "192.0.2.10", "google").cluster_hourly == 1000
    bulk = cfg.shaping.ip_pools["bulk"]["yahoo"]
    assert (bulk.cluster_rate, bulk.cluster_hourly) == (100.0, 20000)
    assert from_dict(to_dict(cfg)) == cfg


def test_cluster_hosts_list_each_hosts_control_and_are_no_restart() -> None:
    hosts = [{"name": "mta-a", "control": "ipc:///run/mailengine/control.sock"},
             {"name": "mta-b", "control": "tcp://10.0.0.2:5572",
              "curve_server_key": "/etc/mailengine/keys/mta-b.control.key"}]
    cfg = from_dict(minimal(cluster={"hosts": hosts}))
    assert [(h.name, h.control, h.curve_server_key) for h in cfg.cluster.hosts] == [
        ("mta-a", "ipc:///run/mailengine/control.sock", ""),
        ("mta-b", "tcp://10.0.0.2:5572", "/etc/mailengine/keys/mta-b.control.key")]
    assert from_dict(to_dict(cfg)).cluster.hosts == cfg.cluster.hosts
    # Only the commands read it: a reload that changes it needs no restart.
    assert cfg.cluster == from_dict(minimal()).cluster


def test_ip_pools_default_to_every_ip() -> None:
    cfg = from_dict(minimal(ips=["192.0.2.10", "192.0.2.11"]))
    assert dict(cfg.ip_pools) == {"default": ("192.0.2.10", "192.0.2.11")}
    assert cfg.warnings == ()


def test_defined_ip_pools_keep_a_default_pool_of_every_ip() -> None:
    cfg = from_dict(minimal(ips=["192.0.2.10", "192.0.2.11"], ip_pools={"blue": ["192.0.2.11"]}))
    assert dict(cfg.ip_pools) == {"blue": ("192.0.2.11",),
                                  "default": ("192.0.2.10", "192.0.2.11")}


def test_a_defined_default_pool_wins() -> None:
    cfg = from_dict(minimal(ips=["192.0.2.10", "192.0.2.11"],
                            ip_pools={"default": ["192.0.2.10"]}))
    assert cfg.ip_pools["default"] == ("192.0.2.10",)


def test_pools_the_old_name_of_ip_pools_still_loads_with_a_warning() -> None:
    data = minimal(ips=["192.0.2.10", "192.0.2.11"])
    old = from_dict({**data, "pools": {"blue": ["192.0.2.11"]}})
    new = from_dict({**data, "ip_pools": {"blue": ["192.0.2.11"]}})
    assert old == new and old.ip_pools["blue"] == ("192.0.2.11",)
    assert old.warnings == ("pools: is now called ip_pools; rename the key "
                            "(the old name is still accepted)",)
    assert new.warnings == () and "warnings" not in to_dict(old)


def test_pools_and_ip_pools_together_are_refused_naming_both() -> None:
    err = refused(minimal(pools={"blue": ["192.0.2.10"]}, ip_pools={"red": ["192.0.2.10"]}))
    assert str(err) == "pools: the old name of ip_pools; give one of them, not both"
    assert err.key == "pools"


def test_an_error_under_the_old_name_names_the_key_as_written() -> None:
    err = refused(minimal(pools={"blue": ["10.0.0.9"]}))
    assert str(err) == "pools.blue[0]: 10.0.0.9 is not in ips"


def test_warnings_is_no_config_key() -> None:
    assert str(refused(minimal(warnings=["x"]))).startswith("warnings: unknown key")


def test_check_config_prints_warnings_and_exits_0(tmp_path: Path,
                                                   capsys: pytest.CaptureFixture[str]) -> None:
    path = write(tmp_path, "hostname: mta.example.com\nips: [192.0.2.10]\n"
                           "pools: {blue: [192.0.2.10]}\n")
    assert cli.main(["check-config", "-q", "--no-host-check", "-c", path]) == 0
    assert capsys.readouterr().err == ("mailengine: warning: pools: is now called ip_pools; "
                                       "rename the key (the old name is still accepted)\n")


def test_ip_addresses_are_normalised_everywhere() -> None:
    cfg = from_dict(minimal(ips=["2001:DB8:0::0A"], ip_pools={"v6": ["2001:db8::a"]},
                            dns={"nameservers": ["2001:0db8::53"]}))
    assert cfg.ips[0].address == "2001:db8::a"
    assert cfg.ip_pools["v6"] == ("2001:db8::a",)
    assert cfg.dns.nameservers == ("2001:db8::53",)


def test_ips_given_as_bare_addresses() -> None:
    assert from_dict(minimal(ips=["192.0.2.10"])).ips == (
        config.IpConfig("192.0.2.10", "mta.example.com"),)


@pytest.mark.parametrize("helo", ["mta1.example.com", "localhost", "[192.0.2.1]",
                                  "[IPv6:2001:db8::1]", "a-b.c0"])
def test_valid_helo_names(helo: str) -> None:
    assert from_dict(minimal(ips=[{"address": "192.0.2.10", "helo": helo}])).ips[0].helo == helo


# --- routes -----------------------------------------------------------------


@pytest.mark.parametrize("target, host, port", [
    ("mx.example.net", "mx.example.net", None),
    ("MX.Example.NET:2525", "mx.example.net", 2525),
    ("192.0.2.25:26", "192.0.2.25", 26),
    ("[2001:db8::25]:2525", "2001:db8::25", 2525),
    ("[2001:db8::25]", "2001:db8::25", None),
])
def test_route_forms(target: str, host: str, port: int | None) -> None:
    cfg = from_dict(minimal(routes={"Example.COM": target}))
    assert cfg.routes["example.com"] == config.Route(host, port)


def test_star_route_matches_every_domain_key() -> None:
    assert from_dict(minimal(routes={"*": "relay.example.net"})).routes["*"].host == \
        "relay.example.net"


def test_route_prints_in_the_form_it_was_written() -> None:
    assert str(config.Route("2001:db8::25", 2525)) == "[2001:db8::25]:2525"
    assert str(config.Route("mx.example.net")) == "mx.example.net"


# --- every refusal starts with the dotted path of the key at fault -----------

REFUSALS = [
    # (config, path, words in the message)
    (minimal(smtp={"tls": "maybe"}), "smtp.tls",
     "must be one of none, opportunistic, required, verify (got 'maybe')"),
    (minimal(ips=["192.0.2.10", {"address": "1.2.3"}]), "ips[1].address",
     "not an IP address: '1.2.3'"),
    (minimal(pool={"max_conections": 5}), "pool.max_conections",
     "unknown key (did you mean max_connections?)"),
    (minimal(ip_pools={"blue": ["10.0.0.9"]}), "ip_pools.blue[0]", "10.0.0.9 is not in ips"),
    (minimal(ip_pools={"blue": []}), "ip_pools.blue", "at least one"),
    (minimal(ip_pools={"": ["192.0.2.10"]}), "ip_pools", "pool names"),
    (minimal(ip_pools={"a b": ["192.0.2.10"]}), "ip_pools.a b", "pool names"),
    (minimal(ip_pools={"blue": ["192.0.2.10", "192.0.2.10"]}), "ip_pools.blue[1]",
     "listed twice"),
    (minimal(ip_pools=["192.0.2.10"]), "ip_pools", "must be a mapping"),
    ({"hostname": "mta.example.com"}, "ips", "required"),
    (minimal(ips=[]), "ips", "required"),
    (minimal(ips="192.0.2.10"), "ips", "must be a list"),
    (minimal(ips=[{"helo": "x.example.com"}]), "ips[0].address", "required"),
    (minimal(ips=[{"address": "192.0.2.10", "hello": "x"}]), "ips[0].hello", "did you mean helo?"),
    (minimal(ips=["192.0.2.10", "192.0.2.010"]), "ips[1].address", "not an IP address"),
    (minimal(ips=["2001:db8::1", "2001:DB8:0::1"]), "ips[1].address",
     "2001:db8::1 is listed twice (also ips[0].address)"),
    (minimal(ips=[4960]), "ips[0].address", "quote it"),
    (minimal(ips=[{"address": 4960}]), "ips[0].address", "quote it"),
    (minimal(ips=[["192.0.2.10"]]), "ips[0]", "must be a mapping"),
    (minimal(ips=[{"address": "192.0.2.10", "helo": "bad_name"}]), "ips[0].helo",
     "not a host name"),
    (minimal(ips=[{"address": "192.0.2.10", "helo": "[2001:db8::1]"}]), "ips[0].helo",
     "address literal"),
    (minimal(hostname="-bad.example.com"), "hostname", "not a host name"),
    (minimal(hostname="a.example.com."), "hostname", "not a host name"),
    (minimal(ingest="http://127.0.0.1:5570"), "ingest", "tcp://, ipc:// or inproc://"),
    (minimal(events="tcp://127.0.0.1:5570"), "events", "same endpoint as ingest"),
    (minimal(control=5), "control", "must be a string"),
    (minimal(run_dir=""), "run_dir", "must not be empty"),
    (minimal(spool=None), "spool", "must be a string"),
    (minimal(events_log=False), "events_log", "must be a string"),
    (minimal(log_level="INFO"), "log_level", "must be one of debug, info, warning, error"),
    (minimal(drain_timeout="forever"), "drain_timeout", "not a duration"),
    (minimal(flavour=True), "flavour", "unknown key (known keys: ingest, events"),
    (minimal(smtp={"port": 0}), "smtp.port", "from 1 to 65535 (got 0)"),
    (minimal(smtp={"port": 65536}), "smtp.port", "from 1 to 65535"),
    (minimal(smtp={"port": True}), "smtp.port", "must be an integer (got True)"),
    (minimal(smtp={"port": "25"}), "smtp.port", "must be an integer (got '25')"),
    (minimal(smtp={"port": 25.0}), "smtp.port", "must be an integer"),
    (minimal(smtp={"tls": True}), "smtp.tls", "must be one of"),
    (minimal(smtp={"tls_broken_ttl": "1 hour"}), "smtp.tls_broken_ttl", "not a duration"),
    (minimal(smtp={"ca_file": ""}), "smtp.ca_file", "must not be empty"),
    (minimal(smtp={"max_reply_lines": 0}), "smtp.max_reply_lines", ">= 1"),
    (minimal(smtp={"max_line_length": 511}), "smtp.max_line_length", ">= 512"),
    (minimal(smtp={"discard_ehlo_keywords": ["PIPE LINING"]}), "smtp.discard_ehlo_keywords[0]",
     "must be an EHLO keyword"),
    (minimal(smtp={"discard_ehlo_keywords": ["chunking", "CHUNKING"]}),
     "smtp.discard_ehlo_keywords[1]", "listed twice"),
    (minimal(smtp={"timeouts": {"connect": 0}}), "smtp.timeouts.connect", "more than 0"),
    (minimal(smtp={"timeouts": {"final_dot": "10x"}}), "smtp.timeouts.final_dot", "not a duration"),
    (minimal(smtp={"timeouts": {"conect": "5s"}}), "smtp.timeouts.conect", "did you mean connect?"),
    (minimal(smtp={"timeouts": "30s"}), "smtp.timeouts", "must be a mapping"),
    (minimal(smtp=[]), "smtp", "must be a mapping"),
    (minimal(pool={"max_connections": 0}), "pool.max_connections", ">= 1"),
    (minimal(pool={"max_messages": False}), "pool.max_messages", "must be an integer"),
    (minimal(pool={"idle_timeout": -1}), "pool.idle_timeout", ">= 0 seconds"),
    (minimal(pool={"connect_backoff": "-30s"}), "pool.connect_backoff", "not a duration"),
    (minimal(dns={"nameservers": ["resolver.example.net"]}), "dns.nameservers[0]",
     "not an IP address"),
    (minimal(dns={"nameservers": "192.0.2.53"}), "dns.nameservers", "must be a list"),
    (minimal(dns={"nameservers": ["192.0.2.53", "192.0.2.53"]}), "dns.nameservers[1]",
     "listed twice"),
    (minimal(dns={"port": 70000}), "dns.port", "from 1 to 65535"),
    (minimal(dns={"timeout": 0}), "dns.timeout", "more than 0"),
    (minimal(dns={"cache_size": -1}), "dns.cache_size", ">= 0"),
    (minimal(dns={"max_in_flight": 0}), "dns.max_in_flight", ">= 1"),
    (minimal(routes={"example.com": "2001:db8::25"}), "routes.example.com", "brackets"),
    (minimal(routes={"example.com": "mx.example.net:smtp"}), "routes.example.com",
     "port must be a number"),
    (minimal(routes={"example.com": "mx.example.net:0"}), "routes.example.com", "from 1 to 65535"),
    (minimal(routes={"example.com": "mx.example.net:"}), "routes.example.com",
     "port must be a number"),
    (minimal(routes={"example.com": "[mx.example.net]:25"}), "routes.example.com",
     "not an IP address"),
    (minimal(routes={"example.com": "bad_host"}), "routes.example.com", "not a host name"),
    (minimal(routes={"example.com": 25}), "routes.example.com", "host:port"),
    (minimal(routes={"example.com": ""}), "routes.example.com", "host:port"),
    (minimal(routes={"*.example.com": "mx.example.net"}), "routes.*.example.com",
     "not a domain name"),
    (minimal(routes={"Example.com": "a.example.net", "example.COM": "b.example.net"}),
     "routes.example.COM", "listed twice"),
    (minimal(statsd={"enabled": "yes"}), "statsd.enabled", "must be true or false"),
    (minimal(statsd={"enabled": 1}), "statsd.enabled", "must be true or false (got 1)"),
    (minimal(statsd={"host": "stats host"}), "statsd.host", "not a host name or IP address"),
    (minimal(statsd={"prefix": "mail..engine"}), "statsd.prefix", "dot-separated"),
    (minimal(statsd={"prefix": ""}), "statsd.prefix", "dot-separated"),
    (minimal(limits={"max_message_size": "50mb"}), "limits.max_message_size", "not a size"),
    (minimal(limits={"max_message_size": 0}), "limits.max_message_size", "more than 0"),
    (minimal(limits={"max_recipients": 0}), "limits.max_recipients", ">= 1"),
    (minimal(limits={"max_in_flight": None}), "limits.max_in_flight", "must be an integer"),
    (minimal(limits={"retry_share": 0}), "limits.retry_share", "must be > 0.0 and <= 1.0"),
    (minimal(limits={"retry_share": 1.5}), "limits.retry_share", "must be > 0.0 and <= 1.0"),
    (minimal(limits={"long_lines": "wrap"}), "limits.long_lines", "must be one of reject, encode"),
    (minimal(pool={"keepalive_interval": 0}), "pool.keepalive_interval", "more than 0"),
    (minimal(pool={"keepalive_count": 0}), "pool.keepalive_count", ">= 1"),
    (minimal(pool={"max_idle": -1}), "pool.max_idle", ">= 0"),
    (minimal(pool={"reuse_check_timeout": "0s"}), "pool.reuse_check_timeout", "more than 0"),
    (minimal(retry={"schedule": []}), "retry.schedule", "at least one"),
    (minimal(retry={"schedule": "1m"}), "retry.schedule", "must be a list"),
    (minimal(retry={"schedule": ["1m", "0s"]}), "retry.schedule[1]", "more than 0"),
    (minimal(retry={"schedule": ["1m", "soon"]}), "retry.schedule[1]", "not a duration"),
    (minimal(retry={"max_age": "5 days"}), "retry.max_age", "not a duration"),
    (minimal(throttle={"slow_start": "yes"}), "throttle.slow_start", "must be true or false"),
    (minimal(throttle={"start_rate": 0}), "throttle.start_rate", "must be > 0"),
    (minimal(throttle={"growth": 0}), "throttle.growth", "must be > 0 and <= 1000 (got 0)"),
    (minimal(throttle={"growth": 1500}), "throttle.growth",
     "must be > 0 and <= 1000 (got 1500)"),
    (minimal(throttle={"decrease": 0}), "throttle.decrease", "must be > 0 and <= 1"),
    (minimal(throttle={"increase": -1}), "throttle.increase", "must be >= 0"),
    (minimal(throttle={"min_rate": 0}), "throttle.min_rate", "must be > 0"),
    (minimal(throttle={"probe_interval": 0}), "throttle.probe_interval", "more than 0"),
    (minimal(throttle={"probe_every": "0s"}), "throttle.probe_every", "more than 0"),
    (minimal(throttle={"pushback_after": 0}), "throttle.pushback_after", "must be >= 1"),
    (minimal(throttle={"pushback_after": 1.5}), "throttle.pushback_after",
     "must be an integer"),
    (minimal(throttle={"remember": "1 day"}), "throttle.remember", "not a duration"),
    (minimal(throttle={"block_suspend": -1}), "throttle.block_suspend", ">= 0 seconds"),
    (minimal(throttle={"holdof": "2s"}), "throttle.holdof", "unknown key"),
    ({"ips": ["192.0.2.10"], 5: "x"}, "5", "keys must be strings"),
    (minimal(cluster={"redis": "http://r:6379"}), "cluster.redis", "must be redis://"),
    (minimal(cluster={"redis": "redis://:pw@"}), "cluster.redis", "it is not shown"),
    (minimal(cluster={"redis": "redis:/r"}), "cluster.redis", "must be redis://"),
    (minimal(cluster={"host": "a b"}), "cluster.host", "letters, digits"),
    (minimal(cluster={"host": "a:b"}), "cluster.host", "letters, digits"),
    (minimal(cluster={"prefix": "me:"}), "cluster.prefix", "':'-separated parts"),
    (minimal(cluster={"timeout": 0}), "cluster.timeout", "more than 0"),
    (minimal(cluster={"lease": "0s"}), "cluster.lease", "more than 0"),
    (minimal(cluster={"duplicate_window": "forever"}), "cluster.duplicate_window",
     "not a duration"),
    (minimal(cluster={"redis_url": "redis://r"}), "cluster.redis_url", "unknown key"),
    (minimal(cluster={"hosts": {"a": "ipc:///x"}}), "cluster.hosts", "must be a list"),
    (minimal(cluster={"hosts": [{"name": "a"}]}), "cluster.hosts[0].control", "missing"),
    (minimal(cluster={"hosts": [{"control": "ipc:///x"}]}), "cluster.hosts[0].name",
     "missing"),
    (minimal(cluster={"hosts": [{"name": "a b", "control": "ipc:///x"}]}),
     "cluster.hosts[0].name", "letters, digits"),
    (minimal(cluster={"hosts": [{"name": "a", "control": "inproc://x"}]}),
     "cluster.hosts[0].control", "tcp:// or ipc://"),
    (minimal(cluster={"hosts": [{"name": "a", "control": "10.0.0.2:5572"}]}),
     "cluster.hosts[0].control", "ZeroMQ endpoint"),
    (minimal(cluster={"hosts": [{"name": "a", "control": "ipc:///x", "key": "k"}]}),
     "cluster.hosts[0].key", "unknown key"),
    (minimal(cluster={"hosts": [{"name": "a", "control": "ipc:///x"},
                                {"name": "a", "control": "ipc:///y"}]}),
     "cluster.hosts[1].name", "listed twice"),
    (minimal(shaping={"providers": {"yahoo": {"cluster_rate": -1}}}),
     "shaping.providers.yahoo.cluster_rate", "must be >= 0"),
    (minimal(shaping={"ips": {"192.0.2.10": {"yahoo": {"cluster_rate": 5}}}}),
     "shaping.ips.192.0.2.10.yahoo.cluster_rate", "set it under shaping.providers"),
    (minimal(shaping={"providers": {"yahoo": {"cluster_connections": 2.5}}}),
     "shaping.providers.yahoo.cluster_connections", "integer"),
    (minimal(shaping={"cluster_connections": -1}), "shaping.cluster_connections", ">= 0"),
    (minimal(shaping={"ips": {"192.0.2.10": {"yahoo": {"cluster_connections": 5}}}}),
     "shaping.ips.192.0.2.10.yahoo.cluster_connections", "set it under shaping.providers"),
    (minimal(cluster={"connection_lease": 0}), "cluster.connection_lease", "more than 0"),
    (minimal(shaping={"ips": {"192.0.2.10": {"yahoo": {"cluster_hourly": 5}}}}),
     "shaping.ips.192.0.2.10.yahoo.cluster_hourly", "set it under shaping.providers"),
    (minimal(shaping={"providers": {"yahoo": {"cluster_hourly": 1.5}}}),
     "shaping.providers.yahoo.cluster_hourly", "integer"),
    (minimal(shaping={"ip_pools": {"bulk": {"yahoo": {"cluster_hourly": 50}}}}),
     "shaping.ip_pools.bulk", "no IP group bulk in ip_pools"),
    (minimal(shaping={"ip_pools": {"default": {"yahoo": {"rate": 5}}}}),
     "shaping.ip_pools.default.yahoo.rate", "unknown key"),
    (minimal(shaping={"ip_pools": {"default": {"Yahoo!": {"cluster_rate": 5}}}}),
     "shaping.ip_pools.default.Yahoo!", "provider names"),
]


@pytest.mark.parametrize("data, path, words", REFUSALS,
                         ids=[f"{path}:{words[:30]}" for _, path, words in REFUSALS])
def test_refusal_names_the_dotted_path(data: dict[str, Any], path: str, words: str) -> None:
    err = refused(data)
    assert str(err).startswith(f"{path}: "), str(err)
    assert words in str(err)
    assert err.key == path


@pytest.mark.parametrize("document", [[], "ips", 5])
def test_top_level_must_be_a_mapping(document: Any) -> None:
    assert str(refused(document)).startswith("(top level): must be a mapping")


def test_empty_document_says_ips_is_required() -> None:
    assert str(refused(None)).startswith("ips: required")


def test_config_error_is_a_value_error() -> None:
    assert issubclass(ConfigError, ValueError)


# --- durations and sizes -----------------------------------------------------


@pytest.mark.parametrize("value, seconds", [
    (0, 0.0), (30, 30.0), (1.5, 1.5), ("500ms", 0.5), ("30s", 30.0), ("5m", 300.0),
    ("1h", 3600.0), ("4d", 345600.0), ("1.5h", 5400.0), (" 10 s ", 10.0), ("100ms", 0.1),
])
def test_parse_duration(value: Any, seconds: float) -> None:
    assert parse_duration(value, "x.y") == seconds
    assert isinstance(parse_duration(value, "x.y"), float)


@pytest.mark.parametrize("value", [
    "30", "5x", "5 minutes", "1h30m", "-1s", "30S", "5M", "", "s", ".5s", True, False, None,
    -1, -0.5, float("inf"), float("nan"), [30], {"s": 30},
])
def test_parse_duration_refuses(value: Any) -> None:
    with pytest.raises(ConfigError, match=r"^x\.y: "):
        parse_duration(value, "x.y")


def test_bad_duration_unit_lists_the_units() -> None:
    with pytest.raises(ConfigError, match="unit ms, s, m, h or d"):
        parse_duration("5w", "retry.max_age")


@pytest.mark.parametrize("value, size", [
    (0, 0), (1024, 1024), ("10MB", 10_000_000), ("50MiB", 50 * 2**20), ("512KB", 512_000),
    ("512KiB", 512 * 1024), ("1GB", 10**9), ("1GiB", 2**30), ("100B", 100), ("1.5KiB", 1536),
    ("2 MB", 2_000_000),
])
def test_parse_size(value: Any, size: int) -> None:
    assert parse_size(value, "limits.max_message_size") == size


@pytest.mark.parametrize("value", [
    "10XB", "10mb", "10 megabytes", "1024", "-1KB", "", "MB", True, None, -1, 1.5, ["1MB"],
])
def test_parse_size_refuses(value: Any) -> None:
    with pytest.raises(ConfigError, match=r"^limits\.max_message_size: "):
        parse_size(value, "limits.max_message_size")


# --- immutability and plain data -----------------------------------------------


def test_config_is_immutable_all_the_way_down() -> None:
    cfg = from_dict(minimal(routes={"example.com": "mx.example.net"}))
    with pytest.raises(dataclasses.FrozenInstanceError):
        cfg.ingest = "tcp://0.0.0.0:1"  # type: ignore[misc]
    with pytest.raises(dataclasses.FrozenInstanceError):
        cfg.smtp.timeouts.connect = 1.0  # type: ignore[misc]
    with pytest.raises(TypeError):
        cfg.ip_pools["evil"] = ("192.0.2.10",)  # type: ignore[index]
    with pytest.raises(TypeError):
        cfg.routes["example.org"] = config.Route("x")  # type: ignore[index]
    assert isinstance(cfg.ips, tuple) and isinstance(cfg.retry.schedule, tuple)


def test_config_built_directly_gets_frozen_mappings_and_default_pool() -> None:
    cfg = config.Config(hostname="h.example.com", ips=(config.IpConfig("192.0.2.10", "h"),),
                        ip_pools={"blue": ("192.0.2.10",)})
    with pytest.raises(TypeError):
        cfg.ip_pools["x"] = ()  # type: ignore[index]
    assert cfg.ip_pools["default"] == ("192.0.2.10",)


def test_to_dict_is_plain_data_that_loads_back() -> None:
    cfg = from_dict(minimal(ips=["192.0.2.10", "2001:db8::1"],
                            ip_pools={"v6": ["2001:db8::1"]},
                            routes={"example.com": "[2001:db8::25]:2525", "*": "relay.example.net"},
                            retry={"schedule": ["30s", "2m"]}))
    plain = to_dict(cfg)
    assert plain["routes"] == {"example.com": "[2001:db8::25]:2525", "*": "relay.example.net"}
    assert plain["ip_pools"]["v6"] == ["2001:db8::1"]
    assert plain["retry"]["schedule"] == [30.0, 120.0]
    text = yaml.safe_dump(plain)  # only plain types: no tuples, proxies or dataclasses
    assert from_dict(yaml.safe_load(text)) == cfg


# --- files -------------------------------------------------------------------


def test_load_reads_a_file(tmp_path: Path) -> None:
    path = write(tmp_path, "hostname: mta.example.com\nips: [{address: 192.0.2.10}]\n"
                           "smtp: {port: 2525}\n")
    assert load(path).smtp.port == 2525


def test_load_uses_the_environment_variable(tmp_path: Path,
                                            monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("MAILENGINE_CONFIG", write(tmp_path, "ips: [192.0.2.77]\n"))
    assert load().ips[0].address == "192.0.2.77"


def test_load_defaults_to_the_etc_path(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("MAILENGINE_CONFIG", raising=False)
    if Path(config.DEFAULT_PATH).exists():
        pytest.skip(f"{config.DEFAULT_PATH} exists on this machine")
    with pytest.raises(ConfigError, match=f"^{re.escape(config.DEFAULT_PATH)}: cannot read"):
        load()


def test_missing_file_is_named(tmp_path: Path) -> None:
    missing = str(tmp_path / "nope.yaml")
    with pytest.raises(ConfigError, match=f"^{re.escape(missing)}: cannot read: No such file"):
        load(missing)


def test_directory_is_named(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=f"^{re.escape(str(tmp_path))}: cannot read"):
        load(str(tmp_path))


def test_yaml_syntax_error_names_file_and_line(tmp_path: Path) -> None:
    path = write(tmp_path, "ips:\n  - {address: 192.0.2.10}\nsmtp:\n  port: [25\n")
    with pytest.raises(ConfigError) as info:
        load(path)
    assert re.match(rf"^{re.escape(path)}:\d+: YAML syntax error: ", str(info.value))
    assert info.value.file == path


def test_yaml_error_line_is_where_the_problem_is(tmp_path: Path) -> None:
    path = write(tmp_path, "ips: [192.0.2.10]\nsmtp:\n  port: 25\n   tls: none\n")
    with pytest.raises(ConfigError, match=f"^{re.escape(path)}:4: YAML syntax error"):
        load(path)


def test_duplicate_key_is_refused_with_its_line(tmp_path: Path) -> None:
    path = write(tmp_path, "ips: [192.0.2.10]\nsmtp: {port: 25}\nlog_level: info\n"
                           "smtp: {tls: none}\n")
    with pytest.raises(ConfigError, match=f"^{re.escape(path)}:4: .*duplicate key 'smtp'"):
        load(path)


def test_yaml_merge_keys_may_be_overridden(tmp_path: Path) -> None:
    path = write(tmp_path, "ips: [192.0.2.10]\nsmtp:\n  <<: {port: 2525, tls: none}\n"
                           "  port: 2526\n")
    cfg = load(path)
    assert (cfg.smtp.port, cfg.smtp.tls) == (2526, "none")


def test_python_tags_are_not_executed(tmp_path: Path) -> None:
    path = write(tmp_path, "ips: !!python/object/apply:os.system ['true']\n")
    with pytest.raises(ConfigError, match=f"^{re.escape(path)}:1: YAML syntax error"):
        load(path)


def test_empty_file_says_ips_is_required(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"^ips: required") as info:
        load(write(tmp_path, "# nothing yet\n"))
    assert info.value.file is not None


def test_bad_value_in_a_file_names_the_key_and_keeps_the_file(tmp_path: Path) -> None:
    path = write(tmp_path, "ips: [192.0.2.10]\nsmtp:\n  tls: maybe\n")
    with pytest.raises(ConfigError, match=r"^smtp\.tls: must be one of") as info:
        load(path)
    assert info.value.file == path


def test_yaml_yes_is_a_boolean(tmp_path: Path) -> None:
    path = write(tmp_path, "ips: [192.0.2.10]\nstatsd: {enabled: no}\n")
    assert load(path).statsd.enabled is False


# --- shipped files stay true to the code ---------------------------------------


@pytest.mark.parametrize("path", [SHIPPED, *EXAMPLES], ids=lambda p: p.name)
def test_shipped_files_load(path: Path) -> None:
    cfg = load(str(path))
    assert cfg.ips and cfg.warnings == ()  # no old key names


def test_two_ips_example_has_what_it_promises() -> None:
    cfg = load(str(ROOT / "conf" / "examples" / "two-ips.yaml"))
    assert len(cfg.ips) == 2 and {"transactional", "bulk", "default"} <= set(cfg.ip_pools)
    assert cfg.routes and cfg.smtp.timeouts != config.Timeouts()


def test_cluster_example_shares_through_redis() -> None:
    cfg = load(str(ROOT / "conf" / "examples" / "cluster-host.yaml"))
    assert cfg.cluster.redis and cfg.cluster.host == "mta-a"
    assert config.SendingLimits.of(cfg.pool, cfg.shaping, "192.0.2.10", "yahoo").cluster_rate


def test_shipped_default_holds_every_default() -> None:
    shipped = to_dict(load(str(SHIPPED)))
    defaults = to_dict(from_dict({"hostname": shipped["hostname"], "ips": shipped["ips"]}))
    assert shipped == defaults
    raw = yaml.safe_load(SHIPPED.read_text(encoding="utf-8"))
    assert _leaf_paths(raw) >= _leaf_paths(defaults) - {"hostname"}  # hostname: machine's FQDN


def test_docs_describe_every_key() -> None:
    doc = (ROOT / "docs" / "CONFIG.md").read_text(encoding="utf-8")
    plain = to_dict(from_dict(minimal()))
    for path in _leaf_paths(plain) | {"address", "helo"}:
        assert f"`{path.rsplit('.', 1)[-1]}`" in doc, path


def _leaf_paths(data: dict[str, Any], prefix: str = "") -> set[str]:
    paths = set()
    for key, value in data.items():
        path = f"{prefix}{key}"
        if isinstance(value, dict) and key not in ("ip_pools", "routes"):
            paths |= _leaf_paths(value, path + ".")
        else:
            paths.add(path)
    return paths


def test_invalid_machine_name_asks_for_hostname(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(socket, "getfqdn", lambda: "build_box.local")
    err = refused({"ips": ["192.0.2.10"]})
    assert str(err).startswith("hostname: this machine's name 'build_box.local'")
    assert from_dict(minimal()).hostname == "mta.example.com"  # set explicitly: no lookup


def test_dane_needs_a_resolver_trusted_to_validate() -> None:
    err = refused(minimal(tls_policy={"dane": True}))
    assert "tls_policy.dane" in str(err) and "dns.trusted_ad: true" in str(err)
    cfg = from_dict(minimal(tls_policy={"dane": True},
                            dns={"nameservers": ["127.0.0.1"], "trusted_ad": True}))
    assert cfg.tls_policy.dane and cfg.dns.trusted_ad
    assert not from_dict(minimal()).tls_policy.dane


def test_forced_dane_needs_a_resolver_trusted_to_validate_too() -> None:
    err = refused(minimal(tls_policy={"domains": {"example.com": "dane"}}))
    assert "tls_policy.domains.example.com" in str(err) and "dns.trusted_ad" in str(err)
    err = refused(minimal(tls_policy={"providers": {"bigmail": "dane"}}))
    assert "tls_policy.providers.bigmail" in str(err)
    cfg = from_dict(minimal(tls_policy={"domains": {"example.com": "dane"}},
                            dns={"nameservers": ["127.0.0.1"], "trusted_ad": True}))
    assert cfg.tls_policy.domains == {"example.com": "dane"} and not cfg.tls_policy.dane
