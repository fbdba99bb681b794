"""Read index rounds between the members' event loops, past Raft's tick threads.

A linearizable read needs the leader's read index, confirmed to be current
(raft.read_index). Through pysyncobj a round wakes two or three tick threads
on the members, ~70-100 us of CPU each under load: about half of what a
linearizable read cost in all. With two or three voters, a round needs the
word of one voter besides the leader, and both messages can go from event
loop to event loop instead, over a connection of the member's own to the
other member's client port:

- A follower asks the leader ('ask', carrying the follower's term, read after
  its reads arrived). The leader answers with its read index if it leads in
  that very term, its no-op is committed, and the asker is one of its at most
  two fellow voters. The ask is the follower's echo: raft.read_index's
  docstring says why that is enough.
- The leader, for its own reads, asks a follower for its term ('ping', sent
  after the reads arrived). A follower still in the leader's term T when it
  answers had voted in no later term when the reads began, nor had the
  leader: two of the three voters, so no leader of a later term existed then,
  and the leader's commit index, read after the reads began, covers every
  write acknowledged before them (its no-op, committed, covers every earlier
  term's).

Either way the member then waits until it has applied the read index. In any
other case -- more voters, no connection yet, a refusal, a term that differs,
no answer within the timeout, a lost connection -- the round goes through
Raft as before, which then decides. This path only ever gives a faster yes.

The connection: the dialer connects to the member's advertised client URL and
starts with MAGIC (no HTTP/2 or HTTP/1.1 client starts with a NUL byte), its
own Raft address and a random nonce; the member answers with its Raft
address and a nonce of its own, so a URL that reaches some other member
(0.0.0.0, a proxy) is noticed and not used. With a cluster secret, the
greeting carries an HMAC, keyed with the secret, of both nonces and both
addresses in their roles, and every message after it an HMAC keyed with a
session key made the same way, which says which way the message goes:
nothing but a member of the cluster can make a dialer take a read as
confirmed, and nothing can be replayed from another connection or turned
around. Without a secret every member's Raft port is on loopback
(metastore.config), so the members share one machine, and a member is only
asked at a loopback client URL: the connections never leave the machine.

Everything here runs on the member's event loop.
"""
from __future__ import annotations

import asyncio
import hashlib
import hmac
import itertools
import logging
import os
import struct
from typing import Callable, Protocol

from metastore.cluster import hostport, is_loopback
from metastore.errors import EtcdError

log = logging.getLogger("metastore.read_peers")

MAGIC = b"\x00metastore-read-index/1\n"
_LENGTH = struct.Struct("!H")
_MESSAGE = struct.Struct("!BQQ")  # kind, request id, term or index
_REQUEST, _ANSWER = b"q", b"a"  # which way a message's MAC says it goes
NONCE_BYTES = 16
MAC_BYTES = 16
MAX_ADDRESS_BYTES = 1024

# Message kinds.
ASK = 1  # follower -> leader: (id, the follower's term)
INDEX = 2  # leader -> follower: (id, read index)
REFUSED = 3  # leader -> follower: (id, 0): ask Raft instead
PING = 4  # leader -> follower: (id, the leader's term)
TERM = 5  # follower -> leader: (id, the follower's term)

# A member that could not be reached, or did not greet as it should (an
# older build, another member behind its URL), is dialed again after this
# long, twice as long after each failure in a row, up to REDIAL_AT_MOST.
REDIAL_AFTER = 1.0
REDIAL_AT_MOST = 30.0
# An answer (or a greeting) takes well under a millisecond on a live member.
# One that has not come after this long ends the connection, and its round
# goes to Raft: a member that stalls (stopped, swapping) must not hold reads
# up for long, and is dialed again later.
ANSWER_TIMEOUT = 0.5
# A connection to the client port that starts like this one and has not sent
# a request that checks out after this long is closed; beyond MAX_ANSWERING
# connections, new ones are refused.
GREETING_TIMEOUT = 5.0
MAX_ANSWERING = 64

DoneHere = Callable[[EtcdError | None], None]  # called on the event loop
DoneAnywhere = Callable[[EtcdError | None], None]  # thread-safe
ViaRaft = Callable[[DoneAnywhere], None]


