"""channel/aead.py: session keys per direction and channel, nonces that never repeat,
openers that take only the next counter."""

from __future__ import annotations

import mmap
import os
import threading
import uuid
from array import array
from typing import Any

import pytest

from zcmigrate.channel.aead import (
    COUNTER_LIMIT,
    HELLO_NONCE_LEN,
    TAG_LEN,
    Direction,
    Opener,
    Sealer,
    SessionKeys,
    StreamId,
    fresh_nonce,
    hkdf_sha256,
)
from zcmigrate.channel.errors import (
    AeadError,
    AuthenticationFailed,
    ChannelError,
    NonceExhausted,
    OutOfOrder,
)
from zcmigrate.native import ffi, lib

PAGE = 4096
S2D = Direction.SOURCE_TO_DESTINATION
D2S = Direction.DESTINATION_TO_SOURCE
SHARED = bytes(range(32))
UUID = uuid.UUID("6ba7b810-9dad-11d1-80b4-00c04fd430c8")


def session(**kw: object) -> SessionKeys:
    args: dict[str, object] = {"shared_key": SHARED, "source_nonce": b"\x01" * 32,
                               "destination_nonce": b"\x02" * 32, "migration_uuid": UUID}
    args.update(kw)
    return SessionKeys(**args)  # type: ignore[arg-type]


def pair(channel: int | None = 0, keys: SessionKeys | None = None) -> tuple[Sealer, Opener]:
    keys = keys or session()
    return keys.sealer(S2D, channel), keys.opener(S2D, channel)


# ------------------------------------------------------------------ session keys


def test_every_direction_and_channel_gets_its_own_key() -> None:
    keys = session()
    streams = [StreamId(d, c) for d in Direction for c in (None, 0, 1, 2, 255)]
    derived = [keys.key(s) for s in streams]
    assert all(len(k) == 16 for k in derived)  # AES-128
    assert len(set(derived)) == len(streams)
    assert len({s.prefix for s in streams}) == len(streams)


def test_the_derivation_is_hkdf_over_the_documented_layout() -> None:
    """Pinned, because both ends must derive the same bytes: salt = source nonce ||
    destination nonce; info = label || UUID || direction || kind || channel (u16) ||
    cipher (1 for aes-128-ocb, 2 for aes-128-gcm)."""
    src, dst = os.urandom(32), os.urandom(32)
    keys = session(source_nonce=src, destination_nonce=dst)
    assert keys.cipher == "aes-128-ocb"  # the default
    info = (b"zcmigrate session key v1\x00" + UUID.bytes + bytes([1, 1])
            + (7).to_bytes(2, "big") + bytes([1]))
    assert keys.key(StreamId(D2S, 7)) == hkdf_sha256(SHARED, salt=src + dst, info=info,
                                                     length=16)
    main = b"zcmigrate session key v1\x00" + UUID.bytes + bytes([0, 0, 0, 0])
    assert keys.key(StreamId(S2D, None)) == hkdf_sha256(SHARED, salt=src + dst,
                                                        info=main + bytes([1]), length=16)
    gcm = session(source_nonce=src, destination_nonce=dst, cipher="aes-128-gcm")
    assert gcm.key(StreamId(S2D, None)) == hkdf_sha256(SHARED, salt=src + dst,
                                                       info=main + bytes([2]), length=16)


def test_each_cipher_has_its_own_keys_and_an_unknown_one_is_refused() -> None:
    """The same session under the two AEADs never shares a key; a sealer of one cannot
    be opened by an opener of the other."""
    ocb, gcm = session(), session(cipher="aes-128-gcm")
    stream = StreamId(S2D, 0)
    assert ocb.key(stream) != gcm.key(stream)
    sealed = ocb.sealer(S2D, 0).seal(b"pages", aad=b"hdr")
    assert ocb.opener(S2D, 0).open(0, sealed, aad=b"hdr") == b"pages"
    with pytest.raises(AuthenticationFailed):
        gcm.opener(S2D, 0).open(0, sealed, aad=b"hdr")
    with pytest.raises(ValueError, match="aes-128-ocb, aes-128-gcm"):
        session(cipher="aes-256-gcm")


