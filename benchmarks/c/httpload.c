/*
 * httpload: the HTTP/1.1 client of the serve benchmark (benchmarks/serve_bench.py).
 *
 * CONNS connections to HOST:PORT driven by one epoll(7) loop, each sending GET requests one
 * after the other (no pipelining):
 *
 *   --mode keepalive  one connection per slot, kept for every request (a new one only after
 *                     a response that says "Connection: close");
 *   --mode close      a new connection per request: "Connection: close", read the response
 *                     to its end, close.
 *
 * After WARMUP seconds it prints "start" on stdout, after SECONDS more "end", then one JSON
 * object: requests answered 200 inside the window, requests/s, latency percentiles (from
 * the request's write to the response's last byte), and every failure, counted whenever it
 * happens (warm-up included): nothing is retried. The harness reads the server's CPU time at
 * "start" and "end".
 *
 * Failures: "refused" (connect() refused), "connect" (another connect() error), "reset"
 * (ECONNRESET/EPIPE after the request was written), "eof" (the server closed the connection
 * before the whole response), "status" (an answer other than 200), "timeout" (no answer in
 * --timeout seconds, default 10), "bad" (a response that does not parse).
 *
 * With --requests N the window ends after N answers instead (for instruction counts: a fixed
 * amount of work), whatever the time.
 *
 * Usage: httpload HOST PORT [--mode keepalive|close] [--conns N] [--warmup S] [--seconds S]
 *                           [--requests N] [--timeout S] [--path PATH]
 */
#define _GNU_SOURCE
#include <arpa/inet.h>
#include <errno.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <strings.h>
#include <sys/epoll.h>
#include <sys/socket.h>
#include <time.h>
#include <unistd.h>

#define BUF 8192

enum { CONNECTING, WRITING, READING };
enum { F_REFUSED, F_CONNECT, F_RESET, F_EOF, F_STATUS, F_TIMEOUT, F_BAD, F_KINDS };
static const char *KIND[F_KINDS] = {"refused", "connect", "reset", "eof",
                                    "status", "timeout", "bad"};

struct conn {
    int fd;
    int state;
    int sent;           /* bytes of the request written */
    int len;            /* bytes in buf */
    int head;           /* length of the header block once parsed, else 0 */
    long body;          /* body bytes expected after the header block */
    int close_after;    /* the response said Connection: close */
    int status;
    int64_t start;      /* when the request's first byte was written */
};

static struct {
    struct sockaddr_storage addr;
    socklen_t addrlen;
    int keepalive;
    int conns;
    double warmup, seconds;
    long requests;      /* --requests: end the window after this many answers */
    int64_t timeout;    /* --timeout: a request not answered in this long failed (ns) */
    char request[512];
    int request_len;
    int epfd;
    int in_window, done;
    long ok;            /* 200s inside the window */
    long failures[F_KINDS];
    int64_t *lat;       /* latencies (ns) inside the window */
    long nlat, caplat;
} G;

static char bufs[4096][BUF];

static int64_t now_ns(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (int64_t)ts.tv_sec * 1000000000 + ts.tv_nsec;
}

static void die(const char *what) {
    fprintf(stderr, "httpload: %s: %s\n", what, strerror(errno));
    exit(2);
}

static void record(int64_t ns) {
    if (G.nlat == G.caplat) {
        G.caplat = G.caplat ? G.caplat * 2 : 1 << 20;
        G.lat = realloc(G.lat, G.caplat * sizeof *G.lat);
        if (!G.lat) die("realloc");
    }
    G.lat[G.nlat++] = ns;
}

static void watch(struct conn *c, uint32_t events, int op) {
    struct epoll_event ev = {.events = events, .data.ptr = c};
    if (epoll_ctl(G.epfd, op, c->fd, &ev) < 0) die("epoll_ctl");
}

static void drop(struct conn *c) {
    if (c->fd >= 0) close(c->fd); /* close(2) removes it from the epoll set */
    c->fd = -1;
}

static void fail(struct conn *c, int kind);
static void open_conn(struct conn *c);

static void write_request(struct conn *c) {
    if (c->sent == 0) c->start = now_ns();
    while (c->sent < G.request_len) {
        ssize_t n = write(c->fd, G.request + c->sent, G.request_len - c->sent);
        if (n < 0) {
            if (errno == EAGAIN) {
                if (c->state != WRITING) watch(c, EPOLLOUT, EPOLL_CTL_MOD);
                c->state = WRITING;
                return;
            }
            fail(c, errno == ECONNREFUSED ? F_REFUSED : F_RESET);
            return;
        }
        c->sent += (int)n;
    }
    if (c->state != READING) watch(c, EPOLLIN, EPOLL_CTL_MOD);
    c->state = READING;
    c->len = c->head = 0;
}