class PeerReadSource(Protocol):
    """What this needs of Raft (raft.RaftNode); every call from the loop."""

    def leader_read_view(self) -> tuple[int, int, frozenset[str]] | None:
        """(term, read index, the other voters' addresses) while this member
        leads a term whose no-op is committed; else None."""

    def term(self) -> int: ...

    def leader_address(self) -> str | None: ...

    def is_learner(self) -> bool: ...

    def applied_through(self, index: int) -> bool:
        """Whether this member has applied every entry up to `index`."""

    def when_applied(self, index: int, done: DoneAnywhere) -> None:
        """done(None) once it has (done(error) if the member stops first)."""


def secret_key(secret: str | None) -> bytes | None:
    if not secret:
        return None
    return hashlib.sha256(b"metastore read index\x00" + secret.encode()).digest()


def _greeting_mac(key: bytes, dialer_nonce: bytes, answerer_nonce: bytes, dialer: bytes,
                  answerer: bytes) -> bytes:
    """Proves the greeting comes from a holder of the secret, for this
    connection (both nonces) and these roles (who dialed whom)."""
    return hmac.digest(key, b"greeting\x00" + dialer_nonce + answerer_nonce + dialer + b"\x00" + answerer,
                       "sha256")[:MAC_BYTES]


def _session_key(key: bytes, dialer_nonce: bytes, answerer_nonce: bytes, dialer: bytes, answerer: bytes) -> bytes:
    return hmac.digest(key, b"session\x00" + dialer_nonce + answerer_nonce + dialer + b"\x00" + answerer, "sha256")


def _message_mac(session: bytes, direction: bytes, body: bytes) -> bytes:
    return hmac.digest(session, direction + body, "sha256")[:MAC_BYTES]