def test_the_same_inputs_give_the_same_keys_and_any_change_gives_others() -> None:
    stream = StreamId(S2D, 0)
    k = session().key(stream)
    assert session().key(stream) == k
    assert session(shared_key=bytes(32)).key(stream) != k
    assert session(source_nonce=b"\x03" * 32).key(stream) != k
    assert session(destination_nonce=b"\x03" * 32).key(stream) != k
    assert session(source_nonce=b"\x02" * 32, destination_nonce=b"\x01" * 32).key(stream) != k
    assert session(migration_uuid=uuid.uuid4()).key(stream) != k
    assert session(migration_uuid=UUID.bytes).key(stream) == k


@pytest.mark.parametrize("kw, message", [
    ({"shared_key": bytes(16)}, "shared key of 16 bytes"),
    ({"source_nonce": bytes(31)}, "source nonce of 31 bytes"),
    ({"destination_nonce": bytes(33)}, "destination nonce of 33 bytes"),
    ({"destination_nonce": b"\x01" * 32}, "reflected"),
    ({"migration_uuid": bytes(15)}, "UUID of 15 bytes"),
])
def test_bad_session_inputs_are_refused(kw: dict[str, object], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        session(**kw)


def test_fresh_nonces_are_32_bytes_and_differ() -> None:
    a, b = fresh_nonce(), fresh_nonce()
    assert len(a) == len(b) == HELLO_NONCE_LEN and a != b


def test_hkdf_wrapper_gives_rfc5869_case_1() -> None:
    okm = hkdf_sha256(bytes([0x0B] * 22), salt=bytes(range(13)), info=bytes(range(0xF0, 0xFA)),
                      length=42)
    assert okm.hex() == ("3cb25f25faacd57a90434f64d0362f2a2d2d0a90cf1a5a4c5db02d56ecc4c5bf"
                         "34007208d5b887185865")


# ------------------------------------------------------------ sealing and opening


def test_records_round_trip_and_each_uses_the_next_counter() -> None:
    s, o = pair()
    for i, msg in enumerate([b"hello", b"", os.urandom(10_000)]):
        assert s.next_counter == i
        sealed = s.seal(msg, aad=b"hdr%d" % i)
        assert len(sealed) == len(msg) + TAG_LEN
        assert o.open(i, sealed, aad=b"hdr%d" % i) == msg
    assert s.next_counter == o.expected_counter == 3


def test_the_nonce_is_the_stream_prefix_then_the_big_endian_counter() -> None:
    keys = session()
    stream = StreamId(S2D, 3)
    s = Sealer(keys.key(stream), stream.prefix, first_counter=0x0102030405060708)
    sealed = s.seal(b"payload")
    ctx = ffi.gc(lib.zcc_aead_new(keys.key(stream), 16, lib.ZCC_AES_128_OCB), lib.zcc_aead_free)
    nonce = bytes([0, 1, 0, 3]) + bytes(range(1, 9))
    buf = bytearray(sealed[:-TAG_LEN])
    c = ffi.from_buffer("uint8_t[]", buf)
    assert lib.zcc_open(ctx, nonce, b"", 0, c, c, len(buf), sealed[-TAG_LEN:]) == 0
    assert bytes(buf) == b"payload"


def test_a_replay_is_refused_naming_expected_and_got() -> None:
    s, o = pair()
    first = s.seal(b"a")
    o.open(0, first)
    with pytest.raises(OutOfOrder, match=r"expected packet counter 1, got 0 \(a replay\)"):
        o.open(0, first)


def test_reordering_is_refused_before_decryption() -> None:
    s, o = pair()
    a, b = s.seal(b"a"), s.seal(b"b")
    with pytest.raises(OutOfOrder, match=r"expected packet counter 0, got 1 .*reordering"):
        o.open(1, b)
    assert isinstance(OutOfOrder("x"), ChannelError)
    # The stream is dead after any failure, even for the packet it was waiting for.
    with pytest.raises(AeadError, match="refused after an earlier failure"):
        o.open(0, a)
    assert o.failed


def test_a_counter_claimed_falsely_fails_authentication() -> None:
    """The nonce comes from the opener's own counter, not just the claim: a packet
    sealed under counter 1 presented as counter 0 does not verify."""
    s, o = pair()
    s.seal(b"a")
    b = s.seal(b"b")
    with pytest.raises(AuthenticationFailed, match="packet 0 did not verify"):
        o.open(0, b)


@pytest.mark.parametrize("where", ["ciphertext", "tag", "aad"])
def test_tampering_fails_authentication_and_zeroes_the_buffer(where: str) -> None:
    s, o = pair()
    msg = os.urandom(100)
    buf = bytearray(msg)
    tag = bytearray(TAG_LEN)
    s.seal_into(buf, buf, tag, aad=b"header")
    aad = b"header"
    if where == "ciphertext":
        buf[50] ^= 0x10
    elif where == "tag":
        tag[15] ^= 0x80
    else:
        aad = b"headex"
    with pytest.raises(AuthenticationFailed):
        o.open_into(0, buf, buf, tag, aad=aad)
    assert buf == bytes(100)
    with pytest.raises(AeadError, match="earlier failure"):
        o.open_into(0, buf, buf, tag, aad=aad)


@pytest.mark.parametrize("wrong", ["channel", "direction", "main", "migration"])
def test_a_packet_of_another_stream_does_not_open(wrong: str) -> None:
    keys = session()
    sealed = keys.sealer(S2D, 0).seal(b"x" * 64)
    opener = {
        "channel": keys.opener(S2D, 1),
        "direction": keys.opener(D2S, 0),  # a reflected packet
        "main": keys.opener(S2D, None),
        "migration": session(migration_uuid=uuid.uuid4()).opener(S2D, 0),
    }[wrong]
    with pytest.raises(AuthenticationFailed):
        opener.open(0, sealed)


def test_the_last_counter_seals_once_then_the_sealer_refuses_for_good() -> None:
    stream = StreamId(S2D, 0)
    key = session().key(stream)
    s = Sealer(key, stream.prefix, first_counter=COUNTER_LIMIT - 1)
    o = Opener(key, stream.prefix, first_counter=COUNTER_LIMIT - 1)
    last = s.seal(b"last")
    assert s.next_counter == COUNTER_LIMIT
    for _ in range(2):
        with pytest.raises(NonceExhausted, match="seals nothing more"):
            s.seal(b"one more")
        with pytest.raises(NonceExhausted):
            s.seal_into(bytearray(4), bytearray(4), bytearray(TAG_LEN))
    assert s.next_counter == COUNTER_LIMIT
    assert o.open(COUNTER_LIMIT - 1, last) == b"last"
    with pytest.raises(NonceExhausted):
        o.open(COUNTER_LIMIT, last)


def test_two_threads_on_one_sealer_never_share_a_counter() -> None:
    s, o = pair()
    got: list[tuple[int, bytes, bytes, bytes]] = []
    lock = threading.Lock()

    def work() -> None:
        for _ in range(300):
            msg = os.urandom(64)
            buf, tag = bytearray(msg), bytearray(TAG_LEN)
            counter = s.seal_into(buf, buf, tag)
            with lock:
                got.append((counter, msg, bytes(buf), bytes(tag)))

    threads = [threading.Thread(target=work) for _ in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert sorted(c for c, *_ in got) == list(range(600))
    for counter, msg, ct, tag in sorted(got):
        buf = bytearray(ct)
        o.open_into(counter, buf, buf, tag)
        assert buf == msg


def test_a_closed_sealer_refuses() -> None:
    s, _ = pair()
    s.close()
    s.close()
    with pytest.raises(AeadError, match="closed"):
        s.seal(b"x")


# ------------------------------------------------------------ gathered blocks


def test_blocks_gathered_from_a_mapping_seal_and_open_in_place() -> None:
    image = mmap.mmap(-1, 64 * PAGE)
    image[:] = os.urandom(len(image))
    img_c = ffi.from_buffer("uint8_t[]", image)
    base = int(ffi.cast("uintptr_t", img_c))
    offsets = array("Q", [p * PAGE for p in (5, 6, 7, 1, 40, 63)])
    out = mmap.mmap(-1, 8 * PAGE)
    s, o = pair(channel=1)
    try:
        nbytes = len(offsets) * PAGE
        tag = memoryview(out)[nbytes:nbytes + TAG_LEN]
        counter = s.seal_gather(base, len(image), offsets, len(offsets), PAGE,
                                memoryview(out)[:nbytes], tag, aad=b"packet header")
        assert counter == 0
        view = memoryview(out)[:nbytes]
        o.open_into(0, view, view, bytes(tag), aad=b"packet header")
        assert out[:nbytes] == b"".join(image[q:q + PAGE] for q in offsets)
        del view, tag
    finally:
        ffi.release(img_c)
        image.close()
        out.close()


def test_a_gather_outside_the_mapping_is_refused_and_uses_no_counter() -> None:
    image = mmap.mmap(-1, 4 * PAGE)
    img_c = ffi.from_buffer("uint8_t[]", image)
    base = int(ffi.cast("uintptr_t", img_c))
    s, _ = pair()
    out = bytearray(2 * PAGE)
    try:
        with pytest.raises(AeadError, match="outside the mapping"):
            s.seal_gather(base, len(image), array("Q", [0, 4 * PAGE]), 2, PAGE, out,
                          bytearray(TAG_LEN))
        with pytest.raises(AeadError, match="too small"):
            s.seal_gather(base, len(image), array("Q", [0, PAGE, 2 * PAGE]), 3, PAGE, out,
                          bytearray(TAG_LEN))
        assert out == bytes(2 * PAGE)
        assert s.next_counter == 0
    finally:
        ffi.release(img_c)
        image.close()


def test_offsets_shorter_than_the_count_are_refused_in_python() -> None:
    s, _ = pair()
    with pytest.raises(ValueError, match="1 offsets for 2 blocks"):
        s.seal_gather(0, PAGE, array("Q", [0]), 2, PAGE, bytearray(2 * PAGE),
                      bytearray(TAG_LEN))


def test_the_c_path_takes_a_cffi_array_and_a_tag_pointer_just_past_the_ciphertext() -> None:
    image = mmap.mmap(-1, 8 * PAGE)
    image[:] = os.urandom(len(image))
    img_c = ffi.from_buffer("uint8_t[]", image)
    base = int(ffi.cast("uintptr_t", img_c))
    offsets = ffi.new("uint64_t[]", [2 * PAGE, 0])
    out = ffi.new("uint8_t[]", 2 * PAGE + TAG_LEN)
    s, o = pair()
    try:
        s.seal_gather(base, len(image), offsets, 2, PAGE, out, out + 2 * PAGE)
        o.open_into(0, ffi.buffer(out, 2 * PAGE), ffi.buffer(out, 2 * PAGE),
                    ffi.buffer(out + 2 * PAGE, TAG_LEN))
        assert ffi.buffer(out, 2 * PAGE)[:] == image[2 * PAGE:3 * PAGE] + image[:PAGE]
    finally:
        ffi.release(img_c)
        image.close()


def test_a_lead_and_gathered_blocks_are_one_sealed_unit_opened_in_place() -> None:
    """seal_gather's lead and its blocks seal as one message into one buffer, the tag
    after them; it opens in place as a whole, and nothing else opens it: not another
    counter, not a byte changed in the lead, the blocks or the AAD."""
    image = mmap.mmap(-1, 16 * PAGE)
    image[:] = os.urandom(len(image))
    img_c = ffi.from_buffer("uint8_t[]", image)
    base = int(ffi.cast("uintptr_t", img_c))
    offsets = array("Q", [3 * PAGE, 4 * PAGE, 9 * PAGE])
    lead = offsets.tobytes() + b"zero page offsets"
    n = len(lead) + 3 * PAGE
    buf = ffi.new("uint8_t[]", n + TAG_LEN)
    try:
        s, o = pair(channel=2)
        assert s.seal_gather(base, len(image), offsets, 3, PAGE, buf, buf + n, aad=b"hdr",
                             lead=lead) == 0
        sealed = bytes(ffi.buffer(buf, n + TAG_LEN))
        o.open_in_place(0, buf, n, aad=b"hdr")
        assert bytes(ffi.buffer(buf, n)) == lead + b"".join(image[q:q + PAGE] for q in offsets)
        for where in (0, len(lead) + 5, n + 3):  # the lead, a page, the tag
            _, o2 = pair(channel=2)
            bad = bytearray(sealed)
            bad[where] ^= 1
            ffi.memmove(buf, bytes(bad), len(bad))
            with pytest.raises(AuthenticationFailed):
                o2.open_in_place(0, buf, n, aad=b"hdr")
            assert bytes(ffi.buffer(buf, n)) == bytes(n)  # zeros, never unverified bytes
        _, o3 = pair(channel=2)
        ffi.memmove(buf, sealed, len(sealed))
        with pytest.raises(AuthenticationFailed):
            o3.open_in_place(0, buf, n, aad=b"hdR")
        _, o4 = pair(channel=2)
        with pytest.raises(OutOfOrder):
            o4.open_in_place(1, buf, n, aad=b"hdr")
    finally:
        ffi.release(img_c)
        image.close()


class PacketImage:
    """A mapping of random pages to seal packets from, and a packet's buffer."""

    def __init__(self, pages: int = 16) -> None:
        self.mm = mmap.mmap(-1, pages * PAGE)
        self.mm[:] = os.urandom(len(self.mm))
        self.c = ffi.from_buffer("uint8_t[]", self.mm)
        self.base = int(ffi.cast("uintptr_t", self.c))

    def seal(self, s: Sealer, pages: list[int], lead: bytes, aad: bytes = b"hdr") -> Any:
        offs = ffi.new("uint64_t[]", [p * PAGE for p in pages])
        n = len(lead) + len(pages) * PAGE + 2 * TAG_LEN
        buf = ffi.new("uint8_t[]", n)
        s.seal_packet(self.base, len(self.mm), offs, len(pages), PAGE, buf, n, aad=aad,
                      lead=lead)
        return buf

    def pages(self, pages: list[int]) -> bytes:
        return b"".join(self.mm[p * PAGE:(p + 1) * PAGE] for p in pages)

    def close(self) -> None:
        ffi.release(self.c)
        self.mm.close()


def test_a_packet_seals_as_offsets_then_pages_each_with_its_tag_under_one_counter() -> None:
    """seal_packet's layout: lead ciphertext | tag | page ciphertext | tag. The opener
    takes the lead, then the pages, in place or straight into a mapping, and the pair
    uses up one counter: the next packet opens under the next."""
    img, dst = PacketImage(), PacketImage()
    lead = b"offsets of three pages: 24 bytes"[:24]
    s, o = pair(channel=3)
    try:
        first = img.seal(s, [3, 4, 9], lead)
        second = img.seal(s, [0], lead[:8])
        assert s.next_counter == 2
        o.open_lead(0, first, 24, aad=b"hdr")
        assert ffi.buffer(first, 24)[:] == lead
        o.open_pages(0, first + 24 + TAG_LEN, 3 * PAGE, aad=b"hdr")
        assert ffi.buffer(first + 24 + TAG_LEN, 3 * PAGE)[:] == img.pages([3, 4, 9])
        o.open_lead(1, second, 8, aad=b"hdr")
        before = bytes(dst.mm)
        o.open_pages(1, second + 8 + TAG_LEN, PAGE, aad=b"hdr",
                     into=(dst.base, len(dst.mm), ffi.new("uint64_t[]", [5 * PAGE]), 1, PAGE))
        assert dst.mm[5 * PAGE:6 * PAGE] == img.pages([0])
        assert dst.mm[:5 * PAGE] == before[:5 * PAGE]
        assert dst.mm[6 * PAGE:] == before[6 * PAGE:]
        assert o.expected_counter == 2
    finally:
        img.close()
        dst.close()


@pytest.mark.parametrize("where", ["lead", "lead tag", "page", "page tag", "swapped"])
def test_a_changed_part_of_a_packet_fails_at_the_step_that_opens_it(where: str) -> None:
    """The lead's tag is checked before anything is decided from the offsets, the pages'
    tag after their decryption (which leaves zeros on failure). The two messages have
    their own nonces: the page data does not open as a lead, nor the lead as page data."""
    img = PacketImage()
    lead = bytes(range(16))
    s, o = pair()
    try:
        buf = img.seal(s, [1, 2], lead)
        pages_at = 16 + TAG_LEN
        if where == "swapped":  # the lead's ciphertext and tag where the pages' should be
            with pytest.raises(AuthenticationFailed, match="offsets"):
                o.open_lead(0, buf + pages_at, 16, aad=b"hdr")
            return
        flip = {"lead": 3, "lead tag": 16 + 2, "page": pages_at + PAGE + 7,
                "page tag": pages_at + 2 * PAGE + 1}[where]
        buf[flip] ^= 0x20
        if where.startswith("lead"):
            with pytest.raises(AuthenticationFailed, match=r"packet 0 \(offsets\)"):
                o.open_lead(0, buf, 16, aad=b"hdr")
        else:
            o.open_lead(0, buf, 16, aad=b"hdr")
            with pytest.raises(AuthenticationFailed, match=r"packet 0 \(page data\)"):
                o.open_pages(0, buf + pages_at, 2 * PAGE, aad=b"hdr")
            assert ffi.buffer(buf + pages_at, 2 * PAGE)[:] == bytes(2 * PAGE)
        with pytest.raises(AeadError, match="earlier failure"):
            o.open_in_place(1, buf, 0, aad=b"hdr")
    finally:
        img.close()


def test_the_two_steps_of_a_packet_are_taken_in_order_and_never_mixed() -> None:
    img = PacketImage()
    try:
        s, o = pair()
        buf = img.seal(s, [1], bytes(8))
        with pytest.raises(AeadError, match="before its packet's offsets"):
            o.open_pages(0, buf + 8 + TAG_LEN, PAGE, aad=b"hdr")
        s, o = pair()
        buf = img.seal(s, [1], bytes(8))
        sync = ffi.new("uint8_t[]", TAG_LEN)
        o.open_lead(0, buf, 8, aad=b"hdr")
        # A SYNC (or another lead) where this packet's page data belongs.
        with pytest.raises(AeadError, match="page data was never opened"):
            o.open_in_place(1, sync, 0, aad=b"sync")
        assert o.failed
    finally:
        img.close()


def test_a_packet_that_cannot_be_sealed_uses_no_counter() -> None:
    img = PacketImage(4)
    s, _ = pair()
    try:
        out = ffi.new("uint8_t[]", 2 * PAGE + 8 + 2 * TAG_LEN)
        with pytest.raises(AeadError, match="outside the mapping"):
            s.seal_packet(img.base, len(img.mm), ffi.new("uint64_t[]", [0, 4 * PAGE]), 2,
                          PAGE, out, len(out), aad=b"", lead=bytes(8))
        with pytest.raises(AeadError, match="does not fit"):
            s.seal_packet(img.base, len(img.mm), ffi.new("uint64_t[]", [0, PAGE]), 2, PAGE,
                          out, len(out) - 1, aad=b"", lead=bytes(8))
        assert s.next_counter == 0
        assert ffi.buffer(out)[:] == bytes(len(out))
        main, _ = pair(channel=None)
        with pytest.raises(AeadError, match="no page-data nonces"):
            main.seal_packet(img.base, len(img.mm), ffi.new("uint64_t[]", [0]), 1, PAGE,
                             out, len(out), aad=b"", lead=bytes(8))
    finally:
        img.close()


def test_page_data_nonces_differ_from_every_other_nonce_of_the_session() -> None:
    prefixes = [StreamId(d, c).prefix for d in Direction for c in (None, 0, 1, 255)]
    pages = [StreamId(d, c).pages_prefix for d in Direction for c in (0, 1, 255)]
    assert len(set(prefixes + pages)) == len(prefixes) + len(pages)
    assert StreamId(S2D, None).pages_prefix is None


def test_open_in_place_takes_a_cffi_buffer_with_room_for_the_tag() -> None:
    _, o = pair()
    with pytest.raises(TypeError):
        o.open_in_place(0, bytearray(64), 32)
    with pytest.raises(ValueError, match="16-byte tag"):
        o.open_in_place(0, ffi.new("uint8_t[]", 40), 32)


def test_a_session_gives_out_one_sealer_per_stream() -> None:
    keys = session()
    keys.sealer(S2D, 0)
    with pytest.raises(AeadError, match="already gave out its sealer"):
        keys.sealer(S2D, 0)
    keys.sealer(S2D, 1)
    keys.sealer(D2S, 0)
    keys.sealer(S2D, None)
    keys.opener(S2D, 0)
    keys.opener(S2D, 0)  # opening twice reuses no nonce
