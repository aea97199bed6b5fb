"""cffi build script for zcmigrate.native._zcnative (API mode, out of line), run by setup.py.

It compiles zcnative.c, zccrypto.c and zcuffd.c into one module, linked with libcrypto; it
must not import anything of zcmigrate's own.
"""

import hashlib
from pathlib import Path

from cffi import FFI

HERE = Path(__file__).resolve().parent
# The interfaces end up in one cdef; native/__init__.py hashes the same files in the
# same order to refuse a stale build.
HEADERS = ("zcnative.h", "zccrypto.h", "zcuffd.h")

# cffi's cdef takes plain declarations: drop the headers' preprocessor lines and
# give struct iovec, which the C side takes from <sys/uio.h>.
_decls = "\n".join(
    line
    for name in HEADERS
    for line in (HERE / name).read_text().splitlines()
    if not line.startswith("#")
)


def interface_hash(headers: list[Path]) -> int:
    """A fingerprint of the C interface; native/__init__.py compares it at import."""
    h = hashlib.sha256()
    for header in headers:
        h.update(header.read_bytes())
    return int(h.hexdigest()[:12], 16)


ffibuilder = FFI()
ffibuilder.cdef(
    "struct iovec { void *iov_base; size_t iov_len; };\n#define ZC_EOF -1\n"
    "#define ZC_INTERFACE_HASH ...\n" + _decls
)
ffibuilder.set_source(
    "zcmigrate.native._zcnative",
    '#include "zcnative.h"\n#include "zccrypto.h"\n#include "zcuffd.h"\n'
    f"#define ZC_INTERFACE_HASH {interface_hash([HERE / n for n in HEADERS])}ULL",
    # setup.py runs from the project root; setuptools wants sources relative to it.
    sources=["native/zcnative.c", "native/zccrypto.c", "native/zcuffd.c"],
    include_dirs=["native"],
    # AES-GCM and HKDF come from OpenSSL's libcrypto (ARCHITECTURE.md, "Trust").
    libraries=["crypto"],
    extra_compile_args=["-O2", "-Wall", "-Wextra", "-Wno-unused-parameter"],
)

if __name__ == "__main__":
    ffibuilder.compile(verbose=True)
