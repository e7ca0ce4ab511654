"""MTA-STS (RFC 8461): the TXT record, the policy parser, MX patterns, and the per-domain
cache with fake DNS, a fake fetch and an injected clock."""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass

import pytest
from structlog.testing import capture_logs

from gsmtp.delivery.mta_sts import (
    MAX_AGE_LIMIT,
    MAX_POLICY_BYTES,
    FetchError,
    Mode,
    MtaSts,
    Policy,
    PolicyError,
    parse_policy,
    parse_txt,
)
from gsmtp.delivery.mx import DnsTemporaryError
from gsmtp.delivery.tls_levels import TlsLevel, TlsRequirement
from gsmtp.delivery.tls_policy import pattern_matches as mx_matches

GOOD = (
    b"version: STSv1\r\nmode: enforce\r\nmx: mail.example.com\r\nmx: *.example.net\r\n"
    b"max_age: 86400\r\n"
)


# -- the TXT record (§3.1) ------------------------------------------------------------------


@pytest.mark.parametrize(
    ("records", "expected"),
    [
        (["v=STSv1; id=20160831085700Z;"], "20160831085700Z"),
        (["v=STSv1;id=abc"], "abc"),
        (["v=STSv1; id=abc; ext=value"], "abc"),
        (["v=spf1 -all", "v=STSv1; id=abc"], "abc"),  # others are discarded
        (["v=STSv1; id=a", "v=STSv1; id=b"], None),  # two: no policy
        ([], None),
        (["v=STSv1;"], None),  # no id
        (["v=STSv1; id=not-alnum"], None),
        (["v=STSv1; id=" + "a" * 33], None),  # 1*32
        (["v=STSv1; id=a; id=b"], None),
        (["v=STSv2; id=a"], None),
        (["V=STSv1; id=a"], None),  # case-sensitive
        (["v=STSv1; id=a; junk"], None),
    ],
)
def test_txt_record(records: list[str], expected: str | None) -> None:
    assert parse_txt(records) == expected


# -- the policy (§3.2) ----------------------------------------------------------------------


def test_a_good_policy_is_parsed() -> None:
    assert parse_policy(GOOD, "id1") == Policy(
        "id1", Mode.ENFORCE, ("mail.example.com", "*.example.net"), 86400
    )


def test_lf_line_ends_unknown_fields_and_first_value_wins() -> None:
    body = (
        b"version: STSv1\nmode: testing\nmode: enforce\nmx: MX.Example.COM.\nfoo: bar\n"
        b"max_age:604800"
    )
    assert parse_policy(body, "x") == Policy("x", Mode.TESTING, ("mx.example.com",), 604800)


def test_mode_none_needs_no_mx() -> None:
    policy = parse_policy(b"version: STSv1\nmode: none\nmax_age: 60\n", "x")
    assert policy.mode is Mode.NONE and policy.mx == ()


def test_max_age_is_capped_at_one_year() -> None:
    body = GOOD.replace(b"max_age: 86400", b"max_age: 9999999999")
    assert parse_policy(body, "x").max_age == MAX_AGE_LIMIT


@pytest.mark.parametrize(
    ("body", "complaint"),
    [
        (GOOD.replace(b"STSv1", b"STSv2"), "version"),
        (GOOD.replace(b"version: STSv1\r\n", b""), "version"),
        (GOOD.replace(b"enforce", b"enforcing"), "mode"),
        (GOOD.replace(b"mode: enforce\r\n", b""), "mode"),
        (GOOD.replace(b"86400", b"-1"), "max_age"),
        (GOOD.replace(b"86400", b"12345678901"), "max_age"),  # 1*10DIGIT
        (GOOD.replace(b"max_age: 86400\r\n", b""), "max_age"),
        (b"version: STSv1\nmode: enforce\nmax_age: 60\n", "no mx"),
        (GOOD + b"mx: *.*.example.org\r\n", "mx pattern"),
        (GOOD + b"mx: mail.exa mple.org\r\n", "mx pattern"),
        (GOOD + b"not a field\r\n", "line 6"),
        (GOOD + b"\xff\r\n", "UTF-8"),
        (GOOD + b"x: " + b"a" * MAX_POLICY_BYTES, "larger"),
    ],
)
def test_bad_policies_are_refused(body: bytes, complaint: str) -> None:
    with pytest.raises(PolicyError, match=complaint):
        parse_policy(body, "x")


