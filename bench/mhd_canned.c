/*
 * The HTTP layer's ceiling (issue 11): a bare libmicrohttpd server with
 * p11kmsd's daemon flags, threading and limits (src/server/http.c,
 * kms_http_start; defaults from src/server/settings.c) that reads each
 * POST / body in full and answers 200 with a canned GenerateDataKey-shaped
 * JSON body, with no signature check, JSON, token call or worker pool
 * between. Run the load generator against it as against p11kmsd.
 *
 *   bench/mhd_canned [--listen HOST:PORT] [--threads N] [--size BYTES]
 *
 * --listen defaults to 127.0.0.1:0 (port 0: the kernel picks one), --threads
 * to p11kmsd's 4, --size to 274: the body of a real GenerateDataKey answer
 * from `p11kmsd --dev` (alias/dev, AES_256), measured with boto3 (the same
 * with or without an encryption context: the blob does not carry it). The
 * answer also carries the same headers: Content-Type, x-amzn-RequestId
 * (fixed here) and libmicrohttpd's Date and Content-Length. HTTP/1.1
 * keep-alive as libmicrohttpd does it. Prints "serving http://HOST:PORT"
 * (flushed) once listening; runs until SIGTERM or SIGINT, then exits 0.
 * Exits 1 when it cannot listen, 2 on a usage error.
 */
#include "config.h"

#include <microhttpd.h>
#include <netdb.h>
#include <pthread.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#define JSON_TYPE "application/x-amz-json-1.1"
#define REQUEST_ID "00000000-0000-4000-8000-000000000000"
#define GENERATE_DATA_KEY_SIZE 274
#define PREFIX                                                                                    \
    "{\"KeyId\":\"arn:aws:kms:us-east-1:111122223333:key/00000000-0000-4000-8000-000000000000\"," \
    "\"CiphertextBlob\":\""
#define SUFFIX "\",\"Plaintext\":\"AAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA=\"}"
#define MIN_SIZE (sizeof PREFIX - 1 + sizeof SUFFIX - 1)

/* p11kmsd's defaults (src/server/settings.c, kms_config_defaults). */
struct opts {
    const char *listen;
    unsigned threads;
    size_t size;
    unsigned connection_timeout_s, max_connections, per_ip_connections;
    size_t max_header;
};

static char *body;
static size_t body_len;
static char marker; /* *con_cls once a request has begun */

/* GenerateDataKey's shape, the blob padded so the whole is exactly n bytes. */
static int make_body(size_t n)
{
    body = malloc(n);
    if (!body)
        return -1;
    memcpy(body, PREFIX, sizeof PREFIX - 1);
    memset(body + sizeof PREFIX - 1, 'A', n - MIN_SIZE);
    memcpy(body + n - (sizeof SUFFIX - 1), SUFFIX, sizeof SUFFIX - 1);
    body_len = n;
    return 0;
}

static enum MHD_Result answer(struct MHD_Connection *c, unsigned status, const char *data, size_t n)
{
    struct MHD_Response *r =
        MHD_create_response_from_buffer(n, (void *)data, MHD_RESPMEM_PERSISTENT);
    if (!r)
        return MHD_NO;
    MHD_add_response_header(r, "Content-Type", JSON_TYPE);
    MHD_add_response_header(r, "x-amzn-RequestId", REQUEST_ID);
    enum MHD_Result ret = MHD_queue_response(c, status, r);
    MHD_destroy_response(r);
    return ret;
}

/* In stages, as p11kmsd's on_request: begin, take the body as it comes, answer at its end. */
static enum MHD_Result on_request(void *cls, struct MHD_Connection *c, const char *url,
                                  const char *method, const char *version, const char *upload,
                                  size_t *upload_size, void **con_cls)
{
    static const char refused[] = "{\"__type\":\"UnknownOperationException\"}";
    (void)cls;
    (void)version;
    (void)upload;
    if (!*con_cls) {
        if (strcmp(method, "POST") != 0 || strcmp(url, "/") != 0)
            return answer(c, 400, refused, sizeof refused - 1);
        *con_cls = &marker;
        return MHD_YES;
    }
    if (*upload_size) {
        *upload_size = 0; /* read and dropped */
        return MHD_YES;
    }
    return answer(c, 200, body, body_len);
}

