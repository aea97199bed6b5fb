"""The multifd data-channel wire format: init records and packet headers, encoded and checked.

Pure functions and frozen dataclasses over bytes (the h11 style): it must not know sockets,
threads, the migration job or the C data path. The layout is QEMU's migration/multifd.h.
"""

from __future__ import annotations

import struct
import sys
from array import array
from collections.abc import Sequence
from dataclasses import dataclass
from functools import lru_cache
from uuid import UUID

from zcmigrate import ZcmigrateError

__all__ = [
    "BLOCK_NAME_SIZE",
    "FLAG_SYNC",
    "HEADER_SIZE",
    "INIT_SIZE",
    "MAX_CHANNELS",
    "MAX_IMAGE_SIZE",
    "MAX_PAGES_ALLOC",
    "MAX_PAGE_SIZE",
    "MIN_PAGE_SIZE",
    "MULTIFD_MAGIC",
    "MULTIFD_VERSION",
    "TAG_SIZE",
    "InitRecord",
    "InitTracker",
    "LocalProtocolError",
    "Packet",
    "PacketHeader",
    "ProtocolError",
    "RemoteProtocolError",
    "SequenceTracker",
    "WireContext",
    "decode_header",
    "decode_init",
    "decode_offsets",
    "decode_packet",
    "encode_init",
    "encode_packet",
    "encode_sync",
    "sealed_capacity",
    "sealed_size",
]

MULTIFD_MAGIC = 0x11223344
MULTIFD_VERSION = 2  # 2: seq and the SYNC counts in what QEMU keeps reserved
INIT_SIZE = 64
HEADER_SIZE = 320
FLAG_SYNC = 1
BLOCK_NAME_SIZE = 256

# An AES-GCM tag (channel/aead.py's TAG_LEN): a sealed data packet has two, one after its
# sealed offsets and one after its sealed page data; a sealed SYNC has one.
TAG_SIZE = 16

MAX_CHANNELS = 255  # the channel id travels as one byte
MIN_PAGE_SIZE = 512
MAX_PAGE_SIZE = 65536
MAX_PAGES_ALLOC = 1024
# Far beyond any guest; it keeps every valid offset below 2**63, which the range check's
# lane arithmetic needs (see _lane_masks).
MAX_IMAGE_SIZE = 1 << 63

# QEMU's MultiFDInit_t: magic, version, uuid, channel id, 7 reserved bytes, 4 reserved u64.
# QEMU's MultiFDInit_t: magic, version, uuid, channel id, 7 reserved bytes, then where
# QEMU keeps 4 reserved u64: the channel's binding MAC (32 bytes; zero without a key).
_INIT = struct.Struct(">II16sB7s32s")
# QEMU's MultiFDPacket_t without its trailing offset[]: magic, version, flags, pages_alloc,
# normal_pages, next_packet_size, packet_num, zero_pages, reserved u32, then where QEMU keeps
# 3 reserved u64: seq, sync_packets, sync_pages; ramblock.
_HEADER = struct.Struct(">IIIIIIQIIQQQ256s")
_INIT_RESERVED_AT = 25  # 7 reserved bytes from here, then the MAC
_INIT_MAC_AT = 32
INIT_MAC_SIZE = 32
CHALLENGE_SIZE = 32  # what the destination sends first on every data connection
_HEADER_RESERVED_U32_AT = 36
_U64_LIMIT = 1 << 64
_TOP = 1 << 63
# Offsets are big-endian on the wire; array('Q') holds host order.
_SWAP = sys.byteorder == "little"

if _INIT.size != INIT_SIZE or _HEADER.size != HEADER_SIZE or array("Q").itemsize != 8:
    raise ImportError("multifd.wire: struct or array sizes differ from the wire layout")


class ProtocolError(ZcmigrateError):
    """A multifd data channel's bytes do not follow the wire format."""


class LocalProtocolError(ProtocolError):
    """We were asked to encode something the wire format cannot carry: a bug on our side."""


