/* A client that reaches no service (offline_client.h). */
#include "config.h"

#include <stdarg.h>
#include <stddef.h>
#include <setjmp.h>
#include <cmocka.h>

#include <arpa/inet.h>
#include <netinet/in.h>
#include <stdio.h>
#include <sys/socket.h>
#include <unistd.h>

#include "client/internal.h"
#include "offline_client.h"

static unsigned closed_port(void)
{
    struct sockaddr_in a = {0};
    socklen_t len = sizeof a;
    int fd = socket(AF_INET, SOCK_STREAM, 0);
    assert_true(fd >= 0);
    a.sin_family = AF_INET;
    a.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
    assert_int_equal(bind(fd, (struct sockaddr *)&a, sizeof a), 0);
    assert_int_equal(getsockname(fd, (struct sockaddr *)&a, &len), 0);
    close(fd); /* bound, never listened on, closed: nothing answers there */
    return ntohs(a.sin_port);
}

p11kms_client *unreachable_client(void)
{
    static char endpoint[64];
    struct p11kms_options o;
    p11kms_client *c = NULL;
    snprintf(endpoint, sizeof endpoint, "http://127.0.0.1:%u", closed_port());
    p11kms_options_init(&o);
    o.endpoint = endpoint;
    o.access_key_id = "AKID";
    o.secret_access_key = "secret";
    o.max_attempts = 1;
    o.breaker_threshold = 1;
    o.breaker_cooldown_ms = 60000;
    if (p11kms_client_new(&o, &c) != P11KMS_OK)
        fail_msg("p11kms_client_new: %s", p11kms_last_error());
    return c;
}

void assert_nothing_sent(p11kms_client *c)
{
    assert_int_equal(kms_transport_breaker_state(c->transport), KMS_BREAKER_CLOSED);
}
