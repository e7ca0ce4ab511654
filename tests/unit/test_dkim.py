"""DKIM signing: the body hash fed in pieces, which key signs, the signature checked by
dkimpy's verifier, a large body hashed from its parts in a real spool, key errors."""

from __future__ import annotations

import functools
import hashlib
import subprocess
from collections.abc import Callable, Iterator
from pathlib import Path

import dkim as dkimpy
import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import rsa
from dkim.canonicalization import Relaxed
from hypothesis import given, settings
from hypothesis import strategies as st
from prometheus_client import REGISTRY

from gsmtp import db
from gsmtp.config import DkimConfig, DkimKeyConfig
from gsmtp.dkim import (
    MAX_HEADER_BYTES,
    DkimKey,
    DkimKeyError,
    DkimSigner,
    RelaxedBodyHash,
    generate_key,
    load_key,
    public_record,
)
from gsmtp.message import MessageId
from gsmtp.protocol.client import crlf_line_ends
from gsmtp.protocol.line_ends import has_bare_line_end
from gsmtp.spool import Spool
from gsmtp.writer import GroupCommitter, ThreadReader

MESSAGE = (
    b"From: Alice <alice@example.org>\r\n"
    b"To: bob@example.net\r\n"
    b"Subject: a test\r\n"
    b"Message-ID: <1@example.org>\r\n"
    b"X-Not-Signed: 1\r\n"
    b"\r\n"
    b"Hello  Bob,\t \r\n\r\nbye\r\n\r\n\r\n"
)
ID = MessageId("0000000000001000001")
NOW = 1_700_000_000.0


def write_key(directory: Path, kind: str, name: str = "key.pem") -> Path:
    path = directory / name
    path.write_bytes(generate_key(kind))
    path.chmod(0o600)
    return path


