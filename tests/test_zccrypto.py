"""native/zccrypto.c: AES-128-OCB, AES-128-GCM and HKDF-SHA256 through OpenSSL, called
directly.

Known answers from RFC 7253 appendix A (OCB), the GCM specification (McGrew and Viega, test
cases 1-4, also NIST SP 800-38D's) and RFC 5869 appendix A; tampering; the bounds of the
fused gather-and-seal and of its inverse, the open that scatters pages into a mapping, with
either cipher.
"""

from __future__ import annotations

import hashlib
import hmac
import mmap
import os
import threading
from array import array
from pathlib import Path
from typing import Any

import pytest

from zcmigrate.native import ffi, lib

PAGE = 4096
# The GCM specification's (McGrew and Viega) AES-128 test cases 1-4, 96-bit IVs.
K16 = bytes.fromhex("feffe9928665731c6d6a8f9467308308")
IV16 = bytes.fromhex("cafebabefacedbaddecaf888")
P16 = bytes.fromhex(
    "d9313225f88406e5a55909c5aff5269a86a7a9531534f7da2e4c303d8a318a72"
    "1c3c0c95956809532fcf0e2449a6b525b16aedf5aa0de657ba637b39"
)
A16 = bytes.fromhex("feedfacedeadbeeffeedfacedeadbeefabaddad2")
C16 = bytes.fromhex(
    "42831ec2217774244b7221b784d0d49ce3aa212f2c02a4e035c17e2329aca12e"
    "21d514b25466931c7d8f6a5aac84aa051ba30b396a0aac973d58e091"
)
T16 = bytes.fromhex("5bc94fbc3221a5db94fae95ae7121a47")

# (key, iv, plaintext, aad, ciphertext, tag)
GCM_VECTORS = {
    "case 1: empty": (bytes(16), bytes(12), b"", b"", b"",
                      bytes.fromhex("58e2fccefa7e3061367f1d57a4e7455a")),
    "case 2: one zero block": (bytes(16), bytes(12), bytes(16), b"",
                               bytes.fromhex("0388dace60b6a392f328c2b971b2fe78"),
                               bytes.fromhex("ab6e47d42cec13bdf53a67b21257bddf")),
    "case 3: four blocks": (
        K16, IV16, P16 + bytes.fromhex("1aafd255"), b"",
        C16 + bytes.fromhex("473f5985"), bytes.fromhex("4d5c2af327cd64a62cf35abd2ba6fab4")),
    "case 4: partial block and AAD": (K16, IV16, P16, A16, C16, T16),
}


# RFC 7253 appendix A, AES-128, 128-bit tags: (nonce, aad, plaintext, ciphertext || tag).
OCB_KEY = bytes(range(16))
OCB_VECTORS = [
    ("bbaa99887766554433221100", "", "", "785407bfffc8ad9edcc5520ac9111ee6"),
    ("bbaa99887766554433221101", "0001020304050607", "0001020304050607",
     "6820b3657b6f615a5725bda0d3b4eb3a257c9af1f8f03009"),
    ("bbaa99887766554433221102", "0001020304050607", "", "81017f8203f081277152fade694a0a00"),
    ("bbaa99887766554433221103", "", "0001020304050607",
     "45dd69f8f5aae72414054cd1f35d82760b2cd00d2f99bfa9"),
    ("bbaa99887766554433221104", "000102030405060708090a0b0c0d0e0f",
     "000102030405060708090a0b0c0d0e0f",
     "571d535b60b277188be5147170a9a22c3ad7a4ff3835b8c5701c1ccec8fc3358"),
]
CIPHER_IDS = {"ocb": lib.ZCC_AES_128_OCB, "gcm": lib.ZCC_AES_128_GCM}


@pytest.fixture(params=list(CIPHER_IDS))
def cipher(request: pytest.FixtureRequest) -> int:
    """Either AEAD, for the tests that hold for both."""
    return int(CIPHER_IDS[request.param])


