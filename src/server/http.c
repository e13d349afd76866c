/*
 * The libmicrohttpd front end: one request state per connection request,
 * the body read into a capped buffer, SigV4 checked, the operation picked by
 * X-Amz-Target, the answer written as AWS's JSON 1.1 protocol writes it.
 */
#include "config.h"

#include <microhttpd.h>
#include <netdb.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>

#include "common/encoding.h"
#include "common/json_alloc.h"
#include "common/log.h"
#include "server/server.h"

#define JSON_TYPE "application/x-amz-json-1.1"
#define TARGET_PREFIX "TrentService."

struct req_state {
    struct kms_buf body;
    int too_large;
};

/* Response bodies may hold plaintext: cleansed when MHD lets go of them. */
static void free_body(void *cls)
{
    struct kms_buf *b = cls;
    kms_buf_free(b);
    free(b);
}

static enum MHD_Result send_buf(struct MHD_Connection *c, unsigned status, struct kms_buf *body,
                                const char *content_type, kms_err e)
{
    struct kms_buf *owned = malloc(sizeof *owned);
    struct MHD_Response *resp;
    uint8_t id[KMS_UUID_LEN];
    char request_id[KMS_UUID_TEXT_LEN + 1] = "00000000-0000-0000-0000-000000000000";
    enum MHD_Result ret;

    if (!owned) {
        kms_buf_free(body);
        return MHD_NO;
    }
    *owned = *body;
    *body = (struct kms_buf)KMS_BUF_INIT;
    resp = MHD_create_response_from_buffer_with_free_callback_cls(owned->len, owned->data,
                                                                  free_body, owned);
    if (!resp) {
        free_body(owned);
        return MHD_NO;
    }
    if (kms_uuid_new(id) == KMS_OK)
        kms_uuid_format(id, request_id);
    MHD_add_response_header(resp, "Content-Type", content_type);
    MHD_add_response_header(resp, "x-amzn-RequestId", request_id);
    if (e != KMS_OK)
        MHD_add_response_header(resp, "X-Amzn-ErrorType", kms_err_type(e));
    if (e == KMS_ERR_THROTTLED)
        MHD_add_response_header(resp, "Retry-After", "1");
    ret = MHD_queue_response(c, status, resp);
    MHD_destroy_response(resp);
    return ret;
}

static enum MHD_Result send_json(struct MHD_Connection *c, unsigned status, json_t *j, kms_err e)
{
    struct kms_buf body = KMS_BUF_INIT;
    if (j && kms_json_dump(j, 0, &body) != KMS_OK) {
        kms_buf_free(&body);
        return MHD_NO;
    }
    return send_buf(c, status, &body, JSON_TYPE, e);
}

static enum MHD_Result send_error(struct MHD_Connection *c, kms_err e)
{
    const char *msg = kms_err_message();
    json_t *j = json_pack("{s:s, s:s}", "__type", kms_err_type(e), "message", msg);
    enum MHD_Result ret = send_json(c, kms_err_status(e), j, e);
    json_decref(j);
    return ret;
}

static enum MHD_Result send_text(struct MHD_Connection *c, unsigned status, const char *text)
{
    struct kms_buf body = KMS_BUF_INIT;
    if (kms_buf_append_str(&body, text) != KMS_OK)
        return MHD_NO;
    return send_buf(c, status, &body, "text/plain", KMS_OK);
}

static enum MHD_Result serve_health(struct kms_server *srv, struct MHD_Connection *c,
                                    const char *url)
{
    if (strcmp(url, "/healthz") == 0)
        return send_text(c, 200, "ok\n");
    if (kms_hsm_ready(srv->hsm))
        return send_text(c, 200, "ready\n");
    return send_text(c, 503, "token not ready\n");
}

static kms_err parse_body(const struct kms_buf *body, json_t **out)
{
    json_error_t jerr;
    if (body->len == 0) {
        *out = json_object();
        KMS_ENSURE(*out != NULL, KMS_ERR_INTERNAL, "out of memory");
        return KMS_OK;
    }
    *out = json_loadb((const char *)body->data, body->len, JSON_REJECT_DUPLICATES, &jerr);
    KMS_ENSURE(*out != NULL, KMS_ERR_SERIALIZATION, "The request body is not valid JSON");
    if (!json_is_object(*out)) {
        json_decref(*out);
        *out = NULL;
        return KMS_FAIL(KMS_ERR_SERIALIZATION, "The request body must be a JSON object");
    }
    return KMS_OK;
}

static kms_err pick_operation(struct MHD_Connection *c, kms_op_fn *op, const char **name)
{
    const char *target = MHD_lookup_connection_value(c, MHD_HEADER_KIND, "X-Amz-Target");
    const char *type = MHD_lookup_connection_value(c, MHD_HEADER_KIND, "Content-Type");
    KMS_ENSURE(target != NULL, KMS_ERR_UNKNOWN_OPERATION,
               "The request names no operation (X-Amz-Target)");
    KMS_ENSURE(strncmp(target, TARGET_PREFIX, sizeof TARGET_PREFIX - 1) == 0,
               KMS_ERR_UNKNOWN_OPERATION, "Unknown operation %.128s", target);
    *name = target + sizeof TARGET_PREFIX - 1;
    *op = kms_op_lookup(*name);
    KMS_ENSURE(*op != NULL, KMS_ERR_UNKNOWN_OPERATION, "Unknown operation %.128s", target);
    KMS_ENSURE(type && (strncmp(type, JSON_TYPE, sizeof JSON_TYPE - 1) == 0 ||
                        strncmp(type, "application/x-amz-json-1.0", 26) == 0),
               KMS_ERR_SERIALIZATION, "Content-Type must be " JSON_TYPE);
    return KMS_OK;
}