@pytest.fixture(scope="module")
def keys(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    directory = tmp_path_factory.mktemp("keys")
    return {kind: write_key(directory, kind, f"{kind}.pem") for kind in ("rsa", "ed25519")}


def signer_for(*keys: DkimKey, hostname: str = "mx.example.org") -> DkimSigner:
    return DkimSigner(keys, hostname=hostname, clock=lambda: NOW)


def dns_of(*keys: DkimKey) -> Callable[..., bytes | None]:
    """dkimpy's DNS lookup, answered from the keys' public records."""
    records = {
        f"{k.selector}._domainkey.{k.domain}.".encode(): public_record(k).encode() for k in keys
    }

    def lookup(name: bytes, timeout: float = 5) -> bytes | None:
        return records.get(name)

    return lookup


def dkimpy_verdicts(message: bytes, lookup: Callable[..., bytes | None]) -> list[bool]:
    """dkimpy's verdict on each DKIM-Signature of the message, top first, the public keys
    found by `lookup(name)` (also used by the integration tests, with dnsmasq)."""
    verifier = dkimpy.DKIM(message)
    count = sum(1 for name, _ in verifier.headers if name.lower() == b"dkim-signature")
    verdicts = []
    for index in range(count):
        try:
            verdicts.append(bool(verifier.verify(idx=index, dnsfunc=lookup)))
        except dkimpy.DKIMException:  # a body hash mismatch is raised, not returned
            verdicts.append(False)
    return verdicts


def verifies(message: bytes, *keys: DkimKey) -> list[bool]:
    return dkimpy_verdicts(message, dns_of(*keys))


def counted(outcome: str) -> float:
    value = REGISTRY.get_sample_value("gsmtp_dkim_signatures_total", {"outcome": outcome})
    return value or 0.0


# -- the body hash, fed in pieces --------------------------------------------------------

BODY_PIECES = st.lists(st.sampled_from([b"a", b"b", b" ", b"\t", b"\r\n", b"\r"]), max_size=60)


@settings(max_examples=400, deadline=None)
@given(
    pieces=BODY_PIECES,
    cuts=st.lists(st.integers(1, 9), max_size=60),
    tail=st.integers(0, 8),
    slice_size=st.integers(1, 8),
)
def test_the_body_hash_in_pieces_equals_dkimpys_in_one(
    pieces: list[bytes], cuts: list[int], tail: int, slice_size: int
) -> None:
    """Cut anywhere (inside CRLF, inside a whitespace run), with long unfinished lines
    hashed as they come (a small TAIL_LIMIT) and pieces worked on in slices: the same
    hash as dkimpy's canonical body."""
    body = b"".join(pieces)
    hasher = RelaxedBodyHash()
    hasher.TAIL_LIMIT = tail
    hasher.SLICE = slice_size
    start = 0
    for size in [*cuts, len(body)]:
        hasher.update(body[start : start + size])
        start += size
    hasher.update(body[start:])
    assert hasher.digest() == hashlib.sha256(Relaxed.canonicalize_body(body)).digest()


def test_a_line_longer_than_the_tail_limit_is_not_kept() -> None:
    hasher = RelaxedBodyHash()
    for _ in range(100):
        hasher.update(b"word " * 4000)  # 20 KB a piece, no line end
        assert len(hasher._tail) <= RelaxedBodyHash.TAIL_LIMIT
    hasher.update(b" \t \r\n")
    expected = Relaxed.canonicalize_body(b"word " * 400_000 + b" \t \r\n")
    assert hasher.digest() == hashlib.sha256(expected).digest()


# -- signing and verifying ---------------------------------------------------------------


@pytest.mark.parametrize("kind", ["rsa", "ed25519"])
def test_a_signed_message_verifies_and_fails_once_changed(keys: dict[str, Path], kind: str) -> None:
    key = load_key("example.org", "s1", str(keys[kind]))
    signature = signer_for(key).sign_message(msg_id=ID, sender="x@other.test", content=MESSAGE)
    assert signature.startswith(b"DKIM-Signature: v=1; a=" + key.algorithm + b"; c=relaxed/relaxed")
    assert b" d=example.org;" in signature and b" s=s1;" in signature
    assert f"t={int(NOW)}".encode() in signature
    signed = signature + MESSAGE
    assert verifies(signed, key) == [True]
    # Relaxed: whitespace changes in the body or a folded header still verify.
    assert verifies(signed.replace(b"Hello  Bob", b"Hello Bob"), key) == [True]
    assert verifies(signed.replace(b"bye", b"bye!"), key) == [False]
    assert verifies(signed.replace(b"alice@example.org", b"mallory@example.org"), key) == [False]
    assert verifies(signed.replace(b"Subject: a test", b"Subject: another"), key) == [False]
    assert verifies(signed.replace(b"X-Not-Signed: 1", b"X-Not-Signed: 2"), key) == [True]


@pytest.mark.parametrize("bits", [2048, 2112])
def test_the_signature_field_has_only_crlf_line_ends_whatever_the_key_size(
    tmp_path: Path, bits: int
) -> None:
    """Red-team finding: dkimpy's `fold`, given the field with its CRLF, parted the CR
    from the LF when the b= value's last line was 72 bytes long (RSA keys of 2089-2112
    bits and two other ranges): "CR CR LF SP LF". The bare CR reached the spool; the
    repair of line ends for sending made it an empty line, which ended the header
    section inside the signature (From:, To: and Subject: went out as body)."""
    private = rsa.generate_private_key(public_exponent=65537, key_size=bits)
    path = tmp_path / "key.pem"
    path.write_bytes(
        private.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    path.chmod(0o600)
    key = load_key("example.org", "s1", str(path))
    signature = signer_for(key).sign_message(msg_id=ID, sender="x@other.test", content=MESSAGE)
    assert not has_bare_line_end(signature)
    assert signature.endswith(b"\r\n") and b"\r\n\r\n" not in signature
    assert all(line.startswith(b" ") for line in signature.split(b"\r\n")[1:-1])
    signed = signature + MESSAGE
    assert crlf_line_ends(signed) == signed
    assert verifies(signed, key) == [True]


@pytest.mark.parametrize(
    ("domain", "selector"),
    [
        ("a" * 50 + "." + "b" * 11 + ".example", "s1"),  # 70 characters
        ("a" * 60 + "." + "b" * 60 + ".example", "s1"),
        ("example.org", "s" * 50 + "." + "t" * 19),
        ("a" * 60 + ".example", "s" * 67),  # a line of whitespace only, before
    ],
)
def test_a_long_domain_or_selector_is_never_cut_by_folding(
    keys: dict[str, Path], domain: str, selector: str
) -> None:
    """Red-team finding: dkimpy's `fold` cut words at 72 characters, so a domain or
    selector of 70 characters got folding whitespace inside, and the verifiers looked
    the key up under a name with a space in it (none verified); with other lengths it
    wrote a continuation line of whitespace only. The signature is folded between tags,
    inside h= at its spaces and inside b=, and nowhere else."""
    key = load_key(domain, selector, str(keys["rsa"]))
    signature = signer_for(key).sign_message(msg_id=ID, sender=f"x@{domain}", content=MESSAGE)
    lines = signature.split(b"\r\n")
    assert lines[-1] == b"" and not has_bare_line_end(signature)
    assert all(line.startswith(b" ") and line.strip() for line in lines[1:-1])
    assert f" d={domain};".encode() in signature and f" s={selector};".encode() in signature
    assert all(len(line) <= 78 or len(line.split()) == 1 for line in lines)
    assert verifies(signature + MESSAGE, key) == [True]


def test_from_is_oversigned_and_the_header_list_is_the_issues(keys: dict[str, Path]) -> None:
    key = load_key("example.org", "s1", str(keys["rsa"]))
    signature = signer_for(key).sign_message(msg_id=ID, sender="", content=MESSAGE)
    tags = dict(dkimpy.util.parse_tag_value(signature.split(b":", 1)[1].strip()))
    assert tags[b"h"].replace(b" ", b"").replace(b"\r\n", b"") == b"from:to:subject:message-id:from"
    signed = signature + MESSAGE
    # A second From: added above the first (where a verifier looks first) breaks it.
    assert verifies(signed + b"", key) == [True]
    added = signed.replace(b"From: Alice", b"From: mallory@evil.test\r\nFrom: Alice", 1)
    assert verifies(added, key) == [False]


def test_a_domain_with_two_keys_signs_with_both(keys: dict[str, Path]) -> None:
    """RFC 8463 §4: Ed25519 beside RSA, for verifiers that know only RSA."""
    rsa = load_key("example.org", "r1", str(keys["rsa"]))
    ed = load_key("example.org", "e1", str(keys["ed25519"]))
    signature = signer_for(rsa, ed).sign_message(msg_id=ID, sender="", content=MESSAGE)
    assert signature.count(b"DKIM-Signature:") == 2
    assert verifies(signature + MESSAGE, rsa, ed) == [True, True]


def test_the_key_is_the_from_domains_else_the_senders_exact_match(
    keys: dict[str, Path],
) -> None:
    org = load_key("example.org", "s1", str(keys["rsa"]))
    sender = load_key("sender.test", "s2", str(keys["ed25519"]))
    signer = signer_for(org, sender)
    by_from = signer.sign_message(msg_id=ID, sender="a@sender.test", content=MESSAGE)
    assert b"d=example.org" in by_from and b"d=sender.test" not in by_from
    other = MESSAGE.replace(b"alice@example.org", b"alice@elsewhere.test")
    by_sender = signer.sign_message(msg_id=ID, sender="a@Sender.Test", content=other)
    assert b"d=sender.test" in by_sender
    assert verifies(by_sender + other, sender) == [True]
    subdomain = MESSAGE.replace(b"alice@example.org", b"alice@mail.example.org")
    signed_before = counted("no_key")
    assert signer.sign_message(msg_id=ID, sender="a@sub.sender.test", content=subdomain) == b""
    assert counted("no_key") == signed_before + 1


def test_nothing_is_signed_or_counted_without_keys() -> None:
    before = [counted(o) for o in ("signed", "no_key", "error")]
    signer = DkimSigner.from_config(DkimConfig(), hostname="mx.example.org")
    assert not signer.active
    assert signer.sign_message(msg_id=ID, sender="a@example.org", content=MESSAGE) == b""
    assert signer.sign_notice(MESSAGE, ID) == b""
    assert [counted(o) for o in ("signed", "no_key", "error")] == before


def test_notices_are_signed_with_the_hostnames_domain(keys: dict[str, Path]) -> None:
    """Our notices come From: MAILER-DAEMON@<hostname>: its key, else the nearest parent."""
    key = load_key("example.org", "s1", str(keys["rsa"]))
    notice = MESSAGE.replace(b"Alice <alice@example.org>", b"MAILER-DAEMON@mx.example.org")
    signature = signer_for(key, hostname="mx.example.org").sign_notice(notice, ID)
    assert b"d=example.org" in signature
    assert verifies(signature + notice, key) == [True]
    assert signer_for(key, hostname="mx.example.com").sign_notice(notice, ID) == b""


def test_a_message_that_cannot_be_signed_is_an_error_not_an_exception(
    keys: dict[str, Path],
) -> None:
    key = load_key("example.org", "s1", str(keys["rsa"]))
    signer = signer_for(key)
    before = counted("error")
    huge = b"From: a@example.org\r\nX-Big: " + b"x" * MAX_HEADER_BYTES + b"\r\n\r\nbody\r\n"
    assert signer.sign_message(msg_id=ID, sender="a@example.org", content=huge) == b""
    no_from = b"To: b@example.net\r\n\r\nbody\r\n"
    assert signer.sign_message(msg_id=ID, sender="a@example.org", content=no_from) == b""
    assert counted("error") == before + 2


def test_signing_runs_through_run_blocking(keys: dict[str, Path]) -> None:
    """The composition root passes a thread; the signer never signs on the caller."""
    key = load_key("example.org", "s1", str(keys["rsa"]))
    ran: list[int] = []

    def run_blocking(work: Callable[[], object]) -> object:
        ran.append(1)
        return work()

    signer = DkimSigner([key], hostname="", run_blocking=run_blocking, clock=lambda: NOW)
    assert signer.sign_message(msg_id=ID, sender="", content=MESSAGE)
    assert ran == [1]


# -- a large body, hashed from its parts in the spool -------------------------------------


@pytest.fixture
def spool(tmp_path: Path) -> Iterator[Spool]:
    path = str(tmp_path / "spool.sqlite")
    writer = GroupCommitter(path)
    bodies = ThreadReader(path)
    yield Spool(writer, db.connect(path), bodies)
    writer.stop()
    bodies.close()


def test_a_large_body_is_signed_from_its_spooled_parts_one_at_a_time(
    keys: dict[str, Path], spool: Spool
) -> None:
    """The body as the server writes it while it arrives: parts in the spool, the rest in
    memory. The parts are read and hashed one by one (never the whole body at once), and
    the signature verifies over the whole message."""
    key = load_key("example.org", "s1", str(keys["rsa"]))
    head = b"From: alice@example.org\r\nTo: bob@example.net\r\nSubject: big\r\n\r\n"
    line = b"0123456789 abcdef  \t ghij\r\n"
    parts = [head + line * 10_000] + [line * 10_000 for _ in range(7)]
    parts[3] = parts[3][:-1]  # a part may end inside CRLF
    parts[4] = b"\n" + parts[4]
    rest = b"the end\r\n\r\n\r\n"
    for seq, part in enumerate(parts):
        spool.write_part(ID, seq, part)
    handed: list[int] = []

    def read_parts(consume: Callable[[bytes], bool]) -> bool:
        def recorded(data: bytes) -> bool:
            handed.append(len(data))
            return consume(data)

        return spool.read_parts(ID, len(parts), recorded)

    signature = signer_for(key).sign_message(
        msg_id=ID, sender="alice@example.org", content=rest, parts=read_parts
    )
    assert handed == [len(p) for p in parts]
    assert verifies(signature + b"".join(parts) + rest, key) == [True]


def test_without_a_key_the_parts_after_the_header_are_not_read(
    keys: dict[str, Path], spool: Spool
) -> None:
    key = load_key("elsewhere.test", "s1", str(keys["rsa"]))
    parts = [b"From: alice@example.org\r\n\r\n" + b"x" * 1000 + b"\r\n", b"y\r\n", b"z\r\n"]
    for seq, part in enumerate(parts):
        spool.write_part(ID, seq, part)
    handed: list[bytes] = []

    def consume_recorded(consume: Callable[[bytes], bool], data: bytes) -> bool:
        handed.append(data)
        return consume(data)

    def read_parts(consume: Callable[[bytes], bool]) -> bool:
        return spool.read_parts(ID, len(parts), functools.partial(consume_recorded, consume))

    signer = signer_for(key)
    assert signer.sign_message(msg_id=ID, sender="a@b.test", content=b"", parts=read_parts) == b""
    assert handed == parts[:1]


def test_a_missing_part_is_an_error_and_the_message_goes_unsigned(
    keys: dict[str, Path], spool: Spool
) -> None:
    key = load_key("example.org", "s1", str(keys["rsa"]))
    spool.write_part(ID, 0, b"From: alice@example.org\r\n\r\n")
    before = counted("error")
    parts = functools.partial(spool.read_parts, ID, 2)
    signer = signer_for(key)
    assert signer.sign_message(msg_id=ID, sender="", content=b"x\r\n", parts=parts) == b""
    assert counted("error") == before + 1


# -- keys --------------------------------------------------------------------------------


def test_a_key_that_cannot_be_used_names_its_file(tmp_path: Path) -> None:
    missing = tmp_path / "missing.pem"
    with pytest.raises(DkimKeyError, match=f"{missing}: cannot read the key"):
        load_key("example.org", "s1", str(missing))
    garbage = tmp_path / "garbage.pem"
    garbage.write_text("not a key\n")
    garbage.chmod(0o600)
    with pytest.raises(DkimKeyError, match=f"{garbage}: not a PEM private key"):
        load_key("example.org", "s1", str(garbage))
    encrypted = tmp_path / "encrypted.pem"
    subprocess.run(
        ["openssl", "genpkey", "-algorithm", "ed25519", "-aes256", "-pass", "pass:x"],
        check=True,
        stdout=encrypted.open("wb"),
    )
    encrypted.chmod(0o600)
    with pytest.raises(DkimKeyError, match=f"{encrypted}: the key is encrypted"):
        load_key("example.org", "s1", str(encrypted))
    ec = tmp_path / "ec.pem"
    subprocess.run(
        ["openssl", "genpkey", "-algorithm", "EC", "-pkeyopt", "ec_paramgen_curve:P-256"],
        check=True,
        stdout=ec.open("wb"),
    )
    ec.chmod(0o600)
    with pytest.raises(DkimKeyError, match=f"{ec}: a .*; DKIM keys are RSA or Ed25519"):
        load_key("example.org", "s1", str(ec))
    config = DkimConfig((DkimKeyConfig("example.org", "s1", str(missing)),))
    with pytest.raises(DkimKeyError, match=r"missing\.pem"):
        DkimSigner.from_config(config, hostname="mx.example.org")


@pytest.mark.parametrize("mode", [0o644, 0o604, 0o601])
def test_a_key_others_may_read_is_refused(tmp_path: Path, mode: int) -> None:
    """Whoever can read the private key can sign as the domain: like the smarthost's
    auth file, a key with any "other" bit is refused, naming the file."""
    path = write_key(tmp_path, "ed25519")
    path.chmod(mode)
    with pytest.raises(DkimKeyError, match=f"{path}: mode {mode:04o} lets every user read"):
        load_key("example.org", "s1", str(path))
    config = DkimConfig((DkimKeyConfig("example.org", "s1", str(path)),))
    with pytest.raises(DkimKeyError, match=f"{path}: mode"):
        DkimSigner.from_config(config, hostname="mx.example.org")


@pytest.mark.parametrize("mode", [0o600, 0o640, 0o400, 0o440])
def test_a_key_for_its_owner_and_group_is_accepted(tmp_path: Path, mode: int) -> None:
    path = write_key(tmp_path, "ed25519")
    path.chmod(mode)
    assert load_key("example.org", "s1", str(path)).path == str(path)


def test_openssl_keys_load(tmp_path: Path) -> None:
    """Keys made with openssl (PKCS#1 and PKCS#8 RSA, Ed25519) as well as keygen's."""
    for name, arguments in {
        "pkcs8.pem": ["genpkey", "-algorithm", "RSA", "-pkeyopt", "rsa_keygen_bits:1024"],
        "pkcs1.pem": ["genrsa", "-traditional", "1024"],
        "ed.pem": ["genpkey", "-algorithm", "ed25519"],
    }.items():
        path = tmp_path / name
        subprocess.run(["openssl", *arguments], check=True, stdout=path.open("wb"))
        path.chmod(0o600)
        key = load_key("example.org", "s1", str(path))
        signature = signer_for(key).sign_message(msg_id=ID, sender="", content=MESSAGE)
        assert verifies(signature + MESSAGE, key) == [True], name
