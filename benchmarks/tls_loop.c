/* Part 6's workload: HTTPS requests on one keep-alive connection, one after the other, to an
 * nginx with TLS on 127.0.0.1 of pod a, through the host's libssl (the one the exporter probes).
 * Each request is an SSL_write and one or two SSL_reads, so what the HTTPS collector adds (a
 * uprobe and a uretprobe on each, and the socket tracepoints) shows at full size. The number of
 * requests done so far is kept in the first 8 bytes of COUNTER_FILE, which the benchmark reads
 * at the edges of its windows.
 *
 *   tls_loop PORT COUNTER_FILE SECONDS   runs until SECONDS have passed or SIGTERM comes,
 *                                        then prints {"requests": N, "seconds": S} */
#include <arpa/inet.h>
#include <fcntl.h>
#include <netinet/in.h>
#include <signal.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <sys/socket.h>
#include <time.h>
#include <unistd.h>

#include <openssl/err.h>
#include <openssl/ssl.h>

static volatile sig_atomic_t stopping;

static void stop(int signal_number)
{
    (void)signal_number;
    stopping = 1;
}

static double now(void)
{
    struct timespec t;
    clock_gettime(CLOCK_MONOTONIC, &t);
    return t.tv_sec + t.tv_nsec / 1e9;
}

static volatile uint64_t *counter_at(const char *path)
{
    int fd = open(path, O_RDWR | O_CREAT | O_TRUNC, 0644);
    if (fd < 0 || ftruncate(fd, sizeof(uint64_t)) != 0)
        return NULL;
    void *mapped = mmap(NULL, sizeof(uint64_t), PROT_READ | PROT_WRITE, MAP_SHARED, fd, 0);
    close(fd);
    return mapped == MAP_FAILED ? NULL : mapped;
}

static SSL *connect_tls(SSL_CTX *ctx, int port)
{
    struct sockaddr_in server = {.sin_family = AF_INET, .sin_port = htons(port),
                                 .sin_addr.s_addr = htonl(INADDR_LOOPBACK)};
    int fd = socket(AF_INET, SOCK_STREAM, 0);
    if (fd < 0 || connect(fd, (struct sockaddr *)&server, sizeof(server)) != 0)
        return NULL;
    SSL *ssl = SSL_new(ctx);
    if (!SSL_set_fd(ssl, fd) || SSL_connect(ssl) != 1)
        return NULL;
    return ssl;
}

/* One response of nginx's `return 200` (no body): read until the end of its headers. */
static int read_response(SSL *ssl)
{
    char buf[4096];
    int have = 0;
    for (;;) {
        int got = SSL_read(ssl, buf + have, sizeof(buf) - 1 - have);
        if (got <= 0)
            return -1;
        have += got;
        buf[have] = 0;
        if (strstr(buf, "\r\n\r\n"))
            return strncmp(buf, "HTTP/1.1 200", 12) == 0 ? 0 : -1;
    }
}

int main(int argc, char **argv)
{
    if (argc != 4) {
        fprintf(stderr, "usage: tls_loop PORT COUNTER_FILE SECONDS\n");
        return 2;
    }
    int port = atoi(argv[1]);
    double seconds = atof(argv[3]);
    volatile uint64_t *done = counter_at(argv[2]);
    signal(SIGTERM, stop);
    SSL_CTX *ctx = SSL_CTX_new(TLS_client_method());
    SSL *ssl = ctx && done ? connect_tls(ctx, port) : NULL;
    if (!ssl) {
        ERR_print_errors_fp(stderr);
        fprintf(stderr, "tls_loop: cannot connect to 127.0.0.1:%d\n", port);
        return 1;
    }
    static const char request[] = "GET /ok HTTP/1.1\r\nHost: localhost\r\n\r\n";
    double started = now();
    uint64_t requests = 0;
    while (!stopping && now() - started < seconds) {
        if (SSL_write(ssl, request, sizeof(request) - 1) != sizeof(request) - 1 ||
            read_response(ssl) != 0) {
            ERR_print_errors_fp(stderr);
            fprintf(stderr, "tls_loop: request %llu failed\n", (unsigned long long)requests);
            return 1;
        }
        *done = ++requests;
    }
    printf("{\"requests\": %llu, \"seconds\": %.6f}\n", (unsigned long long)requests,
           now() - started);
    return 0;
}
