/*
 * zcnative: the per-page hot loops of zcmigrate, called from Python through cffi.
 *
 * Only what Python cannot do per page at line rate: batched sendmsg (optionally
 * MSG_ZEROCOPY) of iovecs taken straight from an mmap, error-queue draining, readv
 * straight into the destination mapping, zero-page scanning, atomic dirty-bitmap
 * operations and the reference guest workload. It decides no policy: every function
 * returns counts and errno values, and Python decides what they mean. cffi releases
 * the GIL around every call, so N workers really run in parallel.
 */
#define _GNU_SOURCE
#include <errno.h>
#include <limits.h>
#include <netinet/in.h>
#include <poll.h>
#include <stdint.h>
#include <string.h>
#include <sys/socket.h>
#include <sys/uio.h>
#include <unistd.h>
#include <linux/errqueue.h>

#include "zcnative.h"
#include "zcruns.h"

#ifndef MSG_ZEROCOPY
#define MSG_ZEROCOPY 0x4000000
#endif
#ifndef SO_EE_ORIGIN_ZEROCOPY
#define SO_EE_ORIGIN_ZEROCOPY 5
#endif
#ifndef SO_EE_CODE_ZEROCOPY_COPIED
#define SO_EE_CODE_ZEROCOPY_COPIED 1
#endif

#define ZC_IOV_MAX 1024 /* Linux UIO_MAXIOV: sendmsg/readv refuse more */

/* ------------------------------------------------------------------------ send */

int zc_sendv(int fd, const struct iovec *iov, int iovcnt, int nplain, int zero_copy,
             uint64_t skip, uint64_t limit, struct zc_send_result *res, uint64_t *call_bytes,
             uint32_t call_cap)
{
    struct iovec win[ZC_IOV_MAX];
    uint64_t plain_bytes = 0, total = 0, pos, end;
    int i;

    res->bytes = 0;
    res->calls = 0;
    res->zc_calls = 0;
    res->err = 0;
    if (iovcnt < 0 || nplain < 0 || nplain > iovcnt ||
        (zero_copy && (call_bytes == NULL || call_cap == 0))) {
        res->err = EINVAL;
        return -1;
    }
    for (i = 0; i < iovcnt; i++) {
        if (i < nplain)
            plain_bytes += iov[i].iov_len;
        total += iov[i].iov_len;
    }
    pos = skip;
    end = (limit == 0 || skip + limit > total) ? total : skip + limit;

    /* idx/intra: where pos falls inside iov[], found once and then advanced. */
    int idx = 0;
    uint64_t intra = pos;
    while (idx < iovcnt && intra >= iov[idx].iov_len) {
        intra -= iov[idx].iov_len;
        idx++;
    }

    while (pos < end) {
        /* With zero copy, the plain part (headers, whose buffers are reused) and the
         * page part go in separate calls: MSG_ZEROCOPY is per call (seed 004). */
        int in_plain = zero_copy && pos < plain_bytes;
        if (zero_copy && !in_plain && res->zc_calls == call_cap)
            return 1; /* call_bytes is full: the caller accounts these, then calls again */
        uint64_t seg_end = zero_copy ? (in_plain ? plain_bytes : end) : end;
        if (seg_end > end)
            seg_end = end;
        int n = 0, j = idx;
        uint64_t want = 0, off = intra;
        while (j < iovcnt && n < ZC_IOV_MAX && pos + want < seg_end) {
            uint64_t len = iov[j].iov_len - off;
            if (len > seg_end - (pos + want))
                len = seg_end - (pos + want);
            if (len > 0) {
                win[n].iov_base = (char *)iov[j].iov_base + off;
                win[n].iov_len = len;
                n++;
                want += len;
            }
            off = 0;
            j++;
        }
        struct msghdr msg;
        memset(&msg, 0, sizeof(msg));
        msg.msg_iov = win;
        msg.msg_iovlen = n;
        int flags = MSG_NOSIGNAL;
        if (zero_copy && !in_plain)
            flags |= MSG_ZEROCOPY;
        if (in_plain && end > plain_bytes)
            flags |= MSG_MORE; /* the pages follow at once: no tiny segment for the header */
        ssize_t r = sendmsg(fd, &msg, flags);
        if (r < 0) {
            if (errno == EINTR)
                continue;
            res->err = errno;
            return -1;
        }
        res->bytes += (uint64_t)r;
        res->calls++;
        if (flags & MSG_ZEROCOPY) {
            /* The kernel's counter moves once per successful call, and this call pins
             * exactly r bytes until its completion: the ledger holds each call to its own. */
            call_bytes[res->zc_calls++] = (uint64_t)r;
        }
        pos += (uint64_t)r;
        intra += (uint64_t)r;
        while (idx < iovcnt && intra >= iov[idx].iov_len) {
            intra -= iov[idx].iov_len;
            idx++;
        }
    }
    return 0;
}

