#include "config.h"

#include "common/random.h"

#include <openssl/crypto.h>
#include <openssl/rand.h>
#include <pthread.h>
#include <string.h>

#define POOL 512
#define MOST 64

struct pool {
    unsigned char bytes[POOL];
    size_t left; /* unused bytes, at the end of bytes */
};

static __thread struct pool pool;
static pthread_once_t at_fork_once = PTHREAD_ONCE_INIT;

/* In the child, on the thread that forked: what the parent may also hand out goes. */
static void forget_in_child(void)
{
    OPENSSL_cleanse(&pool, sizeof pool);
}

static void register_at_fork(void)
{
    pthread_atfork(NULL, NULL, forget_in_child);
}

kms_err kms_random_public(void *out, size_t n)
{
    KMS_ENSURE(n <= MOST, KMS_ERR_INTERNAL, "at most %d public random bytes at once", MOST);
    pthread_once(&at_fork_once, register_at_fork);
    if (pool.left < n) {
        KMS_ENSURE(RAND_bytes(pool.bytes, POOL) == 1, KMS_ERR_INTERNAL, "random generator failed");
        pool.left = POOL;
    }
    unsigned char *from = pool.bytes + POOL - pool.left;
    memcpy(out, from, n);
    OPENSSL_cleanse(from, n); /* handed out once */
    pool.left -= n;
    return KMS_OK;
}
