/*
 * A test-only stand-in for fdatasync(2), preloaded into p11kmsd by
 * tests/integration/test_audit_sync.py (LD_PRELOAD) to show what the audit
 * log's group commit does when the disk is slow or fails. With
 * P11KMS_SYNCSHIM_DIR set, each call looks in that folder first:
 *
 *   fail   present: the call fails with EIO, as a disk that lost the data would
 *   hold   present: the call waits until it is removed (a very slow disk)
 *
 * Otherwise it is the real fdatasync. Not installed; built by `make check`.
 */
#define _GNU_SOURCE
#include <dlfcn.h>
#include <errno.h>
#include <stdio.h>
#include <stdlib.h>
#include <time.h>
#include <unistd.h>

static int present(const char *dir, const char *name)
{
    char path[4096];
    if (snprintf(path, sizeof path, "%s/%s", dir, name) >= (int)sizeof path)
        return 0;
    return access(path, F_OK) == 0;
}

int fdatasync(int fd)
{
    static int (*real)(int);
    const char *dir = getenv("P11KMS_SYNCSHIM_DIR");
    if (!real)
        real = (int (*)(int))dlsym(RTLD_NEXT, "fdatasync");
    while (dir && *dir) {
        if (present(dir, "fail")) {
            errno = EIO;
            return -1;
        }
        if (!present(dir, "hold"))
            break;
        struct timespec ms = {0, 2000000};
        nanosleep(&ms, NULL);
    }
    if (!real) {
        errno = ENOSYS;
        return -1;
    }
    return real(fd);
}
