"""Issue 11's hostile-peer suite: a real receiver (`zcmigrate receive`, a child process)
against peers that send garbage, lie about sizes, stall, forge, replay, squat or tamper
with a real session through a proxy, and against wrong or missing keys.

Every case ends with the same checks (Destination.survived):
- a clear refusal: the receiver's log names it ("connection refused" or "data channel
  refused" with the reason, or "receive failed, nothing committed" with the error), and
  so does the ERROR record to the peer where the peer is ours to read;
- nothing committed: no IMAGE, no IMAGE.state, IMAGE.incoming gone;
- no file in the destination directory touched but IMAGE.incoming (names, sizes and
  mtimes before and after, a bystander file included);
- the receiver's peak RSS (VmHWM) under RSS_BOUND, whatever sizes the peer claimed;
- then a real migration (`zcmigrate send`) into the same receiver completes with the
  source's bytes. A receiver that a refusal must not end is one-shot (it keeps listening
  until a valid migration); one whose job a hostile peer may end runs with --serve.

The data channels' strangers knock while a real session admits its channels (through
tests/tampering_proxy.py, which also flips, drops and injects bytes of a real keyed
session). Only the flip of a page byte in a keyed session is expected to fail until
data packets are sealed.
"""

from __future__ import annotations

import contextlib
import json
import os
import random
import shutil
import socket
import struct
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any
from uuid import UUID

import pytest

from tests.child_output import DIE_WITH_PARENT
from tests.children import Child
from tests.fault_lab import scratch_dir
from tests.packet_factory import PacketFactory
from tests.tampering_proxy import Edit, PageLocator, RecordLocator, Tamper, TamperingProxy
from tests.test_destination_protocol import (
    handshake,
    recv_exact,
    recv_record,
    wait_acknowledged,
)
from zcmigrate.channel.aead import SessionKeys, handshake_mac, shared_key
from zcmigrate.migrate.admission import MAX_PENDING, PREAUTH_TIMEOUT
from zcmigrate.migrate.imagefiles import incoming_path, state_path
from zcmigrate.migrate.keyfile import keygen, read_key
from zcmigrate.migrate.protocol import (
    MAIN_MAGIC,
    MAIN_VERSION,
    RECORD_HEADER_SIZE,
    Greeting,
    Hello,
    HelloAck,
    MultifdFlush,
    Record,
    RecordType,
    decode_header,
    decode_record,
    encode_header,
)
from zcmigrate.multifd.wire import CHALLENGE_SIZE, WireContext, encode_init

PAGE = 4096
# Four packets of 512 pages (the source's default): each of the two channels carries two,
# so a channel's first packet is always followed by another (an edit inside it shows at
# the next header, not only at the final sync).
IMAGE_SIZE = 8 << 20
# The receiver's peak RSS (VmHWM: pages it touched), whatever the peer claims. Measured
# on this suite's receivers: 25 MiB idle, 29 to 39 MiB after hostile peers and several
# real 8 MiB migrations (the shared receivers' peak over all their cases). The smallest
# claim a case makes is 4 packets of 64 MiB (256 MiB), then a 4 GiB record and an image of
# 2**62 bytes: a receiver that touched what one 64 MiB packet claims (about 39 + 64 MiB)
# would pass this bound, and one that stays near its measured peak is 2.5 times under it.
RSS_BOUND = 96 << 20
# A refusal shows in the receiver's log within this (it comes at once; the machine is
# shared).
REFUSAL_BOUND = 15.0
# A real 8 MiB migration, process start-ups included, on a loaded 2-core machine.
MIGRATION_BOUND = 60.0
PEER_TIMEOUT = "10"
# Strangers that sit on connections may slow a real migration by at most this much.
DELAY_BOUND = 3.0

FAILED = "receive failed, nothing committed"
REFUSED = "connection refused"
DATA_REFUSED = "data channel refused"


# ------------------------------------------------------------------ the stage


