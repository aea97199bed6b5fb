/*
 * zccrypto: AES-128-OCB or AES-128-GCM, and HKDF-SHA256, for zcmigrate, through OpenSSL's
 * libcrypto.
 *
 * No home-made crypto: every byte of cipher, tag and key derivation comes from OpenSSL's
 * EVP interfaces. What is ours is the loop around them: sealing pages gathered from a
 * mapping straight into one contiguous send buffer (one pass, no staging copy), opening
 * such ciphertext straight back into a mapping's pages (the inverse), and the bounds
 * checks that keep those loops inside the image and the output. It decides no
 * policy: nonces and keys come from the caller (channel/aead.py owns them), and every
 * function returns 0 or a ZCC_E* code. cffi releases the GIL around every call.
 */
#include <limits.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include <openssl/core_names.h>
#include <openssl/crypto.h>
#include <openssl/err.h>
#include <openssl/evp.h>
#include <openssl/kdf.h>
#include <openssl/params.h>

#include "zccrypto.h"
#include "zcruns.h"

/* SP 800-38D 5.2.1.1: at most 2^39 - 256 bits of plaintext under one nonce (GCM's limit;
 * OCB's is far larger, and one limit for both keeps the checks alike). */
#define AEAD_MAX_BYTES ((UINT64_C(1) << 36) - 32)
/* EVP_CipherUpdate takes an int length: feed it pieces no larger than this. */
#define UPDATE_CHUNK (1 << 30)

struct zcc_aead {
    /* Key schedules set once in zcc_aead_new, one context per direction: OCB decrypts with
     * AES's inverse cipher, whose schedule OpenSSL makes only for a context keyed to
     * decrypt. Each call sets only the IV of one of them. */
    EVP_CIPHER_CTX *enc, *dec;
    EVP_CIPHER_CTX *ctx; /* the call under way: enc or dec */
    int busy;            /* one call at a time: an EVP_CIPHER_CTX is not thread-safe */
};

struct zcc_aead *zcc_aead_new(const uint8_t *key, size_t key_len, int cipher_id)
{
    const char *name = cipher_id == ZCC_AES_128_OCB ? "AES-128-OCB"
                       : cipher_id == ZCC_AES_128_GCM ? "AES-128-GCM" : NULL;
    if (key == NULL || key_len != ZCC_AEAD_KEY_LEN || name == NULL)
        return NULL;
    struct zcc_aead *a = calloc(1, sizeof *a);
    if (a == NULL)
        return NULL;
    /* AES-128, not 256: 7 % faster here (openssl speed -evp, 64 KiB: 4.16 against 3.87
     * GB/s for GCM), and the cipher is most of what encryption costs a migration on shared
     * cores; OCB, the default, runs at 8.0 GB/s (docs/security.md says why both are
     * offered and why 128-bit session keys are enough). */
    EVP_CIPHER *cipher = EVP_CIPHER_fetch(NULL, name, NULL);
    a->enc = EVP_CIPHER_CTX_new();
    a->dec = EVP_CIPHER_CTX_new();
    /* Key now, no IV: every message sets only its IV and keeps the expanded key. */
    if (cipher == NULL || a->enc == NULL || a->dec == NULL ||
        !EVP_EncryptInit_ex2(a->enc, cipher, key, NULL, NULL) ||
        !EVP_DecryptInit_ex2(a->dec, cipher, key, NULL, NULL)) {
        EVP_CIPHER_free(cipher);
        EVP_CIPHER_CTX_free(a->enc);
        EVP_CIPHER_CTX_free(a->dec);
        free(a);
        ERR_clear_error();
        return NULL;
    }
    EVP_CIPHER_free(cipher); /* the context holds its own reference */
    return a;
}

void zcc_aead_free(struct zcc_aead *a)
{
    if (a == NULL)
        return;
    EVP_CIPHER_CTX_free(a->enc); /* cleanses the key schedules */
    EVP_CIPHER_CTX_free(a->dec);
    free(a);
}

/* ---------------------------------------------------------------------- helpers */

static int take(struct zcc_aead *a)
{
    return __atomic_exchange_n(&a->busy, 1, __ATOMIC_ACQUIRE) == 0;
}

static void give(struct zcc_aead *a)
{
    __atomic_store_n(&a->busy, 0, __ATOMIC_RELEASE);
}

static int overlaps(const void *x, uint64_t xlen, const void *y, uint64_t ylen)
{
    uintptr_t a = (uintptr_t)x, b = (uintptr_t)y;
    return xlen && ylen && a < b + ylen && b < a + xlen;
}

/* The arguments every AEAD call shares: a context, a nonce, AAD that fits an int. */
static int common_ok(const struct zcc_aead *a, const uint8_t *nonce, const uint8_t *aad,
                     size_t aad_len)
{
    return a != NULL && nonce != NULL && (aad_len == 0 || aad != NULL) && aad_len <= INT_MAX;
}

