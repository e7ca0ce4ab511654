"""DKIM signing through a real gsmtp, checked by independent verifiers: Perl's Mail::DKIM
(Debian's libmail-dkim-perl) and dkimpy's, both fetching the public keys from dnsmasq,
where the TXT records `gsmtp dkim keygen` printed are published."""

from __future__ import annotations

import base64
import os
import re
import shutil
import signal
import stat
import subprocess
import sys
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import dns.nameserver
import dns.resolver
import pytest

from tests.integration.harness import (
    GsmtpProcess,
    SmtpWire,
    environment,
    free_port,
    wait_for,
)
from tests.integration.remote import Dnsmasq, Sink, SinkBehaviour, wait_received
from tests.unit.test_dkim import dkimpy_verdicts

DOMAIN = "signer.test"
PASSWORD = "correct horse battery staple"
SUBMITTER = f"alice@{DOMAIN}"

# Mail::DKIM's verdict on each signature, its resolver pointed at dnsmasq.
VERIFY_PL = r"""
use strict;
use Mail::DKIM::Verifier;
use Net::DNS::Resolver;
my $port = shift;
Mail::DKIM::DNS::resolver(
    Net::DNS::Resolver->new(nameservers => ['127.0.0.1'], port => $port, recurse => 1));
my $dkim = Mail::DKIM::Verifier->new();
binmode STDIN;
local $/;
my $message = <STDIN>;
$message =~ s/\r?\n/\r\n/g;
$dkim->PRINT($message);
$dkim->CLOSE;
foreach my $signature ($dkim->signatures) {
    printf "%s %s %s %s\n", $signature->domain, $signature->selector,
        $signature->algorithm, $signature->result;
}
"""


@dataclass
class Keys:
    directory: Path
    records: dict[str, str]  # TXT name → text, as keygen printed them


def keygen(directory: Path, selector: str, kind: str) -> tuple[str, str]:
    """`gsmtp dkim keygen` in `directory` (no configuration needed): the TXT record's name
    and text from what it printed."""
    result = subprocess.run(
        [sys.executable, "-m", "gsmtp.cli", "dkim", "keygen", DOMAIN, selector, "--type", kind],
        cwd=directory,
        capture_output=True,
        text=True,
        timeout=60,
        env=environment(),
        check=True,
    )
    (line,) = [x for x in result.stdout.splitlines() if " IN TXT " in x]
    name = line.split()[0].rstrip(".")
    return name, "".join(re.findall(r'"([^"]*)"', line))


@pytest.fixture(scope="module")
def keys(tmp_path_factory: pytest.TempPathFactory) -> Keys:
    directory = tmp_path_factory.mktemp("dkim-keys")
    records = dict([keygen(directory, "s1", "rsa"), keygen(directory, "e1", "ed25519")])
    return Keys(directory, records)


@pytest.fixture(scope="module")
def dns_server(keys: Keys) -> Iterator[Dnsmasq]:
    if shutil.which("dnsmasq") is None:
        pytest.skip("dnsmasq is not installed (apt-get install dnsmasq-base)")
    if subprocess.run(["perl", "-MMail::DKIM::Verifier", "-e1"], check=False).returncode:
        pytest.skip("Mail::DKIM is not installed (apt-get install libmail-dkim-perl)")
    server = Dnsmasq([], txt_records=keys.records)
    yield server
    server.stop()


@pytest.fixture
def sink() -> Iterator[Sink]:
    started = Sink("127.0.0.3", free_port("127.0.0.3"))
    yield started
    started.stop()


