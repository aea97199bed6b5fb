"""C through cffi: the per-page hot loops of zcmigrate, with no policy.

`lib` holds the functions of zcnative.c, zccrypto.c (AES-GCM and HKDF through OpenSSL)
and zcuffd.c (userfaultfd for post-copy), and `ffi` the cffi handle for their buffers.
Nothing here knows about channels, packets or migrations; callers interpret the
counts and errno values it returns.
"""

import hashlib
from pathlib import Path

from zcmigrate.native._zcnative import ffi, lib

ZC_EOF: int = lib.ZC_EOF

# The headers _build.py fed to cffi, in its order (its HEADERS).
_headers = [
    Path(__file__).with_name(name) for name in ("zcnative.h", "zccrypto.h", "zcuffd.h")
]
if all(h.exists() for h in _headers):
    # An editable install keeps an old build after a header changes: calls would fail
    # with baffling argument errors. Say what to do instead.
    _hash = hashlib.sha256()
    for _h in _headers:
        _hash.update(_h.read_bytes())
    if int(_hash.hexdigest()[:12], 16) != lib.ZC_INTERFACE_HASH:
        raise ImportError(
            "native/_zcnative was built from another version of native/zcnative.h, "
            "native/zccrypto.h or native/zcuffd.h: rebuild it with `pip install -e .` "
            "(or `pip install .`)"
        )

__all__ = ["ZC_EOF", "ffi", "lib"]
