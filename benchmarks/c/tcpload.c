/*
 * tcpload: the TCP client of the hand-off benchmark (benchmarks/handoff_bench.py).
 *
 * N short connections to 127.0.0.1:PORT, at most CONC at a time, driven by one epoll(7)
 * loop: each connects (non-blocking), sends a REQ_SIZE-byte request, reads the RESP_SIZE-byte
 * response to the end, and closes. Reports one JSON object on stdout: connections/s over the
 * whole run, and percentiles of the latency from connect() to the last response byte.
 *
 * The response's first bytes are "ok <ns>" where <ns> is the worker's CLOCK_MONOTONIC
 * reading when it got the socket (0 if the server does not say): with --stamps the program
 * prints those readings too, in completion order, for the hand-off latency.
 *
 * Usage: tcpload PORT N CONC [GAP_US] [--stamps]
 *   GAP_US: sleep between connections (lone connections on an idle server: CONC 1).
 */
#define _GNU_SOURCE
#include <errno.h>
#include <fcntl.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/epoll.h>
#include <sys/socket.h>
#include <time.h>
#include <unistd.h>

#define REQ_SIZE 32
#define RESP_SIZE 64

struct conn {
    int fd;
    int state; /* 0 connecting, 1 reading */
    int got;
    int64_t start;
    char buf[RESP_SIZE];
};

static int64_t now_ns(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (int64_t)ts.tv_sec * 1000000000 + ts.tv_nsec;
}

static void die(const char *what) {
    fprintf(stderr, "tcpload: %s: %s\n", what, strerror(errno));
    exit(1);
}

static int cmp64(const void *a, const void *b) {
    int64_t x = *(const int64_t *)a, y = *(const int64_t *)b;
    return (x > y) - (x < y);
}

static int64_t pct(int64_t *v, long n, double q) {
    if (n == 0) return 0;
    long i = (long)(q * n + 0.999999) - 1;
    if (i < 0) i = 0;
    if (i >= n) i = n - 1;
    return v[i];
}

int main(int argc, char **argv) {
    if (argc < 4) {
        fprintf(stderr, "usage: tcpload PORT N CONC [GAP_US] [--stamps]\n");
        return 2;
    }
    int port = atoi(argv[1]);
    long total = atol(argv[2]);
    int conc = atoi(argv[3]);
    long gap_us = argc > 4 && argv[4][0] != '-' ? atol(argv[4]) : 0;
    int stamps = argc > 4 && strcmp(argv[argc - 1], "--stamps") == 0;
    struct sockaddr_in addr = {.sin_family = AF_INET, .sin_port = htons(port)};
    addr.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
    char req[REQ_SIZE];
    memset(req, 'r', sizeof req);
    memcpy(req, "GET /handoff\n", 13);

    int ep = epoll_create1(EPOLL_CLOEXEC);
    if (ep < 0) die("epoll_create1");
    struct conn *conns = calloc(conc, sizeof *conns);
    int64_t *lat = malloc(total * sizeof *lat);
    int64_t *wstamp = malloc(total * sizeof *wstamp);
    long started = 0, done = 0, errors = 0, active = 0;
    struct epoll_event events[256];
    int64_t t0 = now_ns();

    while (done + errors < total) {
        while (active < conc && started < total) {
            int slot = -1;
            for (int i = 0; i < conc; i++)
                if (conns[i].fd <= 0) { slot = i; break; }
            struct conn *c = &conns[slot];
            if (gap_us && started) usleep(gap_us);
            c->fd = socket(AF_INET, SOCK_STREAM | SOCK_NONBLOCK | SOCK_CLOEXEC, 0);
            if (c->fd < 0) die("socket");
            int one = 1;
            setsockopt(c->fd, IPPROTO_TCP, TCP_NODELAY, &one, sizeof one);
            c->state = 0;
            c->got = 0;
            c->start = now_ns();
            if (connect(c->fd, (struct sockaddr *)&addr, sizeof addr) < 0 && errno != EINPROGRESS)
                die("connect");
            struct epoll_event ev = {.events = EPOLLOUT, .data.u32 = (uint32_t)slot};
            if (epoll_ctl(ep, EPOLL_CTL_ADD, c->fd, &ev) < 0) die("epoll_ctl add");
            started++;
            active++;
        }
        int n = epoll_wait(ep, events, 256, 10000);
        if (n < 0) {
            if (errno == EINTR) continue;
            die("epoll_wait");
        }
        if (n == 0) {
            fprintf(stderr, "tcpload: no progress in 10 s (%ld done, %ld active)\n", done, active);
            return 1;
        }
        for (int i = 0; i < n; i++) {
            struct conn *c = &conns[events[i].data.u32];
            int fail = 0, finished = 0;
            if (c->state == 0) {
                int err = 0;
                socklen_t len = sizeof err;
                getsockopt(c->fd, SOL_SOCKET, SO_ERROR, &err, &len);
                if (err || send(c->fd, req, REQ_SIZE, MSG_NOSIGNAL) != REQ_SIZE) {
                    fail = 1;
                } else {
                    c->state = 1;
                    struct epoll_event ev = {.events = EPOLLIN, .data.u32 = events[i].data.u32};
                    epoll_ctl(ep, EPOLL_CTL_MOD, c->fd, &ev);
                }
            } else {
                for (;;) {
                    ssize_t r = recv(c->fd, c->buf + c->got, RESP_SIZE - c->got, 0);
                    if (r > 0) {
                        c->got += (int)r;
                        if (c->got == RESP_SIZE) { finished = 1; break; }
                        continue;
                    }
                    if (r < 0 && (errno == EAGAIN || errno == EINTR)) break;
                    fail = 1; /* EOF or reset before the whole response */
                    break;
                }
            }
            if (finished) {
                lat[done] = now_ns() - c->start;
                wstamp[done] = strncmp(c->buf, "ok ", 3) == 0 ? atoll(c->buf + 3) : 0;
                done++;
            } else if (fail) {
                errors++;
            }
            if (finished || fail) {
                close(c->fd); /* also removes it from the epoll set */
                c->fd = -1;
                active--;
            }
        }
    }
    double seconds = (now_ns() - t0) / 1e9;
    int64_t *sorted = malloc(done * sizeof *sorted);
    memcpy(sorted, lat, done * sizeof *sorted);
    qsort(sorted, done, sizeof *sorted, cmp64);
    printf("{\"connections\":%ld,\"errors\":%ld,\"seconds\":%.6f,\"rate\":%.1f,"
           "\"p50_us\":%.1f,\"p99_us\":%.1f",
           done, errors, seconds, done / seconds, pct(sorted, done, 0.50) / 1e3,
           pct(sorted, done, 0.99) / 1e3);
    if (stamps) {
        printf(",\"stamps\":[");
        for (long i = 0; i < done; i++) printf(i ? ",%lld" : "%lld", (long long)wstamp[i]);
        printf("]");
    }
    printf("}\n");
    return errors ? 3 : 0;
}
