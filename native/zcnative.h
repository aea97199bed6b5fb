/* The interface of zcnative.c. _build.py feeds this file (less its # lines) to cffi's
 * cdef, so it must stay plain declarations that cffi can parse. */
#include <stdint.h>
#include <sys/uio.h>

#define ZC_EOF -1

struct zc_send_result {
    uint64_t bytes;    /* bytes written by the successful calls */
    uint32_t calls;    /* successful sendmsg calls */
    uint32_t zc_calls; /* of which with MSG_ZEROCOPY: each moves the kernel's counter once */
    int err;           /* 0, or the errno of the call that failed */
};

struct zc_completion {
    uint32_t lo;     /* inclusive range of zero-copy send calls: [lo, hi] */
    uint32_t hi;
    uint32_t copied; /* SO_EE_CODE_ZEROCOPY_COPIED was set */
    uint32_t origin; /* ee_origin: SO_EE_ORIGIN_ZEROCOPY (5) for a completion */
    int err;         /* ee_errno: non-zero for a real socket error */
};

int zc_sendv(int fd, const struct iovec *iov, int iovcnt, int nplain, int zero_copy,
             uint64_t skip, uint64_t limit, struct zc_send_result *res);
int zc_drain_errqueue(int fd, struct zc_completion *out, int max);
int zc_poll(int fd, int events, int timeout_ms);
int zc_readv_full(int fd, const struct iovec *iov, int iovcnt, uint64_t *nread);
/* zc_recv_pages' own failure (a read failure is its errno, a close ZC_EOF). */
enum { ZC_EBOUNDS = -2 };

int zc_recv_pages(int fd, uint64_t base, uint64_t image_size, const uint64_t *offsets,
                  uint32_t n, uint32_t page_size, uint64_t *nread);
/* The image-file path: a packet's payload read into a buffer first (where a later step,
 * decryption, can work on it), then written with pwrite; zero pages written as zeros. */
int zc_write_pages(int fd, uint64_t image_size, const uint64_t *offsets, uint32_t n,
                   uint32_t page_size, const void *buf, uint64_t buf_len);
int zc_write_zero_pages(int fd, uint64_t image_size, const uint64_t *offsets, uint32_t n,
                        uint32_t page_size, const uint64_t *written, uint32_t *nwritten);
int zc_page_iov(uint64_t base, uint64_t image_size, const uint64_t *offsets, uint32_t n,
                uint32_t page_size, struct iovec *iov);
int64_t zc_split_zero(uint64_t base, uint64_t image_size, const uint64_t *offsets, uint32_t n,
                      uint32_t page_size, uint64_t *normal, uint64_t *zero, uint32_t *nzero);
void zc_mark_pages(uint64_t *bm, const uint64_t *offsets, uint32_t n, uint32_t page_size);
int zc_zero_pages(uint64_t base, uint64_t image_size, const uint64_t *offsets, uint32_t n,
                  uint32_t page_size, const uint64_t *written, uint32_t *nwritten);
uint64_t zc_bitmap_fetch_clear(uint64_t *bm, uint64_t nwords, uint64_t *out);
uint64_t zc_bitmap_offsets(const uint64_t *bm, uint64_t npages, uint32_t page_size,
                           uint64_t *out);
void zc_bitmap_set_range(uint64_t *bm, uint64_t first, uint64_t count);
/* Pages among the first npages whose bit is clear: returns how many, and writes the byte
 * offsets of the first `max` of them to out. */
uint64_t zc_bitmap_missing(const uint64_t *bm, uint64_t npages, uint32_t page_size,
                           uint64_t *out, uint32_t max);
uint64_t zc_guest_touch(uint64_t base, uint64_t *bm, uint64_t npages, uint32_t page_size,
                        uint64_t pos, uint64_t count);
int64_t zc_guest_check(uint64_t base, uint64_t npages, uint32_t page_size, uint64_t pos,
                       uint32_t value);
