"""Which TLS policy applies to one domain's mail: decided in one place, per delivery.

In order, the first that has something to say wins (docs/SECURITY.md, "TLS policies"):

1. the config's exception for the domain (`tls_policy.domains`) or its provider
   (`tls_policy.providers`): `none`, `opportunistic`, `required`, `verify`, `mta-sts` or
   `dane`. A forced `dane` is Postfix's `dane-only`: the MX answer must be authenticated
   (else `refusal`: deferred 4.7.5 before any connection) and every MX host tried must have
   usable TLSA records and match them (mode `dane-only`; engine.connector fails a host
   without, engine.dane.NoTlsa);
2. DANE (RFC 7672, engine.dane) when `tls_policy.dane` is on: the domain's MX answer is
   DNSSEC-authenticated and an MX host has usable TLSA records: mode `dane` (each host with
   records must match them; engine.connector). RFC 8461 2 gives it precedence over MTA-STS.
3. MTA-STS (RFC 8461, engine.mtasts) when `tls_policy.mta_sts` is on (or the exception
   says `mta-sts`): `enforce` allows only the policy's MX hosts and needs TLS with a
   certificate valid for the MX host's name; `testing` delivers as the default would, and
   reports what enforcing would have refused;
4. the default, `smtp.tls`.

A message with the header field `TLS-Required: No` (RFC 8689 5, Task.tls_optional) asks that
the receiver's policies be ignored: where DANE (2) or an enforced MTA-STS policy (3) was found,
the default (4) applies instead, reported as `dane-skipped` / `mta-sts-skipped`. The
config's exceptions (1) are the operator's word and stay; a policy in testing mode changes
nothing anyway. REQUIRETLS wins over the header (RFC 8689 5: the header is then ignored).

A job with REQUIRETLS (RFC 8689, the envelope's `requiretls`) then raises the floor whatever
the above said: TLS with a verified certificate (by DANE where it is forced, else by the
CAs), and an MX host that offers REQUIRETLS (checked by engine.connector; the flag goes on
MAIL: engine.smtp.transaction).

The `Decision` is what the delivery needs: the MX hosts allowed, the connection's TLS mode
(engine.tls; it is part of the pool key, so a connection opened under a weaker policy is
never reused under a stricter one), and the name events and metrics report (`policy`). For
TLS-RPT (RFC 8460, engine.tlsrpt) it names the policy a session is counted under
(`report_policy`).
"""
from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

from engine import dane as dane_
from engine import tlsrpt
from engine.dane import Dane
from engine.mtasts import MtaSts, Policy
from engine.mx import Destination
from engine.reply import Reply

# The names events report in `tls_policy`.
MTA_STS = "mta-sts"
MTA_STS_TESTING = "mta-sts-testing"
DANE = "dane"
REQUIRETLS = "requiretls"
# The receiver's policy found, and skipped at the message's request (TLS-Required: No).
MTA_STS_SKIPPED = "mta-sts-skipped"
DANE_SKIPPED = "dane-skipped"
SKIPPED = (MTA_STS_SKIPPED, DANE_SKIPPED)


@dataclass(frozen=True)
class Decision:
    """The TLS policy for one domain's delivery."""

    policy: str  # what events report: mta-sts, mta-sts-testing, requiretls, verify, ...
    mode: str  # the connections' TLS mode (engine.tls): none, opportunistic, required, verify
    sts: Policy | None = None  # the MTA-STS policy, enforce or testing
    requiretls: bool = False  # the job requires TLS end to end (RFC 8689)
    # Why no MX host may be tried at all (a forced `dane` over an MX answer that was not
    # authenticated): the recipients are deferred with it. None: go ahead.
    refusal: Reply | None = None

    @property
    def pool_mode(self) -> str:
        """The TLS part of the pool key: connections differ by it."""
        return self.mode + "+requiretls" if self.requiretls else self.mode

    @property
    def enforced_sts(self) -> Policy | None:
        """The MTA-STS policy whose MX patterns must be obeyed (mode enforce), if any."""
        sts = self.sts
        return sts if sts is not None and sts.mode == "enforce" else None

    def report_policy(self, tlsa: tuple[str, ...] = (), host: str = "") -> str:
        """The policy a session under this decision is counted under in TLS-RPT: the
        MTA-STS policy (enforce or testing), DANE with `host`'s usable TLSA records (as
        text; a host without any is under no policy), else no-policy-found."""
        if self.sts is not None:
            return self.sts.report_policy
        if self.policy == DANE and tlsa:
            return tlsrpt.policy_of(tlsrpt.TLSA, tlsa, (host,))
        return tlsrpt.NO_POLICY_JSON

    def allows(self, host: str) -> bool:
        """Whether mail may go to MX host `host` under this decision."""
        sts = self.enforced_sts
        return sts is None or sts.allows(host)

    def shortfall(self, host: str, verified: bool | None) -> str | None:
        """For a policy in `testing` mode: what enforcing it would have refused about a
        session with `host` (`verified`: its certificate verified), or None."""
        sts = self.sts
        if sts is None or sts.mode != "testing":
            return None
        if not sts.allows(host):
            return f"MX host {host} matches no mx of the policy"
        if not verified:
            return f"no TLS with a certificate valid for {host}"
        return None


