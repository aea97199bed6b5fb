"""C through cffi: the per-page hot loops of zcmigrate, with no policy.

`lib` holds the functions of zcnative.c and `ffi` the cffi handle for their buffers.
Nothing here knows about channels, packets or migrations; callers interpret the
counts and errno values it returns.
"""

from native._zcnative import ffi, lib

ZC_EOF: int = lib.ZC_EOF

__all__ = ["ZC_EOF", "ffi", "lib"]
