"""Keys and nonces of an encrypted migration: HKDF session keys, AES-128-OCB or AES-128-GCM
sealers and openers.

The one module that owns key material and nonce counters (the cipher itself is OpenSSL's,
called from native/zccrypto.c). It knows bytes and keys, not pages, packets or records.
"""

from __future__ import annotations

import enum
import hashlib
import hmac
import secrets
import threading
from dataclasses import dataclass
from typing import Any
from uuid import UUID

from zcmigrate.channel.errors import (
    AeadError,
    AuthenticationFailed,
    NonceExhausted,
    OutOfOrder,
)
from zcmigrate.native import ffi, lib

KEY_LEN: int = lib.ZCC_KEY_LEN  # the shared key's length (and HKDF's default output)
AEAD_KEY_LEN: int = lib.ZCC_AEAD_KEY_LEN  # a session key: AES-128
NONCE_LEN: int = lib.ZCC_NONCE_LEN
TAG_LEN: int = lib.ZCC_TAG_LEN
PREFIX_LEN = 4  # the fixed field of the nonce; the other 8 bytes are the counter
HELLO_NONCE_LEN = 32  # each end's fresh contribution to a session
COUNTER_LIMIT = 1 << 64  # counters 0 .. 2**64 - 1, each used once per key
MAX_CHANNEL = 0xFFFF

# HKDF's info starts with this label, so keys for anything else derived from the same
# shared key can never collide with ours (RFC 5869 3.2: info binds keys to a context).
_INFO_LABEL = b"zcmigrate session key v1\x00"
_BINDING_LABEL = b"zcmigrate channel binding v1\x00"
_KIND_MAIN = 0
_KIND_DATA = 1
_KIND_DATA_PAGES = 2  # a data packet's page data: a second message under its counter

# The AEADs a session may use, by the name HELLO gives them (the source chooses, under the
# handshake's MAC). OCB is the default: the same security notion as GCM (RFC 7253, 128-bit
# tags, unique 96-bit nonces) at twice its speed on this CPU (8.0 against 4.2 GB/s per
# core), and the cipher is most of what encryption costs. GCM is there for deployments
# that must use an algorithm NIST approves (docs/security.md, "The cipher").
CIPHERS: dict[str, int] = {
    "aes-128-ocb": lib.ZCC_AES_128_OCB,
    "aes-128-gcm": lib.ZCC_AES_128_GCM,
}
DEFAULT_CIPHER = "aes-128-ocb"


def cipher_id(name: str) -> int:
    """The C id of a cipher named as in CIPHERS; ValueError for any other name."""
    if name not in CIPHERS:
        raise ValueError(f"cipher {name!r}, expected one of {', '.join(CIPHERS)}")
    return CIPHERS[name]

Buffer = Any  # bytes-like, or a cffi array/buffer (ffi.buffer(ptr, n) for a bare pointer)


class Direction(enum.IntEnum):
    """Who seals: each direction has its own keys, so neither end's packets can be
    reflected back to it as the other's."""

    SOURCE_TO_DESTINATION = 0
    DESTINATION_TO_SOURCE = 1


@dataclass(frozen=True, slots=True)
class StreamId:
    """One sealed stream of a session: a direction on the main channel (channel None) or
    on data channel `channel`."""

    direction: Direction
    channel: int | None

    def __post_init__(self) -> None:
        if self.channel is not None and not 0 <= self.channel <= MAX_CHANNEL:
            raise ValueError(f"data channel {self.channel}, expected 0..{MAX_CHANNEL}")

    @property
    def prefix(self) -> bytes:
        """The nonce's fixed field: distinct for every stream of a session, so that no
        two streams could share a nonce even if they shared a key (SP 800-38D 8.2.1)."""
        kind = _KIND_MAIN if self.channel is None else _KIND_DATA
        return bytes((int(self.direction), kind)) + (self.channel or 0).to_bytes(2, "big")

    @property
    def pages_prefix(self) -> bytes | None:
        """The fixed field of the nonces that seal a data packet's page data, a message of
        its own under the packet's counter (docs/protocol.md, "Sealed packets"): the kind
        byte differs from `prefix`'s, so no page-data nonce is ever an offsets nonce.
        None on the main channel, whose records are one message each."""
        if self.channel is None:
            return None
        return bytes((int(self.direction), _KIND_DATA_PAGES)) + self.channel.to_bytes(2, "big")

    def __str__(self) -> str:
        where = "main channel" if self.channel is None else f"data channel {self.channel}"
        arrow = ("source->destination" if self.direction is Direction.SOURCE_TO_DESTINATION
                 else "destination->source")
        return f"{where} {arrow}"