class TlsPolicies:
    """Decides per delivery (see the module's docstring). `default`: smtp.tls; `domains` and
    `providers`: the config's exceptions; `mta_sts`: the policies (None: never looked up);
    `sts_default`: whether MTA-STS is looked up for every domain, or only where an
    exception says `mta-sts`; `dane`: the TLSA lookups (None: DANE is off, and a forced
    `dane` defers everything); `dane_default`: whether DANE applies to every domain
    (`tls_policy.dane`), or only where an exception says `dane`."""

    def __init__(self, default: str, domains: Mapping[str, str] | None = None,
                 providers: Mapping[str, str] | None = None, mta_sts: MtaSts | None = None,
                 sts_default: bool = True, dane: Dane | None = None,
                 dane_default: bool = True) -> None:
        self.default = default
        self.domains = dict(domains or {})
        self.providers = dict(providers or {})
        self.mta_sts = mta_sts
        self.sts_default = sts_default
        self.dane = dane
        self.dane_default = dane_default
        self._dane = Decision(DANE, DANE)
        self._default = Decision(default, default)  # the usual answer, made once
        self._forced = {policy: Decision(policy, policy)
                        for policy in {*self.domains.values(), *self.providers.values()}
                        if policy not in (MTA_STS, DANE)}
        self._forced[DANE] = Decision(DANE, dane_.REQUIRED)
        self._skipped = {DANE: Decision(DANE_SKIPPED, default),
                         MTA_STS: Decision(MTA_STS_SKIPPED, default)}

    def decide(self, domain: str, provider: str, requiretls: bool = False,
               routed: bool = False, dest: Destination | None = None,
               tls_optional: bool = False) -> Decision:
        """The decision for mail to `domain` (its MX hosts' `provider`). `routed`: a
        configured next hop, not the domain's MX hosts: MTA-STS does not apply (nor to an
        address literal). `dest`: the domain's MX hosts as looked up (DANE needs them).
        `tls_optional`: the message says `TLS-Required: No` (ignored with `requiretls`)."""
        decision = self._receiver_policy(domain, provider, routed, dest)
        if requiretls:  # a forced DANE stays (it verifies too: RFC 8689 4.2.1)
            mode = decision.mode if decision.mode == dane_.REQUIRED else "verify"
            return Decision(REQUIRETLS, mode, decision.sts, True, decision.refusal)
        if (tls_optional and (decision is self._dane or decision.enforced_sts is not None)
                and self._exception(domain, provider) is None):  # the operator's: kept
            return self._skipped[decision.policy]
        return decision

    def _receiver_policy(self, domain: str, provider: str, routed: bool,
                         dest: Destination | None) -> Decision:
        forced = self._exception(domain, provider)
        if forced == DANE:
            return self._dane_required(domain, routed, dest)
        if forced is not None and forced != MTA_STS:
            return self._forced[forced]
        if (self.dane is not None and self.dane_default and dest is not None and not routed
                and self.dane.applies(dest)):  # before MTA-STS: RFC 8461 2
            return self._dane
        if (self.mta_sts is not None and not routed and not domain.startswith("[")
                and (forced == MTA_STS or self.sts_default)):  # "[192.0.2.1]": no DNS name
            sts = self.mta_sts.policy(domain)
            if sts is not None and sts.mode == "enforce":
                return Decision(MTA_STS, "verify", sts)
            if sts is not None and sts.mode == "testing":
                return Decision(MTA_STS_TESTING, self.default, sts)
        return self._default

    def _exception(self, domain: str, provider: str) -> str | None:
        """The config's exception for `domain` or, failing that, its provider."""
        return self.domains.get(domain) or self.providers.get(provider)

    def _dane_required(self, domain: str, routed: bool, dest: Destination | None) -> Decision:
        """A forced `dane`: mode `dane-only`, unless the MX hosts cannot be trusted (an MX
        answer not authenticated; a route, the operator's own, has none to check)."""
        if self.dane is None or not (routed or (dest is not None and dest.authenticated)):
            return Decision(DANE, dane_.REQUIRED, refusal=dane_.insecure_mx(domain))
        return self._forced[DANE]
