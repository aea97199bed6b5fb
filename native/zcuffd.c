/*
 * zcuffd: userfaultfd for zcmigrate's post-copy, called from Python through cffi.
 *
 * The guest registers its image's mapping for MISSING faults and hands the descriptor to
 * the receiver, another process: every call below that takes a `base` works on the
 * registering process's address space (the descriptor's mm), whatever process calls it,
 * and every source buffer is in the caller's own. So every offset is checked against the
 * registered range here, not trusted. It decides no policy: functions return counts,
 * errno values (0 for success) or ZCU_EBOUNDS, and Python decides what they mean. cffi
 * releases the GIL around every call.
 *
 * Why the features zcu_open is asked for (multifd/userfault.py asks): MISSING_SHMEM and
 * MISSING_HUGETLBFS, so that a kernel that cannot report missing pages of a file mapping
 * fails the handshake, before anything is registered or sent; THREAD_ID, so that a fault
 * names its thread. Never SIGBUS: a missing page must make its thread wait for the page,
 * not fail. No event features (fork, remap, remove, unmap): the guest does none of those
 * to its registered range, so every message is a page fault. Not UFFD_USER_MODE_ONLY:
 * a kernel access to a missing page (a syscall reading guest memory) must wait too.
 */
#define _GNU_SOURCE
#include <errno.h>
#include <fcntl.h>
#include <linux/falloc.h>
#include <linux/userfaultfd.h>
#include <stddef.h>
#include <stdint.h>
#include <string.h>
#include <sys/ioctl.h>
#include <sys/syscall.h>
#include <unistd.h>

#include "zcuffd.h"
#include "zcruns.h"

_Static_assert(ZCU_FEATURE_MISSING_HUGETLBFS == UFFD_FEATURE_MISSING_HUGETLBFS, "feature bit");
_Static_assert(ZCU_FEATURE_MISSING_SHMEM == UFFD_FEATURE_MISSING_SHMEM, "feature bit");
_Static_assert(ZCU_FEATURE_THREAD_ID == UFFD_FEATURE_THREAD_ID, "feature bit");
_Static_assert(ZCU_RANGE_WAKE == (1 << _UFFDIO_WAKE), "ioctl bit");
_Static_assert(ZCU_RANGE_COPY == (1 << _UFFDIO_COPY), "ioctl bit");
_Static_assert(sizeof(struct uffd_msg) == 32, "uffd_msg is 32 bytes");

#ifndef USERFAULTFD_IOC_NEW
#define USERFAULTFD_IOC_NEW _IO(0xAA, 0x00)
#endif

/* Messages taken per read(2): the kernel hands over as many as are queued and fit. */
#define ZCU_READ_BATCH 128
/* UFFDIO_COPY returns EAGAIN without progress only while the address space is changing
 * under a non-cooperative event, which nothing here enables; retry a few times anyway. */
#define ZCU_COPY_RETRIES 100

static int create(uint32_t how)
{
    if (how == ZCU_OPEN_SYSCALL) {
        long fd = syscall(SYS_userfaultfd, O_CLOEXEC | O_NONBLOCK);
        return fd < 0 ? -errno : (int)fd;
    }
    if (how != ZCU_OPEN_DEVICE)
        return -EINVAL;
    int dev = open("/dev/userfaultfd", O_RDWR | O_CLOEXEC);
    if (dev < 0)
        return -errno;
    int fd = ioctl(dev, USERFAULTFD_IOC_NEW, O_CLOEXEC | O_NONBLOCK);
    int e = errno;
    close(dev);
    return fd < 0 ? -e : fd;
}

int zcu_open(uint32_t how, uint64_t features, uint64_t *available)
{
    *available = 0;
    int fd = create(how);
    if (fd < 0)
        return fd;
    struct uffdio_api api = {.api = UFFD_API, .features = features};
    if (ioctl(fd, UFFDIO_API, &api) == 0) {
        *available = api.features;
        return fd;
    }
    int e = errno;
    close(fd);
    if (e == EINVAL) {
        /* The kernel zeroes the answer of a refused handshake, and a descriptor takes one
         * handshake: ask a second one with no features what it offers, for the message. */
        int probe = create(how);
        if (probe >= 0) {
            struct uffdio_api ask = {.api = UFFD_API, .features = 0};
            if (ioctl(probe, UFFDIO_API, &ask) == 0)
                *available = ask.features;
            close(probe);
        }
    }
    return -e;
}