def hkdf_sha256(ikm: Buffer, *, salt: Buffer = b"", info: Buffer = b"",
                length: int = KEY_LEN) -> bytes:
    """HKDF-SHA256 extract-then-expand (RFC 5869) by OpenSSL; `length` up to 8160 bytes."""
    if not 0 < length <= lib.ZCC_HKDF_MAX:
        raise ValueError(f"HKDF length {length}, expected 1..{lib.ZCC_HKDF_MAX}")
    ikm, salt, info = bytes(ikm), bytes(salt), bytes(info)
    if not ikm:
        raise ValueError("HKDF input key material is empty")
    out = ffi.new("uint8_t[]", length)
    rc = int(lib.zcc_hkdf_sha256(salt, len(salt), ikm, len(ikm), info, len(info), out, length))
    if rc:
        raise AeadError(f"HKDF-SHA256 failed: {_describe(rc)}")
    return bytes(ffi.buffer(out))


def fresh_nonce() -> bytes:
    """One end's contribution to a session: 32 bytes from the OS's CSPRNG."""
    return secrets.token_bytes(HELLO_NONCE_LEN)


class SessionKeys:
    """The keys of one migration, derived from the shared key with HKDF-SHA256.

    salt = source nonce || destination nonce: both ends contribute freshness, so neither
    can make the other reuse a session's keys (and with them its nonces, whose counters
    start at 0 every session) by replaying an old hello. info = label || migration UUID ||
    direction || channel kind || channel id, fixed-length fields: a key per direction and
    per channel, for this migration only.

    The cipher (a name in CIPHERS) is bound into every key as well: the two AEADs never
    share a key, whatever a peer proposes.

    Each stream gets one Sealer: a second would start its counter at 0 again under the
    same key, and either AEAD under a repeated nonce loses its guarantees (GCM gives away
    its authentication key).
    """

    __slots__ = ("_lock", "_salt", "_sealed", "_shared", "cipher", "migration_uuid")

    def __init__(self, shared_key: bytes, source_nonce: bytes, destination_nonce: bytes,
                 migration_uuid: UUID | bytes, cipher: str = DEFAULT_CIPHER) -> None:
        cipher_id(cipher)
        if len(shared_key) != KEY_LEN:
            raise ValueError(f"shared key of {len(shared_key)} bytes, expected {KEY_LEN}")
        for name, nonce in (("source", source_nonce), ("destination", destination_nonce)):
            if len(nonce) != HELLO_NONCE_LEN:
                raise ValueError(f"{name} nonce of {len(nonce)} bytes, "
                                 f"expected {HELLO_NONCE_LEN}")
        if secrets.compare_digest(source_nonce, destination_nonce):
            # Two fresh 32-byte draws never agree: the peer sent ours back.
            raise ValueError("the source and destination nonces are equal: a reflected hello")
        uuid = migration_uuid.bytes if isinstance(migration_uuid, UUID) else migration_uuid
        if len(uuid) != 16:
            raise ValueError(f"migration UUID of {len(uuid)} bytes, expected 16")
        self._shared = bytes(shared_key)
        self._salt = bytes(source_nonce) + bytes(destination_nonce)
        self.migration_uuid = bytes(uuid)
        self.cipher = cipher
        self._sealed: set[StreamId] = set()
        self._lock = threading.Lock()

    def key(self, stream: StreamId) -> bytes:
        """The 16-byte AES-128 key of one stream, for this session's cipher."""
        info = (_INFO_LABEL + self.migration_uuid + stream.prefix
                + cipher_id(self.cipher).to_bytes(1, "big"))
        return hkdf_sha256(self._shared, salt=self._salt, info=info, length=AEAD_KEY_LEN)

    def binding_mac(self, channel: int, challenge: bytes) -> bytes:
        """The MAC a data channel's init record carries: HMAC-SHA256, under a key of this
        session kept for nothing else, over the destination's fresh challenge for that
        connection, the migration and the channel id. Only the session's two ends can
        make it, and a recorded one fits no other connection (a replay or a squat)."""
        if not 0 <= channel <= MAX_CHANNEL:
            raise ValueError(f"data channel {channel}, expected 0..{MAX_CHANNEL}")
        key = hkdf_sha256(self._shared, salt=self._salt,
                          info=_BINDING_LABEL + self.migration_uuid, length=32)
        msg = bytes(challenge) + self.migration_uuid + channel.to_bytes(2, "big")
        return hmac.new(key, msg, hashlib.sha256).digest()

    def sealer(self, direction: Direction, channel: int | None) -> Sealer:
        """The sealer of a stream (the end that sends in `direction`); channel None: main.
        Only one per stream and session: a second raises AeadError."""
        stream = StreamId(direction, channel)
        with self._lock:
            if stream in self._sealed:
                raise AeadError(f"{stream}: this session already gave out its sealer; a "
                                "second would seal under the same nonces")
            self._sealed.add(stream)
        return Sealer(self.key(stream), stream.prefix, pages_prefix=stream.pages_prefix,
                      name=str(stream), cipher=self.cipher)

    def opener(self, direction: Direction, channel: int | None) -> Opener:
        """The opener of a stream (the end that receives in `direction`)."""
        stream = StreamId(direction, channel)
        return Opener(self.key(stream), stream.prefix, pages_prefix=stream.pages_prefix,
                      name=str(stream), cipher=self.cipher)


