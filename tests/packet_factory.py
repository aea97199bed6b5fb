"""Exact multifd data-channel bytes for tests, built with struct alone (h2's FrameFactory style).

Independent of multifd.wire's encoder on purpose, so tests check the encoder against it; every
field, reserved ones and the raw block name included, can be overridden to build bad input.
"""

from __future__ import annotations

import struct
from collections.abc import Sequence
from typing import Any

from zcmigrate.multifd.wire import WireContext

# Spelled out again rather than imported: a wrong constant in wire.py must fail the tests.
MAGIC = 0x11223344
VERSION = 2
FLAG_SYNC = 1
INIT_FORMAT = ">II16sB7s32s"  # magic, version, uuid, channel id, 7 reserved, binding MAC
# magic, version, flags, pages_alloc, normal_pages, next_packet_size, packet_num, zero_pages,
# reserved u32, seq, sync_packets, sync_pages, ramblock: see docs/protocol.md, "Packet header"
HEADER_FORMAT = ">IIIIIIQIIQQQ256s"


class PacketFactory:
    """Builds init records, packet headers and whole packets for one WireContext."""

    def __init__(self, ctx: WireContext) -> None:
        self.ctx = ctx

    def build_init(
        self,
        *,
        magic: int = MAGIC,
        version: int = VERSION,
        uuid: bytes | None = None,
        channel_id: int = 0,
        reserved: bytes = bytes(7),
        mac: bytes = bytes(32),
    ) -> bytes:
        return struct.pack(
            INIT_FORMAT,
            magic,
            version,
            self.ctx.uuid if uuid is None else uuid,
            channel_id,
            reserved,
            mac,
        )

    def build_header(
        self,
        *,
        magic: int = MAGIC,
        version: int = VERSION,
        flags: int = 0,
        pages_alloc: int | None = None,
        normal_pages: int = 0,
        next_packet_size: int | None = None,
        packet_num: int = 0,
        zero_pages: int = 0,
        reserved: int = 0,
        seq: int = 1,
        sync_packets: int = 0,
        sync_pages: int = 0,
        block: str | None = None,
        block_raw: bytes | None = None,
    ) -> bytes:
        """The 320-byte fixed header; unset sizes follow from the context and the counts."""
        if block_raw is None:
            name = self.ctx.block if block is None else block
            block_raw = name.encode("ascii").ljust(256, b"\0")
        return struct.pack(
            HEADER_FORMAT,
            magic,
            version,
            flags,
            self.ctx.pages_alloc if pages_alloc is None else pages_alloc,
            normal_pages,
            # Wrapped to 32 bits like a careless C sender would, so huge counts still pack.
            (normal_pages * self.ctx.page_size) % 2**32
            if next_packet_size is None
            else next_packet_size,
            packet_num,
            zero_pages,
            reserved,
            seq,
            sync_packets,
            sync_pages,
            block_raw,
        )

    @staticmethod
    def build_offsets(offsets: Sequence[int]) -> bytes:
        return struct.pack(f">{len(offsets)}Q", *offsets)

    def page_data(self, count: int) -> bytes:
        """`count` pages, each filled with its own byte value so a mix-up shows."""
        return b"".join(bytes([i % 251 + 1]) * self.ctx.page_size for i in range(count))

    def build_packet(
        self,
        *,
        normal: Sequence[int] = (),
        zero: Sequence[int] = (),
        payload: bytes | None = None,
        sync: bool = False,
        flags: int | None = None,
        normal_pages: int | None = None,
        zero_pages: int | None = None,
        magic: int = MAGIC,
        version: int = VERSION,
        pages_alloc: int | None = None,
        next_packet_size: int | None = None,
        packet_num: int = 0,
        reserved: int = 0,
        seq: int = 1,
        sync_packets: int = 0,
        sync_pages: int = 0,
        block: str | None = None,
        block_raw: bytes | None = None,
    ) -> bytes:
        """Header + offsets + payload; counts follow `normal` and `zero` unless overridden."""
        n_normal = len(normal) if normal_pages is None else normal_pages
        header = self.build_header(
            magic=magic,
            version=version,
            flags=(FLAG_SYNC if sync else 0) if flags is None else flags,
            pages_alloc=pages_alloc,
            normal_pages=n_normal,
            next_packet_size=next_packet_size,
            packet_num=packet_num,
            zero_pages=len(zero) if zero_pages is None else zero_pages,
            reserved=reserved,
            seq=seq,
            sync_packets=sync_packets,
            sync_pages=sync_pages,
            block=block,
            block_raw=block_raw,
        )
        if payload is None:
            payload = self.page_data(len(normal))
        return header + self.build_offsets([*normal, *zero]) + payload


class ChannelStream:
    """One data channel's packets in order, numbered and counted as a correct sender does:
    seq 1 for the first packet after the init record, one more for every packet, and on each
    SYNC the data packets and pages since the previous one. Every packet is built (and
    counted) when asked for; a test that does not send one plays a proxy that dropped it.
    Keyword overrides reach PacketFactory.build_packet, to build a wrong one."""

    def __init__(self, factory: PacketFactory, channel_id: int = 0) -> None:
        self.factory = factory
        self.channel_id = channel_id
        self.seq = 0  # the last seq handed out
        self.packets = 0  # data packets since the last SYNC
        self.pages = 0
        self.packet_num = 0

    def init(self) -> bytes:
        return self.factory.build_init(channel_id=self.channel_id)

    def _next(self, fields: dict[str, Any]) -> dict[str, Any]:
        self.seq += 1
        self.packet_num += 1
        return {"seq": self.seq, "packet_num": self.packet_num, **fields}

    def data(self, normal: Sequence[int] = (), zero: Sequence[int] = (),
             **overrides: Any) -> bytes:
        self.packets += 1
        self.pages += len(normal) + len(zero)
        return self.factory.build_packet(normal=normal, zero=zero, **self._next(overrides))

    def sync(self, **overrides: Any) -> bytes:
        fields = {"sync_packets": self.packets, "sync_pages": self.pages, **overrides}
        self.packets = self.pages = 0
        return self.factory.build_packet(sync=True, **self._next(fields))