@pytest.fixture
def signing_server(
    gsmtp_factory: Callable[..., GsmtpProcess], keys: Keys, sink: Sink, tmp_path: Path
) -> Callable[..., GsmtpProcess]:
    """gsmtp with both keys of signer.test (paths relative to its configuration file),
    trusting 127.0.0.2, a submission listener, alice@signer.test with a password, and
    everything not local relayed to the sink."""

    def make(**server: Any) -> GsmtpProcess:
        submission = free_port()
        relative = Path(os.path.relpath(keys.directory, tmp_path / "gsmtp0"))
        process = gsmtp_factory(
            {
                "server": {"trusted_networks": ["127.0.0.2/32"], **server},
                "submission": {
                    "listen": [f"127.0.0.1:{submission}"],
                    "allow_plaintext_auth": True,
                },
                "delivery": {"smarthost": f"127.0.0.3:{sink.controller.port}"},
                "dkim": {
                    "keys": [
                        {
                            "domain": DOMAIN,
                            "selector": "s1",
                            "key": str(relative / f"s1.{DOMAIN}.pem"),
                        },
                        {
                            "domain": DOMAIN,
                            "selector": "e1",
                            "key": str(relative / f"e1.{DOMAIN}.pem"),
                        },
                    ]
                },
            },
            start=False,
        )
        process.cli("domain", "add", DOMAIN)
        process.cli("user", "add", SUBMITTER, "--password-stdin", stdin=PASSWORD + "\n")
        process.start()
        process.submission = process.port_of(submission)  # type: ignore[attr-defined]
        return process

    return make


def message(sender_header: str, subject: str, body: bytes = b"Hello,  world.\r\n") -> bytes:
    return (
        f"From: {sender_header}\r\nTo: <bob@dest.test>\r\nSubject: {subject}\r\n"
        f"Message-ID: <{subject}@client.test>\r\nDate: Tue, 1 Dec 2026 10:00:00 +0000\r\n"
        "MIME-Version: 1.0\r\nContent-Type: text/plain\r\n\r\n"
    ).encode() + body


def submit(
    port: int,
    sender: str,
    recipient: str,
    content: bytes,
    *,
    source: str | None = None,
    login: str | None = None,
) -> None:
    with SmtpWire(port, source=source) as wire:
        assert wire.read_reply()[0].startswith("220")
        wire.command("EHLO client.test")
        if login is not None:
            token = base64.b64encode(f"\0{login}\0{PASSWORD}".encode()).decode()
            assert wire.command(f"AUTH PLAIN {token}").startswith("235")
        assert wire.command(f"MAIL FROM:<{sender}>").startswith("250")
        assert wire.command(f"RCPT TO:<{recipient}>").startswith("250")
        assert wire.command("DATA").startswith("354")
        wire.send(content.replace(b"\r\n.", b"\r\n..") + b".\r\n")
        reply = wire.read_reply()[-1]
        assert reply.startswith("250 2.0.0"), reply


def mail_dkim(message: bytes, dns_port: int) -> list[str]:
    """Mail::DKIM's lines: "domain selector algorithm result" per signature."""
    result = subprocess.run(
        ["perl", "-e", VERIFY_PL, str(dns_port)],
        input=message,
        capture_output=True,
        timeout=30,
        check=True,
    )
    return result.stdout.decode().splitlines()


def dnsmasq_verdicts(message: bytes, dns_port: int) -> list[bool]:
    """dkimpy's verdict on each signature, the keys fetched from dnsmasq."""
    resolver = dns.resolver.Resolver(configure=False)
    resolver.nameservers = [dns.nameserver.Do53Nameserver("127.0.0.1", dns_port)]

    def txt(name: bytes, timeout: float = 5) -> bytes | None:
        answer = resolver.resolve(name.decode(), "TXT")
        return b"".join(answer[0].strings)  # type: ignore[attr-defined]

    return dkimpy_verdicts(message, txt)


def verified(message: bytes, dns_port: int) -> bool:
    """Both verifiers agree the message is signed by signer.test and intact: Mail::DKIM
    checks the RSA signature (Debian's has no Ed25519), dkimpy both."""
    perl = mail_dkim(message, dns_port)
    python = dnsmasq_verdicts(message, dns_port)
    assert len(perl) == len(python) == 2, (perl, python)
    rsa_pass = f"{DOMAIN} s1 rsa-sha256 pass" in perl
    if rsa_pass != all(python):
        raise AssertionError(f"the verifiers disagree: {perl} {python}")
    return rsa_pass


def signed_messages(sink: Sink, count: int) -> list[bytes]:
    return [received.data for received in wait_received(sink, count)]


