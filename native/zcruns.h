/* Runs of adjacent pages in a packet's offsets: shared by zcnative.c, zccrypto.c and
 * zcuffd.c (not part of the cffi interface; _build.py does not feed it to cdef). */
#ifndef ZCRUNS_H
#define ZCRUNS_H

#include <stdint.h>

/* The end of the run of adjacent pages that starts at offsets[i]: one readv, pwrite,
 * memcpy, cipher update or UFFDIO_COPY moves pages i..end-1 at once. */
static inline uint32_t run_end(const uint64_t *offsets, uint32_t i, uint32_t n,
                               uint32_t page_size)
{
    uint32_t j = i + 1;
    while (j < n && offsets[j] == offsets[j - 1] + page_size)
        j++;
    return j;
}

#endif
