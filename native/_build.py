"""cffi build script for zcmigrate.native._zcnative (API mode, out of line), run by setup.py.

It only compiles zcnative.c; it must not import anything of zcmigrate's own.
"""

import hashlib
from pathlib import Path

from cffi import FFI

HERE = Path(__file__).resolve().parent

# cffi's cdef takes plain declarations: drop the header's preprocessor lines and
# give struct iovec, which the C side takes from <sys/uio.h>.
_decls = "\n".join(
    line for line in (HERE / "zcnative.h").read_text().splitlines() if not line.startswith("#")
)


def interface_hash(header: Path) -> int:
    """A fingerprint of the C interface; native/__init__.py compares it at import."""
    return int(hashlib.sha256(header.read_bytes()).hexdigest()[:12], 16)


ffibuilder = FFI()
ffibuilder.cdef(
    "struct iovec { void *iov_base; size_t iov_len; };\n#define ZC_EOF -1\n"
    "#define ZC_INTERFACE_HASH ...\n" + _decls
)
ffibuilder.set_source(
    "zcmigrate.native._zcnative",
    f'#include "zcnative.h"\n#define ZC_INTERFACE_HASH {interface_hash(HERE / "zcnative.h")}ULL',
    # setup.py runs from the project root; setuptools wants sources relative to it.
    sources=["native/zcnative.c"],
    include_dirs=["native"],
    extra_compile_args=["-O2", "-Wall", "-Wextra", "-Wno-unused-parameter"],
)

if __name__ == "__main__":
    ffibuilder.compile(verbose=True)