class RemoteProtocolError(ProtocolError):
    """The peer sent bytes that break the protocol; the message names field, value, expectation."""


def _is_int(value: object) -> bool:
    # bool is an int to Python but never a meaningful count, size or id here.
    return isinstance(value, int) and not isinstance(value, bool)


@dataclass(frozen=True, slots=True)
class WireContext:
    """What both ends agreed on in the main-channel handshake; every check is relative to it."""

    uuid: bytes  # the migration UUID, 16 bytes
    channels: int  # N, 1..255
    page_size: int  # a power of two, 512..65536
    image_size: int  # bytes, a positive multiple of page_size, at most MAX_IMAGE_SIZE
    pages_alloc: int  # most pages (normal + zero) in one packet, 1..1024
    block: str = "zcmigrate.ram"  # ASCII, 1..255 bytes, so the 256-byte field keeps a NUL
    # Every packet sealed (HELLO's "encryption"): the header stays clear and is the AAD,
    # everything after it is ciphertext and tags (sealed_size).
    sealed: bool = False

    def __post_init__(self) -> None:
        problem = _context_problem(self)
        if problem is not None:
            raise LocalProtocolError(f"wire context: {problem}")


def _context_problem(ctx: WireContext) -> str | None:
    if not isinstance(ctx.uuid, bytes) or len(ctx.uuid) != 16:
        return f"uuid {ctx.uuid!r}, expected 16 bytes"
    if not _is_int(ctx.channels) or not 1 <= ctx.channels <= MAX_CHANNELS:
        return f"channels {ctx.channels!r}, expected 1..{MAX_CHANNELS}"
    ps = ctx.page_size
    if not _is_int(ps) or not MIN_PAGE_SIZE <= ps <= MAX_PAGE_SIZE or ps & (ps - 1):
        return f"page_size {ps!r}, expected a power of two in {MIN_PAGE_SIZE}..{MAX_PAGE_SIZE}"
    size = ctx.image_size
    if not _is_int(size) or not 0 < size <= MAX_IMAGE_SIZE or size % ps:
        return (
            f"image_size {size!r}, expected a positive multiple of page_size {ps}"
            f" up to {MAX_IMAGE_SIZE}"
        )
    if not _is_int(ctx.pages_alloc) or not 1 <= ctx.pages_alloc <= MAX_PAGES_ALLOC:
        return f"pages_alloc {ctx.pages_alloc!r}, expected 1..{MAX_PAGES_ALLOC}"
    block = ctx.block
    if (
        not isinstance(block, str)
        or not block.isascii()
        or "\0" in block
        or not 1 <= len(block) < BLOCK_NAME_SIZE
    ):
        return f"block {block!r}, expected 1..{BLOCK_NAME_SIZE - 1} ASCII characters, no NUL"
    if not isinstance(ctx.sealed, bool):
        return f"sealed {ctx.sealed!r}, expected True or False"
    return None


@dataclass(frozen=True, slots=True)
class InitRecord:
    """The first 64 bytes of a data channel: which migration, which channel, and the MAC
    that binds the connection to the session (over the destination's challenge)."""

    uuid: bytes
    channel_id: int
    mac: bytes = bytes(INIT_MAC_SIZE)


@dataclass(frozen=True, slots=True)
class PacketHeader:
    """The fixed 320-byte part of a packet; the offsets and the page payload follow it."""

    flags: int
    pages_alloc: int
    normal_pages: int
    next_packet_size: int
    packet_num: int
    zero_pages: int
    seq: int  # this channel's packet count, this packet included: 1, 2, ... (never 0)
    sync_packets: int  # SYNC: data packets on this channel since the previous SYNC; else 0
    sync_pages: int  # SYNC: their pages, normal + zero; else 0
    block: str

    @property
    def pages(self) -> int:
        """Pages the packet carries, normal and zero: what a SYNC's sync_pages counts."""
        return self.normal_pages + self.zero_pages

    @property
    def is_sync(self) -> bool:
        return bool(self.flags & FLAG_SYNC)

    @property
    def offsets_size(self) -> int:
        """Bytes of offsets that follow the header."""
        return (self.normal_pages + self.zero_pages) * 8

    @property
    def payload_size(self) -> int:
        """Bytes of page data that follow the offsets."""
        return self.next_packet_size


