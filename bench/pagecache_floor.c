/*
 * pagecache_floor: what it costs to put SIZE bytes of new data into a fresh file's page
 * cache, by each route a receiver could take (issue 12). One route per run; the work is
 * timed by wall clock and by the process's CPU (getrusage: every thread, user and system).
 * bench/pagecache_floor.py compiles this, warms up, interleaves the routes and reports
 * medians; run it through that.
 *
 *   pagecache_floor ROUTE DIR SIZE_MIB [CHUNK_KIB]
 *
 * Every route starts from a new file DIR/pcf-N (created, ftruncate'd to SIZE: sparse, as
 * the destination creates its incoming image) and copies from a per-thread source buffer
 * of CHUNK bytes (default 256 KiB) that stays cache-hot, as a buffer just filled by recv()
 * does. The file is deleted after the measurement (not timed). Routes:
 *
 *   write1         1 thread, pwrite of CHUNK pieces in order: the write(2) floor
 *   write1-big     1 thread, pwrite of 2 MiB pieces (a whole packet, not cache-hot)
 *   write2-shared  2 threads, pieces dealt alternately, one file (the inode lock)
 *   write2-locked  2 threads, one file, a mutex held around each pwrite (waiters sleep)
 *   write2-ranges  2 threads, each its half of one file
 *   write2-files   2 threads, each its own file of half the size (no shared inode)
 *   mmap1          1 thread, memcpy into a fresh MAP_SHARED mapping (a fault per page)
 *   mmap2          2 threads, each its half of the mapping
 *   populate-mmap  a second thread runs MADV_POPULATE_WRITE a few MiB ahead of the copier
 *   falloc-mmap    fallocate the whole file, then memcpy into the mapping (1 thread)
 *   falloc-write   fallocate the whole file, then pwrite (1 thread)
 *   write1-4k      1 thread, pwrite of single 4 KiB pages in a shuffled order
 *   mmap1-4k       1 thread, memcpy of single 4 KiB pages in a shuffled order
 *   zero-punch     the file filled first (not timed), then every 8th page punched
 *                  (fallocate PUNCH_HOLE, one call per page), shuffled
 *   zero-write     the same, but 4 KiB of zeros pwritten instead
 *   zero-check     the same, but read through the mapping first and memset only if not zero
 *                  (today's zc_zero_pages on a non-fresh image)
 *
 * Output: one line of JSON.
 */
#define _GNU_SOURCE
#include <errno.h>
#include <fcntl.h>
#include <pthread.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <sys/resource.h>
#include <sys/stat.h>
#include <time.h>
#include <unistd.h>
#include <linux/falloc.h>

#ifndef MADV_POPULATE_WRITE
#define MADV_POPULATE_WRITE 23
#endif

#define PAGE 4096UL
#define MiB (1UL << 20)

static uint64_t size, chunk;
static const char *dir;
static pthread_mutex_t write_lock = PTHREAD_MUTEX_INITIALIZER;

static void die(const char *what)
{
    fprintf(stderr, "pagecache_floor: %s: %s\n", what, strerror(errno));
    exit(1);
}

static double now(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return ts.tv_sec + ts.tv_nsec / 1e9;
}

static double cpu(double *user, double *sys)
{
    struct rusage ru;
    getrusage(RUSAGE_SELF, &ru);
    *user = ru.ru_utime.tv_sec + ru.ru_utime.tv_usec / 1e6;
    *sys = ru.ru_stime.tv_sec + ru.ru_stime.tv_usec / 1e6;
    return *user + *sys;
}

static int new_file(int k, uint64_t len)
{
    char path[4096];
    snprintf(path, sizeof(path), "%s/pcf-%d-%d", dir, (int)getpid(), k);
    int fd = open(path, O_RDWR | O_CREAT | O_EXCL | O_CLOEXEC, 0600);
    if (fd < 0)
        die(path);
    if (ftruncate(fd, (off_t)len))
        die("ftruncate");
    unlink(path); /* freed at close, after the measurement */
    return fd;
}

static char *source_buffer(uint64_t len, unsigned seed)
{
    char *b = aligned_alloc(PAGE, len);
    if (!b)
        die("aligned_alloc");
    for (uint64_t i = 0; i < len; i++)
        b[i] = (char)(rand_r(&seed) >> 7);
    return b;
}