def test_mail_from_trusted_and_authenticated_clients_is_signed(
    signing_server: Callable[..., GsmtpProcess], sink: Sink, dns_server: Dnsmasq
) -> None:
    """From a trusted network: signed by its From: domain (the envelope sender has no
    key); from an authenticated session: signed. Both verify with Mail::DKIM and dkimpy
    against the keys in DNS, and fail once the body or the From: is changed."""
    gsmtp = signing_server()
    submit(
        gsmtp.port,
        "someone@elsewhere.test",
        "bob@dest.test",
        message(f"Alice <{SUBMITTER}>", "trusted"),
        source="127.0.0.2",
    )
    submit(
        gsmtp.submission,  # type: ignore[attr-defined]
        SUBMITTER,
        "bob@dest.test",
        message(SUBMITTER, "authenticated"),
        login=SUBMITTER,
    )
    for data in signed_messages(sink, 2):
        assert data.count(b"DKIM-Signature:") == 2
        assert verified(data, dns_server.port)
        assert not verified(data.replace(b"Hello,  world.", b"Hello,  world!"), dns_server.port)
        tampered = data.replace(f"From: Alice <{SUBMITTER}>".encode(), b"From: bob@signer.test")
        tampered = tampered.replace(f"From: {SUBMITTER}".encode(), b"From: bob@signer.test")
        assert tampered != data
        assert not verified(tampered, dns_server.port)
    samples = gsmtp.metrics()
    assert samples['gsmtp_dkim_signatures_total{outcome="signed"}'] == 2
    assert samples['gsmtp_dkim_signatures_total{outcome="no_key"}'] == 0
    assert samples['gsmtp_dkim_signatures_total{outcome="error"}'] == 0


def test_mail_from_an_untrusted_client_is_not_signed(
    signing_server: Callable[..., GsmtpProcess], dns_server: Dnsmasq
) -> None:
    """An unauthenticated client outside trusted_networks, writing From: a signed
    domain, to a local user: stored unsigned, and nothing counted."""
    gsmtp = signing_server()
    submit(gsmtp.port, "x@outside.test", "jones@foo.com", message(SUBMITTER, "untrusted"))
    (file,) = wait_for(lambda: gsmtp.maildir_files("jones@foo.com"), what="the delivery")
    content = file.read_bytes()
    assert b"Subject: untrusted" in content and b"DKIM-Signature" not in content
    samples = gsmtp.metrics()
    assert sum(v for k, v in samples.items() if k.startswith("gsmtp_dkim_signatures_total")) == 0


def test_a_large_body_is_signed_from_the_spool_and_a_retry_sends_the_same_bytes(
    signing_server: Callable[..., GsmtpProcess], sink: Sink, dns_server: Dnsmasq
) -> None:
    """A body past the in-memory threshold is written to the spool in parts as it
    arrives and hashed from there; the spool holds the signed message, so the delivery
    after a 451 carries the signature made at acceptance."""
    sink.behaviour = SinkBehaviour(fail_first=1)
    gsmtp = signing_server()
    body = b"".join(b"line %06d  of a large\tbody \r\n" % i for i in range(60_000))  # ~2 MB
    submit(
        gsmtp.port,
        SUBMITTER,
        "bob@dest.test",
        message(SUBMITTER, "large", body),
        source="127.0.0.2",
    )
    stored = wait_for(
        lambda: gsmtp.spool_rows("SELECT body FROM messages WHERE parts > 0"),
        what="the message in the spool",
    )
    (head,) = stored[0]
    assert head.startswith(b"DKIM-Signature:")
    (data,) = signed_messages(sink, 1)
    assert sink.attempts == 2
    assert data.startswith(head)  # signed once, at acceptance
    assert verified(data, dns_server.port)
    assert gsmtp.metrics()["gsmtp_body_parts_written_total"] > 0