static void next(struct conn *c) {
    if (G.done) {
        drop(c);
        return;
    }
    if (!G.keepalive || c->close_after) {
        drop(c);
        open_conn(c);
        return;
    }
    c->sent = 0;
    write_request(c);
}

static void fail(struct conn *c, int kind) {
    G.failures[kind]++;
    c->close_after = 1;
    next(c);
}

static void open_conn(struct conn *c) {
    for (;;) {
        c->fd = socket(G.addr.ss_family, SOCK_STREAM | SOCK_NONBLOCK | SOCK_CLOEXEC, 0);
        if (c->fd < 0) die("socket");
        int one = 1;
        setsockopt(c->fd, IPPROTO_TCP, TCP_NODELAY, &one, sizeof one);
        c->sent = c->len = c->head = 0;
        c->close_after = 0;
        c->state = CONNECTING;
        watch(c, EPOLLOUT, EPOLL_CTL_ADD);
        if (connect(c->fd, (struct sockaddr *)&G.addr, G.addrlen) == 0 || errno == EINPROGRESS)
            return;
        G.failures[errno == ECONNREFUSED ? F_REFUSED : F_CONNECT]++;
        drop(c);
        usleep(1000); /* no spin against a server that is not there */
    }
}

/* The header block is complete in buf[0:head]: status, Content-Length, Connection. */
static int parse_head(struct conn *c, char *buf) {
    if (c->head < 12 || memcmp(buf, "HTTP/1.", 7) != 0) return -1;
    c->status = atoi(buf + 9);
    c->body = 0;
    c->close_after = 0;
    buf[c->head - 1] = '\0';
    for (char *line = strstr(buf, "\r\n"); line; line = strstr(line + 2, "\r\n")) {
        char *h = line + 2;
        if (!strncasecmp(h, "content-length:", 15)) c->body = atol(h + 15);
        else if (!strncasecmp(h, "connection:", 11)) {
            char *eol = strstr(h, "\r\n");
            char *close_ = strcasestr(h + 11, "close");
            c->close_after = close_ && (!eol || close_ < eol);
        }
        else if (!strncasecmp(h, "transfer-encoding:", 18)) return -1; /* not supported */
    }
    buf[c->head - 1] = '\n';
    return 0;
}

static void readable(struct conn *c, char *buf) {
    for (;;) {
        ssize_t n = read(c->fd, buf + c->len, BUF - 1 - c->len);
        if (n < 0) {
            if (errno == EAGAIN) return;
            fail(c, F_RESET);
            return;
        }
        if (n == 0) {
            fail(c, F_EOF);
            return;
        }
        c->len += (int)n;
        if (!c->head) {
            buf[c->len] = '\0';
            char *end = strstr(buf, "\r\n\r\n");
            if (!end) {
                if (c->len >= BUF - 1) {
                    fail(c, F_BAD);
                    return;
                }
                continue;
            }
            c->head = (int)(end - buf) + 4;
            if (parse_head(c, buf) < 0 || c->body > BUF - c->head - 1) {
                fail(c, F_BAD);
                return;
            }
        }
        if (c->len >= c->head + c->body) {
            int64_t t = now_ns();
            if (c->status != 200) G.failures[F_STATUS]++;
            else if (G.in_window) {
                G.ok++;
                record(t - c->start);
            }
            next(c);
            return;
        }
    }
}

static void connected(struct conn *c) {
    int err = 0;
    socklen_t len = sizeof err;
    getsockopt(c->fd, SOL_SOCKET, SO_ERROR, &err, &len);
    if (err) {
        G.failures[err == ECONNREFUSED ? F_REFUSED : F_CONNECT]++;
        drop(c);
        usleep(1000);
        open_conn(c);
        return;
    }
    write_request(c);
}

static int cmp64(const void *a, const void *b) {
    int64_t x = *(const int64_t *)a, y = *(const int64_t *)b;
    return (x > y) - (x < y);
}

static double pct_us(double q) {
    if (!G.nlat) return 0;
    long i = (long)(q * G.nlat + 0.999999) - 1;
    if (i < 0) i = 0;
    return G.lat[i] / 1000.0;
}