# -- MX patterns (§3.4) ---------------------------------------------------------------------


@pytest.mark.parametrize(
    ("pattern", "host", "matches"),
    [
        ("mail.example.com", "mail.example.com", True),
        ("mail.example.com", "MAIL.Example.com.", True),
        ("mail.example.com", "mail2.example.com", False),
        ("*.example.com", "mx.example.com", True),
        ("*.example.com", "example.com", False),
        ("*.example.com", "a.b.example.com", False),  # exactly one leftmost label
        ("*.example.com", "mx.example.org", False),
        ("*.example.com", ".example.com", False),
        ("example.com", "mx.example.com", False),
    ],
)
def test_mx_matches(pattern: str, host: str, matches: bool) -> None:
    assert mx_matches(pattern, host) is matches


# -- discovery and the cache (§3.3, §5.1) ---------------------------------------------------


class FakeDns:
    def __init__(self) -> None:
        self.records: dict[str, list[str]] = {}
        self.failing = False
        self.lookups = 0

    def txt(self, name: str) -> list[str]:
        self.lookups += 1
        if self.failing:
            raise DnsTemporaryError(f"DNS lookup of {name} TXT failed: SERVFAIL")
        return self.records.get(name, [])


class FakeWeb:
    def __init__(self, body: bytes = GOOD) -> None:
        self.body = body
        self.down = False
        self.fetched: list[str] = []

    def fetch(self, domain: str) -> bytes:
        self.fetched.append(domain)
        if self.down:
            raise FetchError(f"mta-sts.{domain}[127.0.0.9]: connection refused")
        return self.body


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


@dataclass
class World:
    dns: FakeDns
    web: FakeWeb
    clock: Clock
    sts: MtaSts


@pytest.fixture
def world() -> World:
    dns, web, clock = FakeDns(), FakeWeb(), Clock()
    dns.records["_mta-sts.example.com"] = ["v=STSv1; id=one"]
    return World(dns, web, clock, MtaSts(dns, web.fetch, clock=clock, retry_after=300))


def test_a_policy_is_fetched_once_and_cached_while_the_id_stays(world: World) -> None:
    first = world.sts.policy("example.com")
    assert first is not None and first.id == "one" and first.mode is Mode.ENFORCE
    world.clock.now += 86399
    assert world.sts.policy("Example.COM") == first
    assert world.web.fetched == ["example.com"]


def test_a_new_id_fetches_again(world: World) -> None:
    world.sts.policy("example.com")
    world.dns.records["_mta-sts.example.com"] = ["v=STSv1; id=two"]
    world.web.body = GOOD.replace(b"enforce", b"testing")
    policy = world.sts.policy("example.com")
    assert policy is not None and policy.id == "two" and policy.mode is Mode.TESTING
    assert world.web.fetched == ["example.com", "example.com"]


def test_an_expired_policy_is_fetched_again(world: World) -> None:
    world.sts.policy("example.com")
    world.clock.now += 86400
    world.web.down = True
    assert world.sts.policy("example.com") is None  # expired, and no fresh one
    assert len(world.web.fetched) == 2


def test_the_cached_policy_stays_when_the_fetch_fails(world: World) -> None:
    first = world.sts.policy("example.com")
    world.dns.records["_mta-sts.example.com"] = ["v=STSv1; id=two"]
    world.web.down = True
    with capture_logs() as logs:
        assert world.sts.policy("example.com") == first
    assert [e["event"] for e in logs] == ["mta_sts_fetch_failed"]
    assert logs[0]["cached_id"] == "one" and "connection refused" in logs[0]["reason"]