class _Aead:
    """An AEAD context in C (key schedules computed once) and the nonce layout."""

    __slots__ = ("_ctx", "_lock", "_pages_prefix", "_prefix", "cipher", "name")

    def __init__(self, key: bytes, prefix: bytes, name: str,
                 pages_prefix: bytes | None = None, cipher: str = DEFAULT_CIPHER) -> None:
        cid = cipher_id(cipher)
        if len(key) != AEAD_KEY_LEN:
            raise ValueError(f"AES-128 key of {len(key)} bytes, expected {AEAD_KEY_LEN}")
        for p in (prefix, pages_prefix):
            if p is not None and len(p) != PREFIX_LEN:
                raise ValueError(f"nonce prefix of {len(p)} bytes, expected {PREFIX_LEN}")
        if pages_prefix == prefix:
            raise ValueError("the page-data nonce prefix must differ from the stream's")
        ctx = lib.zcc_aead_new(key, len(key), cid)
        if ctx == ffi.NULL:
            raise AeadError(f"OpenSSL could not set up an {cipher} context")
        self.cipher = cipher
        self._ctx: Any = ffi.gc(ctx, lib.zcc_aead_free)
        self._prefix = bytes(prefix)
        self._pages_prefix = None if pages_prefix is None else bytes(pages_prefix)
        # Counter and call under one lock: two threads must never draw one counter.
        self._lock = threading.Lock()
        self.name = name or prefix.hex()

    def _nonce(self, counter: int) -> bytes:
        return self._prefix + counter.to_bytes(8, "big")

    def _pages_nonce(self, counter: int) -> bytes:
        if self._pages_prefix is None:
            raise AeadError(f"{self.name}: no page-data nonces on this stream (a data "
                            "channel's sealer or opener has them)")
        return self._pages_prefix + counter.to_bytes(8, "big")

    def _live_ctx(self) -> Any:
        if self._ctx is None:
            raise AeadError(f"{self.name}: the AEAD context was closed")
        return self._ctx

    def close(self) -> None:
        """Free the C context now (OpenSSL cleanses the key schedule)."""
        with self._lock:
            if self._ctx is not None:
                ffi.release(self._ctx)
                self._ctx = None