class ReadPeers:
    """This member's side of the exchange: the connections it dials (to ask)
    and the ones it accepts (to answer)."""

    def __init__(self, raft: PeerReadSource, self_address: str | None,
                 client_url_of: Callable[[str], str | None], secret: str | None,
                 timeout: float = ANSWER_TIMEOUT) -> None:
        self._raft = raft
        self._self_address = self_address
        self._client_url_of = client_url_of  # Raft address -> the client URL that member advertises
        self._key = secret_key(secret)
        self._timeout = timeout
        self._dialed: dict[str, _Dialed] = {}  # Raft address -> connection (ready or being made)
        self._redial_at: dict[str, float] = {}
        self._failures: dict[str, int] = {}  # Raft address -> dials in a row that never got ready
        self._warned: set[str] = set()  # addresses whose greeting was wrong, logged once
        self._answering: set[_Answering] = set()
        self._connecting: set[asyncio.Task] = set()
        self._warn_full_after = 0.0
        self._closed = False
        self.confirmed = 0  # rounds confirmed here

    # -- asking ----------------------------------------------------------------
    def start(self, done_here: DoneHere, done_anywhere: DoneAnywhere, via_raft: ViaRaft) -> bool:
        """Start a read index round for reads that arrived before this call.
        False: this path does not apply right now; nothing was started. True:
        done_here(None) (on the loop) or done_anywhere(...) will be called,
        directly or through via_raft(done_anywhere) if the round falls back."""
        if self._closed or self._self_address is None or self._raft.is_learner():
            return False
        view = self._raft.leader_read_view()
        if view is not None:
            term, index, voters = view
            if not 1 <= len(voters) <= 2:
                return False  # alone, or a majority needs more than one other voter
            conn = self._ready_connection(sorted(voters))
            if conn is None:
                return False

            def on_term(kind: int | None, their_term: int) -> None:
                if kind == TERM and their_term == term:
                    self._confirmed(index, done_here, done_anywhere)
                else:
                    via_raft(done_anywhere)
            conn.request(PING, term, on_term)
            return True
        leader = self._raft.leader_address()
        if leader is None or leader == self._self_address:
            return False
        conn = self._ready_connection([leader])
        if conn is None:
            return False
        # Our term now, after the reads this round carries arrived.
        term = self._raft.term()

        def on_index(kind: int | None, index: int) -> None:
            if kind == INDEX:
                self._confirmed(index, done_here, done_anywhere)
            else:
                via_raft(done_anywhere)
        conn.request(ASK, term, on_index)
        return True

    def _confirmed(self, index: int, done_here: DoneHere, done_anywhere: DoneAnywhere) -> None:
        self.confirmed += 1
        if self._raft.applied_through(index):
            done_here(None)
        else:
            self._raft.when_applied(index, done_anywhere)

    def _ready_connection(self, addresses: list[str]) -> "_Dialed | None":
        """A connection ready to carry a request to one of `addresses`; if
        there is none, the missing ones are dialed for the next rounds."""
        for address in addresses:
            conn = self._dialed.get(address)
            if conn is not None and conn.ready:
                return conn
        loop = asyncio.get_running_loop()
        for address in addresses:
            if address not in self._dialed and loop.time() >= self._redial_at.get(address, 0.0):
                self._dial(address)
        return None

    def _dial(self, address: str) -> None:
        url = self._client_url_of(address)
        loop = asyncio.get_running_loop()
        if url is None:  # its client URL is not known yet
            self._redial_at[address] = loop.time() + REDIAL_AFTER
            return
        if self._key is None and not is_loopback(url, resolve=False):
            # Without a secret nothing could tell a member from whoever
            # answers at that address: only this machine's members are asked.
            self._refused(address, f"its client URL ({url}) is not on loopback and the cluster has no secret")
            self._redial_at[address] = loop.time() + REDIAL_AT_MOST
            return
        target = hostport(url)
        host, _, port = target.rpartition(":")
        host = host.strip("[]")
        conn = _Dialed(self, address, self._self_address or "", self._key, self._timeout)
        self._dialed[address] = conn

        async def connect() -> None:
            try:
                transport, _ = await asyncio.wait_for(
                    loop.create_connection(lambda: conn, host, int(port)), self._timeout)
            except (OSError, asyncio.TimeoutError, ValueError) as exc:
                log.debug("could not reach member %s at %s for read index rounds: %s", address, target, exc)
                self._lost(conn)
                return
            if self._closed:
                transport.close()
        task = loop.create_task(connect())
        self._connecting.add(task)
        task.add_done_callback(self._connecting.discard)

    def _lost(self, conn: "_Dialed") -> None:
        address = conn.address
        if self._dialed.get(address) is not conn:
            return
        del self._dialed[address]
        failures = 0 if conn.answered else self._failures.get(address, 0) + 1
        self._failures[address] = failures
        wait = min(REDIAL_AFTER * 2 ** max(failures - 1, 0), REDIAL_AT_MOST)
        self._redial_at[address] = asyncio.get_running_loop().time() + wait

    def _refused(self, address: str, why: str) -> None:
        level = logging.DEBUG if address in self._warned else logging.WARNING
        self._warned.add(address)
        log.log(level, "not asking member %s for read index rounds (Raft confirms those reads): %s",
                address, why)

    # -- answering -------------------------------------------------------------
    def accept(self, transport: asyncio.Transport, data: bytes) -> None:
        """Take over a client-port connection that started with MAGIC."""
        if self._closed or self._self_address is None:
            transport.close()
            return
        if len(self._answering) >= MAX_ANSWERING:
            now = asyncio.get_running_loop().time()
            if now >= self._warn_full_after:
                self._warn_full_after = now + 60.0
                log.warning("refusing read index connections (from %s, and any more in the next minute): "
                            "%d open already", transport.get_extra_info("peername"), MAX_ANSWERING)
            transport.close()
            return
        protocol = _Answering(self, self._self_address.encode(), self._key)
        self._answering.add(protocol)
        transport.set_protocol(protocol)
        protocol.connection_made(transport)
        protocol.data_received(data)

    def answer(self, kind: int, asker: str, value: int) -> tuple[int, int]:
        """The reply to one request from `asker`: (kind, value)."""
        if kind == PING:
            return TERM, self._raft.term()
        view = self._raft.leader_read_view()
        if view is not None:
            term, index, voters = view
            if value == term and asker in voters and len(voters) <= 2:
                return INDEX, index
        return REFUSED, 0

    def close(self) -> None:
        self._closed = True
        for task in list(self._connecting):
            task.cancel()
        for conn in list(self._dialed.values()):
            conn.close()
        self._dialed.clear()
        for protocol in list(self._answering):
            protocol.close()
        self._answering.clear()