static enum MHD_Result serve_kms(struct kms_server *srv, struct MHD_Connection *c, const char *url,
                                 const char *method, struct req_state *st)
{
    struct kms_request r = {srv, NULL, NULL, NULL};
    const char *op_name = "-";
    kms_op_fn op = NULL;
    kms_err rc;
    enum MHD_Result ret;

    kms_err_clear();
    rc = kms_auth_verify(srv, c, method, url, &st->body, &r.principal);
    if (rc == KMS_OK)
        rc = pick_operation(c, &op, &op_name);
    if (rc == KMS_OK)
        rc = parse_body(&st->body, &r.in);
    if (rc == KMS_OK)
        rc = op(&r);
    if (rc == KMS_OK) {
        ret = send_json(c, 200, r.out, KMS_OK);
    } else {
        if (kms_err_status(rc) >= 500)
            kms_error("%s by %s failed: %s (%s)", op_name, r.principal ? r.principal : "-",
                      kms_err_message(), kms_err_where());
        ret = send_error(c, rc);
    }
    kms_debug("%s %s by %s: %s", method, op_name, r.principal ? r.principal : "-",
              rc == KMS_OK ? "ok" : kms_err_type(rc));
    json_decref(r.in);
    json_decref(r.out);
    return ret;
}

static enum MHD_Result on_request(void *cls, struct MHD_Connection *c, const char *url,
                                  const char *method, const char *version, const char *upload,
                                  size_t *upload_size, void **con_cls)
{
    struct kms_server *srv = cls;
    struct req_state *st = *con_cls;

    if (!st) {
        if (strcmp(method, "GET") == 0 &&
            (strcmp(url, "/healthz") == 0 || strcmp(url, "/readyz") == 0))
            return serve_health(srv, c, url);
        if (strcmp(method, "POST") != 0 || strcmp(url, "/") != 0) {
            kms_err_clear();
            return send_error(c, KMS_FAIL(KMS_ERR_UNKNOWN_OPERATION,
                                          "Only POST / and GET /healthz, /readyz are served"));
        }
        st = calloc(1, sizeof *st);
        if (!st)
            return MHD_NO;
        *con_cls = st;
        const char *cl = MHD_lookup_connection_value(c, MHD_HEADER_KIND, "Content-Length");
        if (cl && strtoull(cl, NULL, 10) > srv->cfg.max_body) {
            st->too_large = 1;
            return send_error(c, KMS_FAIL(KMS_ERR_TOO_LARGE,
                                          "The request body is larger than %zu bytes",
                                          srv->cfg.max_body));
        }
        return MHD_YES;
    }
    if (*upload_size) {
        if (!st->too_large && st->body.len + *upload_size <= srv->cfg.max_body) {
            if (kms_buf_append(&st->body, upload, *upload_size) != KMS_OK)
                return MHD_NO;
        } else {
            st->too_large = 1;
            kms_buf_free(&st->body);
        }
        *upload_size = 0;
        return MHD_YES;
    }
    if (st->too_large)
        return send_error(c,
                          KMS_FAIL(KMS_ERR_TOO_LARGE, "The request body is larger than %zu bytes",
                                   srv->cfg.max_body));
    return serve_kms(srv, c, url, method, st);
}

static void on_completed(void *cls, struct MHD_Connection *c, void **con_cls,
                         enum MHD_RequestTerminationCode toe)
{
    struct req_state *st = *con_cls;
    if (!st)
        return;
    kms_buf_free(&st->body);
    free(st);
    *con_cls = NULL;
}

kms_err kms_http_start(struct kms_server *srv)
{
    struct addrinfo hints = {0}, *ai = NULL;
    char port_text[8];
    unsigned port;
    unsigned flags = MHD_USE_INTERNAL_POLLING_THREAD | MHD_USE_AUTO | MHD_USE_ERROR_LOG;

    KMS_GUARD(kms_parse_listen(srv->cfg.listen, srv->host, sizeof srv->host, &port));
    snprintf(port_text, sizeof port_text, "%u", port);
    hints.ai_family = AF_UNSPEC;
    hints.ai_socktype = SOCK_STREAM;
    hints.ai_flags = AI_PASSIVE;
    KMS_ENSURE(getaddrinfo(srv->host, port_text, &hints, &ai) == 0 && ai, KMS_ERR_VALIDATION,
               "cannot resolve listen address %s", srv->cfg.listen);
    if (ai->ai_family == AF_INET6)
        flags |= MHD_USE_IPv6;
    srv->daemon = MHD_start_daemon(
        flags, (uint16_t)port, NULL, NULL, on_request, srv, MHD_OPTION_SOCK_ADDR, ai->ai_addr,
        MHD_OPTION_THREAD_POOL_SIZE, (unsigned int)srv->cfg.threads, MHD_OPTION_CONNECTION_TIMEOUT,
        (unsigned int)30, MHD_OPTION_CONNECTION_LIMIT, (unsigned int)1024,
        MHD_OPTION_NOTIFY_COMPLETED, on_completed, srv, MHD_OPTION_END);
    freeaddrinfo(ai);
    KMS_ENSURE(srv->daemon != NULL, KMS_ERR_INTERNAL, "cannot listen on %s", srv->cfg.listen);
    const union MHD_DaemonInfo *info = MHD_get_daemon_info(srv->daemon, MHD_DAEMON_INFO_BIND_PORT);
    srv->port = info ? info->port : port;
    return KMS_OK;
}

void kms_http_stop(struct kms_server *srv)
{
    if (srv->daemon)
        MHD_stop_daemon(srv->daemon);
    srv->daemon = NULL;
}