/* ------------------------------------------------------------------ error queue */

int zc_parse_errqueue(const void *control, uint64_t controllen, int msg_flags,
                      struct zc_completion *out, int max)
{
    if (control == NULL || out == NULL || max < 1)
        return -EINVAL;
    /* The control data was cut short: the notification in it is lost, and with it the
     * completion of calls that can then never be accounted. Never guess. */
    if (msg_flags & MSG_CTRUNC)
        return -EMSGSIZE;
    struct msghdr msg;
    memset(&msg, 0, sizeof(msg));
    msg.msg_control = (void *)control;
    msg.msg_controllen = (size_t)controllen;
    const char *limit = (const char *)control + controllen;
    int found = 0;
    struct cmsghdr *cm;
    for (cm = CMSG_FIRSTHDR(&msg); cm; cm = CMSG_NXTHDR(&msg, cm)) {
        /* cmsg_len is the kernel's word for how far this message's data goes: it must
         * hold a whole sock_extended_err and end inside what recvmsg wrote, or the copy
         * below would read past it. */
        if (cm->cmsg_len < CMSG_LEN(sizeof(struct sock_extended_err)) ||
            cm->cmsg_len > (uint64_t)(limit - (const char *)cm))
            return -EPROTO;
        if (!((cm->cmsg_level == SOL_IP && cm->cmsg_type == IP_RECVERR) ||
              (cm->cmsg_level == SOL_IPV6 && cm->cmsg_type == IPV6_RECVERR)))
            continue;
        if (found)
            return -EPROTO; /* one error-queue skb carries one sock_extended_err */
        struct sock_extended_err serr;
        memcpy(&serr, CMSG_DATA(cm), sizeof(serr));
        /* The range is inclusive, [ee_info, ee_data] (seed 004). */
        out->lo = serr.ee_info;
        out->hi = serr.ee_data;
        out->copied = (serr.ee_code & SO_EE_CODE_ZEROCOPY_COPIED) ? 1 : 0;
        out->origin = serr.ee_origin;
        out->err = (int)serr.ee_errno;
        found = 1;
    }
    return found ? 1 : -EPROTO;
}

int zc_drain_errqueue(int fd, struct zc_completion *out, int max)
{
    int count = 0;
    if (out == NULL || max < 1)
        return -EINVAL;
    /* Each message yields exactly one completion, so a message is read only while there
     * is room for it: nothing taken off the queue is ever dropped. */
    while (count < max) {
        /* Room for a sock_extended_err and the offender's address (IPv6 at most). */
        union {
            char buf[CMSG_SPACE(sizeof(struct sock_extended_err) +
                                sizeof(struct sockaddr_in6))];
            struct cmsghdr align;
        } control;
        struct msghdr msg;
        memset(&msg, 0, sizeof(msg));
        msg.msg_control = control.buf;
        msg.msg_controllen = sizeof(control.buf);
        ssize_t r = recvmsg(fd, &msg, MSG_ERRQUEUE | MSG_DONTWAIT);
        if (r < 0) {
            if (errno == EINTR)
                continue;
            if (errno == EAGAIN || errno == EWOULDBLOCK)
                break;
            return -errno;
        }
        int got = zc_parse_errqueue(control.buf, msg.msg_controllen, msg.msg_flags,
                                    out + count, max - count);
        if (got < 0)
            return got;
        count += got;
    }
    return count;
}