def sealed_size(header: PacketHeader) -> int:
    """The bytes a sealed packet has after its header, tags included. A data packet: its
    offsets' ciphertext and tag, then its page data's ciphertext and tag (two messages
    under one counter, so the offsets verify before a page is written: docs/protocol.md);
    a SYNC: one tag, over its header alone."""
    if header.is_sync:
        return TAG_SIZE
    return header.offsets_size + TAG_SIZE + header.payload_size + TAG_SIZE


def sealed_capacity(ctx: WireContext) -> int:
    """The most any sealed packet of this context has after its header: a buffer of this
    size holds every one of them (sealed_size of a full packet)."""
    return 8 * ctx.pages_alloc + ctx.pages_alloc * ctx.page_size + 2 * TAG_SIZE


@dataclass(frozen=True, slots=True)
class Packet:
    """A whole decoded packet; payload is a view of the caller's buffer, not a copy."""

    header: PacketHeader
    normal: array[int]
    zero: array[int]
    payload: memoryview


def _view(data: bytes | bytearray | memoryview) -> memoryview:
    # One flat byte view, so len() counts bytes and slices never copy.
    return memoryview(data).cast("B")


def _length_problem(what: str, got: int, expected: int) -> str:
    if got < expected:
        return f"{what}: truncated, {got} bytes, expected {expected}"
    return f"{what}: {got} bytes, expected {expected} ({got - expected} trailing bytes)"


def _check_magic_version(what: str, magic: int, version: int) -> None:
    if magic != MULTIFD_MAGIC:
        raise RemoteProtocolError(
            f"{what}: bad magic 0x{magic:08x}, expected 0x{MULTIFD_MAGIC:08x}"
        )
    if version != MULTIFD_VERSION:
        raise RemoteProtocolError(f"{what}: bad version {version}, expected {MULTIFD_VERSION}")


@lru_cache(maxsize=16)
def _block_field(block: str) -> bytes:
    return block.encode("ascii").ljust(BLOCK_NAME_SIZE, b"\0")


# ---------------------------------------------------------------------------------------------
# Init record


def encode_init(ctx: WireContext, channel_id: int, mac: bytes = bytes(INIT_MAC_SIZE)) -> bytes:
    """The 64-byte record that opens data channel `channel_id`; `mac` binds it to the
    session (channel.aead.SessionKeys.binding_mac over the destination's challenge)."""
    if not isinstance(mac, bytes) or len(mac) != INIT_MAC_SIZE:
        raise LocalProtocolError(f"init record: mac of {len(mac)} bytes, expected "
                                 f"{INIT_MAC_SIZE}")
    if not _is_int(channel_id) or not 0 <= channel_id < ctx.channels:
        raise LocalProtocolError(
            f"init record: channel id {channel_id!r}, expected 0..{ctx.channels - 1}"
        )
    return _INIT.pack(MULTIFD_MAGIC, MULTIFD_VERSION, ctx.uuid, channel_id, bytes(7), mac)


def decode_init(data: bytes | bytearray | memoryview, ctx: WireContext) -> InitRecord:
    """Check one init record against the negotiated context (not against other channels)."""
    mv = _view(data)
    if len(mv) != INIT_SIZE:
        raise RemoteProtocolError(_length_problem("init record", len(mv), INIT_SIZE))
    magic, version, uuid, channel_id, _, mac = _INIT.unpack(mv)
    _check_magic_version("init record", magic, version)
    if uuid != ctx.uuid:
        # A channel of another (perhaps earlier, failed) migration must not feed this image.
        raise RemoteProtocolError(
            f"init record: uuid {UUID(bytes=uuid)}, expected {UUID(bytes=ctx.uuid)}"
        )
    if channel_id >= ctx.channels:
        raise RemoteProtocolError(
            f"init record: channel id {channel_id}, expected 0..{ctx.channels - 1}"
        )
    reserved = mv[_INIT_RESERVED_AT:_INIT_MAC_AT]
    if any(reserved):
        at = next(i for i, b in enumerate(reserved) if b)
        raise RemoteProtocolError(
            f"init record: reserved byte at offset {_INIT_RESERVED_AT + at}"
            f" = 0x{reserved[at]:02x}, expected 0"
        )
    return InitRecord(uuid=uuid, channel_id=channel_id, mac=bytes(mac))