def aead(key: bytes, cipher: int = lib.ZCC_AES_128_GCM) -> Any:
    ctx = lib.zcc_aead_new(key, len(key), cipher)
    assert ctx != ffi.NULL
    return ffi.gc(ctx, lib.zcc_aead_free)


def seal(ctx: Any, nonce: bytes, aad: bytes, data: bytes) -> tuple[int, bytes, bytes]:
    out = bytearray(len(data))
    tag = bytearray(16)
    rc = lib.zcc_seal(ctx, nonce, aad, len(aad), data, ffi.from_buffer("uint8_t[]", out),
                      len(data), ffi.from_buffer("uint8_t[]", tag))
    return rc, bytes(out), bytes(tag)


def open_(ctx: Any, nonce: bytes, aad: bytes, data: bytes, tag: bytes) -> tuple[int, bytes]:
    """Open in place, as a receiver does; returns the code and what the buffer holds."""
    buf = bytearray(data)
    c = ffi.from_buffer("uint8_t[]", buf)
    rc = lib.zcc_open(ctx, nonce, aad, len(aad), c, c, len(buf), tag)
    return rc, bytes(buf)


# ------------------------------------------------------------------ known answers


@pytest.mark.parametrize("name", list(GCM_VECTORS))
def test_gcm_spec_vectors_seal_and_open(name: str) -> None:
    key, iv, pt, aad, ct, tag = GCM_VECTORS[name]
    ctx = aead(key)
    assert seal(ctx, iv, aad, pt) == (0, ct, tag)
    assert open_(ctx, iv, aad, ct, tag) == (0, pt)


@pytest.mark.parametrize("vector", OCB_VECTORS, ids=[v[0][-2:] for v in OCB_VECTORS])
def test_rfc7253_vectors_seal_and_open(vector: tuple[str, str, str, str]) -> None:
    nonce, aad, pt, sealed = (bytes.fromhex(x) for x in vector)
    ctx = aead(OCB_KEY, lib.ZCC_AES_128_OCB)
    ct, tag = sealed[:-16], sealed[-16:]
    assert seal(ctx, nonce, aad, pt) == (0, ct, tag)
    assert open_(ctx, nonce, aad, ct, tag) == (0, pt)


def test_one_ocb_context_seals_and_opens_in_turn_with_its_keys_set_once() -> None:
    """OCB decrypts with AES's inverse cipher: a context keyed once must still open after
    sealing, and seal after opening, every vector in both orders."""
    ctx = aead(OCB_KEY, lib.ZCC_AES_128_OCB)
    for _ in range(2):
        for vector in OCB_VECTORS + OCB_VECTORS[::-1]:
            nonce, aad, pt, sealed = (bytes.fromhex(x) for x in vector)
            assert seal(ctx, nonce, aad, pt) == (0, sealed[:-16], sealed[-16:])
            assert open_(ctx, nonce, aad, sealed[:-16], sealed[-16:]) == (0, pt)


@pytest.mark.parametrize("n", [*range(0, 49), 4095, 4096, 4097])
def test_every_length_round_trips_in_place_with_the_tag_after_it(cipher: int, n: int) -> None:
    """OCB holds back a partial last block until its Final: every length, block-aligned or
    not, comes back whole, sealed and opened in place as the main channel's records are."""
    ctx = aead(K16, cipher)
    data = os.urandom(n)
    buf = bytearray(data + bytes(16))
    c = ffi.from_buffer("uint8_t[]", buf)
    assert lib.zcc_seal(ctx, IV16, A16, len(A16), c, c, n, c + n) == 0
    assert n == 0 or bytes(buf[:n]) != data
    assert lib.zcc_open(ctx, IV16, A16, len(A16), c, c, n, c + n) == 0
    assert bytes(buf[:n]) == data