class Sealer(_Aead):
    """Seals one stream: nonce = 4-byte prefix || 64-bit big-endian counter.

    The counter starts at `first_counter` (0 for a new key: anything else is for tests
    of the limit, and two sealers of one key must never exist) and moves on with every seal
    that reached the cipher, failed or not, so a nonce is never used twice. It never wraps:
    once 2**64 - 1 has been used every later seal raises NonceExhausted and seals nothing
    (a new session derives new keys). One thread seals at a time: build a header with
    `next_counter`, then seal; calls are serialised, never interleaved.
    """

    __slots__ = ("_next",)

    def __init__(self, key: bytes, prefix: bytes, *, first_counter: int = 0,
                 name: str = "", pages_prefix: bytes | None = None,
                 cipher: str = DEFAULT_CIPHER) -> None:
        super().__init__(key, prefix, name, pages_prefix, cipher)
        if not 0 <= first_counter <= COUNTER_LIMIT:
            raise ValueError(f"first counter {first_counter}, expected 0..2**64")
        self._next = first_counter

    @property
    def next_counter(self) -> int:
        """The counter the next seal will use (2**64 once exhausted)."""
        return self._next

    def seal(self, plaintext: Buffer, aad: Buffer = b"") -> bytes:
        """A small record: ciphertext || 16-byte tag, under the next counter."""
        data = bytes(plaintext)
        n = len(data)
        out = ffi.new("uint8_t[]", n + TAG_LEN)
        self._seal(data, out, n, out + n, bytes(aad))
        return bytes(ffi.buffer(out))

    def seal_into(self, data: Buffer, out: Buffer, tag: Buffer, *, aad: Buffer = b"") -> int:
        """Seal `data` into `out` (the same buffer: in place) and its tag into `tag` (16
        writable bytes, or a cffi pointer to them); return the counter used."""
        with _Pins() as pins:
            data_c, n = pins.readable(data)
            out_c, cap = pins.writable(out)
            tag_c = pins.tag_out(tag)
            if cap < n:
                raise ValueError(f"{self.name}: output of {cap} bytes for {n} bytes of data")
            aad_c, _ = pins.readable(aad)
            return self._seal(data_c, out_c, n, tag_c, aad_c)

    def _seal(self, data_c: Any, out_c: Any, n: int, tag_c: Any, aad_c: Any) -> int:
        with self._lock:
            counter = self._take_counter()
            rc = int(lib.zcc_seal(self._live_ctx(), self._nonce(counter), aad_c, len(aad_c),
                                  data_c, out_c, n, tag_c))
            self._settle(rc)
        return counter

    def seal_gather(self, base: int, size: int, offsets: Any, count: int, block_size: int,
                    out: Buffer, tag: Buffer, *, aad: Buffer = b"", lead: Buffer = b"") -> int:
        """Seal `lead` (bytes of the caller's, if any) and then `count` blocks of
        `block_size` bytes read at `offsets` (a uint64_t array or pointer) in the mapping
        [base, base+size), as one message, straight into `out` (the lead's ciphertext
        first, then the blocks'), one pass in C, and the tag into `tag` (16 bytes, or a
        cffi pointer to them, e.g. just past the ciphertext in `out`); return the counter
        used. Offsets outside the mapping, or an `out` too small, raise AeadError with
        nothing read or written."""
        with _Pins() as pins:
            if isinstance(offsets, ffi.CData):
                offsets_c = offsets
            else:
                offsets_c = pins.pin(ffi.from_buffer("uint64_t[]", offsets))
                if len(offsets_c) < count:
                    raise ValueError(f"{self.name}: {len(offsets_c)} offsets for {count} "
                                     "blocks")
            out_c, cap = pins.writable(out)
            tag_c = pins.tag_out(tag)
            aad_c, aad_n = pins.readable(aad)
            lead_c, lead_n = pins.readable(lead)
            with self._lock:
                counter = self._take_counter()
                rc = int(lib.zcc_seal_pages(self._live_ctx(), self._nonce(counter), aad_c,
                                            aad_n, lead_c, lead_n, base, size, offsets_c,
                                            count, block_size, out_c, cap, tag_c))
                self._settle(rc)
            return counter

    def seal_packet(self, base: int, size: int, offsets: Any, count: int, block_size: int,
                    out: Any, capacity: int, *, aad: Buffer, lead: Buffer) -> int:
        """A data packet as two messages under one counter (docs/protocol.md, "Sealed
        packets"), written to `out` (a cffi pointer to `capacity` bytes):

            lead ciphertext | its tag | ciphertext of the count blocks | their tag

        The lead (the packet's offsets) under the stream's nonce, the blocks (read at
        `offsets`, a uint64_t cffi array, in the mapping [base, base+size)) under the
        page-data nonce, both with `aad`, so the receiver can verify where the pages go
        before any of them is written. Return the counter used. Offsets outside the
        mapping or too small an `out` raise AeadError with nothing read or written."""
        lead_b = bytes(lead)
        n_lead = len(lead_b)
        n_blocks = count * block_size
        if n_lead + n_blocks + 2 * TAG_LEN > capacity:
            raise AeadError(f"{self.name}: seal refused: a packet of {n_lead + n_blocks} "
                            f"bytes and two tags does not fit {capacity} bytes")
        aad_b = bytes(aad)
        pages_out = out + n_lead + TAG_LEN
        with self._lock:
            counter = self._take_counter()
            pages_nonce = self._pages_nonce(counter)
            ctx = self._live_ctx()
            # The blocks first: their bounds check is the one that can refuse, and a
            # refusal before either cipher call leaves the counter unused.
            rc = int(lib.zcc_seal_pages(ctx, pages_nonce, aad_b, len(aad_b), ffi.NULL, 0,
                                        base, size, offsets, count, block_size, pages_out,
                                        n_blocks, pages_out + n_blocks))
            if rc == 0:
                rc = int(lib.zcc_seal(ctx, self._nonce(counter), aad_b, len(aad_b), lead_b,
                                      out, n_lead, out + n_lead))
            self._settle(rc)
        return counter

    def _take_counter(self) -> int:
        if self._next >= COUNTER_LIMIT:
            raise NonceExhausted(
                f"{self.name}: the key has sealed under all 2**64 counters and seals nothing "
                "more; start a new session (fresh nonces derive new keys)"
            )
        return self._next

    def _settle(self, rc: int) -> None:
        # These three return before the cipher runs: that counter was never used.
        if rc in (lib.ZCC_EINVAL, lib.ZCC_EBOUNDS, lib.ZCC_EBUSY):
            raise AeadError(f"{self.name}: seal refused: {_describe(rc)}")
        self._next += 1
        if rc:
            raise AeadError(f"{self.name}: seal failed: {_describe(rc)}")