int zc_poll(int fd, int events, int timeout_ms)
{
    struct pollfd pfd = {.fd = fd, .events = (short)events, .revents = 0};
    int r = poll(&pfd, 1, timeout_ms);
    if (r < 0)
        return errno == EINTR ? 0 : -errno;
    return r == 0 ? 0 : pfd.revents;
}

/* ------------------------------------------------------------------------ read */

static int readv_all(int fd, struct iovec *iov, int iovcnt, uint64_t *nread)
{
    int idx = 0;
    while (idx < iovcnt) {
        int n = iovcnt - idx;
        if (n > ZC_IOV_MAX)
            n = ZC_IOV_MAX;
        ssize_t r = readv(fd, iov + idx, n);
        if (r < 0) {
            if (errno == EINTR)
                continue;
            return errno;
        }
        if (r == 0)
            return ZC_EOF;
        *nread += (uint64_t)r;
        uint64_t left = (uint64_t)r;
        while (idx < iovcnt && left >= iov[idx].iov_len) {
            left -= iov[idx].iov_len;
            idx++;
        }
        if (left) {
            iov[idx].iov_base = (char *)iov[idx].iov_base + left;
            iov[idx].iov_len -= left;
        }
    }
    return 0;
}

int zc_readv_full(int fd, const struct iovec *iov, int iovcnt, uint64_t *nread)
{
    struct iovec win[ZC_IOV_MAX];
    *nread = 0;
    /* readv_all consumes its iovecs, so work on copies, a window at a time. */
    for (int base = 0; base < iovcnt; base += ZC_IOV_MAX) {
        int n = iovcnt - base < ZC_IOV_MAX ? iovcnt - base : ZC_IOV_MAX;
        memcpy(win, iov + base, (size_t)n * sizeof(struct iovec));
        int r = readv_all(fd, win, n, nread);
        if (r)
            return r;
    }
    return 0;
}

/* ----------------------------------------------------------------------- pages */

/* log2 of a page size, or -1 for one that is not a power of two (0 included): no caller
 * ever takes the count of trailing zeros of 0, which is undefined. */
static int page_shift(uint32_t page_size)
{
    if (page_size == 0 || (page_size & (page_size - 1)))
        return -1;
    return __builtin_ctz(page_size);
}

static int pages_in_bounds(uint64_t image_size, const uint64_t *offsets, uint32_t n,
                           uint32_t page_size)
{
    /* The wire decoder already checked this; a receiver must never write outside
     * its image whatever it reads, so the hot loop checks again. */
    if (page_shift(page_size) < 0 || (n && offsets == NULL))
        return 0;
    for (uint32_t i = 0; i < n; i++) {
        uint64_t off = offsets[i];
        if (off % page_size || off > image_size || image_size - off < page_size)
            return 0;
    }
    return 1;
}

/* A packet's n pages gathered in buf (page i at i * page_size): every offset inside the
 * image and the buffer long enough, checked before the first byte moves. */
static int gathered_ok(uint64_t image_size, const uint64_t *offsets, uint32_t n,
                       uint32_t page_size, const void *buf, uint64_t buf_len)
{
    return pages_in_bounds(image_size, offsets, n, page_size) &&
           (uint64_t)n * page_size <= buf_len && (!n || buf != NULL);
}

/* Whether bit `page` lies in a bitmap of `nwords` words. */
static inline int bit_in(uint64_t page, uint64_t nwords)
{
    return (page >> 6) < nwords;
}

