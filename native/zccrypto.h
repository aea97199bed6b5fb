/* The interface of zccrypto.c: AES-128-OCB or AES-128-GCM, and HKDF-SHA256, through
 * OpenSSL's libcrypto.
 * _build.py feeds this file (less its # lines) to cffi's cdef beside zcnative.h, so it
 * must stay plain declarations that cffi can parse: constants are enums, not #defines. */
#include <stddef.h>
#include <stdint.h>

enum {
    ZCC_KEY_LEN = 32,     /* the shared key, and the HKDF keys of the handshake's MACs */
    ZCC_AEAD_KEY_LEN = 16, /* AES-128: a session key, derived per stream with HKDF */
    ZCC_NONCE_LEN = 12,   /* 96-bit nonces: GCM's deterministic form (SP 800-38D 8.2.1),
                             OCB's recommended length (RFC 7253 4.2) */
    ZCC_TAG_LEN = 16,     /* full-length tags only */
    ZCC_HKDF_MAX = 8160   /* RFC 5869 2.3: L <= 255 * HashLen */
};

/* Return codes: 0 is success; these are negative and never an errno. */
enum {
    ZCC_EAUTH = -20,   /* the tag did not verify: the output was zeroed */
    ZCC_EBOUNDS = -21, /* a page outside the image, or the output too small: nothing done */
    ZCC_EINVAL = -22,  /* a bad argument (length, NULL, overlap): nothing done */
    ZCC_EBUSY = -23,   /* the context is in use by another thread: nothing done */
    ZCC_ECRYPTO = -24  /* libcrypto failed (out of memory...): see each function */
};

/* The AEADs a session may use (channel/aead.py names them on the wire). */
enum {
    ZCC_AES_128_OCB = 1, /* RFC 7253, 128-bit tags */
    ZCC_AES_128_GCM = 2  /* SP 800-38D, 128-bit tags */
};

/* One AES-128 key for one of the AEADs above, its schedules computed once: NULL for an
 * unknown cipher id or a key of the wrong length. A context serves one thread at a time:
 * a second concurrent call gets ZCC_EBUSY rather than corrupting the first. */
struct zcc_aead;

struct zcc_aead *zcc_aead_new(const uint8_t *key, size_t key_len, int cipher_id);
void zcc_aead_free(struct zcc_aead *a);

int zcc_seal(struct zcc_aead *a, const uint8_t *nonce, const uint8_t *aad, size_t aad_len,
             const uint8_t *in, uint8_t *out, uint64_t len, uint8_t *tag);
/* One sealed unit of `lead` (lead_len bytes: a packet's offsets) followed by n pages read at
 * `offsets` in the mapping [base, base + image_size): its ciphertext in out[0, lead_len +
 * n * page_size), out_capacity bytes at most, the tag in tag[0, 16). */
int zcc_seal_pages(struct zcc_aead *a, const uint8_t *nonce, const uint8_t *aad,
                   size_t aad_len, const uint8_t *lead, uint64_t lead_len, uint64_t base,
                   uint64_t image_size, const uint64_t *offsets, uint32_t n,
                   uint32_t page_size, uint8_t *out, uint64_t out_capacity, uint8_t *tag);
int zcc_open(struct zcc_aead *a, const uint8_t *nonce, const uint8_t *aad, size_t aad_len,
             const uint8_t *in, uint8_t *out, uint64_t len, const uint8_t *tag);
/* The reverse of zcc_seal_pages without a lead: in_len = n * page_size bytes of ciphertext
 * (page_size a multiple of the 16-byte block, else ZCC_EINVAL)
 * at `in`, decrypted straight into the mapping [base, base + image_size) at `offsets`,
 * then the tag checked. On ZCC_EAUTH (or ZCC_ECRYPTO) every one of those n pages of the
 * mapping has been zeroed; on any other error nothing was written. */
int zcc_open_pages(struct zcc_aead *a, const uint8_t *nonce, const uint8_t *aad,
                   size_t aad_len, const uint8_t *in, uint64_t in_len, uint64_t base,
                   uint64_t image_size, const uint64_t *offsets, uint32_t n,
                   uint32_t page_size, const uint8_t *tag);

int zcc_hkdf_sha256(const uint8_t *salt, size_t salt_len, const uint8_t *ikm, size_t ikm_len,
                    const uint8_t *info, size_t info_len, uint8_t *out, size_t out_len);