class Opener(_Aead):
    """Opens one stream, accepting only the next counter: a replayed, reordered or lost
    packet is refused before decryption. Any failure is final for the stream (TLS does
    the same, RFC 8446 5.2): the opener refuses everything after it."""

    __slots__ = ("_expected", "_failure", "_lead_open")

    def __init__(self, key: bytes, prefix: bytes, *, first_counter: int = 0,
                 name: str = "", pages_prefix: bytes | None = None,
                 cipher: str = DEFAULT_CIPHER) -> None:
        super().__init__(key, prefix, name, pages_prefix, cipher)
        if not 0 <= first_counter <= COUNTER_LIMIT:
            raise ValueError(f"first counter {first_counter}, expected 0..2**64")
        self._expected = first_counter
        self._failure = ""
        # A data packet is opened in two steps (open_lead, then open_pages): between
        # them its counter is taken but not yet used up.
        self._lead_open = False

    @property
    def expected_counter(self) -> int:
        return self._expected

    @property
    def failed(self) -> bool:
        return bool(self._failure)

    def open(self, counter: int, sealed: Buffer, aad: Buffer = b"") -> bytes:
        """A small record sealed by Sealer.seal (ciphertext || tag): its plaintext."""
        data = bytes(sealed)
        if len(data) < TAG_LEN:
            raise AuthenticationFailed(f"{self.name}: record {counter} of {len(data)} bytes "
                                       f"is shorter than its {TAG_LEN}-byte tag")
        n = len(data) - TAG_LEN
        buf = ffi.new("uint8_t[]", max(n, 1))
        self._open(counter, data, buf, n, data[n:], bytes(aad))
        return bytes(ffi.buffer(buf, n))

    def open_into(self, counter: int, data: Buffer, out: Buffer, tag: Buffer, *,
                  aad: Buffer = b"") -> None:
        """Verify and decrypt `data` into `out` (the same buffer: in place) with `tag`.

        `counter` is what the sender says it used; it must be the next one expected
        (OutOfOrder otherwise). On AuthenticationFailed `out` holds zeros.
        """
        with _Pins() as pins:
            data_c, n = pins.readable(data)
            out_c, cap = pins.writable(out)
            tag_c, tag_n = pins.readable(tag)
            if tag_n != TAG_LEN:
                raise ValueError(f"{self.name}: tag of {tag_n} bytes, expected {TAG_LEN}")
            if cap < n:
                raise ValueError(f"{self.name}: output of {cap} bytes for {n} bytes of data")
            aad_c, _ = pins.readable(aad)
            self._open(counter, data_c, out_c, n, tag_c, aad_c)

    def open_in_place(self, counter: int, buf: Any, n: int, *, aad: Buffer = b"") -> None:
        """Verify and decrypt the `n` bytes at `buf` (a cffi uint8_t pointer or array)
        in place, their tag in the 16 bytes right after them: a sealed packet as it was
        read off a channel into one buffer. As open_into otherwise: only the next counter
        opens, and on AuthenticationFailed the n bytes hold zeros."""
        if not isinstance(buf, ffi.CData):
            raise TypeError("open_in_place takes a cffi pointer or array")
        if ffi.typeof(buf).kind == "array" and ffi.sizeof(buf) < n + TAG_LEN:
            raise ValueError(f"{self.name}: a buffer of {ffi.sizeof(buf)} bytes for {n} "
                             f"bytes and a {TAG_LEN}-byte tag")
        with _Pins() as pins:
            aad_c, _ = pins.readable(aad)
            self._open(counter, buf, buf, n, buf + n, aad_c)

    def open_lead(self, counter: int, buf: Any, n: int, *, aad: Buffer) -> None:
        """The first step of a data packet sealed by Sealer.seal_packet: verify and decrypt
        its lead (the `n` bytes at `buf`, a cffi pointer, tag right after them) in place.
        The counter must be the next one; it stays taken until open_pages uses it up."""
        with _Pins() as pins:
            aad_c, _ = pins.readable(aad)
            with self._lock:
                self._check(counter)
                self._run(counter, lib.zcc_open(self._live_ctx(), self._nonce(counter), aad_c,
                                                len(aad_c), buf, buf, n, buf + n), "offsets")
                self._lead_open = True

    def open_pages(self, counter: int, buf: Any, n: int, *, aad: Buffer,
                   into: tuple[int, int, Any, int, int] | None = None) -> None:
        """The second step: verify and decrypt the packet's page data (the `n` bytes at
        `buf`, tag right after them), in place, or, with `into` = (base, size, offsets,
        count, page_size), straight into the mapping [base, base+size) at `offsets` (a
        uint64_t cffi array; n must be count * page_size). The offsets are the lead's,
        verified by open_lead; before the tag is checked those pages hold unverified
        plaintext, and if it fails they (or, in place, the n bytes) hold zeros."""
        with _Pins() as pins:
            aad_c, _ = pins.readable(aad)
            with self._lock:
                if not self._lead_open:
                    raise AeadError(f"{self.name}: page data before its packet's offsets "
                                    "were opened")
                self._lead_open = False
                self._check(counter, taken=True)
                nonce = self._pages_nonce(counter)
                if into is None:
                    rc = lib.zcc_open(self._live_ctx(), nonce, aad_c, len(aad_c), buf, buf, n,
                                      buf + n)
                else:
                    base, size, offsets, count, page_size = into
                    rc = lib.zcc_open_pages(self._live_ctx(), nonce, aad_c, len(aad_c), buf, n,
                                            base, size, offsets, count, page_size, buf + n)
                self._run(counter, rc, "page data")
                self._expected += 1

    def _open(self, counter: int, data_c: Any, out_c: Any, n: int, tag_c: Any,
              aad_c: Any) -> None:
        with self._lock:
            self._check(counter)
            self._run(counter, lib.zcc_open(self._live_ctx(), self._nonce(counter), aad_c,
                                            len(aad_c), data_c, out_c, n, tag_c), "")
            self._expected += 1

    def _check(self, counter: int, *, taken: bool = False) -> None:
        """Refuse before any decryption: after a failure, an unexpected counter, the last
        counter used, or (unless `taken`, open_pages) a packet whose offsets were opened
        and whose pages never were."""
        if self._failure:
            raise AeadError(f"{self.name}: refused after an earlier failure "
                            f"({self._failure})")
        if self._lead_open and not taken:
            raise self._failed(AeadError(f"{self.name}: packet {self._expected}'s page data "
                                         "was never opened"))
        if counter != self._expected:
            raise self._failed(OutOfOrder(self._order_message(counter)))
        if self._expected >= COUNTER_LIMIT:
            raise self._failed(NonceExhausted(f"{self.name}: all 2**64 counters were used"))

    def _run(self, counter: int, rc: int, part: str) -> None:
        what = f"packet {counter}" + (f" ({part})" if part else "")
        if rc == lib.ZCC_EAUTH:
            raise self._failed(AuthenticationFailed(
                f"{self.name}: {what} did not verify (tampered with, or sealed under "
                "another key or for another stream); what it decrypted to was zeroed"))
        if rc == lib.ZCC_EBOUNDS:
            raise self._failed(AeadError(f"{self.name}: {what}: {_describe(rc)}"))
        if rc:
            raise AeadError(f"{self.name}: open failed: {_describe(rc)}")

    def _order_message(self, got: int) -> str:
        exp = self._expected
        what = "a replay" if got < exp else "a reordering or a lost packet"
        return f"{self.name}: expected packet counter {exp}, got {got} ({what})"

    def _failed(self, error: AeadError) -> AeadError:
        """Remember the first failure; the caller raises the error it returns."""
        self._failure = str(error)
        return error