int zc_page_iov(uint64_t base, uint64_t image_size, const uint64_t *offsets, uint32_t n,
                uint32_t page_size, struct iovec *iov, uint32_t iov_cap)
{
    if (!pages_in_bounds(image_size, offsets, n, page_size) || (n && iov == NULL))
        return -EINVAL;
    uint32_t cnt = 0;
    for (uint32_t i = 0; i < n; i++) {
        char *p = (char *)(uintptr_t)(base + offsets[i]);
        /* Adjacent pages share one iovec: a static image becomes a few large ones. */
        if (cnt && (char *)iov[cnt - 1].iov_base + iov[cnt - 1].iov_len == p) {
            iov[cnt - 1].iov_len += page_size;
        } else {
            if (cnt == iov_cap || cnt == INT_MAX)
                return -ENOSPC;
            iov[cnt].iov_base = p;
            iov[cnt].iov_len = page_size;
            cnt++;
        }
    }
    return (int)cnt;
}

static inline int page_is_zero(const unsigned char *p, uint32_t len)
{
    /* Most non-zero pages differ in the first word; memcmp against itself shifted
     * by one is the vectorised test for the rest. */
    uint64_t w;
    memcpy(&w, p, sizeof(w));
    if (w)
        return 0;
    return memcmp(p, p + 1, len - 1) == 0;
}

int64_t zc_split_zero(uint64_t base, uint64_t image_size, const uint64_t *offsets, uint32_t n,
                      uint32_t page_size, uint64_t *normal, uint32_t normal_cap, uint64_t *zero,
                      uint32_t zero_cap, uint32_t *nzero)
{
    uint32_t nn = 0, nz = 0;
    if (nzero == NULL)
        return -EINVAL;
    *nzero = 0;
    /* Reading outside the mapping would fault: offsets come from callers we check too. */
    if (!pages_in_bounds(image_size, offsets, n, page_size) || page_size < sizeof(uint64_t))
        return -EINVAL;
    for (uint32_t i = 0; i < n; i++) {
        const unsigned char *p = (const unsigned char *)(uintptr_t)(base + offsets[i]);
        if (page_is_zero(p, page_size)) {
            if (nz == zero_cap || zero == NULL)
                return -ENOSPC;
            zero[nz++] = offsets[i];
        } else {
            if (nn == normal_cap || normal == NULL)
                return -ENOSPC;
            normal[nn++] = offsets[i];
        }
    }
    *nzero = nz;
    return nn;
}

static inline void bitmap_mark(uint64_t *bm, uint64_t page)
{
    __atomic_fetch_or(&bm[page >> 6], 1ULL << (page & 63), __ATOMIC_RELEASE);
}

static inline int bitmap_test(const uint64_t *bm, uint64_t page)
{
    return (__atomic_load_n(&bm[page >> 6], __ATOMIC_ACQUIRE) >> (page & 63)) & 1;
}

int zc_mark_pages(uint64_t *bm, uint64_t nwords, const uint64_t *offsets, uint32_t n,
                  uint32_t page_size)
{
    int shift = page_shift(page_size);
    if (shift < 0 || (n && (bm == NULL || offsets == NULL)))
        return -EINVAL;
    /* Every page before any bit: a wrong offset leaves the bitmap as it was. */
    for (uint32_t i = 0; i < n; i++)
        if (!bit_in(offsets[i] >> shift, nwords))
            return -ERANGE;
    for (uint32_t i = 0; i < n; i++)
        bitmap_mark(bm, offsets[i] >> shift);
    return 0;
}

/* Whether every page of `offsets` has its bit inside a `written` bitmap of nwords words
 * (a NULL bitmap: nothing to check). */
static int written_covers(const uint64_t *written, uint64_t nwords, const uint64_t *offsets,
                          uint32_t n, int shift)
{
    if (written == NULL)
        return 1;
    for (uint32_t i = 0; i < n; i++)
        if (!bit_in(offsets[i] >> shift, nwords))
            return 0;
    return 1;
}