static void pwrite_all(int fd, const char *buf, uint64_t len, uint64_t off)
{
    while (len) {
        ssize_t r = pwrite(fd, buf, len, (off_t)off);
        if (r < 0) {
            if (errno == EINTR)
                continue;
            die("pwrite");
        }
        buf += r;
        len -= (uint64_t)r;
        off += (uint64_t)r;
    }
}

/* ------------------------------------------------------------------- threads */

struct job {
    int fd;
    char *map;
    uint64_t first, end, step; /* pieces [first, end) of `chunk` bytes, every `step` */
    int locked;
    unsigned seed;
};

static void *pwriter(void *arg)
{
    struct job *j = arg;
    char *src = source_buffer(chunk, j->seed);
    for (uint64_t p = j->first; p < j->end; p += j->step) {
        if (j->locked)
            pthread_mutex_lock(&write_lock);
        pwrite_all(j->fd, src, chunk, p * chunk);
        if (j->locked)
            pthread_mutex_unlock(&write_lock);
    }
    free(src);
    return NULL;
}

static void *copier(void *arg)
{
    struct job *j = arg;
    char *src = source_buffer(chunk, j->seed);
    for (uint64_t p = j->first; p < j->end; p += j->step)
        memcpy(j->map + p * chunk, src, chunk);
    free(src);
    return NULL;
}

/* The populate thread stays at most `ahead` bytes in front of the copier's progress. */
static volatile uint64_t copied_upto;
static void *populator(void *arg)
{
    struct job *j = arg;
    const uint64_t step = 2 * MiB, ahead = 8 * MiB;
    for (uint64_t off = 0; off < size; off += step) {
        while (off > __atomic_load_n(&copied_upto, __ATOMIC_ACQUIRE) + ahead)
            sched_yield();
        if (madvise(j->map + off, step, MADV_POPULATE_WRITE))
            die("madvise(MADV_POPULATE_WRITE)");
    }
    return NULL;
}

static void run2(void *(*fn)(void *), struct job *a, struct job *b)
{
    pthread_t t;
    if (pthread_create(&t, NULL, fn, b))
        die("pthread_create");
    fn(a);
    pthread_join(t, NULL);
}

static char *map_file(int fd, uint64_t len)
{
    char *m = mmap(NULL, len, PROT_READ | PROT_WRITE, MAP_SHARED, fd, 0);
    if (m == MAP_FAILED)
        die("mmap");
    return m;
}

static uint64_t *shuffled_pages(uint64_t n, unsigned seed)
{
    uint64_t *o = malloc(n * sizeof(*o));
    for (uint64_t i = 0; i < n; i++)
        o[i] = i;
    for (uint64_t i = n - 1; i > 0; i--) {
        uint64_t k = ((uint64_t)rand_r(&seed) << 31 ^ (uint64_t)rand_r(&seed)) % (i + 1);
        uint64_t t = o[i];
        o[i] = o[k];
        o[k] = t;
    }
    return o;
}

/* --------------------------------------------------------------------- main */