class InitTracker:
    """The data channels a destination has heard from: each channel id exactly once.

    Owned by the one thread that accepts data channels; it does no locking.
    """

    __slots__ = ("_ctx", "_seen")

    def __init__(self, ctx: WireContext) -> None:
        self._ctx = ctx
        self._seen: set[int] = set()

    def accept(self, data: bytes | bytearray | memoryview) -> InitRecord:
        record = decode_init(data, self._ctx)
        if record.channel_id in self._seen:
            # Two connections claiming one id would leave another id's sync barrier unmet.
            raise RemoteProtocolError(
                f"init record: channel id {record.channel_id} seen twice,"
                f" expected each of 0..{self._ctx.channels - 1} once"
            )
        self._seen.add(record.channel_id)
        return record

    @property
    def complete(self) -> bool:
        return len(self._seen) == self._ctx.channels

    @property
    def context(self) -> WireContext:
        return self._ctx

    @property
    def seen(self) -> frozenset[int]:
        return frozenset(self._seen)


# ---------------------------------------------------------------------------------------------
# Offsets: the check that keeps a receiver inside the image


@lru_cache(maxsize=16)
def _lane_masks(page_size: int, image_size: int, lanes: int) -> tuple[int, int, int]:
    """Constants to check up to `lanes` u64 offsets at once, as one big integer (SWAR).

    An offset v is valid iff v % page_size == 0 and v <= last, where last = image_size -
    page_size. For v < 2**63, v + (2**63 - 1 - last) has bit 63 set exactly when v > last, and
    cannot carry into the next lane (both terms are below 2**63; last < 2**63 by
    MAX_IMAGE_SIZE). So with X the offsets as one integer, all are valid iff
    (X + add) & top == 0 and X & (top | page_size - 1) == 0; the second term catches
    misalignment and any v >= 2**63, whose carry could spoil the first. Lanes beyond the
    packet's count are 0 in X and stay clear, so one set of constants serves every count.
    """
    last = image_size - page_size

    def repeat(lane: int) -> int:
        return int.from_bytes(lane.to_bytes(8, "big") * lanes, "big")

    return repeat(_TOP - 1 - last), repeat(_TOP), repeat(_TOP | (page_size - 1))


def _offsets_valid(offsets_be: bytes | memoryview, ctx: WireContext) -> bool:
    # timeit, 512 offsets (4 KiB pages, 1 GiB image, pages_alloc 512), one core of this VM:
    # this check 5.0 us (all of decode_offsets 6.4 us); any(map(mask.__and__, arr)) plus
    # max(arr) 32 us, max(arr) alone 11 us. Bigint arithmetic runs in C over the whole
    # buffer and creates no Python int per offset.
    add, top, top_align = _lane_masks(ctx.page_size, ctx.image_size, ctx.pages_alloc)
    x = int.from_bytes(offsets_be, "big")
    return not ((x + add) & top or x & top_align)


def _offset_problem(offsets: array[int], normal_pages: int, ctx: WireContext) -> str:
    # Only on the error path: find the first bad offset to name it in the message.
    for i, off in enumerate(offsets):
        kind, index = ("normal", i) if i < normal_pages else ("zero", i - normal_pages)
        if off % ctx.page_size:
            return (
                f"{kind} offset [{index}] 0x{off:x}, expected a multiple of"
                f" page size {ctx.page_size}"
            )
        if off + ctx.page_size > ctx.image_size:
            return (
                f"{kind} offset [{index}] 0x{off:x} outside the image, expected at most"
                f" 0x{ctx.image_size - ctx.page_size:x} (image size {ctx.image_size},"
                f" page size {ctx.page_size})"
            )
    raise AssertionError("multifd.wire: the offset checks disagree")  # a bug, never the peer