int zc_zero_pages(uint64_t base, uint64_t image_size, const uint64_t *offsets, uint32_t n,
                  uint32_t page_size, const uint64_t *written, uint64_t written_words,
                  uint32_t *nwritten)
{
    if (nwritten == NULL)
        return EINVAL;
    *nwritten = 0;
    if (!pages_in_bounds(image_size, offsets, n, page_size) || page_size < sizeof(uint64_t))
        return EINVAL;
    int shift = page_shift(page_size);
    if (!written_covers(written, written_words, offsets, n, shift))
        return EINVAL;
    for (uint32_t i = 0; i < n; i++) {
        /* A page never written on a fresh image is already zero: touching it would
         * only fault it in. Otherwise write only if it is not zero already. */
        if (written && !bitmap_test(written, offsets[i] >> shift))
            continue;
        unsigned char *p = (unsigned char *)(uintptr_t)(base + offsets[i]);
        if (!page_is_zero(p, page_size)) {
            memset(p, 0, page_size);
            (*nwritten)++;
        }
    }
    return 0;
}

int zc_recv_pages(int fd, uint64_t base, uint64_t image_size, const uint64_t *offsets,
                  uint32_t n, uint32_t page_size, uint64_t *nread)
{
    /* A packet's pages, in order, read straight into the mapping: the iovecs (adjacent
     * pages merged) are built here, so Python makes one call per packet. Prefaulting the
     * runs of never-written pages first (MADV_POPULATE_WRITE) was measured and bought
     * nothing here: allocating and zeroing the new tmpfs pages is the cost, not the trap
     * (docs/performance.md). */
    struct iovec win[ZC_IOV_MAX];
    int nw = 0, r;
    *nread = 0;
    if (!pages_in_bounds(image_size, offsets, n, page_size))
        return ZC_EBOUNDS;
    uint32_t i = 0;
    while (i < n) {
        uint32_t j = run_end(offsets, i, n, page_size);
        win[nw].iov_base = (char *)(uintptr_t)(base + offsets[i]);
        win[nw].iov_len = (uint64_t)(j - i) * page_size;
        if (++nw == ZC_IOV_MAX) {
            if ((r = readv_all(fd, win, nw, nread)))
                return r;
            nw = 0;
        }
        i = j;
    }
    if (nw && (r = readv_all(fd, win, nw, nread)))
        return r;
    return 0;
}

/* ------------------------------------------------------------------ image file */

/* Zeros for zc_write_zero_pages' iovecs: every iovec of a run points here (MAX_PAGE_SIZE
 * of the wire format; larger pages are refused). */
#define ZC_ZERO_BLOCK 65536
static const char zero_block[ZC_ZERO_BLOCK];

static int pwrite_all(int fd, const char *p, uint64_t len, uint64_t off)
{
    while (len) {
        ssize_t r = pwrite(fd, p, len, (off_t)off);
        if (r < 0) {
            if (errno == EINTR)
                continue;
            return errno;
        }
        if (r == 0)
            return EIO; /* pwrite makes no progress: never loop for ever */
        p += r;
        len -= (uint64_t)r;
        off += (uint64_t)r;
    }
    return 0;
}

/* A packet's pages gathered in buf (page i at i * page_size) to their offsets, one call per
 * run of adjacent pages: pwrite into fd when to_fd, else memcpy into the mapping at base.
 * Every offset and the buffer's length are checked before the first byte moves. */
static int land_gathered(int to_fd, int fd, uint64_t base, uint64_t image_size,
                         const uint64_t *offsets, uint32_t n, uint32_t page_size,
                         const void *buf, uint64_t buf_len)
{
    const char *src = buf;
    if (!gathered_ok(image_size, offsets, n, page_size, buf, buf_len))
        return ZC_EBOUNDS;
    uint32_t i = 0;
    while (i < n) {
        uint32_t j = run_end(offsets, i, n, page_size);
        const char *from = src + (uint64_t)i * page_size;
        uint64_t len = (uint64_t)(j - i) * page_size;
        if (to_fd) {
            int r = pwrite_all(fd, from, len, offsets[i]);
            if (r)
                return r;
        } else {
            memcpy((char *)(uintptr_t)(base + offsets[i]), from, len);
        }
        i = j;
    }
    return 0;
}