static int begin(struct zcc_aead *a, const uint8_t *nonce, const uint8_t *aad, size_t aad_len,
                 int enc)
{
    int outl;
    a->ctx = enc ? a->enc : a->dec;
    if (!EVP_CipherInit_ex2(a->ctx, NULL, NULL, nonce, enc, NULL))
        return ZCC_ECRYPTO;
    if (aad_len && !EVP_CipherUpdate(a->ctx, NULL, &outl, aad, (int)aad_len))
        return ZCC_ECRYPTO;
    return 0;
}

/* `len` bytes through the cipher; what comes out is written from `out` on and counted in
 * *done. GCM, a stream mode, gives back every byte at once; OCB holds back a partial last
 * block until Final, so only the caller's count says where the output stands. */
static int update(struct zcc_aead *a, uint8_t *out, const uint8_t *in, uint64_t len,
                  uint64_t *done)
{
    while (len) {
        int n = len > UPDATE_CHUNK ? UPDATE_CHUNK : (int)len, outl = 0;
        if (!EVP_CipherUpdate(a->ctx, out, &outl, in, n) || outl < 0)
            return ZCC_ECRYPTO;
        in += n;
        out += outl;
        *done += (uint64_t)outl;
        len -= (uint64_t)n;
    }
    return 0;
}

/* Final (the held-back bytes, if any, to `tail`) and the tag. */
static int finish_seal(struct zcc_aead *a, uint8_t *tail, uint64_t *done, uint8_t *tag)
{
    int outl = 0;
    if (!EVP_EncryptFinal_ex(a->ctx, tail, &outl) ||
        !EVP_CIPHER_CTX_ctrl(a->ctx, EVP_CTRL_AEAD_GET_TAG, ZCC_TAG_LEN, tag))
        return ZCC_ECRYPTO;
    *done += (uint64_t)outl;
    return 0;
}

/* Every offset names a whole, aligned page inside the image: checked for all of them
 * before any byte is read or written, since the offsets come from a caller (or, through
 * it, a peer) that may be wrong. 0 or ZCC_EBOUNDS. */
static int pages_in_image(const uint64_t *offsets, uint32_t n, uint32_t page_size,
                          uint64_t image_size)
{
    for (uint32_t i = 0; i < n; i++) {
        uint64_t off = offsets[i];
        if (off % page_size || off > image_size || image_size - off < page_size)
            return ZCC_EBOUNDS;
    }
    return 0;
}

/* The cipher over a packet's pages, one update per run of adjacent pages: from the
 * mapping into `linear` (seal: gather) or from `linear` into the mapping (open: scatter).
 * Either way one pass over the bytes, no staging copy. The gather writes its output where
 * *done says (after a lead whose last partial block OCB may still hold); the scatter must
 * get every run back whole, or a page would land short: a run is whole pages, whole
 * cipher blocks, so it always does, and anything else is ZCC_ECRYPTO. */
static int cipher_runs(struct zcc_aead *a, uint64_t base, const uint64_t *offsets, uint32_t n,
                       uint32_t page_size, uint8_t *linear, int into_mapping, uint64_t *done)
{
    uint32_t i = 0;
    while (i < n) {
        uint32_t j = run_end(offsets, i, n, page_size);
        uint64_t run = (uint64_t)(j - i) * page_size;
        uint8_t *page = (uint8_t *)(uintptr_t)(base + offsets[i]);
        int rc;
        if (into_mapping) {
            uint64_t got = 0;
            rc = update(a, page, linear, run, &got);
            if (!rc && got != run)
                rc = ZCC_ECRYPTO;
            *done += got;
            linear += run;
        } else {
            rc = update(a, linear + *done, page, run, done);
        }
        if (rc)
            return rc;
        i = j;
    }
    return 0;
}

/* ------------------------------------------------------------------------- seal */

int zcc_seal(struct zcc_aead *a, const uint8_t *nonce, const uint8_t *aad, size_t aad_len,
             const uint8_t *in, uint8_t *out, uint64_t len, uint8_t *tag)
{
    if (!common_ok(a, nonce, aad, aad_len) || tag == NULL ||
        (len && (in == NULL || out == NULL)) || len > AEAD_MAX_BYTES)
        return ZCC_EINVAL;
    /* In place (in == out) is fine; a shifted overlap would read what it just wrote. */
    if ((in != out && overlaps(in, len, out, len)) || overlaps(tag, ZCC_TAG_LEN, out, len))
        return ZCC_EINVAL;
    if (!take(a))
        return ZCC_EBUSY;
    uint64_t done = 0;
    int rc = begin(a, nonce, aad, aad_len, 1);
    if (!rc)
        rc = update(a, out, in, len, &done);
    if (!rc)
        rc = finish_seal(a, out + done, &done, tag);
    if (!rc && done != len)
        rc = ZCC_ECRYPTO;
    give(a);
    if (rc)
        ERR_clear_error();
    return rc;
}

