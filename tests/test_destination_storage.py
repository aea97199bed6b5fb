"""Where the destination's pages go: through the image file's descriptor (pwrite) on a tmpfs,
through a mapping elsewhere; either way a page sent again lands over its older copy, a page
sent as zero over a written one clears it, and the committed image says so."""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.migration_procs import Receiver
from tests.test_destination_protocol import (
    PAGE,
    SIZE,
    handshake,
    recv_record,
    rest_as_zero,
    stream,
)
from zcmigrate.migrate.incoming import WRITE_THROUGH_FD, filesystem_type, writes_through_fd
from zcmigrate.migrate.protocol import DeviceStateRecord, EndOfRam, MultifdFlush, RecordType


def test_dev_shm_is_tmpfs_which_is_written_through_the_descriptor() -> None:
    with tempfile.NamedTemporaryFile(dir="/dev/shm") as f:
        os.ftruncate(f.fileno(), 64 << 20)
        assert filesystem_type(f.fileno()) == "tmpfs"
        assert writes_through_fd(f.fileno())
    assert "tmpfs" in WRITE_THROUGH_FD


def test_a_huge_page_tmpfs_keeps_the_mapping(tmp_path: Path) -> None:
    """A tmpfs that allocates 2 MiB pages faults once per huge page: the receiver reads
    straight into the mapping there (one copy) rather than through pwrite (two)."""
    if os.geteuid() != 0:
        pytest.skip("mounting a tmpfs needs root")
    mnt = tmp_path / "huge"
    mnt.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=16M,huge=within_size", "tmpfs",
                    str(mnt)], check=True)
    try:
        fd = os.open(mnt / "img", os.O_RDWR | os.O_CREAT, 0o600)
        try:
            os.ftruncate(fd, 8 << 20)  # as create() does before it decides
            assert filesystem_type(fd) == "tmpfs"
            assert not writes_through_fd(fd)
        finally:
            os.close(fd)
    finally:
        subprocess.run(["umount", str(mnt)], check=True)


def test_any_mounted_file_has_a_file_system_type(tmp_path: Path) -> None:
    with open(tmp_path / "f", "wb") as f:
        assert filesystem_type(f.fileno()) != ""


def test_a_file_on_no_listed_mount_has_no_type_and_keeps_the_mapping() -> None:
    fd = os.memfd_create("image")  # the kernel's internal shm mount: not in mountinfo
    try:
        assert filesystem_type(fd) not in WRITE_THROUGH_FD
    finally:
        os.close(fd)


@pytest.fixture(params=["dev-shm", "tmp-path"])
def image_dir(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Path]:
    """/dev/shm (pwrite through the descriptor) and pytest's tmp_path (a mapping, unless
    it is a tmpfs too)."""
    if request.param == "tmp-path":
        yield tmp_path
        return
    d = Path(tempfile.mkdtemp(dir="/dev/shm", prefix="zcmigrate-test-"))
    yield d
    shutil.rmtree(d, ignore_errors=True)


def test_a_newer_copy_and_a_zero_page_land_over_older_data(image_dir: Path) -> None:
    dst = image_dir / "dst.img"
    recv = Receiver.start(dst)
    main, ack = handshake(recv.port)
    assert ack.TYPE is RecordType.HELLO_ACK
    data = socket.create_connection(("127.0.0.1", recv.port), timeout=10)
    s = stream()
    data.sendall(s.init())
    a, b, c = b"\x0a" * PAGE, b"\x0b" * PAGE, b"\x0c" * PAGE
    # Iteration 1: pages 5, 6, 7 (5 and 6 adjacent: one run), 9 sent as zero (never written),
    # and every other page as zero too, so that the whole image arrived.
    data.sendall(s.data(normal=[PAGE * 5, PAGE * 6, PAGE * 7], zero=[PAGE * 9],
                        payload=a + b + a))
    data.sendall(s.data(zero=rest_as_zero(*(PAGE * p for p in (5, 6, 7, 9)))))
    data.sendall(s.sync())
    main.sendall(MultifdFlush(1).encode())
    # Iteration 2: 5 again with new data, 6 now zero (it holds data: it must be cleared).
    data.sendall(s.data(normal=[PAGE * 5], zero=[PAGE * 6], payload=c))
    data.sendall(s.sync())
    main.sendall(EndOfRam(2).encode())
    assert recv_record(main).TYPE is RecordType.RAM_RECEIVED
    main.sendall(DeviceStateRecord(b'{"kind":"test"}').encode())
    assert recv_record(main).TYPE is RecordType.COMMIT_ACK
    code, _, err = recv.result(timeout=30)
    assert code == 0, err
    image = dst.read_bytes()
    assert len(image) == SIZE
    assert image[PAGE * 5:PAGE * 6] == c
    assert image[PAGE * 6:PAGE * 7] == bytes(PAGE)
    assert image[PAGE * 7:PAGE * 8] == a
    assert image.count(0) == SIZE - 2 * PAGE
    assert not Path(f"{dst}.incoming").exists()
    data.close()
    main.close()