def _host_array(offsets_be: bytes | memoryview) -> array[int]:
    offsets = array("Q")
    offsets.frombytes(offsets_be)
    if _SWAP:
        offsets.byteswap()
    return offsets


# ---------------------------------------------------------------------------------------------
# Packets


def _u64_array(values: Sequence[int] | array[int], what: str) -> array[int]:
    try:
        # Same-typecode arrays are copied with memcpy; the copy is ours to byteswap.
        return array("Q", values)
    except (OverflowError, TypeError) as exc:
        raise LocalProtocolError(f"packet offsets: {what} offsets must be u64 ({exc})") from exc


def encode_packet(
    ctx: WireContext,
    *,
    packet_num: int,
    seq: int,
    normal: Sequence[int] | array[int],
    zero: Sequence[int] | array[int] = (),
    sync: bool = False,
    sync_packets: int = 0,
    sync_pages: int = 0,
) -> bytes:
    """The header and offsets of one packet, without the page payload.

    `seq` is the packet's number on its channel (1 for the first after the init record, and
    one more for each packet after it, SYNC or not); a SYNC packet carries `sync_packets` and
    `sync_pages`, what its channel sent since the previous SYNC. The caller sends
    normal_pages * page_size bytes of pages after these bytes, straight from the mmap and
    uncopied (h11's data passthrough), in the order of `normal`.
    """
    n_normal, n_zero = len(normal), len(zero)
    if sync and (n_normal or n_zero):
        raise LocalProtocolError(
            f"packet: SYNC packet with {n_normal} normal and {n_zero} zero pages, expected none"
        )
    if n_normal + n_zero > ctx.pages_alloc:
        raise LocalProtocolError(
            f"packet: {n_normal} normal + {n_zero} zero pages, expected at most"
            f" pages_alloc {ctx.pages_alloc}"
        )
    if not _is_int(packet_num) or not 0 <= packet_num < _U64_LIMIT:
        raise LocalProtocolError(f"packet: packet_num {packet_num!r}, expected a u64")
    # Never 0 and never past the top: a channel's seq must not wrap (the next issue's AEAD
    # nonce is built from it, and a nonce must never repeat under one key).
    if not _is_int(seq) or not 1 <= seq < _U64_LIMIT:
        raise LocalProtocolError(f"packet: seq {seq!r}, expected 1..{_U64_LIMIT - 1}")
    for name, count in (("sync_packets", sync_packets), ("sync_pages", sync_pages)):
        if not _is_int(count) or not 0 <= count < _U64_LIMIT:
            raise LocalProtocolError(f"packet: {name} {count!r}, expected a u64")
        if count and not sync:
            raise LocalProtocolError(f"packet: {name} {count} on a data packet, expected 0")
    offsets = _u64_array(normal, "normal")
    if n_zero:
        offsets.extend(_u64_array(zero, "zero"))
    if _SWAP:
        offsets.byteswap()
    offsets_be = offsets.tobytes()
    if offsets_be and not _offsets_valid(offsets_be, ctx):
        problem = _offset_problem(_host_array(offsets_be), n_normal, ctx)
        raise LocalProtocolError(f"packet offsets: {problem}")
    header = _HEADER.pack(
        MULTIFD_MAGIC,
        MULTIFD_VERSION,
        FLAG_SYNC if sync else 0,
        ctx.pages_alloc,
        n_normal,
        n_normal * ctx.page_size,
        packet_num,
        n_zero,
        0,
        seq,
        sync_packets,
        sync_pages,
        _block_field(ctx.block),
    )
    return header + offsets_be


