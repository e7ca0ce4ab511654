"""Drive a bare SmtpSession like the server does, with real policy over fixed accounts.

AUTH is answered by a fake verifier: `PASSWORDS` (user → password) over the accounts'
users; `checked` records every username it was asked about."""

from __future__ import annotations

import ipaddress
from collections.abc import Callable
from dataclasses import replace

from gsmtp.accounts import AccountsSnapshot, Login
from gsmtp.policy import Client, Policy
from gsmtp.protocol import replies
from gsmtp.protocol.session import (
    NEED_DATA,
    AuthRequested,
    Envelope,
    Limits,
    ListenerRules,
    MailFrom,
    MessageReceived,
    RcptTo,
    SmtpSession,
    StartTlsRequested,
    VerifyRequested,
)

AUTH_ON_PORT_25 = ListenerRules(auth=True)  # as the server's port 25 listeners
PASSWORDS = {"jones@foo.com": "jones-secret", "brown@foo.com": "brown-secret"}
SNAPSHOT = AccountsSnapshot(
    1,
    frozenset({"foo.com"}),
    frozenset({"jones@foo.com", "brown@foo.com"}),
    {
        "jones@foo.com": Login("hash", may_send_as=frozenset({"sales@foo.com", "@jones.example"})),
        "brown@foo.com": Login("hash"),
    },
)


def make_policy(trusted: bool = False, vrfy: bool = False) -> Policy:
    return Policy(
        hostname="mx.foo.com",
        trusted_networks=[ipaddress.ip_network("192.0.2.0/24")] if trusted else [],
        snapshot=lambda fresh=False: SNAPSHOT,
        vrfy=vrfy,
    )


class SessionWire:
    """A `dialog.Wire` over a bare session: send feeds bytes, read_reply parses output."""

    def __init__(
        self,
        limits: Limits | None = None,
        *,
        trusted: bool = False,
        greeted: bool = False,
        tls: bool = False,
        rules: ListenerRules = AUTH_ON_PORT_25,
        has_room: Callable[[int | None], bool] = lambda size: True,
    ) -> None:
        self.session = SmtpSession(
            limits or Limits(), hostname="mx.foo.com", tls_active=tls, rules=rules
        )
        self.has_room = has_room
        self.policy = make_policy(trusted)
        self.client = Client(ipaddress.ip_address("192.0.2.7"))
        self.checked: list[str] = []
        self.stored: list[Envelope] = []
        self._output = bytearray(self.session.start())
        if greeted:
            self.read_reply()

    def send(self, data: bytes) -> None:
        self.session.receive_data(data)
        self.pump()

    def pump(self) -> None:
        session = self.session
        while True:
            event = session.next_event()
            if event is NEED_DATA:
                break
            if isinstance(event, MailFrom):
                if self.has_room(event.size):
                    session.respond(event, self.policy.check_sender(event.sender, self.current()))
                else:
                    session.respond(event, replies.INSUFFICIENT_STORAGE)
            elif isinstance(event, AuthRequested):
                session.respond(event, self.verify(event))
            elif isinstance(event, RcptTo):
                session.respond(event, self.policy.check_recipient(event.address, self.current()))
            elif isinstance(event, MessageReceived):
                self.stored.append(event.envelope)
                session.respond(event, replies.queued(f"ID{len(self.stored)}"))
            elif isinstance(event, VerifyRequested):
                session.respond(event, self.policy.verify(event.argument))
            elif isinstance(event, StartTlsRequested):
                session.respond(event, replies.NOT_IMPLEMENTED)
        self._output += session.data_to_send()

    def verify(self, event: AuthRequested) -> replies.Reply:
        credentials = event.credentials
        self.checked.append(credentials.username)
        if PASSWORDS.get(credentials.username) == credentials.password:
            self.client = replace(self.client, user=credentials.username)
            return replies.AUTH_SUCCEEDED
        return replies.AUTH_FAILED

    def current(self) -> Client:
        """The client as the server sees it: its user only while the session agrees."""
        return self.client if self.session.authenticated else replace(self.client, user=None)

    def read_reply(self) -> list[str]:
        lines: list[str] = []
        while True:
            end = self._output.find(b"\r\n")
            if end < 0:
                assert not lines, f"incomplete reply {lines!r}"
                assert self.session.closed, "no reply and the session is still open"
                return []
            line = self._output[:end].decode("utf-8")
            del self._output[: end + 2]
            lines.append(line)
            if len(line) < 4 or line[3] == " ":
                return lines

    def all_replies(self) -> list[str]:
        """Every complete reply now in the output, as their last lines."""
        result = []
        while b"\r\n" in self._output:
            result.append(self.read_reply()[-1])
        return result