# ------------------------------------------------------------------ buffers for C


class _Pins:
    """The C views of the caller's buffers for one call, released when it ends.

    Released at once, not left to the collector: an exception's traceback would keep
    them alive, and a cycle collected in the wrong order can free a buffer that a view
    still exports.
    """

    __slots__ = ("_held",)

    def __init__(self) -> None:
        self._held: list[Any] = []

    def __enter__(self) -> _Pins:
        return self

    def __exit__(self, *exc: object) -> None:
        for c in self._held:
            ffi.release(c)
        self._held.clear()

    def pin(self, c: Any) -> Any:
        self._held.append(c)
        return c

    def readable(self, obj: Buffer) -> tuple[Any, int]:
        """(uint8_t pointer, length) of a bytes-like object or a cffi array/buffer."""
        if isinstance(obj, ffi.CData):
            if ffi.typeof(obj).kind != "array":
                raise TypeError("a bare cffi pointer has no length: pass ffi.buffer(ptr, n)")
            return obj, ffi.sizeof(obj)
        c = self.pin(ffi.from_buffer("uint8_t[]", obj))
        return c, len(c)

    def writable(self, obj: Buffer) -> tuple[Any, int]:
        if isinstance(obj, ffi.CData):
            return self.readable(obj)
        c = self.pin(ffi.from_buffer("uint8_t[]", obj, require_writable=True))
        return c, len(c)

    def tag_out(self, tag: Buffer) -> Any:
        """A writable 16-byte tag: a bare cffi pointer is taken to point at 16 bytes."""
        if isinstance(tag, ffi.CData) and ffi.typeof(tag).kind == "pointer":
            return tag
        tag_c, n = self.writable(tag)
        if n < TAG_LEN:
            raise ValueError(f"tag buffer of {n} bytes, expected {TAG_LEN}")
        return tag_c