/* ------------------------------------------------------------------ bounds */

static int range_ok(uint64_t base, uint64_t length, uint32_t page_size)
{
    return page_size != 0 && (page_size & (page_size - 1)) == 0 && length != 0 &&
           base % page_size == 0 && length % page_size == 0 && base + length > base;
}

/* [offset, offset + len) is a non-empty run of whole pages inside [0, length). */
static int span_ok(uint64_t length, uint32_t page_size, uint64_t offset, uint64_t len)
{
    return len != 0 && offset % page_size == 0 && len % page_size == 0 && offset < length &&
           len <= length - offset;
}

/* ------------------------------------------------------------ registration */

int zcu_register(int uffd, uint64_t base, uint64_t length, uint32_t page_size,
                 uint64_t *ioctls)
{
    *ioctls = 0;
    if (!range_ok(base, length, page_size))
        return ZCU_EBOUNDS;
    struct uffdio_register reg = {
        .range = {.start = base, .len = length},
        .mode = UFFDIO_REGISTER_MODE_MISSING,
    };
    if (ioctl(uffd, UFFDIO_REGISTER, &reg) < 0)
        return errno; /* EINVAL for a mapping that cannot fault MISSING (a disk file) */
    *ioctls = reg.ioctls;
    return 0;
}

int zcu_unregister(int uffd, uint64_t base, uint64_t length, uint32_t page_size)
{
    if (!range_ok(base, length, page_size))
        return ZCU_EBOUNDS;
    struct uffdio_range range = {.start = base, .len = length};
    /* Unregistering wakes every thread waiting in the range: they fault again, and with
     * no registration a missing page is then filled with zeros. The caller must know that
     * no page is missing. */
    return ioctl(uffd, UFFDIO_UNREGISTER, &range) < 0 ? errno : 0;
}

/* ------------------------------------------------------------------ faults */

int zcu_read_faults(int uffd, uint64_t base, uint64_t length, uint32_t page_size,
                    struct zcu_fault *out, uint32_t max)
{
    if (!range_ok(base, length, page_size) || max == 0)
        return ZCU_EBOUNDS;
    struct uffd_msg msgs[ZCU_READ_BATCH];
    uint32_t want = max < ZCU_READ_BATCH ? max : ZCU_READ_BATCH;
    ssize_t got;
    do
        got = read(uffd, msgs, want * sizeof msgs[0]);
    while (got < 0 && errno == EINTR);
    if (got < 0)
        return errno == EAGAIN ? 0 : -errno;
    uint32_t n = (uint32_t)(got / (ssize_t)sizeof msgs[0]);
    for (uint32_t i = 0; i < n; i++) {
        const struct uffd_msg *m = &msgs[i];
        struct zcu_fault *f = &out[i];
        f->event = m->event;
        f->offset = UINT64_MAX;
        f->address = 0;
        f->flags = 0;
        f->tid = 0;
        f->inside = 0;
        if (m->event != UFFD_EVENT_PAGEFAULT)
            continue;
        uint64_t addr = m->arg.pagefault.address;
        f->address = addr;
        f->flags = (uint32_t)m->arg.pagefault.flags;
        f->tid = m->arg.pagefault.feat.ptid;
        if (addr >= base && addr - base < length) {
            /* Without UFFD_FEATURE_EXACT_ADDRESS the kernel masks to its own page; mask
             * to the range's page too (a huge page on hugetlbfs). */
            f->offset = (addr - base) & ~((uint64_t)page_size - 1);
            f->inside = 1;
        }
    }
    return (int)n;
}