def test_the_two_ciphers_differ_and_an_unknown_one_gives_no_context() -> None:
    ocb, gcm = aead(K16, lib.ZCC_AES_128_OCB), aead(K16, lib.ZCC_AES_128_GCM)
    rc1, ct1, tag1 = seal(ocb, IV16, A16, P16)
    rc2, ct2, tag2 = seal(gcm, IV16, A16, P16)
    assert rc1 == rc2 == 0 and ct1 != ct2 and tag1 != tag2
    # A message sealed under one cipher never opens under the other, even with one key.
    assert open_(gcm, IV16, A16, ct1, tag1)[0] == lib.ZCC_EAUTH
    assert open_(ocb, IV16, A16, ct2, tag2)[0] == lib.ZCC_EAUTH
    for bad in (0, 3, -1):
        assert lib.zcc_aead_new(K16, 16, bad) == ffi.NULL


def test_one_context_seals_many_messages_with_the_key_set_once() -> None:
    """Only the IV changes between messages: cases 3 and 4 share a key and a context,
    in both orders, with opens in between."""
    ctx = aead(K16)
    _, _, p15, _, c15, t15 = GCM_VECTORS["case 3: four blocks"]
    for _ in range(2):
        assert seal(ctx, IV16, A16, P16) == (0, C16, T16)
        assert open_(ctx, IV16, b"", c15, t15) == (0, p15)
        assert seal(ctx, IV16, b"", p15) == (0, c15, t15)
        assert open_(ctx, IV16, A16, C16, T16) == (0, P16)


def test_sealing_in_place_gives_the_same_bytes() -> None:
    ctx = aead(K16)
    buf = bytearray(P16)
    tag = bytearray(16)
    c = ffi.from_buffer("uint8_t[]", buf)
    assert lib.zcc_seal(ctx, IV16, A16, len(A16), c, c, len(buf),
                        ffi.from_buffer("uint8_t[]", tag)) == 0
    assert (bytes(buf), bytes(tag)) == (C16, T16)


def test_a_tag_appended_right_after_the_ciphertext_opens_in_place() -> None:
    ctx = aead(K16)
    buf = bytearray(C16 + T16)
    c = ffi.from_buffer("uint8_t[]", buf)
    assert lib.zcc_open(ctx, IV16, A16, len(A16), c, c, len(C16), c + len(C16)) == 0
    assert bytes(buf[:len(C16)]) == P16


# ---------------------------------------------------------------------- tampering