int main(int argc, char **argv)
{
    if (argc < 4) {
        fprintf(stderr, "usage: pagecache_floor ROUTE DIR SIZE_MIB [CHUNK_KIB]\n");
        return 2;
    }
    const char *route = argv[1];
    dir = argv[2];
    size = strtoull(argv[3], NULL, 10) * MiB;
    chunk = (argc > 4 ? strtoull(argv[4], NULL, 10) : 256) << 10;
    if (!strcmp(route, "write1-big"))
        chunk = 2 * MiB;
    uint64_t pieces = size / chunk, npages = size / PAGE;
    int fd = new_file(0, size), fd2 = -1;
    char *map = NULL, *src = NULL;
    uint64_t *order = NULL;
    struct job a = {.fd = fd, .first = 0, .end = pieces, .step = 1, .seed = 1};
    struct job b = a;
    b.seed = 2;

    /* Set-up that is not part of the route. */
    int zero_route = !strncmp(route, "zero-", 5);
    if (!strcmp(route, "write1-4k") || !strcmp(route, "mmap1-4k") || zero_route) {
        order = shuffled_pages(npages, 7);
        src = source_buffer(PAGE, 3);
    }
    if (zero_route) {
        char *fill = source_buffer(chunk, 5);
        for (uint64_t p = 0; p < pieces; p++)
            pwrite_all(fd, fill, chunk, p * chunk);
        free(fill);
        memset(src, 0, PAGE);
    }
    if (!strncmp(route, "mmap", 4) || !strcmp(route, "populate-mmap") ||
        !strcmp(route, "falloc-mmap") || !strcmp(route, "zero-check"))
        map = map_file(fd, size);
    if (!strcmp(route, "write2-files")) {
        close(fd);
        fd = new_file(0, size / 2);
        fd2 = new_file(1, size / 2);
    }

    double u0, s0, u1, s1;
    double c0 = cpu(&u0, &s0), t0 = now();
    if (!strcmp(route, "write1") || !strcmp(route, "write1-big")) {
        pwriter(&a);
    } else if (!strcmp(route, "write2-shared") || !strcmp(route, "write2-locked")) {
        a.step = b.step = 2;
        b.first = 1;
        a.locked = b.locked = !strcmp(route, "write2-locked");
        run2(pwriter, &a, &b);
    } else if (!strcmp(route, "write2-ranges")) {
        a.end = b.first = pieces / 2;
        run2(pwriter, &a, &b);
    } else if (!strcmp(route, "write2-files")) {
        a.end = b.end = pieces / 2;
        b.fd = fd2;
        run2(pwriter, &a, &b);
    } else if (!strcmp(route, "mmap1")) {
        a.map = map;
        copier(&a);
        munmap(map, size);
    } else if (!strcmp(route, "mmap2")) {
        a.map = b.map = map;
        a.end = b.first = pieces / 2;
        run2(copier, &a, &b);
        munmap(map, size);
    } else if (!strcmp(route, "populate-mmap")) {
        pthread_t t;
        a.map = map;
        if (pthread_create(&t, NULL, populator, &a))
            die("pthread_create");
        char *s = source_buffer(chunk, 1);
        for (uint64_t p = 0; p < pieces; p++) {
            memcpy(map + p * chunk, s, chunk);
            __atomic_store_n(&copied_upto, (p + 1) * chunk, __ATOMIC_RELEASE);
        }
        pthread_join(t, NULL);
        free(s);
        munmap(map, size);
    } else if (!strcmp(route, "falloc-mmap") || !strcmp(route, "falloc-write")) {
        if (fallocate(fd, FALLOC_FL_KEEP_SIZE, 0, (off_t)size))
            die("fallocate");
        if (map) {
            a.map = map;
            copier(&a);
            munmap(map, size);
        } else {
            pwriter(&a);
        }
    } else if (!strcmp(route, "write1-4k")) {
        for (uint64_t i = 0; i < npages; i++)
            pwrite_all(fd, src, PAGE, order[i] * PAGE);
    } else if (!strcmp(route, "mmap1-4k")) {
        for (uint64_t i = 0; i < npages; i++)
            memcpy(map + order[i] * PAGE, src, PAGE);
        munmap(map, size);
    } else if (!strcmp(route, "zero-punch")) {
        for (uint64_t i = 0; i < npages; i += 8)
            if (fallocate(fd, FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE,
                          (off_t)(order[i] * PAGE), PAGE))
                die("fallocate(PUNCH_HOLE)");
    } else if (!strcmp(route, "zero-write")) {
        for (uint64_t i = 0; i < npages; i += 8)
            pwrite_all(fd, src, PAGE, order[i] * PAGE);
    } else if (!strcmp(route, "zero-check")) {
        for (uint64_t i = 0; i < npages; i += 8) {
            char *p = map + order[i] * PAGE;
            if (memcmp(p, src, PAGE))
                memset(p, 0, PAGE);
        }
        munmap(map, size);
    } else {
        fprintf(stderr, "pagecache_floor: unknown route %s\n", route);
        return 2;
    }
    double t1 = now(), c1 = cpu(&u1, &s1);
    printf("{\"route\": \"%s\", \"bytes\": %lu, \"chunk\": %lu, \"wall_s\": %.4f, "
           "\"cpu_s\": %.4f, \"user_s\": %.4f, \"sys_s\": %.4f}\n",
           route, (unsigned long)(zero_route ? size / 8 : size), (unsigned long)chunk,
           t1 - t0, c1 - c0, u1 - u0, s1 - s0);
    close(fd);
    if (fd2 >= 0)
        close(fd2);
    return 0;
}