int zcu_wake(int uffd, uint64_t base, uint64_t length, uint32_t page_size, uint64_t offset,
             uint64_t len)
{
    if (!range_ok(base, length, page_size) || !span_ok(length, page_size, offset, len))
        return ZCU_EBOUNDS;
    struct uffdio_range range = {.start = base + offset, .len = len};
    return ioctl(uffd, UFFDIO_WAKE, &range) < 0 ? errno : 0;
}

/* One run of whole pages at offset (checked by the caller), its counts added to *res. */
static int copy_run(int uffd, uint64_t base, uint32_t page_size, uint64_t offset,
                    const void *src, uint64_t len, struct zcu_copy_result *res)
{
    uint64_t existed_before = res->existed;
    uint64_t done = 0;
    int retries = 0;
    while (done < len) {
        struct uffdio_copy c = {
            .dst = base + offset + done,
            .src = (uint64_t)(uintptr_t)src + done,
            .len = len - done,
            .mode = 0, /* wake each copied page's waiters */
        };
        if (ioctl(uffd, UFFDIO_COPY, &c) == 0) {
            res->copied += (len - done) / page_size;
            break;
        }
        int e = errno;
        /* c.copy: the bytes copied before the kernel stopped (> 0), or -errno. */
        if (c.copy > 0) {
            res->copied += (uint64_t)c.copy / page_size;
            done += (uint64_t)c.copy;
            retries = 0;
            continue; /* EAGAIN after progress: go on from the page that stopped it */
        }
        if (e == EEXIST) {
            /* This page arrived another way since the fault (a pwrite into the page
             * cache): it is left as it is, and the run goes on after it. */
            res->existed++;
            done += page_size;
            retries = 0;
            continue;
        }
        if (e == EAGAIN && ++retries < ZCU_COPY_RETRIES)
            continue;
        /* ENOENT: nothing registered there any more (unregistered, unmapped); ESRCH: the
         * registering process's address space is gone (it exited). */
        res->err = e;
        break;
    }
    if (res->existed > existed_before) {
        /* A copy that finds its page present wakes no one: the thread that faulted on it
         * would wait for ever. Wake the run, so it retries its access and finds the page;
         * the copied pages' waiters are gone already, so this wakes no one twice. */
        struct uffdio_range range = {.start = base + offset, .len = len};
        if (ioctl(uffd, UFFDIO_WAKE, &range) == 0)
            res->woken = 1;
        else if (res->err == 0)
            res->err = errno;
    }
    return res->err;
}

int zcu_copy(int uffd, uint64_t base, uint64_t length, uint32_t page_size, uint64_t offset,
             const void *src, uint64_t len, struct zcu_copy_result *res)
{
    memset(res, 0, sizeof *res);
    if (src == NULL || !range_ok(base, length, page_size) ||
        !span_ok(length, page_size, offset, len))
        return ZCU_EBOUNDS;
    return copy_run(uffd, base, page_size, offset, src, len, res);
}

int zcu_copy_pages(int uffd, uint64_t base, uint64_t length, uint32_t granule,
                   const uint64_t *offsets, uint32_t n, uint32_t page_size, const void *src,
                   uint64_t src_len, struct zcu_copy_result *res)
{
    /* Page i of src (page_size bytes each) to offsets[i], one UFFDIO_COPY per run of
     * adjacent pages: a packet's pages in one call, not one Python step per page. Every
     * run (whole granules inside the range) and the source's length are checked before
     * the first page is placed. */
    memset(res, 0, sizeof *res);
    if ((n && (src == NULL || offsets == NULL)) || page_size == 0 ||
        !range_ok(base, length, granule) || (uint64_t)n * page_size > src_len)
        return ZCU_EBOUNDS;
    for (uint32_t i = 0, j; i < n; i = j) {
        j = run_end(offsets, i, n, page_size);
        if (offsets[i] % page_size ||
            !span_ok(length, granule, offsets[i], (uint64_t)(j - i) * page_size))
            return ZCU_EBOUNDS;
    }
    const char *from = src;
    for (uint32_t i = 0, j; i < n; i = j) {
        j = run_end(offsets, i, n, page_size);
        int rc = copy_run(uffd, base, granule, offsets[i], from + (uint64_t)i * page_size,
                          (uint64_t)(j - i) * page_size, res);
        if (rc)
            return rc;
    }
    return 0;
}