def test_the_cached_policy_stays_when_a_new_policy_is_invalid(world: World) -> None:
    first = world.sts.policy("example.com")
    world.dns.records["_mta-sts.example.com"] = ["v=STSv1; id=two"]
    world.web.body = b"version: STSv1\nmode: enforce\n"
    assert world.sts.policy("example.com") == first


def test_the_cached_policy_stays_without_the_txt_record_or_dns(world: World) -> None:
    first = world.sts.policy("example.com")
    del world.dns.records["_mta-sts.example.com"]
    assert world.sts.policy("example.com") == first
    world.dns.failing = True
    assert world.sts.policy("example.com") == first
    assert world.web.fetched == ["example.com"]


def test_a_failed_fetch_waits_before_it_is_tried_again(world: World) -> None:
    world.web.down = True
    assert world.sts.policy("example.com") is None
    assert world.sts.policy("example.com") is None
    assert world.web.fetched == ["example.com"]
    world.clock.now += 300
    world.web.down = False
    assert world.sts.policy("example.com") is not None
    assert len(world.web.fetched) == 2


def test_no_txt_record_means_no_policy_and_no_fetch(world: World) -> None:
    assert world.sts.policy("other.example") is None
    assert world.web.fetched == []


def test_deliveries_at_once_share_one_fetch(world: World) -> None:
    started, release = threading.Event(), threading.Event()
    fetch = world.web.fetch

    def slow_fetch(domain: str) -> bytes:
        started.set()
        release.wait(10)
        return fetch(domain)

    sts = MtaSts(world.dns, slow_fetch, clock=world.clock)
    results: list[Policy | None] = []
    threads = [threading.Thread(target=lambda: results.append(sts.policy("example.com")))]
    threads[0].start()
    assert started.wait(10)
    threads.append(threading.Thread(target=lambda: results.append(sts.policy("example.com"))))
    threads[1].start()
    deadline = time.monotonic() + 10
    while world.dns.lookups < 2 and time.monotonic() < deadline:  # it saw the new id
        time.sleep(0.01)
    release.set()
    for thread in threads:
        thread.join(10)
    assert len(results) == 2 and results[0] == results[1] is not None
    assert world.web.fetched == ["example.com"]


# -- what a policy demands ------------------------------------------------------------------


def test_enforce_demands_verify_with_the_mx_patterns(world: World) -> None:
    requirement = world.sts.requirement("example.com", ["mail.example.com"])
    assert requirement == TlsRequirement(
        TlsLevel.VERIFY, source="mta-sts", mx_patterns=("mail.example.com", "*.example.net")
    )
    assert TlsRequirement(TlsLevel.MAY).stricter(requirement) == requirement


def test_testing_demands_nothing_and_logs_what_enforce_would_refuse(world: World) -> None:
    world.web.body = GOOD.replace(b"enforce", b"testing")
    with capture_logs() as logs:
        requirement = world.sts.requirement("example.com", ["mx.elsewhere.org", "mail.example.com"])
    assert requirement == TlsRequirement(TlsLevel.NONE, "mta-sts testing", report_only=True)
    assert TlsRequirement(TlsLevel.MAY).stricter(requirement) == TlsRequirement(
        TlsLevel.MAY, report_only=True
    )
    failures = [e for e in logs if e["event"] == "mta_sts_testing_failure"]
    assert len(failures) == 1 and failures[0]["hosts"] == ["mx.elsewhere.org"]
    assert failures[0]["log_level"] == "warning"


def test_testing_logs_nothing_when_every_mx_matches(world: World) -> None:
    world.web.body = GOOD.replace(b"enforce", b"testing")
    with capture_logs() as logs:
        assert world.sts.requirement("example.com", ["a.example.net"]) is not None
    assert [e for e in logs if e["event"] == "mta_sts_testing_failure"] == []


def test_mode_none_demands_nothing(world: World) -> None:
    world.web.body = b"version: STSv1\nmode: none\nmax_age: 60\n"
    assert world.sts.requirement("example.com", ["anything.org"]) is None
