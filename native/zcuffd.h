/* The interface of zcuffd.c: userfaultfd for post-copy (missing pages of a shared tmpfs or
 * hugetlbfs mapping, served from another process). _build.py feeds this file (less its #
 * lines) to cffi's cdef beside zcnative.h and zccrypto.h, so it must stay plain
 * declarations: constants are enums with their kernel values written out, and zcuffd.c
 * checks each against <linux/userfaultfd.h> at compile time. */
#include <stdint.h>

/* Return codes of our own: negative, never an errno. */
enum {
    ZCU_EBOUNDS = -30 /* an offset, length or address outside the registered range or the
                       * file, not page-aligned, or a buffer too short: nothing done */
};

/* UFFD_FEATURE_* bits a caller may ask zcu_open for. */
enum {
    ZCU_FEATURE_MISSING_HUGETLBFS = 1 << 4, /* MISSING faults on a hugetlbfs mapping */
    ZCU_FEATURE_MISSING_SHMEM = 1 << 5,     /* MISSING faults on a tmpfs (shmem) mapping */
    ZCU_FEATURE_THREAD_ID = 1 << 8          /* each fault names its thread */
};

/* How zcu_open creates the descriptor. */
enum {
    ZCU_OPEN_SYSCALL = 0, /* userfaultfd(2): root (CAP_SYS_PTRACE) or the sysctl
                           * vm.unprivileged_userfaultfd = 1 */
    ZCU_OPEN_DEVICE = 1   /* ioctl USERFAULTFD_IOC_NEW on /dev/userfaultfd (Linux 6.1):
                           * whoever may open the device */
};

/* Bits of zcu_register's `ioctls`: what the kernel allows on the registered range. */
enum {
    ZCU_RANGE_WAKE = 1 << 2, /* 1 << _UFFDIO_WAKE */
    ZCU_RANGE_COPY = 1 << 3  /* 1 << _UFFDIO_COPY */
};

/* A message read from a userfaultfd. Without event features only page faults come. */
struct zcu_fault {
    uint64_t offset;  /* the faulting page's offset from base, page-aligned; UINT64_MAX
                       * when `inside` is 0 */
    uint64_t address; /* the address as the kernel reported it */
    uint32_t flags;   /* UFFD_PAGEFAULT_FLAG_*: 1 write, 2 write-protect, 4 minor */
    uint32_t tid;     /* the faulting thread; 0 without ZCU_FEATURE_THREAD_ID */
    uint32_t event;   /* UFFD_EVENT_PAGEFAULT (0x12), or another event */
    uint32_t inside;  /* 1 for a page fault in [base, base + length) */
};

struct zcu_copy_result {
    uint64_t copied;  /* pages placed by UFFDIO_COPY; the kernel woke their waiters */
    uint64_t existed; /* pages that were there already (EEXIST): they arrived another way
                       * meanwhile (a pwrite into the page cache); left as they were */
    uint32_t woken;   /* 1 if the run was woken (UFFDIO_WAKE) because some page existed */
    int err;          /* 0, or the errno that stopped the run (see zcu_copy) */
};

/* A descriptor (O_CLOEXEC | O_NONBLOCK) past the UFFD_API handshake with `features`,
 * or -errno. *available: every feature the kernel offers (0 if the handshake failed). */
int zcu_open(uint32_t how, uint64_t features, uint64_t *available);
int zcu_register(int uffd, uint64_t base, uint64_t length, uint32_t page_size,
                 uint64_t *ioctls);
int zcu_unregister(int uffd, uint64_t base, uint64_t length, uint32_t page_size);
int zcu_read_faults(int uffd, uint64_t base, uint64_t length, uint32_t page_size,
                    struct zcu_fault *out, uint32_t max);
int zcu_copy(int uffd, uint64_t base, uint64_t length, uint32_t page_size, uint64_t offset,
             const void *src, uint64_t len, struct zcu_copy_result *res);
/* zcu_copy for n pages of page_size bytes gathered in src (page i for offsets[i]): one
 * UFFDIO_COPY per run of adjacent pages, each run whole granules; ZCU_EBOUNDS with
 * nothing placed if an offset, a run or src_len is wrong. The counts in *res add up
 * over the runs; the first errno stops it. */
int zcu_copy_pages(int uffd, uint64_t base, uint64_t length, uint32_t granule,
                   const uint64_t *offsets, uint32_t n, uint32_t page_size, const void *src,
                   uint64_t src_len, struct zcu_copy_result *res);
/* flags[offset / page_size] = value (0 or 1) for each of the n offsets, *changed the
 * bytes that were not value before; ZCU_EBOUNDS with nothing changed for an offset that
 * is unaligned or past npages. */
int zcu_flags_set(uint8_t *flags, uint64_t npages, const uint64_t *offsets, uint32_t n,
                  uint32_t page_size, uint8_t value, uint32_t *changed);
/* The n offsets whose flag is 0, in order, into out (out_cap >= n), their count in
 * *nout; ZCU_EBOUNDS with nothing written for a bad offset or a short out. */
int zcu_flags_unset_only(const uint8_t *flags, uint64_t npages, const uint64_t *offsets,
                         uint32_t n, uint32_t page_size, uint64_t *out, uint32_t out_cap,
                         uint32_t *nout);
/* The flags as a bitmap of nwords (>= ceil(npages / 64)) words in host order, bit i for
 * page i (POSTCOPY_DIRTY's layout once little-endian); ZCU_EBOUNDS if words is short. */
int zcu_flags_bitmap(const uint8_t *flags, uint64_t npages, uint64_t *words, uint64_t nwords);
int zcu_wake(int uffd, uint64_t base, uint64_t length, uint32_t page_size, uint64_t offset,
             uint64_t len);
int zcu_punch(int fd, uint64_t file_size, const uint64_t *offsets, uint32_t n,
              uint32_t page_size, uint32_t *npunched);
