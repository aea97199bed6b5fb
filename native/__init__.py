"""C through cffi: the per-page hot loops of zcmigrate, with no policy.

`lib` holds the functions of zcnative.c and `ffi` the cffi handle for their buffers.
Nothing here knows about channels, packets or migrations; callers interpret the
counts and errno values it returns.
"""

import hashlib
from pathlib import Path

from zcmigrate.native._zcnative import ffi, lib

ZC_EOF: int = lib.ZC_EOF

_header = Path(__file__).with_name("zcnative.h")
if _header.exists():
    # An editable install keeps an old build after zcnative.h changes: calls would fail
    # with baffling argument errors. Say what to do instead.
    _want = int(hashlib.sha256(_header.read_bytes()).hexdigest()[:12], 16)
    if _want != lib.ZC_INTERFACE_HASH:
        raise ImportError(
            "native/_zcnative was built from another version of native/zcnative.h: "
            "rebuild it with `pip install -e .` (or `pip install .`)"
        )

__all__ = ["ZC_EOF", "ffi", "lib"]