def _flip(b: bytes, bit: int) -> bytes:
    x = bytearray(b)
    x[bit // 8] ^= 1 << (bit % 8)
    return bytes(x)


@pytest.mark.parametrize("where", ["ciphertext", "tag", "aad", "nonce"])
@pytest.mark.parametrize("bit", [0, 77, -1])
def test_one_flipped_bit_fails_authentication_and_leaves_zeros(cipher: int, where: str,
                                                               bit: int) -> None:
    ctx = aead(K16, cipher)
    rc, good_ct, good_tag = seal(ctx, IV16, A16, P16)
    assert rc == 0
    ct, tag, aad, nonce = good_ct, good_tag, A16, IV16
    n = {"ciphertext": len(ct), "tag": 16, "aad": len(aad), "nonce": 12}[where] * 8
    b = bit % n
    if where == "ciphertext":
        ct = _flip(ct, b)
    elif where == "tag":
        tag = _flip(tag, b)
    elif where == "aad":
        aad = _flip(aad, b)
    else:
        nonce = _flip(nonce, b)
    rc, left = open_(ctx, nonce, aad, ct, tag)
    assert rc == lib.ZCC_EAUTH
    # No unverified plaintext survives: the buffer is all zeros.
    assert left == bytes(len(ct))
    # The context is still good for the next, genuine message.
    assert open_(ctx, IV16, A16, good_ct, good_tag) == (0, P16)


def test_missing_or_extra_aad_and_a_wrong_key_fail_authentication() -> None:
    assert open_(aead(K16), IV16, b"", C16, T16)[0] == lib.ZCC_EAUTH
    assert open_(aead(K16), IV16, A16 + b"\0", C16, T16)[0] == lib.ZCC_EAUTH
    assert open_(aead(_flip(K16, 3)), IV16, A16, C16, T16)[0] == lib.ZCC_EAUTH
    assert open_(aead(K16), IV16, A16, C16[:-1], T16)[0] == lib.ZCC_EAUTH


def test_a_failed_open_into_a_separate_buffer_zeroes_that_buffer_only() -> None:
    ctx = aead(K16)
    src = bytearray(C16)
    dst = bytearray(b"\xaa" * len(C16))
    rc = lib.zcc_open(ctx, IV16, A16, len(A16), ffi.from_buffer("uint8_t[]", src),
                      ffi.from_buffer("uint8_t[]", dst), len(src), _flip(T16, 5))
    assert rc == lib.ZCC_EAUTH
    assert bytes(dst) == bytes(len(dst)) and bytes(src) == C16


# ------------------------------------------------------------------- arguments


def test_a_key_of_the_wrong_length_gives_no_context() -> None:
    """AES-128 session keys only: not a shared key's 32 bytes (AES-256), nor 15 or 17."""
    for n in (15, 17, 32):
        for c in CIPHER_IDS.values():
            assert lib.zcc_aead_new(bytes(n), n, c) == ffi.NULL


def test_shifted_overlap_of_input_and_output_is_refused() -> None:
    ctx = aead(K16)
    buf = bytearray(128)
    c = ffi.from_buffer("uint8_t[]", buf)
    tag = ffi.new("uint8_t[16]")
    assert lib.zcc_seal(ctx, IV16, b"", 0, c, c + 1, 64, tag) == lib.ZCC_EINVAL
    assert lib.zcc_open(ctx, IV16, b"", 0, c + 1, c, 64, tag) == lib.ZCC_EINVAL
    # A tag written over the ciphertext it belongs to is refused too.
    assert lib.zcc_seal(ctx, IV16, b"", 0, c, c, 64, c + 60) == lib.ZCC_EINVAL


def test_a_context_used_by_two_threads_at_once_refuses_the_second() -> None:
    """cffi releases the GIL, and an EVP_CIPHER_CTX is not thread-safe: the second
    caller gets ZCC_EBUSY instead of corrupting the first one's stream."""
    ctx = aead(K16)
    big = mmap.mmap(-1, 64 << 20)
    big_c = ffi.from_buffer("uint8_t[]", big)
    tag = ffi.new("uint8_t[16]")
    done = threading.Event()
    codes: list[int] = []

    def long_seal() -> None:
        codes.append(lib.zcc_seal(ctx, IV16, b"", 0, big_c, big_c, len(big), tag))
        done.set()

    t = threading.Thread(target=long_seal)
    t.start()
    busy = 0
    small_tag = ffi.new("uint8_t[16]")
    while not done.is_set():
        out = ffi.new("uint8_t[16]")
        rc = lib.zcc_seal(ctx, bytes(12), b"", 0, bytes(16), out, 16, small_tag)
        busy += rc == lib.ZCC_EBUSY
    t.join()
    assert codes == [0]
    assert busy > 0
    # The long seal was not disturbed: it opens.
    assert lib.zcc_open(ctx, IV16, b"", 0, big_c, big_c, len(big), tag) == 0
    assert big[:4096] == bytes(4096)
    ffi.release(big_c)
    big.close()


# --------------------------------------------------------------- gathered pages


class Image:
    """A mapping of `pages` random pages, of which the first `size_pages` are the image;
    the rest stand for whatever lies beside it (it must never leave)."""

    def __init__(self, pages: int = 16, size_pages: int = 12) -> None:
        self.mm = mmap.mmap(-1, pages * PAGE)
        self.mm[:] = os.urandom(pages * PAGE)
        self.c = ffi.from_buffer("uint8_t[]", self.mm)
        self.base = int(ffi.cast("uintptr_t", self.c))
        self.size = size_pages * PAGE

    def page(self, off: int) -> bytes:
        return bytes(self.mm[off:off + PAGE])

    def close(self) -> None:
        ffi.release(self.c)
        self.mm.close()


GUARD = b"\x5a" * PAGE


def seal_pages(ctx: Any, img: Image, offsets: list[int], capacity: int, *,
               aad: bytes = b"", nonce: bytes = IV16, page_size: int = PAGE,
               lead: bytes = b"") -> tuple[int, bytes, bytes, bytes]:
    """(rc, output, tag, guard): the output buffer is followed by a guard region that
    must come back unchanged whatever the call does."""
    out = bytearray(b"\xee" * capacity + GUARD)
    tag = bytearray(b"\xee" * 16)
    offs = array("Q", offsets)
    rc = lib.zcc_seal_pages(ctx, nonce, aad, len(aad), lead, len(lead), img.base, img.size,
                            ffi.from_buffer("uint64_t[]", offs), len(offs), page_size,
                            ffi.from_buffer("uint8_t[]", out), capacity,
                            ffi.from_buffer("uint8_t[]", tag))
    return rc, bytes(out[:capacity]), bytes(tag), bytes(out[capacity:])


def test_sealed_pages_equal_a_seal_of_the_same_pages_laid_end_to_end(cipher: int) -> None:
    """The fused gather-and-seal is the plain seal of the gathered bytes: adjacent runs,
    single pages, out of order and repeated pages alike."""
    img = Image()
    ctx = aead(K16, cipher)
    offsets = [3 * PAGE, 4 * PAGE, 5 * PAGE, 0, 9 * PAGE, 11 * PAGE, 10 * PAGE, 0]
    try:
        rc, out, tag, guard = seal_pages(ctx, img, offsets, len(offsets) * PAGE, aad=A16)
        assert rc == 0 and guard == GUARD
        plain = b"".join(img.page(o) for o in offsets)
        assert seal(ctx, IV16, A16, plain) == (0, out, tag)
        assert open_(ctx, IV16, A16, out, tag) == (0, plain)
    finally:
        img.close()


def test_a_lead_and_pages_seal_as_one_message(cipher: int) -> None:
    """A packet's offsets (the lead) and its gathered pages are one AEAD message: the plain
    seal of lead || pages, opened under one tag. 24 bytes of lead end mid-block, so OCB
    carries 8 of them into the first run of pages."""
    img = Image()
    ctx = aead(K16, cipher)
    lead = os.urandom(24)
    offsets = [2 * PAGE, 3 * PAGE, 7 * PAGE]
    try:
        rc, out, tag, guard = seal_pages(ctx, img, offsets, 24 + 3 * PAGE, aad=A16, lead=lead)
        assert rc == 0 and guard == GUARD
        plain = lead + b"".join(img.page(o) for o in offsets)
        assert seal(ctx, IV16, A16, plain) == (0, out, tag)
        # A lead alone (a packet of zero pages only) is a plain seal of it too.
        rc, out, tag, _ = seal_pages(ctx, img, [], 24, aad=A16, lead=lead)
        assert rc == 0 and seal(ctx, IV16, A16, lead) == (0, out, tag)
    finally:
        img.close()


def test_the_lead_counts_against_the_output_and_may_not_overlap_it() -> None:
    img = Image()
    ctx = aead(K16)
    try:
        rc, out, tag, guard = seal_pages(ctx, img, [0], PAGE + 7, lead=bytes(8))
        assert rc == lib.ZCC_EBOUNDS and out == b"\xee" * (PAGE + 7) and guard == GUARD
        assert tag == b"\xee" * 16
        buf = ffi.new("uint8_t[]", 64 + PAGE)
        offs = ffi.new("uint64_t[]", [0])
        tag_c = ffi.new("uint8_t[16]")
        # Sealed in place (lead == out) is fine; shifted by one, refused.
        assert lib.zcc_seal_pages(ctx, IV16, b"", 0, buf, 8, img.base, img.size, offs, 1,
                                  PAGE, buf, 64 + PAGE, tag_c) == 0
        assert lib.zcc_seal_pages(ctx, IV16, b"", 0, buf + 1, 8, img.base, img.size, offs,
                                  1, PAGE, buf, 64 + PAGE, tag_c) == lib.ZCC_EINVAL
    finally:
        img.close()


def test_no_pages_seal_to_the_tag_of_an_empty_message() -> None:
    img = Image()
    try:
        rc, _, tag, _ = seal_pages(aead(bytes(16)), img, [], 0, nonce=bytes(12))
        assert (rc, tag) == (0, GCM_VECTORS["case 1: empty"][5])
    finally:
        img.close()


@pytest.mark.parametrize("bad", [
    12 * PAGE,                # the first page past the image (mapped: it must not leak)
    15 * PAGE,                # further out, still mapped
    11 * PAGE + 1,            # inside but not page-aligned
    2**63,                    # far outside
    2**64 - PAGE,             # off + page_size would wrap around
])
def test_an_offset_outside_the_image_is_refused_with_nothing_read_or_written(bad: int) -> None:
    img = Image()
    try:
        rc, out, tag, guard = seal_pages(aead(K16), img, [0, PAGE, bad], 3 * PAGE)
        assert rc == lib.ZCC_EBOUNDS
        assert out == b"\xee" * (3 * PAGE) and tag == b"\xee" * 16 and guard == GUARD
    finally:
        img.close()


@pytest.mark.parametrize("short", [1, PAGE, 3 * PAGE])
def test_an_output_too_small_is_refused_and_nothing_lands_past_its_end(short: int) -> None:
    img = Image()
    try:
        cap = 3 * PAGE - short
        rc, out, tag, guard = seal_pages(aead(K16), img, [0, PAGE, 2 * PAGE], cap)
        assert rc == lib.ZCC_EBOUNDS
        assert out == b"\xee" * cap and tag == b"\xee" * 16 and guard == GUARD
    finally:
        img.close()


def test_an_output_larger_than_needed_is_written_only_as_far_as_the_pages() -> None:
    img = Image()
    try:
        rc, out, _, guard = seal_pages(aead(K16), img, [PAGE, 0], 4 * PAGE)
        assert rc == 0 and guard == GUARD
        assert out[2 * PAGE:] == b"\xee" * (2 * PAGE)
    finally:
        img.close()


def test_a_zero_page_size_or_an_output_inside_the_image_is_refused() -> None:
    img = Image()
    ctx = aead(K16)
    tag = ffi.new("uint8_t[16]")
    offs = ffi.new("uint64_t[]", [0])
    try:
        assert seal_pages(ctx, img, [0], PAGE, page_size=0)[0] == lib.ZCC_EINVAL
        # Ciphertext written over the pages it is reading: refused.
        assert lib.zcc_seal_pages(ctx, IV16, b"", 0, b"", 0, img.base, img.size, offs, 1,
                                  PAGE, img.c + 2 * PAGE, PAGE, tag) == lib.ZCC_EINVAL
    finally:
        img.close()


# ------------------------------------------------ open pages straight into a mapping


def open_pages(ctx: Any, img: Image, offsets: list[int], sealed: bytes, tag: bytes, *,
               aad: bytes = b"", in_len: int | None = None) -> int:
    offs = array("Q", offsets)
    return int(lib.zcc_open_pages(ctx, IV16, aad, len(aad), sealed,
                                  len(sealed) if in_len is None else in_len, img.base,
                                  img.size, ffi.from_buffer("uint64_t[]", offs), len(offs),
                                  PAGE, tag))


def test_pages_open_straight_into_their_places_in_the_mapping(cipher: int) -> None:
    """zcc_open_pages is the inverse of zcc_seal_pages: each page lands at its offset (runs,
    single pages, out of order), the pages between them and past the image keep theirs."""
    src, dst = Image(), Image()
    ctx = aead(K16, cipher)
    offsets = [3 * PAGE, 4 * PAGE, 0, 9 * PAGE, 11 * PAGE]
    try:
        rc, sealed, tag, _ = seal_pages(ctx, src, offsets, len(offsets) * PAGE, aad=A16)
        assert rc == 0
        before = bytes(dst.mm)
        assert open_pages(ctx, dst, offsets, sealed, tag, aad=A16) == 0
        for i in range(16):
            want = src.page(i * PAGE) if i * PAGE in offsets else before[i * PAGE:(i + 1) * PAGE]
            assert dst.page(i * PAGE) == want, f"page {i}"
    finally:
        src.close()
        dst.close()


@pytest.mark.parametrize("what", ["ciphertext", "tag", "aad"])
def test_pages_that_fail_their_tag_are_zeroed_in_the_mapping_and_only_they(cipher: int,
                                                                          what: str) -> None:
    src, dst = Image(), Image()
    ctx = aead(K16, cipher)
    offsets = [PAGE, 2 * PAGE, 7 * PAGE]
    try:
        rc, sealed, tag, _ = seal_pages(ctx, src, offsets, 3 * PAGE, aad=A16)
        assert rc == 0
        aad = A16
        if what == "ciphertext":
            sealed = _flip(sealed, 8 * (PAGE + 5))
        elif what == "tag":
            tag = _flip(tag, 3)
        else:
            aad = _flip(A16, 0)
        before = bytes(dst.mm)
        assert open_pages(ctx, dst, offsets, sealed, tag, aad=aad) == lib.ZCC_EAUTH
        for i in range(16):
            want = bytes(PAGE) if i * PAGE in offsets else before[i * PAGE:(i + 1) * PAGE]
            assert dst.page(i * PAGE) == want, f"page {i}"
    finally:
        src.close()
        dst.close()


def test_pages_that_are_not_whole_cipher_blocks_are_refused_before_anything_is_written(
        cipher: int) -> None:
    """A page of 8 bytes would make OCB give back a run longer or shorter than the run:
    the scatter refuses such a page size before it decrypts a byte."""
    dst = Image()
    try:
        before = bytes(dst.mm)
        offs = array("Q", [0, 8])
        rc = lib.zcc_open_pages(aead(K16, cipher), IV16, b"", 0, bytes(16), 16, dst.base,
                                dst.size, ffi.from_buffer("uint64_t[]", offs), 2, 8,
                                bytes(16))
        assert rc == lib.ZCC_EINVAL and bytes(dst.mm) == before
    finally:
        dst.close()


@pytest.mark.parametrize("bad", [12 * PAGE, 11 * PAGE + 1, 2**63, 2**64 - PAGE])
def test_opening_pages_outside_the_image_is_refused_with_nothing_written(bad: int) -> None:
    dst = Image()
    try:
        before = bytes(dst.mm)
        rc = open_pages(aead(K16), dst, [0, bad], bytes(2 * PAGE), bytes(16))
        assert rc == lib.ZCC_EBOUNDS and bytes(dst.mm) == before
    finally:
        dst.close()


@pytest.mark.parametrize("in_len", [2 * PAGE - 1, 2 * PAGE + 1, 0])
def test_ciphertext_not_exactly_the_pages_is_refused_with_nothing_written(in_len: int) -> None:
    dst = Image()
    try:
        before = bytes(dst.mm)
        rc = open_pages(aead(K16), dst, [0, PAGE], bytes(3 * PAGE), bytes(16), in_len=in_len)
        assert rc == lib.ZCC_EBOUNDS and bytes(dst.mm) == before
    finally:
        dst.close()


def test_ciphertext_or_tag_inside_the_image_is_refused() -> None:
    dst = Image()
    ctx = aead(K16)
    offs = ffi.new("uint64_t[]", [0])
    try:
        before = bytes(dst.mm)
        assert lib.zcc_open_pages(ctx, IV16, b"", 0, dst.c + 4 * PAGE, PAGE, dst.base,
                                  dst.size, offs, 1, PAGE, bytes(16)) == lib.ZCC_EINVAL
        assert lib.zcc_open_pages(ctx, IV16, b"", 0, bytes(PAGE), PAGE, dst.base, dst.size,
                                  offs, 1, PAGE, dst.c + 5 * PAGE) == lib.ZCC_EINVAL
        assert bytes(dst.mm) == before
    finally:
        dst.close()


# --------------------------------------------------------------------------- HKDF

RFC5869 = {
    "A.1 basic": (
        bytes([0x0B] * 22), bytes(range(0x0D)), bytes(range(0xF0, 0xFA)), 42,
        "3cb25f25faacd57a90434f64d0362f2a2d2d0a90cf1a5a4c5db02d56ecc4c5bf34007208d5b887185865"),
    "A.2 longer inputs": (
        bytes(range(0x50)), bytes(range(0x60, 0xB0)), bytes(range(0xB0, 0x100)), 82,
        "b11e398dc80327a1c8e7f78c596a49344f012eda2d4efad8a050cc4c19afa97c59045a99cac78272"
        "71cb41c65e590e09da3275600c2f09b8367793a9aca3db71cc30c58179ec3e87c14c01d5c1f3434f1d87"),
    "A.3 empty salt and info": (
        bytes([0x0B] * 22), b"", b"", 42,
        "8da4e775a563c18f715f802a063c5a31b8a11f5c5ee1879ec3454e5f3c738d2d9d201395faa4b61a96c8"),
}


def hkdf(salt: bytes, ikm: bytes, info: bytes, n: int) -> tuple[int, bytes]:
    out = ffi.new("uint8_t[]", max(n, 1))
    rc = lib.zcc_hkdf_sha256(salt, len(salt), ikm, len(ikm), info, len(info), out, n)
    return rc, bytes(ffi.buffer(out, n))


@pytest.mark.parametrize("name", list(RFC5869))
def test_rfc5869_hkdf_sha256_vectors(name: str) -> None:
    ikm, salt, info, n, okm = RFC5869[name]
    assert hkdf(salt, ikm, info, n) == (0, bytes.fromhex(okm))


def _hkdf_reference(salt: bytes, ikm: bytes, info: bytes, n: int) -> bytes:
    """RFC 5869 2.2 and 2.3 written out with the standard library's HMAC (a test oracle)."""
    prk = hmac.new(salt or bytes(32), ikm, hashlib.sha256).digest()
    okm, t = b"", b""
    for i in range(1, -(-n // 32) + 1):
        t = hmac.new(prk, t + info + bytes([i]), hashlib.sha256).digest()
        okm += t
    return okm[:n]


@pytest.mark.parametrize("n", [1, 32, 33, 100, 8160])
def test_hkdf_agrees_with_the_rfc_written_out(n: int) -> None:
    salt, ikm, info = os.urandom(64), os.urandom(32), os.urandom(57)
    assert hkdf(salt, ikm, info, n) == (0, _hkdf_reference(salt, ikm, info, n))


def test_hkdf_refuses_lengths_past_255_blocks_and_empty_input_key_material() -> None:
    assert hkdf(b"s", b"k", b"i", 8161)[0] == lib.ZCC_EINVAL
    assert hkdf(b"s", b"k", b"i", 0)[0] == lib.ZCC_EINVAL
    assert hkdf(b"s", b"", b"i", 32)[0] == lib.ZCC_EINVAL


def test_the_stale_build_fingerprint_covers_every_header() -> None:
    """native/__init__.py refuses a build older than any header (an editable install
    keeps the old .so after a header changes)."""
    native = Path(__file__).resolve().parent.parent / "native"
    h = hashlib.sha256()
    for name in ("zcnative.h", "zccrypto.h", "zcuffd.h"):
        h.update((native / name).read_bytes())
    assert int(h.hexdigest()[:12], 16) == lib.ZC_INTERFACE_HASH