def _describe(rc: int) -> str:
    return {
        lib.ZCC_EAUTH: "authentication failed",
        lib.ZCC_EBOUNDS: "a block outside the mapping, or the output too small",
        lib.ZCC_EINVAL: "invalid arguments (a length, a NULL or overlapping buffers)",
        lib.ZCC_EBUSY: "the context is in use by another thread",
        lib.ZCC_ECRYPTO: "libcrypto failed",
    }.get(rc, f"code {rc}")


# ---------------------------------------------------------------- the shared key

_KEYFILE_SALT = b"zcmigrate key file v1"
_HANDSHAKE_INFO = b"zcmigrate handshake mac v1"
MIN_KEY_MATERIAL = 16


def shared_key(material: bytes) -> bytes:
    """The 32-byte shared key from a key file's contents (at least 16 bytes; `zcmigrate
    keygen` writes 32 random ones): HKDF-extract and expand, so a longer or shorter
    secret still gives a uniform key (RFC 5869 3.3)."""
    if len(material) < MIN_KEY_MATERIAL:
        raise ValueError(f"a key must hold at least {MIN_KEY_MATERIAL} bytes, "
                         f"not {len(material)}")
    return hkdf_sha256(material, salt=_KEYFILE_SALT, length=KEY_LEN)


def handshake_mac(key: bytes, label: bytes, *parts: bytes) -> bytes:
    """HMAC-SHA256 under a key of its own (HKDF from the shared key) over `label` and the
    handshake's records, each length-prefixed so that no two transcripts collide."""
    mac_key = hkdf_sha256(key, info=_HANDSHAKE_INFO, length=32)
    h = hmac.new(mac_key, label, hashlib.sha256)
    for part in parts:
        h.update(len(part).to_bytes(4, "big"))
        h.update(part)
    return h.digest()


def macs_equal(a: bytes, b: bytes) -> bool:
    return hmac.compare_digest(a, b)