int zcc_seal_pages(struct zcc_aead *a, const uint8_t *nonce, const uint8_t *aad,
                   size_t aad_len, const uint8_t *lead, uint64_t lead_len, uint64_t base,
                   uint64_t image_size, const uint64_t *offsets, uint32_t n,
                   uint32_t page_size, uint8_t *out, uint64_t out_capacity, uint8_t *tag)
{
    if (!common_ok(a, nonce, aad, aad_len) || tag == NULL || page_size == 0 ||
        (n && offsets == NULL) || (lead_len && lead == NULL) || lead_len > AEAD_MAX_BYTES ||
        ((n || lead_len) && out == NULL))
        return ZCC_EINVAL;
    uint64_t pages = (uint64_t)n * page_size; /* < 2^64: both factors are 32-bit */
    if (pages > AEAD_MAX_BYTES - lead_len)
        return ZCC_EINVAL;
    uint64_t total = lead_len + pages;
    if (total > out_capacity)
        return ZCC_EBOUNDS;
    /* A seal must never read outside the image (nor leak what lies beside it). */
    if (pages_in_image(offsets, n, page_size, image_size))
        return ZCC_EBOUNDS;
    const void *image = (const void *)(uintptr_t)base;
    if (overlaps(out, total, image, image_size) || overlaps(tag, ZCC_TAG_LEN, out, total))
        return ZCC_EINVAL;
    /* The lead may be sealed in place (lead == out), never from a shifted overlap. */
    if (lead != out && overlaps(lead, lead_len, out, total))
        return ZCC_EINVAL;
    if (!take(a))
        return ZCC_EBUSY;
    uint64_t done = 0;
    int rc = begin(a, nonce, aad, aad_len, 1);
    /* One AEAD message: the lead, then the pages, so the receiver opens them as one unit
     * under one tag (a packet's offsets and its pages). */
    if (!rc && lead_len)
        rc = update(a, out, lead, lead_len, &done);
    /* The fused gather: each run's ciphertext straight into the send buffer. */
    if (!rc)
        rc = cipher_runs(a, base, offsets, n, page_size, out, 0, &done);
    if (!rc)
        rc = finish_seal(a, out + done, &done, tag);
    if (!rc && done != total)
        rc = ZCC_ECRYPTO;
    give(a);
    if (rc)
        ERR_clear_error();
    return rc;
}

/* ------------------------------------------------------------------------- open */

/* An open's start: the IV, the AAD and the expected tag (copied by the caller first: it
 * may sit right after the ciphertext in the caller's buffer). */
static int begin_open(struct zcc_aead *a, const uint8_t *nonce, const uint8_t *aad,
                      size_t aad_len, uint8_t *want)
{
    int rc = begin(a, nonce, aad, aad_len, 0);
    if (!rc && !EVP_CIPHER_CTX_ctrl(a->ctx, EVP_CTRL_AEAD_SET_TAG, ZCC_TAG_LEN, want))
        rc = ZCC_ECRYPTO;
    return rc;
}

/* Both AEADs decrypt before they can verify, so the output holds unverified plaintext until
 * here; Final compares the tags (in constant time): 0 or ZCC_EAUTH. */
static int finish_open(struct zcc_aead *a, uint8_t *tail, uint64_t *done)
{
    int outl = 0;
    if (EVP_DecryptFinal_ex(a->ctx, tail, &outl) <= 0)
        return ZCC_EAUTH;
    *done += (uint64_t)outl;
    return 0;
}

int zcc_open(struct zcc_aead *a, const uint8_t *nonce, const uint8_t *aad, size_t aad_len,
             const uint8_t *in, uint8_t *out, uint64_t len, const uint8_t *tag)
{
    if (!common_ok(a, nonce, aad, aad_len) || tag == NULL ||
        (len && (in == NULL || out == NULL)) || len > AEAD_MAX_BYTES)
        return ZCC_EINVAL;
    if (in != out && overlaps(in, len, out, len))
        return ZCC_EINVAL;
    /* The tag may sit right after the ciphertext in the caller's buffer: copy it first. */
    uint8_t want[ZCC_TAG_LEN];
    memcpy(want, tag, sizeof want);
    if (!take(a))
        return ZCC_EBUSY;
    uint64_t done = 0;
    int rc = begin_open(a, nonce, aad, aad_len, want);
    if (!rc)
        rc = update(a, out, in, len, &done);
    if (!rc)
        rc = finish_open(a, out + done, &done);
    if (!rc && done != len)
        rc = ZCC_ECRYPTO;
    give(a);
    if (rc) {
        /* Nothing a caller could take for verified data survives a failure: the
         * output is all zeros (in place, the ciphertext is gone too). */
        if (len)
            OPENSSL_cleanse(out, len);
        ERR_clear_error();
    }
    return rc;
}

