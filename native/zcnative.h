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

/* Sends the bytes [skip, skip+limit) (limit 0: to the end) of the iovecs, the first `nplain`
 * of which (0 or 1: a header) go without MSG_ZEROCOPY. Returns 0 when done; 1 when it stopped
 * after `call_cap` zero-copy calls (call again from skip + res->bytes); -1 on a failed call
 * (res->err). call_bytes[i] gets the bytes of the i-th zero-copy call: the ledger accounts each
 * call for what it carried. call_bytes may be NULL only without zero copy. */
int zc_sendv(int fd, const struct iovec *iov, int iovcnt, int nplain, int zero_copy,
             uint64_t skip, uint64_t limit, struct zc_send_result *res, uint64_t *call_bytes,
             uint32_t call_cap);
/* Completions from the error queue into out[0..max): how many, or a negative errno: a failed
 * recvmsg, -EMSGSIZE when a message's control data was cut short (MSG_CTRUNC: a completion was
 * lost), -EPROTO for a message without exactly one well-formed IP(V6)_RECVERR. */
int zc_drain_errqueue(int fd, struct zc_completion *out, int max);
/* The parse of one error-queue message (what zc_drain_errqueue does to each), apart so that
 * tests can feed it control data the kernel would never send: 1 (out[0] filled), or -EMSGSIZE,
 * -EPROTO as above, -EINVAL for a NULL or a max below 1. */
int zc_parse_errqueue(const void *control, uint64_t controllen, int msg_flags,
                      struct zc_completion *out, int max);
int zc_poll(int fd, int events, int timeout_ms);
int zc_readv_full(int fd, const struct iovec *iov, int iovcnt, uint64_t *nread);
/* zc_recv_pages' own failure (a read failure is its errno, a close ZC_EOF). */
enum { ZC_EBOUNDS = -2 };

/* Every function below that takes page offsets checks each against the image (aligned, the
 * whole page inside) and the page size (a power of two, never 0) before it reads or writes a
 * byte, and every array it writes comes with its capacity: a caller's mistake is an error
 * code, never a write past an array. */
int zc_recv_pages(int fd, uint64_t base, uint64_t image_size, const uint64_t *offsets,
                  uint32_t n, uint32_t page_size, uint64_t *nread);
/* The image-file path: a packet's payload read into a buffer first (where it may be opened in
 * place when sealed), then written with pwrite; zero pages written as zeros. */
int zc_write_pages(int fd, uint64_t image_size, const uint64_t *offsets, uint32_t n,
                   uint32_t page_size, const void *buf, uint64_t buf_len);
/* The mapping's path for a payload that had to land in a buffer first (a sealed packet,
 * opened there): page i of buf copied to base + offsets[i]. 0 or ZC_EBOUNDS. */
int zc_place_pages(uint64_t base, uint64_t image_size, const uint64_t *offsets, uint32_t n,
                   uint32_t page_size, const void *buf, uint64_t buf_len);
/* `written` (may be NULL) has `written_words` u64 words: a page beyond them is ZC_EBOUNDS. */
int zc_write_zero_pages(int fd, uint64_t image_size, const uint64_t *offsets, uint32_t n,
                        uint32_t page_size, const uint64_t *written, uint64_t written_words,
                        uint32_t *nwritten);
/* The iovecs of a packet's pages (adjacent pages merged) into iov[0..iov_cap): how many, or
 * -EINVAL (an offset or the page size) or -ENOSPC (more than iov_cap needed). */
int zc_page_iov(uint64_t base, uint64_t image_size, const uint64_t *offsets, uint32_t n,
                uint32_t page_size, struct iovec *iov, uint32_t iov_cap);
/* Normal offsets into normal[0..normal_cap), zero ones into zero[0..zero_cap): how many normal,
 * or -EINVAL, -ENOSPC as zc_page_iov. */
int64_t zc_split_zero(uint64_t base, uint64_t image_size, const uint64_t *offsets, uint32_t n,
                      uint32_t page_size, uint64_t *normal, uint32_t normal_cap, uint64_t *zero,
                      uint32_t zero_cap, uint32_t *nzero);
/* Sets the bit of every page in a bitmap of `nwords` u64 words: 0, -EINVAL (the page size) or
 * -ERANGE (a page beyond the bitmap); every offset is checked before a bit is set. */
int zc_mark_pages(uint64_t *bm, uint64_t nwords, const uint64_t *offsets, uint32_t n,
                  uint32_t page_size);
int zc_zero_pages(uint64_t base, uint64_t image_size, const uint64_t *offsets, uint32_t n,
                  uint32_t page_size, const uint64_t *written, uint64_t written_words,
                  uint32_t *nwritten);
/* Moves nwords words of bm into out (out_cap words): dirty pages fetched, or -ENOSPC. */
int64_t zc_bitmap_fetch_clear(uint64_t *bm, uint64_t nwords, uint64_t *out, uint64_t out_cap);
/* The byte offset of every page set among the first npages into out (out_cap entries): how
 * many, or -ENOSPC when they do not fit (nothing past out_cap is written). */
int64_t zc_bitmap_offsets(const uint64_t *bm, uint64_t npages, uint32_t page_size,
                          uint64_t *out, uint64_t out_cap);
/* Sets bits [first, first + count) of a bitmap of nwords words: 0 or -ERANGE. */
int zc_bitmap_set_range(uint64_t *bm, uint64_t nwords, uint64_t first, uint64_t count);
/* Pages among the first npages whose bit is clear: returns how many, and writes the byte
 * offsets of the first `max` of them to out. */
uint64_t zc_bitmap_missing(const uint64_t *bm, uint64_t npages, uint32_t page_size,
                           uint64_t *out, uint32_t max);
/* The workload's writes from page pos (< npages) on: the next position, or -EINVAL. */
int64_t zc_guest_touch(uint64_t base, uint64_t *bm, uint64_t npages, uint32_t page_size,
                       uint64_t pos, uint64_t count);
int64_t zc_guest_check(uint64_t base, uint64_t npages, uint32_t page_size, uint64_t pos,
                       uint32_t value);