class _Dialed(asyncio.Protocol):
    """A connection this member dialed to ask another one."""

    def __init__(self, owner: ReadPeers, address: str, self_address: str, key: bytes | None,
                 timeout: float) -> None:
        self.owner = owner
        self.address = address
        self._self_address = self_address.encode()
        self._key = key
        self._session: bytes | None = None  # with a secret, once greeted
        self._timeout = timeout
        self._nonce = os.urandom(NONCE_BYTES)
        self._transport: asyncio.Transport | None = None
        self._greeting_timer: asyncio.TimerHandle | None = None
        self._buf = b""
        self.ready = False
        self.answered = False  # an answer came: the member is live, not just greeting
        self._ids = itertools.count(1)
        # id -> (reply callback, timer)
        self._pending: dict[int, tuple[Callable[[int | None, int], None], asyncio.TimerHandle]] = {}
        self._answer_bytes = _MESSAGE.size + (MAC_BYTES if key is not None else 0)

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self._transport = transport  # type: ignore[assignment]
        self._greeting_timer = asyncio.get_running_loop().call_later(self._timeout, self._no_greeting)
        transport.write(MAGIC + _LENGTH.pack(len(self._self_address)) + self._self_address  # type: ignore[attr-defined]
                        + self._nonce)

    def request(self, kind: int, value: int, reply: Callable[[int | None, int], None]) -> None:
        request_id = next(self._ids)
        body = _MESSAGE.pack(kind, request_id, value)
        if self._session is not None:
            body += _message_mac(self._session, _REQUEST, body)
        self._transport.write(body)  # type: ignore[union-attr]
        timer = asyncio.get_running_loop().call_later(self._timeout, self._expire, request_id)
        self._pending[request_id] = (reply, timer)

    def _no_greeting(self) -> None:
        if not self.ready:
            self.close()

    def _expire(self, request_id: int) -> None:
        """No answer in time: this and every other round waiting on the
        connection go to Raft (connection_lost), and it is dialed again later."""
        if request_id in self._pending:
            self.close()

    def data_received(self, data: bytes) -> None:
        buf = self._buf + data if self._buf else data
        pos = 0
        if not self.ready:
            pos = self._greeting(buf)
            if pos == 0:
                self._buf = buf
                return
            if pos < 0:
                return
        size = self._answer_bytes
        end = len(buf)
        session = self._session
        while end - pos >= size:
            body = buf[pos:pos + _MESSAGE.size]
            if session is not None and not hmac.compare_digest(
                    buf[pos + _MESSAGE.size:pos + size], _message_mac(session, _ANSWER, body)):
                self._fail("an answer with a wrong MAC")
                return
            pos += size
            kind, request_id, value = _MESSAGE.unpack(body)
            self.answered = True
            pending = self._pending.pop(request_id, None)
            if pending is not None:
                pending[1].cancel()
                pending[0](kind, value)
        self._buf = buf[pos:]

    def _greeting(self, buf: bytes) -> int:
        """Check the member's greeting: bytes it took, 0 if more are needed, -1 if refused."""
        if len(buf) < _LENGTH.size:
            return 0
        (n,) = _LENGTH.unpack_from(buf)
        if n > MAX_ADDRESS_BYTES:
            self._fail("no greeting it understands (a member of an older build?)")
            return -1
        end = _LENGTH.size + n + NONCE_BYTES + MAC_BYTES
        if len(buf) < end:
            return 0
        address = buf[_LENGTH.size:_LENGTH.size + n]
        their_nonce = buf[_LENGTH.size + n:_LENGTH.size + n + NONCE_BYTES]
        mac = buf[end - MAC_BYTES:end]
        if self._key is not None:
            expected = _greeting_mac(self._key, self._nonce, their_nonce, self._self_address, address)
            if not hmac.compare_digest(mac, expected):
                self._fail("a greeting with a wrong MAC (another cluster secret?)")
                return -1
            self._session = _session_key(self._key, self._nonce, their_nonce, self._self_address, address)
        if address.decode(errors="replace") != self.address:
            self._fail(f"member {address.decode(errors='replace')} answering there")
            return -1
        self.ready = True
        if self._greeting_timer is not None:
            self._greeting_timer.cancel()
        # A first request at once: the member keeps a connection only once a
        # request checks out, and this one tells whether it answers at all.
        self.request(PING, 0, lambda kind, value: None)
        return end

    def _fail(self, why: str) -> None:
        self.owner._refused(self.address, why)
        self.close()

    def close(self) -> None:
        self.ready = False  # no more rounds on it, from now
        if self._transport is not None:
            self._transport.close()

    def connection_lost(self, exc: Exception | None) -> None:
        self.ready = False
        if self._greeting_timer is not None:
            self._greeting_timer.cancel()
        self.owner._lost(self)
        pending = list(self._pending.values())
        self._pending.clear()
        for reply, timer in pending:
            timer.cancel()
            reply(None, 0)