def encode_sync(ctx: WireContext, packet_num: int, seq: int, *, packets: int,
                pages: int) -> bytes:
    """A SYNC packet: no pages, the mark that everything before it was sent, and how much
    that was since the previous SYNC: `packets` data packets holding `pages` pages."""
    return encode_packet(ctx, packet_num=packet_num, seq=seq, normal=(), sync=True,
                         sync_packets=packets, sync_pages=pages)


def decode_header(data: bytes | bytearray | memoryview, ctx: WireContext) -> PacketHeader:
    """Check exactly HEADER_SIZE bytes; what it returns says how many bytes follow."""
    mv = _view(data)
    if len(mv) != HEADER_SIZE:
        raise RemoteProtocolError(_length_problem("packet header", len(mv), HEADER_SIZE))
    (
        magic,
        version,
        flags,
        pages_alloc,
        normal_pages,
        next_packet_size,
        packet_num,
        zero_pages,
        reserved32,
        seq,
        sync_packets,
        sync_pages,
        block_raw,
    ) = _HEADER.unpack(mv)
    _check_magic_version("packet header", magic, version)
    if flags & ~FLAG_SYNC:
        raise RemoteProtocolError(
            f"packet header: unknown flags 0x{flags & ~FLAG_SYNC:x} in flags 0x{flags:x},"
            f" expected only SYNC (0x{FLAG_SYNC:x})"
        )
    if pages_alloc != ctx.pages_alloc:
        raise RemoteProtocolError(
            f"packet header: pages_alloc {pages_alloc}, expected {ctx.pages_alloc} (negotiated)"
        )
    # This bound is what lets a receiver size its buffers from the context alone.
    if normal_pages + zero_pages > pages_alloc:
        raise RemoteProtocolError(
            f"packet header: normal_pages {normal_pages} + zero_pages {zero_pages}"
            f" = {normal_pages + zero_pages}, expected at most pages_alloc {pages_alloc}"
        )
    if flags & FLAG_SYNC and (normal_pages or zero_pages):
        raise RemoteProtocolError(
            f"packet header: SYNC packet with normal_pages {normal_pages} and zero_pages"
            f" {zero_pages}, expected no pages"
        )
    if next_packet_size != normal_pages * ctx.page_size:
        raise RemoteProtocolError(
            f"packet header: next_packet_size {next_packet_size}, expected"
            f" {normal_pages * ctx.page_size} (normal_pages {normal_pages} x page size"
            f" {ctx.page_size})"
        )
    if reserved32:
        raise RemoteProtocolError(
            f"packet header: reserved u32 at offset {_HEADER_RESERVED_U32_AT}"
            f" = 0x{reserved32:x}, expected 0"
        )
    if seq == 0:
        raise RemoteProtocolError("packet header: seq 0, expected at least 1 (a channel's"
                                  " first packet is 1)")
    if not flags & FLAG_SYNC and (sync_packets or sync_pages):
        raise RemoteProtocolError(
            f"packet header: data packet with sync_packets {sync_packets} and sync_pages"
            f" {sync_pages}, expected 0 and 0 (only a SYNC packet counts)"
        )
    if block_raw != _block_field(ctx.block):
        shown = block_raw.rstrip(b"\0").decode("ascii", "backslashreplace")
        raise RemoteProtocolError(f"packet header: block name {shown!r}, expected {ctx.block!r}")
    return PacketHeader(
        flags=flags,
        pages_alloc=pages_alloc,
        normal_pages=normal_pages,
        next_packet_size=next_packet_size,
        packet_num=packet_num,
        zero_pages=zero_pages,
        seq=seq,
        sync_packets=sync_packets,
        sync_pages=sync_pages,
        block=ctx.block,
    )


