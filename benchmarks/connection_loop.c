/* Part 5's workload without an interpreter: TCP connections on 127.0.0.1, one after the other.
 * A forked server accepts, sends one byte, waits for the client's close and closes; the client
 * connects, waits for the byte and closes, so one connection runs at a time and the accept
 * queue never overflows. Each connection costs only the kernel's work and a few syscalls, so
 * what the exporter's tracepoint programs add shows at full size, not diluted by the ~30 us of
 * interpreter a Python loop spends on each.
 *
 *   connection_loop SECONDS    runs until SECONDS have passed or SIGTERM comes, then prints
 *                              {"connections": N, "seconds": S} */
#include <arpa/inet.h>
#include <netinet/in.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <sys/socket.h>
#include <sys/wait.h>
#include <time.h>
#include <unistd.h>

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

static void serve(int server)
{
    char byte = 'x';
    for (;;) {
        int conn = accept(server, NULL, NULL);
        if (conn < 0)
            continue;
        if (write(conn, &byte, 1) == 1)
            (void)read(conn, &byte, 1); /* 0: the client closed */
        close(conn);
    }
}

int main(int argc, char **argv)
{
    if (argc != 2 || atof(argv[1]) <= 0) {
        fprintf(stderr, "usage: connection_loop SECONDS\n");
        return 2;
    }
    double seconds = atof(argv[1]);
    struct sockaddr_in address = {.sin_family = AF_INET};
    address.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
    socklen_t length = sizeof(address);
    int one = 1;
    int server = socket(AF_INET, SOCK_STREAM, 0);
    if (server < 0 || setsockopt(server, SOL_SOCKET, SO_REUSEADDR, &one, sizeof(one)) < 0 ||
        bind(server, (struct sockaddr *)&address, sizeof(address)) < 0 ||
        listen(server, 128) < 0 ||
        getsockname(server, (struct sockaddr *)&address, &length) < 0) {
        perror("connection_loop: server");
        return 1;
    }
    pid_t child = fork();
    if (child < 0) {
        perror("connection_loop: fork");
        return 1;
    }
    if (child == 0)
        serve(server);
    close(server);
    signal(SIGTERM, stop);

    long count = 0;
    double start = now(), deadline = start + seconds;
    while (!stopping && now() < deadline) {
        char byte;
        int client = socket(AF_INET, SOCK_STREAM, 0);
        if (client < 0 || connect(client, (struct sockaddr *)&address, sizeof(address)) < 0) {
            perror("connection_loop: connect");
            break;
        }
        if (read(client, &byte, 1) != 1) {
            fprintf(stderr, "connection_loop: the server sent nothing\n");
            break;
        }
        close(client);
        count++;
    }
    double elapsed = now() - start;
    kill(child, SIGKILL);
    waitpid(child, NULL, 0);
    printf("{\"connections\": %ld, \"seconds\": %.6f}\n", count, elapsed);
    return stopping || elapsed >= seconds ? 0 : 1;
}