@dataclass
class Destination:
    """A receiver under attack, and what it may not do."""

    directory: Path
    image: Path
    key: Path | None
    child: Child
    port: int
    serve: bool

    # -------------------------------------------------------- what it shows

    def snapshot(self) -> dict[str, tuple[int, int]]:
        """Every file of the destination directory but IMAGE.incoming: size and mtime."""
        skip = incoming_path(self.image).name
        return {p.name: (p.lstat().st_size, p.lstat().st_mtime_ns)
                for p in self.directory.iterdir() if p.name != skip}

    def peak_rss(self) -> int:
        """VmHWM of the receiver process, in bytes."""
        for line in Path(f"/proc/{self.child.pid}/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
        raise AssertionError(f"no VmHWM for pid {self.child.pid}")

    def events(self, event: str, since: int = 0) -> list[dict[str, Any]]:
        """The log events named `event`, of those logged after mark() returned `since`."""
        return [e for e in self.child.events()[since:] if e.get("event") == event]

    def mark(self) -> int:
        """Where the log is now: a shared receiver's case looks only at what follows."""
        return len(self.child.events())

    def clean(self) -> dict[str, tuple[int, int]]:
        """The start of a case on a shared receiver: the image and device state of the
        previous case's real migration removed (the receiver, --serve --replace, holds no
        reference to them between jobs), and the snapshot the case must leave as it is."""
        for p in (self.image, state_path(self.image)):
            p.unlink(missing_ok=True)
        return self.snapshot()

    def logged(self, event: str, text: str, timeout: float = REFUSAL_BOUND, *,
               since: int = 0) -> dict[str, Any]:
        """The first log event `event` (after mark `since`) whose reason or error holds
        `text`."""
        deadline = time.monotonic() + timeout
        while True:
            for e in self.events(event, since):
                if text in str(e.get("reason", "")) + str(e.get("error", "")):
                    return e
            if time.monotonic() >= deadline:
                seen = [e.get("reason", e.get("error")) for e in self.events(event, since)]
                raise AssertionError(f"the receiver never logged {event!r} with {text!r} "
                                     f"(it logged {event!r}: {seen})\n{self.child.describe()}")
            time.sleep(0.05)

    # -------------------------------------------------------- the checks

    def assert_nothing_committed(self, before: dict[str, tuple[int, int]]) -> None:
        incoming = incoming_path(self.image)
        # A failed job logs first and removes IMAGE.incoming right after.
        deadline = time.monotonic() + REFUSAL_BOUND
        while incoming.exists() and time.monotonic() < deadline:
            time.sleep(0.02)
        assert not incoming.exists(), f"{incoming} left behind\n{self.child.describe()}"
        assert not self.image.exists(), f"{self.image} committed\n{self.child.describe()}"
        assert not state_path(self.image).exists(), "a device state was committed"
        after = self.snapshot()
        assert after == before, f"files touched beside IMAGE.incoming: before {before}, " \
                                f"after {after}"

    def assert_rss_bounded(self, when: str) -> None:
        rss = self.peak_rss()
        assert rss < RSS_BOUND, (f"{when}: the receiver's peak RSS is {rss >> 20} MiB, bound "
                                 f"{RSS_BOUND >> 20} MiB\n{self.child.describe()}")

    def survived(self, stage: Stage, before: dict[str, tuple[int, int]],
                 src: Path) -> None:
        """After a refused peer: nothing committed, nothing else touched, memory bounded,
        and a real migration into this receiver completes."""
        self.assert_nothing_committed(before)
        self.assert_rss_bounded("after the hostile peer")
        stage.migrate(self, src)


@dataclass
class Stage:
    """Owns the receivers, senders, keys and directories of one test."""

    root: Path
    children: list[Child] = field(default_factory=list)
    _n: int = 0

    def keyfile(self, name: str = "key") -> Path:
        path = self.root / "keys" / name
        path.parent.mkdir(mode=0o700, exist_ok=True)
        keygen(path)
        return path

    def receiver(self, *, key: Path | None, serve: bool = False,
                 replace: bool = False) -> Destination:
        self._n += 1
        directory = self.root / f"dst{self._n}"
        directory.mkdir()
        # A bystander: no refusal, and no migration, may touch it.
        (directory / "bystander.img").write_bytes(b"\x5a" * PAGE)
        image = directory / "dst.img"
        args = ["receive", str(image), "--listen", "127.0.0.1:0", "--json",
                "--log-format", "json", "--peer-timeout", PEER_TIMEOUT]
        if serve:
            args.append("--serve")
        if replace:
            args.append("--replace")
        if key is not None:
            args += ["--auth-key-file", str(key)]
        child = Child.zcmigrate(*args, name=f"receiver {self._n}", prefix=DIE_WITH_PARENT)
        self.children.append(child)
        port = int(child.wait_line("listening:", 60).rsplit(":", 1)[1])
        return Destination(directory, image, key, child, port, serve)

    def send(self, src: Path, port: int, key: Path | None, *extra: str) -> Child:
        args = ["send", str(src), "--to", f"127.0.0.1:{port}", "--json", "--log-format",
                "json", "--peer-timeout", PEER_TIMEOUT, *extra]
        if key is not None:
            args += ["--auth-key-file", str(key)]
        child = Child.zcmigrate(*args, name="sender", prefix=DIE_WITH_PARENT)
        self.children.append(child)
        return child

    def migrate(self, dest: Destination, src: Path, *, key: Path | str | None = "same",
                port: int | None = None) -> float:
        """A real migration of `src` into `dest` (through `port` if given) completes: the
        sender exits 0, the receiver commits, IMAGE holds the source's bytes. Its wall
        time in seconds."""
        k = dest.key if key == "same" else key
        assert not isinstance(k, str)
        commits = len(dest.events("committed"))
        before = dest.snapshot()
        t0 = time.monotonic()
        sender = self.send(src, port or dest.port, k)
        code = sender.wait_exit(MIGRATION_BOUND)
        took = time.monotonic() - t0
        assert code == 0, (f"the real migration did not complete\n{sender.describe()}\n"
                           f"{dest.child.describe()}")
        deadline = time.monotonic() + REFUSAL_BOUND
        while len(dest.events("committed")) <= commits:
            assert time.monotonic() < deadline, f"no commit logged\n{dest.child.describe()}"
            time.sleep(0.02)
        assert dest.image.read_bytes() == src.read_bytes(), "IMAGE differs from the source"
        assert state_path(dest.image).exists()
        # A commit makes IMAGE and IMAGE.state and touches nothing else, the bystander
        # included.
        made = {dest.image.name, state_path(dest.image).name}
        after = dest.snapshot()
        assert {n: v for n, v in after.items() if n not in made} == \
            {n: v for n, v in before.items() if n not in made}, (before, after)
        if dest.serve:
            dest.assert_rss_bounded("after the real migration")
        else:
            assert dest.child.wait_exit(REFUSAL_BOUND) == 0, dest.child.describe()
        return took

    def close(self) -> None:
        for c in reversed(self.children):
            c.close()


@pytest.fixture(scope="module")
def source_image() -> Iterator[Path]:
    """A static image of random pages: every page travels as data."""
    d = scratch_dir("zchostile-src-")
    path = d / "src.img"
    path.write_bytes(random.Random(11).randbytes(IMAGE_SIZE))
    yield path
    shutil.rmtree(d, ignore_errors=True)


@contextlib.contextmanager
def _stage(prefix: str) -> Iterator[Stage]:
    d = scratch_dir(prefix)
    s = Stage(d)
    try:
        yield s
    finally:
        s.close()
        shutil.rmtree(d, ignore_errors=True)


@pytest.fixture
def stage() -> Iterator[Stage]:
    with _stage("zchostile-") as s:
        yield s


@pytest.fixture(scope="module")
def shared_stage() -> Iterator[Stage]:
    with _stage("zchostile-shared-") as s:
        yield s


# Receivers shared by the cases of this module (starting one costs a second of this
# 2-core machine's time): --serve, so a refusal or a failed job leaves them listening,
# and --replace, so each case's real migration may commit over the last. A case starts
# with clean() and reads only the log lines after its mark().

@pytest.fixture(scope="module")
def keyed(shared_stage: Stage) -> Destination:
    return shared_stage.receiver(key=shared_stage.keyfile("shared"), serve=True,
                                 replace=True)


@pytest.fixture(scope="module")
def keyless(shared_stage: Stage) -> Destination:
    return shared_stage.receiver(key=None, serve=True, replace=True)


# ------------------------------------------------------------------ hostile peers


def answer(s: socket.socket) -> Record | None:
    """The receiver's next record, or None if it closed (or reset) without one."""
    try:
        head = recv_exact(s, RECORD_HEADER_SIZE)
        rtype, length = decode_header(head)
        return decode_record(rtype, recv_exact(s, length))
    except (ConnectionError, TimeoutError):
        return None


def closed_by_peer(s: socket.socket, timeout: float = REFUSAL_BOUND) -> bool:
    """Whether the receiver closes `s` within `timeout` (reading and dropping anything it
    still sends)."""
    s.settimeout(timeout)
    try:
        while s.recv(4096):
            pass
    except ConnectionResetError:
        return True
    except TimeoutError:
        return False
    return True


def knock(port: int, data: bytes) -> Record | None:
    """A stranger on the main port: read the GREETING, send `data`; the receiver's answer
    (it must then close the connection)."""
    with socket.create_connection(("127.0.0.1", port), timeout=REFUSAL_BOUND) as s:
        assert isinstance(recv_record(s), Greeting)
        s.sendall(data)
        rec = answer(s)
        assert closed_by_peer(s), "the receiver kept a refused connection open"
        return rec


def error_says(rec: Record | None, text: str) -> None:
    assert rec is not None and rec.TYPE is RecordType.ERROR, f"expected ERROR, got {rec}"
    assert text in rec.message, rec  # type: ignore[attr-defined]


def stranger_channel(port: int, init: bytes | Callable[[bytes], bytes], *,
                     source: str = "127.0.0.1") -> None:
    """A stranger on the data port: it answers the receiver's challenge with `init` (or
    `init(challenge)`); the receiver must close the connection."""
    s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    try:
        s.settimeout(REFUSAL_BOUND)
        s.bind((source, 0))
        s.connect(("127.0.0.1", port))
        challenge = recv_exact(s, CHALLENGE_SIZE)
        s.sendall(init(challenge) if callable(init) else init)
        assert closed_by_peer(s), "the receiver kept a stranger's data channel"
    finally:
        s.close()


def hello(*, uuid: bytes = bytes(range(16)), channels: int = 1, page_size: int = PAGE,
          image_size: int = 64 * PAGE, pages_alloc: int = 64) -> Hello:
    return Hello(uuid=uuid, channels=channels, page_size=page_size, image_size=image_size,
                 pages_alloc=pages_alloc, block="zcmigrate.ram", zero_copy=False,
                 zero_page_detection=True, nonce=os.urandom(32))


def hostile_session(port: int, h: Hello) -> tuple[socket.socket, list[socket.socket]]:
    """A keyless source played by hand up to its data channels: handshake, and every
    channel connected with its init record."""
    main, ack = handshake(port, h)
    assert isinstance(ack, HelloAck), ack
    ctx = h.context()
    data = []
    for cid in range(h.channels):
        s = socket.create_connection(("127.0.0.1", port), timeout=REFUSAL_BOUND)
        recv_exact(s, CHALLENGE_SIZE)
        s.sendall(encode_init(ctx, cid))
        data.append(s)
    return main, data


def wait_read_by_peer(s: socket.socket, port: int, timeout: float = REFUSAL_BOUND) -> None:
    """Wait until the receiver's process has read everything `s` sent it: the kernel's
    receive queue of its end of the connection (in /proc/net/tcp, the one on `port` whose
    peer is `s`) is empty and nothing is left in our send queue."""
    ours = s.getsockname()[1]
    local, remote = f"0100007F:{port:04X}", f"0100007F:{ours:04X}"
    deadline = time.monotonic() + timeout
    while True:
        wait_acknowledged(s)
        for line in Path("/proc/net/tcp").read_text().splitlines()[1:]:
            f = line.split()
            if f[1] == local and f[2] == remote:
                if int(f[4].split(":")[1], 16) == 0:
                    return
                break
        else:
            raise AssertionError(f"no connection from port {ours} to {port} in /proc/net/tcp")
        assert time.monotonic() < deadline, f"the receiver did not read within {timeout:g} s"
        time.sleep(0.01)


def session_keys(proxy: TamperingProxy, key: Path) -> SessionKeys:
    """What a holder of the key derives from a session it watched pass in clear."""
    greeting, h = proxy.session()
    return SessionKeys(read_key(key), h.nonce, greeting.nonce, h.uuid)


# ------------------------------------------------------------------ the main channel

_HTTP = (b"GET / HTTP/1.1\r\nHost: 127.0.0.1:4444\r\nUser-Agent: curl/7.88.1\r\n"
         b"Accept: */*\r\n\r\n")


def _raw(rtype: RecordType, payload: bytes) -> bytes:
    """A record of `rtype` with any payload: what no encoder of ours would make."""
    return encode_header(rtype, len(payload)) + payload


def _hello_json(**changes: Any) -> bytes:
    """A HELLO's JSON payload, with fields replaced by raw JSON text."""
    fields = {k: json.dumps(v) for k, v in json.loads(hello().payload()).items()}
    fields.update(changes)
    return ("{" + ",".join(f"{json.dumps(k)}:{v}" for k, v in fields.items()) + "}").encode()


# What a stranger sends after the GREETING, and the reason the receiver gives (in its log
# and, but where noted, in an ERROR record to the stranger).
MAIN_STRANGERS: dict[str, tuple[bytes, str]] = {
    "garbage": (bytes([0xA5]) + random.Random(1).randbytes(4095), "bad magic 0xa5"),
    "an HTTP request": (_HTTP, "bad magic 0x47455420"),
    "a data channel's init record": (
        PacketFactory(hello().context()).build_init(), "bad magic 0x11223344"),
    "another version": (struct.pack(">IHHI", MAIN_MAGIC, MAIN_VERSION - 1, 2, 0),
                        f"version {MAIN_VERSION - 1} is not supported"),
    "an unknown record type": (struct.pack(">IHHI", MAIN_MAGIC, MAIN_VERSION, 99, 0),
                               "unknown record type 99"),
    "a record out of order": (MultifdFlush(1).encode(),
                              "MULTIFD_FLUSH is out of order in phase hello"),
    "a record only a receiver sends": (Greeting(bytes(32)).encode(),
                                       "GREETING is never sent by the source"),
    "a HELLO that is not JSON": (_raw(RecordType.HELLO, b"not json!"),
                                 "HELLO: payload is not JSON"),
    "a HELLO that is not UTF-8": (_raw(RecordType.HELLO, b'{"uuid": "\xff\xfe"}'),
                                  "HELLO: payload is not UTF-8"),
    # The Python messages: "maximum recursion depth exceeded" and
    # "Exceeds the limit (4300 digits) for integer string conversion".
    "a HELLO nested 2000 deep": (_raw(RecordType.HELLO, b"[" * 2000 + b"]" * 2000),
                                 "HELLO: payload is nested too deeply"),
    "a HELLO with a 600-digit channel count": (
        _raw(RecordType.HELLO, _hello_json(channels="9" * 600)),
        "HELLO: field 'channels' is not an unsigned 64-bit number"),
    "a HELLO with a negative image size": (
        _raw(RecordType.HELLO, _hello_json(**{"image-size": "-4096"})),
        "HELLO: field 'image-size' is not an unsigned 64-bit number"),
    "a HELLO with true for a count": (
        _raw(RecordType.HELLO, _hello_json(channels="true")),
        "HELLO: field 'channels' missing or not int"),
    "a HELLO with a short uuid": (
        _raw(RecordType.HELLO, _hello_json(uuid='"0011"')), "HELLO: uuid: 2 bytes, expected 16"),
    "a HELLO that is a JSON list": (_raw(RecordType.HELLO, b"[1, 2, 3]"),
                                    "HELLO: payload is not a JSON object"),
    # An ERROR gets no ERROR back: the stranger gave up, and its message is its own.
    "an ERROR with a 5000-digit number": (
        _raw(RecordType.ERROR, b'{"message": ' + b"7" * 5000 + b"}"),
        "it gave up: (no message)"),
}
NO_ANSWER = {"an ERROR with a 5000-digit number"}


@pytest.mark.parametrize("case", list(MAIN_STRANGERS))
def test_a_stranger_on_the_main_port_is_refused_and_the_receiver_goes_on(
    stage: Stage, keyed: Destination, source_image: Path, case: str
) -> None:
    data, reason = MAIN_STRANGERS[case]
    before, mark = keyed.clean(), keyed.mark()
    rec = knock(keyed.port, data)
    if case in NO_ANSWER:
        assert rec is None, rec
    else:
        error_says(rec, reason)
    keyed.logged(REFUSED, reason, since=mark)
    keyed.survived(stage, before, source_image)


def test_a_one_shot_receiver_keeps_listening_past_bad_connections(
    stage: Stage, source_image: Path
) -> None:
    """A one-shot `receive` (no --serve) must not end on a bad connection before a
    migration (an HTTP probe, a port scan): strangers of every kind, one after another,
    then the real source, whose migration ends the receiver with exit 0."""
    key = stage.keyfile()
    dest = stage.receiver(key=key)
    before = dest.snapshot()
    for case in ("garbage", "an HTTP request", "a HELLO nested 2000 deep",
                 "an ERROR with a 5000-digit number"):
        knock(dest.port, MAIN_STRANGERS[case][0])
    # One that hangs up half-way through a record header, and one that hangs up at once.
    with socket.create_connection(("127.0.0.1", dest.port), timeout=REFUSAL_BOUND) as s:
        assert isinstance(recv_record(s), Greeting)
        s.sendall(encode_header(RecordType.HELLO, 100)[:5])
    socket.create_connection(("127.0.0.1", dest.port), timeout=REFUSAL_BOUND).close()
    for case in ("garbage", "an HTTP request", "a HELLO nested 2000 deep"):
        dest.logged(REFUSED, MAIN_STRANGERS[case][1])
    assert len(dest.events(REFUSED)) >= 4, dest.child.describe()
    assert dest.child.returncode is None, dest.child.describe()
    dest.survived(stage, before, source_image)  # and it exits 0 after the migration


def test_every_record_type_claiming_4_gib_is_refused_before_a_byte_is_read(
    stage: Stage, keyed: Destination, source_image: Path
) -> None:
    before, mark = keyed.clean(), keyed.mark()
    for rtype in RecordType:
        # The header alone, then 64 KiB of what it claims: nothing of it is read.
        header = encode_header(rtype, 0xFFFF_FFFF)
        reason = f"{rtype.name} claims 4294967295 bytes, more than its limit"
        error_says(knock(keyed.port, header + bytes(1 << 16)), reason)
        keyed.logged(REFUSED, reason, since=mark)
    keyed.survived(stage, before, source_image)


HELLO_BEYOND_BOUNDS: dict[str, tuple[dict[str, Any], str]] = {
    "256 channels": ({"channels": 256}, "channels 256, expected 1..255"),
    "no channel": ({"channels": 0}, "channels 0, expected 1..255"),
    "a 1 MiB page": ({"page_size": 1 << 20}, "page_size 1048576, expected a power of two"),
    "2**32 pages a packet": ({"pages_alloc": 1 << 32}, "pages_alloc 4294967296, expected"),
    "an image of 2**63 + 4096 bytes": ({"image_size": (1 << 63) + PAGE},
                                       "image_size 9223372036854779904, expected"),
    "an image of 2**64 bytes": ({"image_size": 1 << 64},
                                "'image-size' is not an unsigned 64-bit number"),
    "an image of no page": ({"image_size": 0}, "image_size 0, expected a positive multiple"),
    "a cipher the receiver does not know": (
        {"cipher": "aes-256-xts"},
        "cipher 'aes-256-xts' is not one this receiver knows (aes-128-ocb, aes-128-gcm)"),
}


def test_a_hello_beyond_the_protocols_bounds_is_refused_at_the_door(
    stage: Stage, keyed: Destination, source_image: Path
) -> None:
    """Sizes the wire format cannot carry, from a peer that holds the key (its HELLO's MAC
    is right): refused while decoding, before anything is created."""
    before, mark = keyed.clean(), keyed.mark()
    assert keyed.key is not None
    for fields, reason in HELLO_BEYOND_BOUNDS.values():
        main, rec = handshake(keyed.port, replace(hello(), **fields), key=read_key(keyed.key))
        error_says(rec, reason)
        assert closed_by_peer(main)
        main.close()
        keyed.logged(REFUSED, reason, since=mark)
    assert not keyed.events("hello", mark), "a HELLO beyond the bounds was admitted"
    keyed.survived(stage, before, source_image)


def test_a_hello_claiming_2_62_bytes_is_refused_without_allocating_them(
    stage: Stage, keyed: Destination, source_image: Path
) -> None:
    """The most of everything the wire allows (255 channels of 1024 pages of 64 KiB, an
    image of 2**62 bytes), from a key holder: admitted as a HELLO, refused before an
    image, a bitmap or a buffer of that size exists."""
    before, mark = keyed.clean(), keyed.mark()
    assert keyed.key is not None
    h = hello(channels=255, page_size=65536, image_size=1 << 62, pages_alloc=1024)
    main, rec = handshake(keyed.port, h, key=read_key(keyed.key))
    error_says(rec, "needs")
    main.close()
    keyed.logged(FAILED, "no space left on the destination", since=mark)
    keyed.survived(stage, before, source_image)


# ------------------------------------------------------------------ keys


def test_a_hello_whose_cipher_was_changed_after_its_mac_is_refused(
    stage: Stage, keyed: Destination, source_image: Path
) -> None:
    """The cipher is the source's choice under the HELLO's MAC: someone on the path who
    turns a GCM session into an OCB one (or back) fails the MAC, nothing is admitted."""
    before, mark = keyed.clean(), keyed.mark()
    assert keyed.key is not None
    key = read_key(keyed.key)
    main = socket.create_connection(("127.0.0.1", keyed.port), timeout=REFUSAL_BOUND)
    greeting = recv_record(main)
    assert isinstance(greeting, Greeting)
    h = replace(hello(), cipher="aes-128-gcm")
    signed = replace(h, mac=handshake_mac(key, b"hello", greeting.payload(), h.body()))
    main.sendall(replace(signed, cipher="aes-128-ocb").encode())
    error_says(recv_record(main), "authentication failed")
    main.close()
    keyed.logged(REFUSED, "authentication failed", since=mark)
    assert not keyed.events("hello", mark)
    keyed.survived(stage, before, source_image)


def test_a_wrong_key_is_refused(stage: Stage, keyed: Destination, source_image: Path) -> None:
    """The source and the receiver hold different keys: the receiver refuses the HELLO
    (its MAC), so the source never opens a data channel; both say why. (The source's own
    check of a receiver that cannot prove the key: the next test.)"""
    before, mark = keyed.clean(), keyed.mark()
    wrong = stage.send(source_image, keyed.port, stage.keyfile("wrong"))
    assert wrong.wait_exit(MIGRATION_BOUND) == 1, wrong.describe()
    assert "does not hold this receiver's key" in wrong.err, wrong.describe()
    keyed.logged(REFUSED, "authentication failed: the source does not hold this "
                          "receiver's key", since=mark)
    assert not keyed.events("hello", mark) and not keyed.events(DATA_REFUSED, mark)
    keyed.survived(stage, before, source_image)


def test_a_source_refuses_a_receiver_that_cannot_prove_the_key(
    stage: Stage, source_image: Path
) -> None:
    """The other side of a wrong key: a receiver that says it holds a key and answers
    HELLO with a HELLO_ACK whose MAC is under another key. The source sends it nothing:
    no data channel, no page."""
    key = stage.keyfile()
    wrong = shared_key(b"not the key the source holds")
    with socket.create_server(("127.0.0.1", 0)) as lst:
        src = stage.send(source_image, lst.getsockname()[1], key)
        lst.settimeout(MIGRATION_BOUND)  # the accept's deadline
        main, _ = lst.accept()
        with main:
            main.settimeout(MIGRATION_BOUND)
            greeting = Greeting(os.urandom(32), keyed=True)
            main.sendall(greeting.encode())
            h = recv_record(main)
            assert isinstance(h, Hello)
            main.sendall(HelloAck(handshake_mac(wrong, b"hello-ack", greeting.payload(),
                                                h.payload())).encode())
            assert src.wait_exit(MIGRATION_BOUND) == 1, src.describe()
        assert "did not prove that it holds our key" in src.err, src.describe()
        # The source has exited: a data connection it made would have been established
        # (connect returns after the handshake) and would wait in the backlog now.
        lst.setblocking(False)  # the accept below returns at once: it cannot wait
        with pytest.raises(BlockingIOError):
            lst.accept()[0].close()


def test_a_key_at_the_source_only(
    stage: Stage, keyless: Destination, source_image: Path
) -> None:
    """The source refuses a receiver without a key (it could not prove who it is) before
    sending its HELLO, and says so; the receiver logs it and goes on."""
    before, mark = keyless.clean(), keyless.mark()
    src = stage.send(source_image, keyless.port, stage.keyfile())
    assert src.wait_exit(MIGRATION_BOUND) == 1, src.describe()
    assert "the receiver holds no key" in src.err, src.describe()
    keyless.logged(REFUSED, "it gave up: the receiver holds no key", since=mark)
    keyless.survived(stage, before, source_image)


def test_a_key_at_the_receiver_only(
    stage: Stage, keyed: Destination, source_image: Path
) -> None:
    before, mark = keyed.clean(), keyed.mark()
    src = stage.send(source_image, keyed.port, None)
    assert src.wait_exit(MIGRATION_BOUND) == 1, src.describe()
    assert "the source holds no key" in src.err, src.describe()
    keyed.logged(REFUSED, "authentication failed: the source holds no key", since=mark)
    keyed.survived(stage, before, source_image)


def test_a_recorded_hello_replayed_on_a_new_connection_is_refused(
    stage: Stage, keyed: Destination, source_image: Path
) -> None:
    """A real session's HELLO, recorded on the way, fits no other GREETING's nonce."""
    keyed.clean()
    with TamperingProxy(("127.0.0.1", keyed.port)) as proxy:
        stage.migrate(keyed, source_image, port=proxy.port)
        recorded = proxy.hellos[0]
    before, mark = keyed.clean(), keyed.mark()
    error_says(knock(keyed.port, recorded),
               "authentication failed: the source does not hold")
    keyed.logged(REFUSED, "authentication failed", since=mark)
    keyed.survived(stage, before, source_image)


# ------------------------------------------------------------------ data channels


def data_strangers(ctx: WireContext) -> dict[str, tuple[bytes, str]]:
    """Init records that must not join the session of `ctx`, and why."""
    f = PacketFactory(ctx)
    other = bytes(b ^ 0xFF for b in ctx.uuid)
    n = ctx.channels
    main_record = replace(hello(), uuid=ctx.uuid).encode()
    return {
        "garbage": (bytes([0xA5]) + random.Random(2).randbytes(63), "bad magic 0xa5"),
        "an HTTP request": (_HTTP[:64], "bad magic 0x47455420"),
        "a main-channel record": (main_record[:64], "bad magic 0x5a434d47"),
        "wrong magic": (f.build_init(magic=0xDEADBEEF), "bad magic 0xdeadbeef"),
        "wrong version": (f.build_init(version=1), "bad version 1, expected 2"),
        "another migration's UUID": (f.build_init(uuid=other), "init record: uuid"),
        "an id out of range": (f.build_init(channel_id=n), f"channel id {n}, expected 0.."),
        "the largest id": (f.build_init(channel_id=255), "channel id 255, expected 0.."),
        "reserved bytes set": (f.build_init(reserved=b"\x01" + bytes(6)),
                               "reserved byte at offset 25"),
    }


@pytest.mark.parametrize("with_key", [True, False], ids=["keyed", "keyless"])
def test_strangers_on_the_data_port_are_refused_while_a_real_session_connects(
    request: pytest.FixtureRequest, stage: Stage, source_image: Path,
    with_key: bool
) -> None:
    """Each knocks before the session's first data channel reaches the receiver; each is
    refused for its own reason, and the session completes."""
    dest: Destination = request.getfixturevalue("keyed" if with_key else "keyless")
    dest.clean()
    mark = dest.mark()
    proxy: TamperingProxy
    expected: dict[str, str] = {}

    def knock_first(index: int) -> None:
        if index != 1:  # the first data connection, the main channel's next
            return
        _, h = proxy.session()
        for what, (init, reason) in data_strangers(h.context()).items():
            expected[what] = reason
            stranger_channel(dest.port, init)

    with TamperingProxy(("127.0.0.1", dest.port), before_upstream=knock_first) as proxy:
        stage.migrate(dest, source_image, port=proxy.port)
        proxy.check()
    assert expected, "no stranger knocked"
    for reason in expected.values():
        dest.logged(DATA_REFUSED, reason, since=mark)


def test_a_squatter_that_comes_first_claiming_id_0_is_refused(
    stage: Stage, keyed: Destination, source_image: Path
) -> None:
    """It knows the migration's UUID (HELLO travels in clear) but not the key: its init
    record is perfect but for the MAC, which it cannot make."""
    dest = keyed
    key = dest.key
    assert key is not None
    dest.clean()
    mark = dest.mark()
    proxy: TamperingProxy

    def squat(index: int) -> None:
        if index == 1:
            _, h = proxy.session()
            stranger_channel(dest.port, encode_init(h.context(), 0))

    with TamperingProxy(("127.0.0.1", dest.port), before_upstream=squat) as proxy:
        stage.migrate(dest, source_image, port=proxy.port)
        proxy.check()
    dest.logged(DATA_REFUSED, "data channel 0: its init record is not bound to this session",
                since=mark)


def test_a_data_channel_forged_under_another_key_is_refused(
    stage: Stage, keyed: Destination, source_image: Path
) -> None:
    """A MAC made as the session makes it, over the connection's own challenge, but
    under another key."""
    dest = keyed
    key = dest.key
    assert key is not None
    dest.clean()
    mark = dest.mark()
    proxy: TamperingProxy

    def forge(index: int) -> None:
        if index != 1:
            return
        greeting, h = proxy.session()
        forger = SessionKeys(shared_key(b"a key of the forger's own"), h.nonce,
                             greeting.nonce, h.uuid)
        stranger_channel(dest.port, lambda challenge: encode_init(
            h.context(), 0, mac=forger.binding_mac(0, challenge)))

    with TamperingProxy(("127.0.0.1", dest.port), before_upstream=forge) as proxy:
        stage.migrate(dest, source_image, port=proxy.port)
        proxy.check()
    dest.logged(DATA_REFUSED, "data channel 0: its init record is not bound to this session",
                since=mark)


def test_a_data_channel_init_replayed_within_its_session_is_refused(
    stage: Stage, keyed: Destination, source_image: Path
) -> None:
    """The real channel's init record, copied on its way and sent first on a new
    connection: it answers another connection's challenge, so it does not fit."""
    dest = keyed
    key = dest.key
    assert key is not None
    dest.clean()
    mark = dest.mark()
    replayed: list[int] = []

    def replay(cid: int, init: bytes) -> None:
        if not replayed:
            replayed.append(cid)
            stranger_channel(dest.port, init)

    with TamperingProxy(("127.0.0.1", dest.port), before_init=replay) as proxy:
        stage.migrate(dest, source_image, port=proxy.port)
        proxy.check()
    dest.logged(DATA_REFUSED, f"data channel {replayed[0]}: its init record is not bound",
                since=mark)


def test_a_data_channel_init_replayed_from_an_earlier_session_is_refused(
    stage: Stage, keyed: Destination, source_image: Path
) -> None:
    """The init records of a session that completed, replayed while the next one
    connects: as they were (another migration's UUID), and readdressed to the new
    session's UUID (which HELLO shows in clear), when their MAC no longer fits."""
    dest = keyed
    key = dest.key
    assert key is not None
    dest.clean()
    mark = dest.mark()
    with TamperingProxy(("127.0.0.1", dest.port)) as recorder:
        stage.migrate(dest, source_image, port=recorder.port)
        recorded = dict(recorder.inits)
    proxy: TamperingProxy

    def replay(index: int) -> None:
        if index != 1:
            return
        _, h = proxy.session()
        for init in recorded.values():
            stranger_channel(dest.port, init)
            stranger_channel(dest.port, init[:8] + h.uuid + init[24:])

    with TamperingProxy(("127.0.0.1", dest.port), before_upstream=replay) as proxy:
        stage.migrate(dest, source_image, port=proxy.port)
        proxy.check()
    old = recorder.session()[1].uuid
    for cid in recorded:
        dest.logged(DATA_REFUSED, f"init record: uuid {UUID(bytes=old)}", since=mark)
        dest.logged(DATA_REFUSED, f"data channel {cid}: its init record is not bound", since=mark)


def test_a_second_channel_with_a_taken_id_is_refused_even_with_the_right_mac(
    stage: Stage, keyed: Destination, source_image: Path
) -> None:
    """A duplicate from a holder of the key, with a MAC that fits its own challenge:
    the id is taken, and stays the real channel's."""
    dest = keyed
    key = dest.key
    assert key is not None
    dest.clean()
    mark = dest.mark()
    proxy: TamperingProxy
    duplicated: list[int] = []

    def duplicate(cid: int, init: bytes) -> None:
        if duplicated:
            return
        duplicated.append(cid)
        keys = session_keys(proxy, key)
        _, h = proxy.session()
        stranger_channel(dest.port, lambda challenge: encode_init(
            h.context(), cid, mac=keys.binding_mac(cid, challenge)))

    with TamperingProxy(("127.0.0.1", dest.port), after_init=duplicate) as proxy:
        stage.migrate(dest, source_image, port=proxy.port)
        proxy.check()
    cid = duplicated[0]
    dest.logged(DATA_REFUSED, f"init record: channel id {cid} seen twice", since=mark)


def _second_loopback_address() -> str | None:
    try:
        with socket.socket() as s:
            s.bind(("127.0.0.2", 0))
    except OSError as e:
        return f"cannot bind 127.0.0.2: {e}"
    return None


@pytest.mark.parametrize("with_key", [True, False], ids=["keyed", "keyless"])
def test_a_data_channel_from_another_address_is_refused(
    request: pytest.FixtureRequest, stage: Stage, source_image: Path,
    with_key: bool
) -> None:
    """From 127.0.0.2, an init record the session would take from its source's address
    (the right UUID and a free id; with a key, from a holder of it, with the right MAC)."""
    why = _second_loopback_address()
    if why is not None:
        pytest.skip(why)
    dest: Destination = request.getfixturevalue("keyed" if with_key else "keyless")
    key = dest.key
    dest.clean()
    mark = dest.mark()
    proxy: TamperingProxy

    def from_elsewhere(index: int) -> None:
        if index != 1:
            return
        _, h = proxy.session()
        keys = session_keys(proxy, key) if key is not None else None
        stranger_channel(dest.port, lambda challenge: encode_init(
            h.context(), 0,
            mac=keys.binding_mac(0, challenge) if keys is not None else bytes(32)),
            source="127.0.0.2")

    with TamperingProxy(("127.0.0.1", dest.port), before_upstream=from_elsewhere) as proxy:
        stage.migrate(dest, source_image, port=proxy.port)
        proxy.check()
    dest.logged(DATA_REFUSED, "data channel from 127.0.0.2, not from the main channel's "
                              "peer 127.0.0.1", since=mark)


# ------------------------------------------------------------------ packets

def _factory() -> PacketFactory:
    return PacketFactory(hello().context())


BAD_PACKETS: dict[str, tuple[Callable[[PacketFactory], bytes], str]] = {
    "an offset past the image's end": (
        lambda f: f.build_packet(normal=[64 * PAGE]), "outside the image"),
    "an offset near 2**64": (
        lambda f: f.build_packet(zero=[(1 << 64) - PAGE]), "outside the image"),
    "an unaligned offset": (
        lambda f: f.build_packet(normal=[PAGE + 1]),
        "normal offset [0] 0x1001, expected a multiple of page size 4096"),
    "2**32 - 1 pages": (
        lambda f: f.build_header(normal_pages=0xFFFF_FFFF, next_packet_size=0),
        "normal_pages 4294967295 + zero_pages 0 = 4294967295, expected at most pages_alloc"),
    "2**32 - 1 zero pages": (
        lambda f: f.build_header(zero_pages=0xFFFF_FFFF),
        "= 4294967295, expected at most pages_alloc 64"),
    "pages_alloc 2**32 - 1": (
        lambda f: f.build_header(pages_alloc=0xFFFF_FFFF),
        "pages_alloc 4294967295, expected 64 (negotiated)"),
    "4 GiB of page data": (
        lambda f: f.build_header(normal_pages=1, next_packet_size=0xFFFF_FFFF),
        "next_packet_size 4294967295, expected 4096"),
    "wrong magic": (lambda f: f.build_packet(normal=[0], magic=0xDEADBEEF),
                    "bad magic 0xdeadbeef"),
    "wrong version": (lambda f: f.build_packet(normal=[0], version=1), "bad version 1"),
    "another block": (lambda f: f.build_packet(normal=[0], block="pc.ram"),
                      "block name 'pc.ram', expected 'zcmigrate.ram'"),
}


@pytest.mark.parametrize("case", list(BAD_PACKETS))
def test_a_bad_packet_fails_the_migration_and_writes_nothing(
    stage: Stage, keyless: Destination, source_image: Path, case: str
) -> None:
    build, reason = BAD_PACKETS[case]
    dest = keyless
    before, mark = dest.clean(), dest.mark()
    main, data = hostile_session(dest.port, hello())
    data[0].sendall(build(_factory()))
    error_says(answer(main), reason)
    dest.logged(FAILED, reason, since=mark)
    for s in (main, *data):
        s.close()
    dest.survived(stage, before, source_image)


def test_packets_claiming_pages_alloc_pages_cost_only_what_arrives(
    stage: Stage, keyless: Destination, source_image: Path
) -> None:
    """Four channels, each with a packet that claims 1024 pages of 64 KiB (64 MiB, 256 MiB
    in all, more than RSS_BOUND) and carries one: the receiver holds what arrived, not
    what was claimed."""
    dest = keyless
    before, mark = dest.clean(), dest.mark()
    h = hello(channels=4, page_size=65536, pages_alloc=1024, image_size=1024 * 65536)
    main, data = hostile_session(dest.port, h)
    f = PacketFactory(h.context())
    offsets = [i * 65536 for i in range(1024)]
    for s in data:
        header = f.build_header(normal_pages=1024, seq=1)
        s.sendall(header + f.build_offsets(offsets) + b"\x42" * 65536)
    for s in data:
        wait_read_by_peer(s, dest.port)  # every worker has its header and its one page
    dest.assert_rss_bounded("with 4 packets claiming 64 MiB each")
    main.close()  # the source goes away mid-packet
    dest.logged(FAILED, "", since=mark)
    for s in data:
        s.close()
    dest.survived(stage, before, source_image)


# ------------------------------------------------------------------ a proxy that tampers

# The receiver names the channel a data packet failed on, whatever the reason: today an
# edit inside a page desynchronises the stream (a "bad magic" at the next header); sealed,
# it fails authentication first.
DATA_CHANNEL_0 = "multifd receive channel 0: "
# What the proxy does, and how the receiver says it refused: the event it logs and the
# reason in it.
TAMPERS: dict[str, tuple[Tamper, str, str]] = {
    # EXPECTED TO FAIL until data packets are sealed (wip-seal, issue 11 item 4): nothing
    # covers a page's bytes yet, so the receiver commits the flipped page and the source
    # exits 0. Kept strict on purpose: it passes once the seal is merged.
    "flip one byte of a page": (
        Tamper("to-destination", PageLocator(0, PAGE // 2), Edit.flip()), FAILED,
        DATA_CHANNEL_0),
    "drop bytes of a page": (
        Tamper("to-destination", PageLocator(0, PAGE // 2), Edit.drop(100)), FAILED,
        DATA_CHANNEL_0),
    "inject bytes into a page": (
        Tamper("to-destination", PageLocator(0, PAGE // 2), Edit.inject(b"\x99" * 100)),
        FAILED, DATA_CHANNEL_0),
    # normal_pages' low byte: 512 pages become 513.
    "flip one byte of a packet header": (
        Tamper("to-destination", PageLocator(1, 19, header=True), Edit.flip()), FAILED,
        "multifd receive channel 1: "),
    "flip one byte of HELLO": (
        Tamper("to-destination", RecordLocator(RecordType.HELLO, offset=10), Edit.flip()),
        REFUSED, "authentication failed"),
    "flip one byte of END_OF_RAM": (
        Tamper("to-destination", RecordLocator(RecordType.END_OF_RAM), Edit.flip()), FAILED,
        "END_OF_RAM record from the source failed authentication"),
    "drop bytes of MULTIFD_FLUSH": (
        Tamper("to-destination", RecordLocator(RecordType.MULTIFD_FLUSH), Edit.drop(3)),
        FAILED, "MULTIFD_FLUSH record from the source failed authentication"),
    "inject a CANCEL in clear": (
        Tamper("to-destination", RecordLocator(RecordType.END_OF_RAM, offset=None),
               Edit.inject(encode_header(RecordType.CANCEL, 0))),
        FAILED, "CANCEL record from the source failed authentication"),
    "flip one byte of RAM_RECEIVED": (
        Tamper("to-source", RecordLocator(RecordType.RAM_RECEIVED), Edit.flip()), FAILED,
        "the source failed: migration failed: main channel: a RAM_RECEIVED record from "
        "the destination failed authentication"),
}


@pytest.mark.parametrize("case", list(TAMPERS))
def test_a_tampered_keyed_session_is_refused_and_nothing_committed(
    stage: Stage, keyed: Destination, source_image: Path, case: str
) -> None:
    tamper, event, reason = TAMPERS[case]
    dest = keyed
    key = dest.key
    assert key is not None
    before, mark = dest.clean(), dest.mark()
    with TamperingProxy(("127.0.0.1", dest.port), tamper=tamper) as proxy:
        src = stage.send(source_image, proxy.port, key)
        code = src.wait_exit(MIGRATION_BOUND)
        proxy.check()
        assert proxy.applied_at is not None, "the proxy found no place for its edit"
    if code == 0:
        image = dest.image.read_bytes()
        diff = next((i for i, (a, b) in enumerate(zip(image, source_image.read_bytes(),
                                                      strict=True)) if a != b), None)
        raise AssertionError(f"{case}: the tampered session was committed (the source "
                             f"exited 0; the committed image differs from the source at "
                             f"byte {diff})")
    assert code == 1, src.describe()
    dest.logged(event, reason, since=mark)
    dest.survived(stage, before, source_image)


# ------------------------------------------------------------------ silent and slow


def trickle(port: int, data: bytes, stop: threading.Event, *,
            greeting: bool = False) -> threading.Thread:
    """A connection that sends `data` one byte a second until the receiver closes it
    or `stop` is set; with `greeting`, once it has read the receiver's GREETING (it was
    accepted)."""
    s = socket.create_connection(("127.0.0.1", port), timeout=REFUSAL_BOUND)
    if greeting:
        assert isinstance(recv_record(s), Greeting)

    def run() -> None:
        with contextlib.suppress(OSError):
            for b in data:
                if stop.wait(1.0):
                    break
                s.sendall(bytes([b]))
        s.close()

    t = threading.Thread(target=run, daemon=True, name="trickle")
    t.start()
    return t


def test_silent_and_slow_connections_do_not_hold_up_a_migration(
    stage: Stage, keyed: Destination, source_image: Path
) -> None:
    """Six silent connections and three sending a HELLO one byte a second on the main
    port, then, while the session connects its channels, three silent data connections
    and two sending an init record one byte a second: the migration takes at most
    DELAY_BOUND longer than a clean one, and none of them is waited out."""
    dest = keyed
    dest.clean()
    with TamperingProxy(("127.0.0.1", dest.port)) as clean:
        baseline = stage.migrate(dest, source_image, port=clean.port)
    mark = dest.mark()

    stop = threading.Event()
    held: list[socket.socket] = []
    trickles: list[threading.Thread] = []
    proxy: TamperingProxy

    def data_strangers_sit(index: int) -> None:
        if index != 1:
            return
        _, h = proxy.session()
        for _ in range(3):
            held.append(socket.create_connection(("127.0.0.1", dest.port)))
        for _ in range(2):
            trickles.append(trickle(dest.port, encode_init(h.context(), 0), stop))

    silent = [socket.create_connection(("127.0.0.1", dest.port)) for _ in range(6)]
    hello_bytes = replace(hello(), nonce=bytes(32)).encode()
    trickles += [trickle(dest.port, hello_bytes, stop, greeting=True) for _ in range(3)]
    try:
        # All of them accepted and served (each has its GREETING) before the source comes.
        for s in silent:
            assert isinstance(answer(s), Greeting)
        with TamperingProxy(("127.0.0.1", dest.port),
                            before_upstream=data_strangers_sit) as proxy:
            took = stage.migrate(dest, source_image, port=proxy.port)
            proxy.check()
        assert took <= baseline + DELAY_BOUND, (
            f"the migration took {took:.1f} s with strangers on the line, {baseline:.1f} s "
            f"without (bound {DELAY_BOUND:g} s more)")
        # Dropped once a migration took the receiver, not waited out:
        for s in silent:
            error_says(answer(s), "the receiver took another migration")
        waited_out = [e for e in dest.events(REFUSED, mark) + dest.events(DATA_REFUSED, mark)
                      if "within" in str(e.get("reason"))]
        assert not waited_out, f"strangers were waited out: {waited_out}"
    finally:
        stop.set()
        for s in silent + held:
            s.close()
        for t in trickles:
            t.join(5)


def test_more_silent_connections_than_the_receiver_serves_do_not_hold_up_a_migration(
    stage: Stage, keyed: Destination, source_image: Path
) -> None:
    """MAX_PENDING + 8 silent connections on the main port before the real source, and as
    many on the data port before its first data channel: neither the source nor its
    channels may wait in the listen backlog for one of them to be timed out
    (PREAUTH_TIMEOUT, INIT_TIMEOUT), or a stranger that keeps MAX_PENDING connections open
    holds every migration off. The oldest are dropped to make room."""
    dest = keyed
    dest.clean()
    baseline = stage.migrate(dest, source_image)
    mark = dest.mark()
    crowd = MAX_PENDING + 8
    silent = [socket.create_connection(("127.0.0.1", dest.port)) for _ in range(crowd)]
    proxy: TamperingProxy

    def crowd_the_data_port(index: int) -> None:
        if index != 1:
            return
        more = [socket.create_connection(("127.0.0.1", dest.port)) for _ in range(crowd)]
        silent.extend(more)
        for s in more:  # each accepted: it has its challenge
            s.settimeout(REFUSAL_BOUND)
            recv_exact(s, CHALLENGE_SIZE)

    try:
        for s in silent:  # each accepted: it has its GREETING
            s.settimeout(REFUSAL_BOUND)
            assert isinstance(recv_record(s), Greeting)
        with TamperingProxy(("127.0.0.1", dest.port),
                            before_upstream=crowd_the_data_port) as proxy:
            took = stage.migrate(dest, source_image, port=proxy.port)
            proxy.check()
        assert took <= baseline + DELAY_BOUND, (
            f"the migration took {took:.1f} s behind {len(silent)} silent connections, "
            f"{baseline:.1f} s without (bound {DELAY_BOUND:g} s more; a silent connection "
            f"is dropped after PREAUTH_TIMEOUT = {PREAUTH_TIMEOUT:g} s)")
        dest.logged(REFUSED, f"more than {MAX_PENDING} connections waiting", since=mark)
        dest.logged(DATA_REFUSED, f"more than {MAX_PENDING} connections waiting", since=mark)
    finally:
        for s in silent:
            s.close()