int zc_write_pages(int fd, uint64_t image_size, const uint64_t *offsets, uint32_t n,
                   uint32_t page_size, const void *buf, uint64_t buf_len)
{
    /* One pwrite per run; a static image's packet is one run. Through the fd, not a
     * mapping: write(2) fills a new page-cache page without zeroing it first and without a
     * fault per page, about half the CPU of a copy into a fresh MAP_SHARED mapping on a
     * 4 KiB-page tmpfs (docs/performance.md, bench/pagecache_floor.c). Everything is
     * checked before the first write: an offset outside the image would grow the file, so
     * a receiver never writes outside it whatever it reads. */
    return land_gathered(1, fd, 0, image_size, offsets, n, page_size, buf, buf_len);
}

int zc_place_pages(uint64_t base, uint64_t image_size, const uint64_t *offsets, uint32_t n,
                   uint32_t page_size, const void *buf, uint64_t buf_len)
{
    /* Page i of buf to base + offsets[i], one memcpy per run of adjacent pages. */
    return land_gathered(0, -1, base, image_size, offsets, n, page_size, buf, buf_len);
}

int zc_write_zero_pages(int fd, uint64_t image_size, const uint64_t *offsets, uint32_t n,
                        uint32_t page_size, const uint64_t *written, uint64_t written_words,
                        uint32_t *nwritten)
{
    /* Zero pages through the fd. A page never written on a fresh image is already zero
     * (written != NULL and its bit clear): nothing to do, not even a page allocated. Any
     * other is written with zeros, a run of adjacent pages per pwritev: cheaper than
     * punching it (fallocate PUNCH_HOLE) on a 4 KiB tmpfs, a huge-page tmpfs and ext4
     * alike (bench/pagecache_floor.c, zero-write against zero-punch). */
    struct iovec win[ZC_IOV_MAX];
    if (nwritten == NULL)
        return EINVAL;
    *nwritten = 0;
    if (page_size > ZC_ZERO_BLOCK || !pages_in_bounds(image_size, offsets, n, page_size))
        return ZC_EBOUNDS;
    int shift = page_shift(page_size);
    if (!written_covers(written, written_words, offsets, n, shift))
        return ZC_EBOUNDS;
    uint32_t i = 0;
    while (i < n) {
        if (written && !bitmap_test(written, offsets[i] >> shift)) {
            i++;
            continue;
        }
        int cnt = 0;
        uint32_t j = i;
        do {
            win[cnt].iov_base = (void *)zero_block;
            win[cnt].iov_len = page_size;
            cnt++;
            j++;
        } while (j < n && cnt < ZC_IOV_MAX && offsets[j] == offsets[j - 1] + page_size &&
                 !(written && !bitmap_test(written, offsets[j] >> shift)));
        uint64_t off = offsets[i], left = (uint64_t)cnt * page_size;
        struct iovec *v = win;
        while (left) {
            ssize_t r = pwritev(fd, v, cnt, (off_t)off);
            if (r < 0) {
                if (errno == EINTR)
                    continue;
                return errno;
            }
            if (r == 0)
                return EIO;
            off += (uint64_t)r;
            left -= (uint64_t)r;
            while (cnt && (uint64_t)r >= v->iov_len) { /* a short write: go on after it */
                r -= (ssize_t)v->iov_len;
                v++;
                cnt--;
            }
            if (r) {
                v->iov_base = (char *)v->iov_base + r;
                v->iov_len -= (size_t)r;
            }
        }
        *nwritten += j - i;
        i = j;
    }
    return 0;
}

/* ---------------------------------------------------------------------- bitmap */

int64_t zc_bitmap_fetch_clear(uint64_t *bm, uint64_t nwords, uint64_t *out, uint64_t out_cap)
{
    if (nwords > out_cap || nwords > INT64_MAX / 64 || (nwords && (bm == NULL || out == NULL)))
        return -ENOSPC;
    int64_t total = 0;
    for (uint64_t i = 0; i < nwords; i++) {
        /* Skip the atomic write when a word is clean: it is the common case and a
         * locked exchange on every word would bounce the guest's cache lines. */
        if (!__atomic_load_n(&bm[i], __ATOMIC_RELAXED)) {
            out[i] = 0;
            continue;
        }
        uint64_t w = __atomic_exchange_n(&bm[i], 0, __ATOMIC_ACQ_REL);
        out[i] = w;
        total += __builtin_popcountll(w);
    }
    return total;
}