int main(int argc, char **argv) {
    if (argc < 3) {
        fprintf(stderr, "usage: httpload HOST PORT [--mode keepalive|close] [--conns N] "
                        "[--warmup S] [--seconds S] [--requests N] [--timeout S] [--path PATH]\n");
        return 2;
    }
    const char *host = argv[1], *path = "/";
    int port = atoi(argv[2]);
    G.keepalive = 1;
    G.conns = 64;
    G.warmup = 1.0;
    G.seconds = 5.0;
    G.timeout = 10000000000LL;
    for (int i = 3; i + 1 < argc; i += 2) {
        if (!strcmp(argv[i], "--mode")) G.keepalive = strcmp(argv[i + 1], "close") != 0;
        else if (!strcmp(argv[i], "--conns")) G.conns = atoi(argv[i + 1]);
        else if (!strcmp(argv[i], "--warmup")) G.warmup = atof(argv[i + 1]);
        else if (!strcmp(argv[i], "--seconds")) G.seconds = atof(argv[i + 1]);
        else if (!strcmp(argv[i], "--requests")) G.requests = atol(argv[i + 1]);
        else if (!strcmp(argv[i], "--timeout")) G.timeout = (int64_t)(atof(argv[i + 1]) * 1e9);
        else if (!strcmp(argv[i], "--path")) path = argv[i + 1];
        else {
            fprintf(stderr, "httpload: unknown option %s\n", argv[i]);
            return 2;
        }
    }
    if (G.conns < 1 || G.conns > 4096) {
        fprintf(stderr, "httpload: --conns must be 1 to 4096\n");
        return 2;
    }
    struct sockaddr_in *v4 = (struct sockaddr_in *)&G.addr;
    struct sockaddr_in6 *v6 = (struct sockaddr_in6 *)&G.addr;
    if (inet_pton(AF_INET, host, &v4->sin_addr) == 1) {
        v4->sin_family = AF_INET;
        v4->sin_port = htons(port);
        G.addrlen = sizeof *v4;
    } else if (inet_pton(AF_INET6, host, &v6->sin6_addr) == 1) {
        v6->sin6_family = AF_INET6;
        v6->sin6_port = htons(port);
        G.addrlen = sizeof *v6;
    } else {
        fprintf(stderr, "httpload: HOST must be an IPv4 or IPv6 address\n");
        return 2;
    }
    G.request_len = snprintf(G.request, sizeof G.request,
                             "GET %s HTTP/1.1\r\nHost: %s\r\n%s\r\n", path, host,
                             G.keepalive ? "" : "Connection: close\r\n");
    G.epfd = epoll_create1(EPOLL_CLOEXEC);
    if (G.epfd < 0) die("epoll_create1");

    struct conn *conns = calloc(G.conns, sizeof *conns);
    for (int i = 0; i < G.conns; i++) open_conn(&conns[i]);

    int64_t t0 = now_ns();
    int64_t start = t0 + (int64_t)(G.warmup * 1e9);
    int64_t end = start + (int64_t)(G.seconds * 1e9);
    int64_t window_start = 0, window_end = 0;
    struct epoll_event events[256];
    while (!G.done) {
        int n = epoll_wait(G.epfd, events, 256, 50);
        if (n < 0 && errno != EINTR) die("epoll_wait");
        for (int i = 0; i < n; i++) {
            struct conn *c = events[i].data.ptr;
            if (c->fd < 0) continue;
            if (c->state == CONNECTING) connected(c);
            else if (c->state == WRITING) write_request(c);
            else readable(c, bufs[c - conns]);
        }
        int64_t t = now_ns();
        if (!G.in_window && !window_start && t >= start) {
            G.in_window = 1;
            window_start = t;
            printf("start\n");
            fflush(stdout);
        }
        if (G.in_window && (G.requests ? G.ok >= G.requests : t >= end)) {
            G.in_window = 0;
            G.done = 1;
            window_end = t;
            printf("end\n");
            fflush(stdout);
        }
        for (int i = 0; i < G.conns; i++) { /* answers that never come */
            struct conn *c = &conns[i];
            if (c->fd >= 0 && c->state != CONNECTING && c->sent && t - c->start > G.timeout)
                fail(c, F_TIMEOUT);
        }
    }
    for (int i = 0; i < G.conns; i++) drop(&conns[i]);
    qsort(G.lat, G.nlat, sizeof *G.lat, cmp64);
    double window = (window_end - window_start) / 1e9;
    long failed = 0;
    for (int k = 0; k < F_KINDS; k++) failed += G.failures[k];
    printf("{\"mode\": \"%s\", \"conns\": %d, \"seconds\": %.3f, \"requests\": %ld, "
           "\"rps\": %.1f, \"p50_us\": %.1f, \"p90_us\": %.1f, \"p99_us\": %.1f, "
           "\"p999_us\": %.1f, \"max_us\": %.1f, \"failed\": %ld, \"failures\": {",
           G.keepalive ? "keepalive" : "close", G.conns, window, G.ok, G.ok / window,
           pct_us(0.5), pct_us(0.9), pct_us(0.99), pct_us(0.999), pct_us(1.0), failed);
    for (int k = 0; k < F_KINDS; k++)
        printf("%s\"%s\": %ld", k ? ", " : "", KIND[k], G.failures[k]);
    printf("}}\n");
    return 0;
}