def decode_offsets(
    data: bytes | bytearray | memoryview, header: PacketHeader, ctx: WireContext
) -> tuple[array[int], array[int]]:
    """Check exactly header.offsets_size bytes; return (normal, zero) in host byte order.

    Every offset returned is page-aligned and its page lies wholly inside the image.
    """
    mv = _view(data)
    count = header.normal_pages + header.zero_pages
    if count > ctx.pages_alloc:
        # decode_header rejects this too; repeated because _lane_masks covers pages_alloc lanes.
        raise RemoteProtocolError(
            f"packet header: normal_pages {header.normal_pages} + zero_pages"
            f" {header.zero_pages} = {count}, expected at most pages_alloc {ctx.pages_alloc}"
        )
    if len(mv) != count * 8:
        raise RemoteProtocolError(_length_problem("packet offsets", len(mv), count * 8))
    if count and not _offsets_valid(mv, ctx):
        problem = _offset_problem(_host_array(mv), header.normal_pages, ctx)
        raise RemoteProtocolError(f"packet offsets: {problem}")
    split = header.normal_pages * 8
    return _host_array(mv[:split]), _host_array(mv[split:])


def decode_packet(data: bytes | bytearray | memoryview, ctx: WireContext) -> Packet:
    """Check one whole clear packet (header, offsets, payload) with nothing before or after
    it. A sealed packet is opened first (its offsets are ciphertext until then)."""
    if ctx.sealed:
        raise LocalProtocolError("decode_packet: the context says sealed; open the packet "
                                 "first and decode its header and offsets apart")
    mv = _view(data)
    header = decode_header(mv[:HEADER_SIZE], ctx)
    offsets_end = HEADER_SIZE + header.offsets_size
    if len(mv) < offsets_end:
        raise RemoteProtocolError(
            _length_problem("packet offsets", len(mv) - HEADER_SIZE, header.offsets_size)
        )
    normal, zero = decode_offsets(mv[HEADER_SIZE:offsets_end], header, ctx)
    payload = mv[offsets_end:]
    if len(payload) != header.payload_size:
        raise RemoteProtocolError(
            _length_problem("packet payload", len(payload), header.payload_size)
        )
    return Packet(header=header, normal=normal, zero=zero, payload=payload)


# ---------------------------------------------------------------------------------------------
# Sequence: every packet of a channel accounted for


class SequenceTracker:
    """One data channel's packets as its receiver sees them: seq exactly one more each time,
    and every SYNC's counts equal to what arrived since the previous SYNC.

    Fed every decoded header in the order it came off the channel, before the packet's pages
    are written, so a repeated or reordered packet never reaches the image, and a dropped one
    is found at the next packet or, at the latest, at the SYNC after it. Owned by the channel's
    one receiving thread; it does no locking.
    """

    __slots__ = ("_channel_id", "_next_seq", "_packets", "_pages")

    def __init__(self, channel_id: int) -> None:
        self._channel_id = channel_id
        self._next_seq = 1  # the init record is not counted: the first packet is 1
        self._packets = 0  # data packets since the previous SYNC
        self._pages = 0  # their pages, normal + zero

    def accept(self, header: PacketHeader) -> None:
        """Count one packet, or RemoteProtocolError naming the channel, what came and what
        was expected."""
        expected, got = self._next_seq, header.seq
        if got != expected:
            if got > expected:
                missing = got - expected
                why = f"{missing} packet{'s' if missing > 1 else ''} missing"
            else:
                why = "a packet repeated or out of order"
            raise RemoteProtocolError(
                f"packet header: seq {got} on channel {self._channel_id}, expected {expected}"
                f" ({why})"
            )
        if not header.is_sync:
            self._packets += 1
            self._pages += header.pages
        elif (header.sync_packets, header.sync_pages) != (self._packets, self._pages):
            raise RemoteProtocolError(
                f"SYNC packet (seq {got}) on channel {self._channel_id}: the sender counts"
                f" {header.sync_packets} data packets and {header.sync_pages} pages since the"
                f" previous SYNC, received {self._packets} packets and {self._pages} pages"
            )
        else:
            self._packets = self._pages = 0
        self._next_seq = expected + 1

    @property
    def next_seq(self) -> int:
        """The seq the next packet must carry."""
        return self._next_seq