static void mhd_log(void *cls, const char *fmt, va_list ap)
{
    (void)cls;
    (void)fmt;
    (void)ap; /* p11kmsd keeps these for debug logs only */
}

static struct MHD_Daemon *start(const struct opts *o, unsigned *port)
{
    char host[256], port_text[8];
    const char *colon = strrchr(o->listen, ':');
    struct addrinfo hints = {0}, *ai = NULL;
    unsigned flags = MHD_USE_INTERNAL_POLLING_THREAD | MHD_USE_AUTO | MHD_USE_ERROR_LOG |
                     MHD_USE_ITC | MHD_ALLOW_SUSPEND_RESUME;

    if (!colon || (size_t)(colon - o->listen) >= sizeof host)
        return NULL;
    snprintf(host, sizeof host, "%.*s", (int)(colon - o->listen), o->listen);
    snprintf(port_text, sizeof port_text, "%s", colon + 1);
    hints.ai_family = AF_UNSPEC;
    hints.ai_socktype = SOCK_STREAM;
    hints.ai_flags = AI_PASSIVE;
    if (getaddrinfo(host, port_text, &hints, &ai) != 0 || !ai)
        return NULL;
    if (ai->ai_family == AF_INET6)
        flags |= MHD_USE_IPv6;
    struct MHD_Daemon *d = MHD_start_daemon(
        flags, (uint16_t)atoi(port_text), NULL, NULL, on_request, NULL, MHD_OPTION_SOCK_ADDR,
        ai->ai_addr, MHD_OPTION_THREAD_POOL_SIZE, o->threads, MHD_OPTION_CONNECTION_TIMEOUT,
        o->connection_timeout_s, MHD_OPTION_CONNECTION_LIMIT, o->max_connections,
        MHD_OPTION_PER_IP_CONNECTION_LIMIT, o->per_ip_connections,
        MHD_OPTION_CONNECTION_MEMORY_LIMIT, o->max_header, MHD_OPTION_EXTERNAL_LOGGER, mhd_log,
        NULL, MHD_OPTION_END);
    freeaddrinfo(ai);
    const union MHD_DaemonInfo *info = d ? MHD_get_daemon_info(d, MHD_DAEMON_INFO_BIND_PORT) : NULL;
    *port = info ? info->port : 0;
    return d;
}

static int parse(int argc, char **argv, struct opts *o)
{
    *o = (struct opts){"127.0.0.1:0", 4, GENERATE_DATA_KEY_SIZE, 30, 4096, 0, 16 * 1024};
    for (int i = 1; i + 1 < argc; i += 2) {
        if (strcmp(argv[i], "--listen") == 0)
            o->listen = argv[i + 1];
        else if (strcmp(argv[i], "--threads") == 0)
            o->threads = (unsigned)strtoul(argv[i + 1], NULL, 10);
        else if (strcmp(argv[i], "--size") == 0)
            o->size = strtoul(argv[i + 1], NULL, 10);
        else
            return -1;
    }
    return argc % 2 == 1 && o->threads >= 1 && o->threads <= 256 && o->size >= MIN_SIZE ? 0 : -1;
}

int main(int argc, char **argv)
{
    struct opts o;
    sigset_t stop;
    unsigned port = 0;
    int sig = 0;

    if (parse(argc, argv, &o) != 0) {
        fprintf(stderr,
                "usage: mhd_canned [--listen HOST:PORT] [--threads N] [--size BYTES]\n"
                "       (--size at least %zu)\n",
                MIN_SIZE);
        return 2;
    }
    signal(SIGPIPE, SIG_IGN);
    sigemptyset(&stop);
    sigaddset(&stop, SIGINT);
    sigaddset(&stop, SIGTERM);
    pthread_sigmask(SIG_BLOCK, &stop, NULL); /* before the daemon's threads inherit the mask */
    struct MHD_Daemon *d = make_body(o.size) == 0 ? start(&o, &port) : NULL;
    if (!d) {
        fprintf(stderr, "mhd_canned: cannot listen on %s\n", o.listen);
        free(body);
        return 1;
    }
    printf("serving http://%.*s:%u\n", (int)(strrchr(o.listen, ':') - o.listen), o.listen, port);
    fflush(stdout);
    sigwait(&stop, &sig);
    MHD_stop_daemon(d);
    free(body);
    return 0;
}