def test_bounces_are_signed_with_the_hostnames_domain(
    signing_server: Callable[..., GsmtpProcess], sink: Sink, dns_server: Dnsmasq
) -> None:
    """gsmtp's own notices (From: MAILER-DAEMON@mx.signer.test) are signed with the key
    of the host name's parent domain."""
    sink.behaviour = SinkBehaviour(rcpt_replies={"gone@dest.test": "550 5.1.1 no such user"})
    gsmtp = signing_server(hostname=f"mx.{DOMAIN}")
    submit(
        gsmtp.submission,  # type: ignore[attr-defined]
        SUBMITTER,
        "gone@dest.test",
        message(SUBMITTER, "bounced"),
        login=SUBMITTER,
    )
    (file,) = wait_for(lambda: gsmtp.maildir_files(SUBMITTER), timeout=20, what="the bounce")
    bounce = file.read_bytes()
    assert f"From: Mail Delivery System <MAILER-DAEMON@mx.{DOMAIN}>".encode() in bounce
    assert verified(bounce, dns_server.port)
    samples = gsmtp.metrics()
    assert samples['gsmtp_dkim_signatures_total{outcome="signed"}'] == 2


def test_a_key_that_cannot_be_read_stops_the_start_and_fails_check_config(
    gsmtp_factory: Callable[..., GsmtpProcess], keys: Keys, tmp_path: Path
) -> None:
    gsmtp = gsmtp_factory(
        {"dkim": {"keys": [{"domain": DOMAIN, "selector": "s9", "key": "missing.pem"}]}},
        start=False,
    )
    missing = gsmtp.directory / "missing.pem"
    check = gsmtp.cli("check-config", check=False)
    assert check.returncode != 0
    assert f"[dkim] keys: {missing}: cannot read the key" in check.stderr
    serve = subprocess.run(
        [sys.executable, "-m", "gsmtp.cli", "serve", "-c", str(gsmtp.config)],
        capture_output=True,
        text=True,
        timeout=60,
        env=environment(),
    )
    assert serve.returncode == 1
    assert f"[dkim] keys: {missing}: cannot read the key" in serve.stderr
    assert "Traceback" not in serve.stderr
    shutil.copy(keys.directory / f"s1.{DOMAIN}.pem", missing)
    check = gsmtp.cli("check-config")
    assert f'keys = [{{domain = "{DOMAIN}", selector = "s9", key = "{missing}"}}]' in check.stdout


def test_keygen_writes_the_key_for_its_owner_only_and_never_over_a_file(
    keys: Keys,
) -> None:
    for name in ("s1.signer.test.pem", "e1.signer.test.pem"):
        mode = stat.S_IMODE((keys.directory / name).stat().st_mode)
        assert mode == 0o600, oct(mode)
    assert keys.records[f"s1._domainkey.{DOMAIN}"].startswith("v=DKIM1; k=rsa; p=MIIB")
    assert keys.records[f"e1._domainkey.{DOMAIN}"].startswith("v=DKIM1; k=ed25519; p=")
    again = subprocess.run(
        [sys.executable, "-m", "gsmtp.cli", "dkim", "keygen", DOMAIN, "s1"],
        cwd=keys.directory,
        capture_output=True,
        text=True,
        timeout=60,
        env=environment(),
    )
    assert again.returncode == 1 and "exists" in again.stderr


def test_sighup_loads_the_keys_again(
    signing_server: Callable[..., GsmtpProcess], sink: Sink, dns_server: Dnsmasq
) -> None:
    """Keys removed from the configuration are no longer used after SIGHUP; a key that
    fails to load keeps the signer as it was."""
    gsmtp = signing_server()
    text = gsmtp.config.read_text()
    gsmtp.config.write_text(re.sub(r"(?m)^keys = .*$", "keys = []", text))
    gsmtp.signal(signal.SIGHUP)
    wait_for(lambda: gsmtp.events("config_reloaded"), what="the reload")
    submit(gsmtp.port, SUBMITTER, "bob@dest.test", message(SUBMITTER, "after"), source="127.0.0.2")
    (data,) = signed_messages(sink, 1)
    assert b"DKIM-Signature" not in data
    gsmtp.config.write_text(text.replace(f"e1.{DOMAIN}.pem", "nothing-here.pem"))
    gsmtp.signal(signal.SIGHUP)
    wait_for(lambda: gsmtp.events("reload_failed"), what="the second reload to fail")
    assert len(gsmtp.events("config_reloaded")) == 1  # all or nothing: nothing applied
    submit(gsmtp.port, SUBMITTER, "bob@dest.test", message(SUBMITTER, "still"), source="127.0.0.2")
    assert b"DKIM-Signature" not in signed_messages(sink, 2)[1]