int64_t zc_bitmap_offsets(const uint64_t *bm, uint64_t npages, uint32_t page_size,
                          uint64_t *out, uint64_t out_cap)
{
    if (npages > INT64_MAX || (npages && bm == NULL) || (out_cap && out == NULL))
        return -EINVAL;
    uint64_t cnt = 0;
    uint64_t nwords = (npages + 63) / 64;
    for (uint64_t i = 0; i < nwords; i++) {
        uint64_t w = bm[i];
        while (w) {
            uint64_t page = i * 64 + (uint64_t)__builtin_ctzll(w);
            w &= w - 1;
            if (page < npages) {
                if (cnt == out_cap)
                    return -ENOSPC;
                out[cnt++] = page * page_size;
            }
        }
    }
    return (int64_t)cnt;
}

int zc_bitmap_set_range(uint64_t *bm, uint64_t nwords, uint64_t first, uint64_t count)
{
    uint64_t nbits = nwords > UINT64_MAX / 64 ? UINT64_MAX : nwords * 64;
    if (first > nbits || count > nbits - first || (count && bm == NULL))
        return -ERANGE;
    for (uint64_t p = first; p < first + count; p++)
        bitmap_mark(bm, p);
    return 0;
}

uint64_t zc_bitmap_missing(const uint64_t *bm, uint64_t npages, uint32_t page_size,
                           uint64_t *out, uint32_t max)
{
    /* The receiver's arrival bitmap, read once after its workers were joined (or as a
     * snapshot while they run: hence the atomic loads). */
    uint64_t cnt = 0, nwords = (npages + 63) / 64;
    uint32_t shown = 0;
    for (uint64_t i = 0; i < nwords; i++) {
        uint64_t w = ~__atomic_load_n(&bm[i], __ATOMIC_ACQUIRE);
        if (i == nwords - 1 && npages % 64)
            w &= (1ULL << (npages % 64)) - 1; /* bits past the last page are no pages */
        cnt += (uint64_t)__builtin_popcountll(w);
        while (w && shown < max) {
            out[shown++] = (i * 64 + (uint64_t)__builtin_ctzll(w)) * page_size;
            w &= w - 1;
        }
    }
    return cnt;
}

/* ----------------------------------------------------------------------- guest */

int64_t zc_guest_touch(uint64_t base, uint64_t *bm, uint64_t npages, uint32_t page_size,
                       uint64_t pos, uint64_t count)
{
    /* pos indexes both the mapping and the bitmap (npages bits): one outside would write
     * outside both. */
    if (pos >= npages || npages > INT64_MAX || page_size == 0 || bm == NULL)
        return -EINVAL;
    for (uint64_t k = 0; k < count; k++) {
        volatile unsigned char *p = (volatile unsigned char *)(uintptr_t)(base + pos * page_size);
        *p = (unsigned char)(*p + 1);
        /* Mark after the write (release): a migration that fetch-clears the bit
         * afterwards sends this version or a newer one. */
        bitmap_mark(bm, pos);
        if (++pos == npages)
            pos = 0;
    }
    return (int64_t)pos;
}

int64_t zc_guest_check(uint64_t base, uint64_t npages, uint32_t page_size, uint64_t pos,
                       uint32_t value)
{
    /* The oracle: pages before pos hold value+1, the rest hold value (mod 256).
     * Returns -1 when every page agrees, else the first page that does not. */
    unsigned char lo = (unsigned char)value, hi = (unsigned char)(value + 1);
    for (uint64_t i = 0; i < npages; i++) {
        unsigned char v = *(const unsigned char *)(uintptr_t)(base + i * page_size);
        if (v != (i < pos ? hi : lo))
            return (int64_t)i;
    }
    return -1;
}