/* ------------------------------------------------------------- page flags */

/* Every offset page-aligned and below npages pages. */
static int flag_offsets_ok(uint64_t npages, const uint64_t *offsets, uint32_t n,
                           uint32_t page_size)
{
    for (uint32_t i = 0; i < n; i++)
        if (offsets[i] % page_size || offsets[i] / page_size >= npages)
            return 0;
    return 1;
}

int zcu_flags_set(uint8_t *flags, uint64_t npages, const uint64_t *offsets, uint32_t n,
                  uint32_t page_size, uint8_t value, uint32_t *changed)
{
    /* One byte per page (post-copy's "still to come" at the destination, "sent on the
     * urgent channel" at the source). Every offset is checked before the first byte
     * changes; *changed counts the pages whose byte was not `value` before. */
    if (changed == NULL)
        return ZCU_EBOUNDS;
    *changed = 0;
    if (page_size == 0 || (n && (flags == NULL || offsets == NULL)) ||
        !flag_offsets_ok(npages, offsets, n, page_size))
        return ZCU_EBOUNDS;
    uint8_t v = value ? 1 : 0;
    uint32_t c = 0;
    for (uint32_t i = 0; i < n; i++) {
        uint8_t *p = &flags[offsets[i] / page_size];
        c += *p != v;
        *p = v;
    }
    *changed = c;
    return 0;
}

int zcu_flags_unset_only(const uint8_t *flags, uint64_t npages, const uint64_t *offsets,
                         uint32_t n, uint32_t page_size, uint64_t *out, uint32_t out_cap,
                         uint32_t *nout)
{
    /* The offsets whose page's byte is 0, in order, into out: what is still to send. */
    if (nout == NULL)
        return ZCU_EBOUNDS;
    *nout = 0;
    if (page_size == 0 || out_cap < n ||
        (n && (flags == NULL || offsets == NULL || out == NULL)) ||
        !flag_offsets_ok(npages, offsets, n, page_size))
        return ZCU_EBOUNDS;
    uint32_t k = 0;
    for (uint32_t i = 0; i < n; i++)
        if (!flags[offsets[i] / page_size])
            out[k++] = offsets[i];
    *nout = k;
    return 0;
}

int zcu_flags_bitmap(const uint8_t *flags, uint64_t npages, uint64_t *words, uint64_t nwords)
{
    /* Bit i of words (word i / 64, bit i % 64, host order) set for each flag i set. */
    if ((npages && (flags == NULL || words == NULL)) || nwords < (npages + 63) / 64)
        return ZCU_EBOUNDS;
    memset(words, 0, nwords * sizeof *words);
    for (uint64_t i = 0; i < npages; i++)
        if (flags[i])
            words[i >> 6] |= UINT64_C(1) << (i & 63);
    return 0;
}

/* ------------------------------------------------------------------ holes */

int zcu_punch(int fd, uint64_t file_size, const uint64_t *offsets, uint32_t n,
              uint32_t page_size, uint32_t *npunched)
{
    /* Checked before the first punch: a bad offset punches nothing. */
    *npunched = 0;
    if (page_size == 0)
        return ZCU_EBOUNDS;
    for (uint32_t i = 0; i < n; i++)
        if (offsets[i] % page_size || offsets[i] >= file_size ||
            page_size > file_size - offsets[i])
            return ZCU_EBOUNDS;
    uint32_t i = 0;
    while (i < n) {
        uint32_t j = run_end(offsets, i, n, page_size);
        /* KEEP_SIZE: a hole in the middle, never a shorter file. On tmpfs the page leaves
         * the page cache and every mapping of it, so the next access faults MISSING. */
        int r;
        do
            r = fallocate(fd, FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE, (off_t)offsets[i],
                          (off_t)((uint64_t)(j - i) * page_size));
        while (r < 0 && errno == EINTR);
        if (r < 0)
            return errno;
        *npunched += j - i;
        i = j;
    }
    return 0;
}