int zcc_open_pages(struct zcc_aead *a, const uint8_t *nonce, const uint8_t *aad,
                   size_t aad_len, const uint8_t *in, uint64_t in_len, uint64_t base,
                   uint64_t image_size, const uint64_t *offsets, uint32_t n,
                   uint32_t page_size, const uint8_t *tag)
{
    /* Pages of whole cipher blocks: OCB gives a run back whole only then, and a run that
     * came back longer than itself would write past its last page. */
    if (!common_ok(a, nonce, aad, aad_len) || tag == NULL || page_size == 0 ||
        page_size % 16 || (n && (offsets == NULL || in == NULL)))
        return ZCC_EINVAL;
    /* Exactly the packet's pages: one more or fewer byte of ciphertext than the offsets
     * name and the tag could never verify, so say so before anything is written. */
    if (in_len != (uint64_t)n * page_size || in_len > AEAD_MAX_BYTES)
        return ZCC_EBOUNDS;
    /* Whatever the peer sent, the plaintext lands inside the image and nowhere else. */
    if (pages_in_image(offsets, n, page_size, image_size))
        return ZCC_EBOUNDS;
    const void *image = (const void *)(uintptr_t)base;
    if (overlaps(in, in_len, image, image_size) || overlaps(tag, ZCC_TAG_LEN, image, image_size))
        return ZCC_EINVAL;
    uint8_t want[ZCC_TAG_LEN];
    memcpy(want, tag, sizeof want);
    if (!take(a))
        return ZCC_EBUSY;
    int rc = begin_open(a, nonce, aad, aad_len, want);
    /* The fused scatter: each run decrypted straight to its place in the mapping, no
     * copy after. Until Final those pages hold plaintext that is not yet verified: the
     * caller writes only an image no guest runs from and that is committed only once
     * every packet verified (docs/security.md), and a failure below zeroes them all. */
    uint64_t done = 0;
    uint8_t tail[32];
    if (!rc)
        rc = cipher_runs(a, base, offsets, n, page_size, (uint8_t *)(uintptr_t)in, 1, &done);
    if (!rc)
        rc = finish_open(a, tail, &done);
    if (!rc && done != in_len)
        rc = ZCC_ECRYPTO;
    give(a);
    if (rc) {
        for (uint32_t i = 0; i < n; i++)
            OPENSSL_cleanse((void *)(uintptr_t)(base + offsets[i]), page_size);
        ERR_clear_error();
    }
    return rc;
}

/* ------------------------------------------------------------------------- HKDF */

int zcc_hkdf_sha256(const uint8_t *salt, size_t salt_len, const uint8_t *ikm, size_t ikm_len,
                    const uint8_t *info, size_t info_len, uint8_t *out, size_t out_len)
{
    /* An empty salt is RFC 5869's "not provided" (HashLen zeros, which is what HMAC
     * makes of an empty key); an empty IKM has no use here and OpenSSL refuses it. */
    if ((salt_len && salt == NULL) || ikm == NULL || ikm_len == 0 ||
        (info_len && info == NULL) || out == NULL || out_len == 0 || out_len > ZCC_HKDF_MAX)
        return ZCC_EINVAL;
    EVP_KDF *kdf = EVP_KDF_fetch(NULL, "HKDF", NULL);
    EVP_KDF_CTX *kctx = kdf ? EVP_KDF_CTX_new(kdf) : NULL;
    EVP_KDF_free(kdf);
    if (kctx == NULL) {
        ERR_clear_error();
        return ZCC_ECRYPTO;
    }
    OSSL_PARAM params[5], *p = params;
    *p++ = OSSL_PARAM_construct_utf8_string(OSSL_KDF_PARAM_DIGEST, (char *)"SHA256", 0);
    *p++ = OSSL_PARAM_construct_octet_string(OSSL_KDF_PARAM_KEY, (void *)ikm, ikm_len);
    if (salt_len)
        *p++ = OSSL_PARAM_construct_octet_string(OSSL_KDF_PARAM_SALT, (void *)salt, salt_len);
    if (info_len)
        *p++ = OSSL_PARAM_construct_octet_string(OSSL_KDF_PARAM_INFO, (void *)info, info_len);
    *p = OSSL_PARAM_construct_end();
    /* The default mode is extract-then-expand (RFC 5869 2.2 and 2.3). */
    int rc = EVP_KDF_derive(kctx, out, out_len, params) > 0 ? 0 : ZCC_ECRYPTO;
    EVP_KDF_CTX_free(kctx);
    if (rc) {
        OPENSSL_cleanse(out, out_len);
        ERR_clear_error();
    }
    return rc;
}