class _Answering(asyncio.Protocol):
    """A connection another member dialed to ask this one. Anyone who can
    reach the client port can open one: it is closed at the first thing
    out of protocol, reads stop while its answers are not being read, and
    one that does not greet in time is closed."""

    def __init__(self, owner: ReadPeers, self_address: bytes, key: bytes | None) -> None:
        self.owner = owner
        self._self_address = self_address
        self._key = key
        self._session: bytes | None = None
        self._transport: asyncio.Transport | None = None
        self._buf = b""
        self._asker: str | None = None
        self._greeting_timer: asyncio.TimerHandle | None = None
        self._request_bytes = _MESSAGE.size + (MAC_BYTES if key is not None else 0)

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self._transport = transport  # type: ignore[assignment]
        self._greeting_timer = asyncio.get_running_loop().call_later(GREETING_TIMEOUT, self.close)

    def data_received(self, data: bytes) -> None:
        buf = self._buf + data if self._buf else data
        pos = 0
        if self._asker is None:
            pos = self._greeting(buf)
            if pos <= 0:
                if pos == 0:
                    self._buf = buf
                return
        out = []
        end = len(buf)
        size = self._request_bytes
        session = self._session
        while end - pos >= size:
            body = buf[pos:pos + _MESSAGE.size]
            if session is not None and not hmac.compare_digest(
                    buf[pos + _MESSAGE.size:pos + size], _message_mac(session, _REQUEST, body)):
                self.close()
                return
            pos += size
            kind, request_id, value = _MESSAGE.unpack(body)
            if kind not in (ASK, PING):
                self.close()
                return
            if self._greeting_timer is not None:  # a first request that checks out
                self._greeting_timer.cancel()
                self._greeting_timer = None
            answer_kind, answer = self.owner.answer(kind, self._asker, value)  # type: ignore[arg-type]
            reply = _MESSAGE.pack(answer_kind, request_id, answer)
            out.append(reply)
            if session is not None:
                out.append(_message_mac(session, _ANSWER, reply))
        self._buf = buf[pos:]
        if out:
            self._transport.write(b"".join(out))  # type: ignore[union-attr]

    def _greeting(self, buf: bytes) -> int:
        start = len(MAGIC)
        if len(buf) < start + _LENGTH.size:
            return 0 if MAGIC.startswith(buf[:start]) else self._refuse()
        if not buf.startswith(MAGIC):
            return self._refuse()
        (n,) = _LENGTH.unpack_from(buf, start)
        if n > MAX_ADDRESS_BYTES:
            return self._refuse()
        end = start + _LENGTH.size + n + NONCE_BYTES
        if len(buf) < end:
            return 0
        asker = buf[start + _LENGTH.size:start + _LENGTH.size + n]
        their_nonce = buf[end - NONCE_BYTES:end]
        nonce = os.urandom(NONCE_BYTES)
        if self._key is not None:
            mac = _greeting_mac(self._key, their_nonce, nonce, asker, self._self_address)
            self._session = _session_key(self._key, their_nonce, nonce, asker, self._self_address)
        else:
            mac = bytes(MAC_BYTES)
        self._asker = asker.decode(errors="replace")
        self._transport.write(_LENGTH.pack(len(self._self_address)) + self._self_address  # type: ignore[union-attr]
                              + nonce + mac)
        return end

    def _refuse(self) -> int:
        self.close()
        return -1

    def pause_writing(self) -> None:
        # Its answers are not being read: stop reading its requests.
        if self._transport is not None:
            self._transport.pause_reading()

    def resume_writing(self) -> None:
        if self._transport is not None:
            self._transport.resume_reading()

    def close(self) -> None:
        if self._transport is not None:
            self._transport.close()

    def connection_lost(self, exc: Exception | None) -> None:
        if self._greeting_timer is not None:
            self._greeting_timer.cancel()
        self.owner._answering.discard(self)
