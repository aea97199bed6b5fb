"""cffi build script for native._zcnative (API mode, out of line), run by setup.py.

It only compiles zcnative.c; it must not import anything of zcmigrate's own.
"""

from pathlib import Path

from cffi import FFI

HERE = Path(__file__).resolve().parent

# cffi's cdef takes plain declarations: drop the header's preprocessor lines and
# give struct iovec, which the C side takes from <sys/uio.h>.
_decls = "\n".join(
    line for line in (HERE / "zcnative.h").read_text().splitlines() if not line.startswith("#")
)

ffibuilder = FFI()
ffibuilder.cdef(
    "struct iovec { void *iov_base; size_t iov_len; };\n#define ZC_EOF -1\n" + _decls
)
ffibuilder.set_source(
    "native._zcnative",
    '#include "zcnative.h"',
    # setup.py runs from the project root; setuptools wants sources relative to it.
    sources=["native/zcnative.c"],
    include_dirs=["native"],
    extra_compile_args=["-O2", "-Wall", "-Wextra", "-Wno-unused-parameter"],
)

if __name__ == "__main__":
    ffibuilder.compile(verbose=True)
