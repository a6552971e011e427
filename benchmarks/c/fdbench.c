/*
 * fdbench: the C reference for the aioancillary benchmarks.
 *
 * One sendmsg(2) per message and one recvmsg(2) per message, each with its own cmsg buffer
 * (cmsg(3)); the receiver closes every fd it gets. This is "as fast as the kernel allows,
 * unbatched". Built by benchmarks/run.py with `cc -O2` into benchmarks/_build/.
 *
 * Every role speaks the harness's control protocol on an inherited control socket (one JSON
 * object per line, see benchmarks/_proc.py): it reports {"event":"ready","fds":N} after setup,
 * waits for "go" if it starts the traffic, and reports {"event":"done",...} at the end; roles
 * that only react (sender side) first report {"event":"sent"} and wait for "finish" so that
 * their fd count is taken after the peer has everything.
 *
 * Usage (fd numbers are inherited from the harness):
 *   fdbench send    SOCK CTRL N NFDS          one-way sender (stream or seqpacket)
 *   fdbench recv    SOCK CTRL N NFDS          one-way receiver
 *   fdbench ping    SOCK CTRL N LATFILE       ping-pong initiator, writes int64 ns latencies
 *   fdbench pong    SOCK CTRL N               ping-pong echo side
 *   fdbench accept  SOCK CTRL N LISTENFD      handoff acceptor: accept, send the fd, close it
 *   fdbench connect -    CTRL N LISTENFD      handoff load: N TCP connects (not measured)
 */
#define _GNU_SOURCE
#include <dirent.h>
#include <errno.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <signal.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/resource.h>
#include <sys/socket.h>
#include <sys/types.h>
#include <time.h>
#include <fcntl.h>
#include <unistd.h>

#define MSG_SIZE 16
#define MAX_FDS 253
#define RING 2048      /* client sockets kept open by `connect` (closed oldest first) */
#define QUEUE_MAX 256  /* `connect` waits while the listener's accept queue is this long */

static int ctrl = -1;

static void die(const char *what) {
    fprintf(stderr, "fdbench: %s: %s\n", what, strerror(errno));
    exit(1);
}

static int64_t now_ns(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts); /* same clock as Python's time.monotonic_ns() */
    return (int64_t)ts.tv_sec * 1000000000 + ts.tv_nsec;
}

static int count_fds(void) {
    DIR *dir = opendir("/proc/self/fd");
    if (!dir) die("opendir /proc/self/fd");
    int n = 0;
    struct dirent *e;
    while ((e = readdir(dir)) != NULL)
        if (e->d_name[0] != '.') n++;
    closedir(dir);
    return n - 1; /* the directory's own fd */
}

/* CPU time (user + system) of this process so far, in seconds. */
static double cpu_seconds(void) {
    struct rusage ru;
    getrusage(RUSAGE_SELF, &ru);
    return ru.ru_utime.tv_sec + ru.ru_stime.tv_sec +
           (ru.ru_utime.tv_usec + ru.ru_stime.tv_usec) / 1e6;
}

static void ctrl_write(const char *line) {
    size_t len = strlen(line), off = 0;
    while (off < len) {
        ssize_t r = write(ctrl, line + off, len - off);
        if (r < 0) {
            if (errno == EINTR) continue;
            die("write ctrl");
        }
        off += (size_t)r;
    }
}

/* Read one line from the control socket; the harness sends only short words. */
static void ctrl_expect(const char *word) {
    char buf[64];
    size_t n = 0;
    while (n < sizeof buf - 1) {
        ssize_t r = read(ctrl, buf + n, 1);
        if (r < 0 && errno == EINTR) continue;
        if (r <= 0) die("read ctrl");
        if (buf[n] == '\n') break;
        n++;
    }
    buf[n] = 0;
    if (strcmp(buf, word) != 0) {
        fprintf(stderr, "fdbench: expected %s on ctrl, got %s\n", word, buf);
        exit(1);
    }
}

static void ready(void) {
    char line[96];
    snprintf(line, sizeof line, "{\"event\":\"ready\",\"fds\":%d,\"cpu\":%.6f}\n", count_fds(),
             cpu_seconds());
    ctrl_write(line);
}

/* Passive roles: report, wait until the peer has everything, then count fds. */
static void sent_and_finish(void) {
    ctrl_write("{\"event\":\"sent\"}\n");
    ctrl_expect("finish");
    char line[96];
    snprintf(line, sizeof line, "{\"event\":\"done\",\"fds\":%d,\"cpu\":%.6f}\n", count_fds(),
             cpu_seconds());
    ctrl_write(line);
}

static void send_one(int sock, const char *data, const int *fds, int nfds) {
    union {
        char buf[CMSG_SPACE(MAX_FDS * sizeof(int))];
        struct cmsghdr align;
    } u;
    struct iovec iov = {.iov_base = (void *)data, .iov_len = MSG_SIZE};
    struct msghdr msg = {.msg_iov = &iov, .msg_iovlen = 1};
    if (nfds) {
        msg.msg_control = u.buf;
        msg.msg_controllen = CMSG_SPACE(nfds * sizeof(int));
        struct cmsghdr *c = CMSG_FIRSTHDR(&msg);
        c->cmsg_level = SOL_SOCKET;
        c->cmsg_type = SCM_RIGHTS;
        c->cmsg_len = CMSG_LEN(nfds * sizeof(int));
        memcpy(CMSG_DATA(c), fds, nfds * sizeof(int));
    }
    size_t off = 0;
    while (off < MSG_SIZE) {
        ssize_t r = sendmsg(sock, &msg, 0);
        if (r < 0) {
            if (errno == EINTR) continue;
            die("sendmsg");
        }
        off += (size_t)r;
        /* A partial stream write already carried the fds: send the rest without them. */
        iov.iov_base = (char *)data + off;
        iov.iov_len = MSG_SIZE - off;
        msg.msg_control = NULL;
        msg.msg_controllen = 0;
    }
}

/* One recvmsg; closes every fd that came with it. Returns bytes read, adds fds to *nfds. */
static ssize_t recv_one(int sock, char *data, size_t len, int maxfds, long *nfds) {
    union {
        char buf[CMSG_SPACE(MAX_FDS * sizeof(int))];
        struct cmsghdr align;
    } u;
    struct iovec iov = {.iov_base = data, .iov_len = len};
    struct msghdr msg = {.msg_iov = &iov, .msg_iovlen = 1, .msg_control = u.buf};
    msg.msg_controllen = CMSG_SPACE(maxfds * sizeof(int));
    ssize_t r;
    do {
        r = recvmsg(sock, &msg, MSG_CMSG_CLOEXEC);
    } while (r < 0 && errno == EINTR);
    if (r < 0) die("recvmsg");
    if (msg.msg_flags & MSG_CTRUNC) {
        fprintf(stderr, "fdbench: MSG_CTRUNC\n");
        exit(1);
    }
    for (struct cmsghdr *c = CMSG_FIRSTHDR(&msg); c; c = CMSG_NXTHDR(&msg, c)) {
        if (c->cmsg_level != SOL_SOCKET || c->cmsg_type != SCM_RIGHTS) continue;
        int n = (int)((c->cmsg_len - CMSG_LEN(0)) / sizeof(int));
        int fds[MAX_FDS];
        memcpy(fds, CMSG_DATA(c), n * sizeof(int));
        for (int i = 0; i < n; i++) close(fds[i]);
        *nfds += n;
    }
    return r;
}

static int open_devnull(void) {
    int fd = open("/dev/null", O_RDWR | O_CLOEXEC);
    if (fd < 0) die("open /dev/null");
    return fd;
}

static void role_send(int sock, long n, int nfds) {
    int fd = open_devnull();
    int fds[MAX_FDS];
    for (int i = 0; i < nfds; i++) fds[i] = fd; /* the same fd in every slot and message */
    char data[MSG_SIZE] = "fdbench-message";
    ready();
    ctrl_expect("go");
    for (long i = 0; i < n; i++) send_one(sock, data, fds, nfds);
    sent_and_finish();
    close(fd);
}

static void role_recv(int sock, long n, int nfds) {
    char data[MSG_SIZE];
    long total = n * MSG_SIZE, got = 0, nrecv = 0;
    ready();
    while (got < total) {
        ssize_t r = recv_one(sock, data, MSG_SIZE, nfds, &nrecv);
        if (r == 0) {
            fprintf(stderr, "fdbench: unexpected EOF\n");
            exit(1);
        }
        got += r;
    }
    int64_t t_end = now_ns();
    char line[200];
    snprintf(line, sizeof line,
             "{\"event\":\"done\",\"t_end\":%lld,\"messages\":%ld,\"fds_received\":%ld,"
             "\"fds\":%d,\"cpu\":%.6f}\n",
             (long long)t_end, got / MSG_SIZE, nrecv, count_fds(), cpu_seconds());
    ctrl_write(line);
}

static void recv_exact(int sock, char *data, long *nrecv) {
    size_t got = 0;
    while (got < MSG_SIZE) {
        ssize_t r = recv_one(sock, data + got, MSG_SIZE - got, 1, nrecv);
        if (r == 0) {
            fprintf(stderr, "fdbench: unexpected EOF\n");
            exit(1);
        }
        got += (size_t)r;
    }
}

static void role_ping(int sock, long n, const char *latfile) {
    int fd = open_devnull();
    char data[MSG_SIZE] = "fdbench-ping....";
    char in[MSG_SIZE];
    long nrecv = 0;
    int64_t *lat = malloc(n * sizeof *lat);
    if (!lat) die("malloc");
    ready();
    ctrl_expect("go");
    for (long i = 0; i < n; i++) {
        int64_t t = now_ns();
        send_one(sock, data, &fd, 1);
        recv_exact(sock, in, &nrecv);
        lat[i] = now_ns() - t;
    }
    int64_t t_end = now_ns();
    FILE *f = fopen(latfile, "wb");
    if (!f || fwrite(lat, sizeof *lat, n, f) != (size_t)n || fclose(f) != 0) die(latfile);
    free(lat);
    char line[200];
    snprintf(line, sizeof line,
             "{\"event\":\"done\",\"t_end\":%lld,\"messages\":%ld,\"fds_received\":%ld,"
             "\"fds\":%d,\"cpu\":%.6f}\n",
             (long long)t_end, n, nrecv, count_fds(), cpu_seconds());
    ctrl_write(line);
    close(fd);
}

static void role_pong(int sock, long n) {
    int fd = open_devnull();
    char data[MSG_SIZE] = "fdbench-pong....";
    char in[MSG_SIZE];
    long nrecv = 0;
    ready();
    for (long i = 0; i < n; i++) {
        recv_exact(sock, in, &nrecv);
        send_one(sock, data, &fd, 1);
    }
    sent_and_finish();
    close(fd);
}

static void role_accept(int sock, long n, int listener) {
    char data[MSG_SIZE] = "fdbench-handoff.";
    ready();
    for (long i = 0; i < n; i++) {
        int c;
        do {
            c = accept4(listener, NULL, NULL, SOCK_CLOEXEC);
        } while (c < 0 && errno == EINTR);
        if (c < 0) die("accept");
        send_one(sock, data, &c, 1);
        close(c);
    }
    sent_and_finish();
}

/* Accept-queue length of a listening TCP socket (Linux: tcpi_unacked in LISTEN state). */
static unsigned accept_queue(int listener) {
    struct tcp_info info;
    socklen_t len = sizeof info;
    if (getsockopt(listener, IPPROTO_TCP, TCP_INFO, &info, &len) < 0) die("TCP_INFO");
    return info.tcpi_unacked;
}

static void close_rst(int fd) {
    struct linger lg = {.l_onoff = 1, .l_linger = 0}; /* RST: no TIME_WAIT, no port reuse wait */
    setsockopt(fd, SOL_SOCKET, SO_LINGER, &lg, sizeof lg);
    close(fd);
}

static void role_connect(long n, int listener) {
    struct sockaddr_in addr;
    socklen_t alen = sizeof addr;
    if (getsockname(listener, (struct sockaddr *)&addr, &alen) < 0) die("getsockname");
    int *ring = malloc(RING * sizeof *ring);
    if (!ring) die("malloc");
    for (int i = 0; i < RING; i++) ring[i] = -1;
    struct timespec pause = {0, 20000};
    ready();
    ctrl_expect("go");
    for (long i = 0; i < n; i++) {
        /* Flow control: a full accept queue would drop SYNs (1 s retransmit stalls). */
        while (accept_queue(listener) >= QUEUE_MAX) nanosleep(&pause, NULL);
        int s = socket(AF_INET, SOCK_STREAM | SOCK_CLOEXEC, 0);
        if (s < 0) die("socket");
        if (connect(s, (struct sockaddr *)&addr, alen) < 0) die("connect");
        /* The queue is shorter than the ring, so the oldest connection was accepted. */
        int slot = (int)(i % RING);
        if (ring[slot] >= 0) close_rst(ring[slot]);
        ring[slot] = s;
    }
    ctrl_write("{\"event\":\"sent\"}\n");
    ctrl_expect("finish");
    for (int i = 0; i < RING; i++)
        if (ring[i] >= 0) close_rst(ring[i]);
    free(ring);
    ctrl_write("{\"event\":\"done\",\"fds\":0}\n");
}

int main(int argc, char **argv) {
    if (argc < 5) {
        fprintf(stderr, "usage: fdbench ROLE SOCK CTRL N [ARG]\n");
        return 2;
    }
    signal(SIGPIPE, SIG_IGN);
    const char *role = argv[1];
    int sock = strcmp(argv[2], "-") == 0 ? -1 : atoi(argv[2]);
    ctrl = atoi(argv[3]);
    long n = atol(argv[4]);
    const char *arg = argc > 5 ? argv[5] : "0";
    if (strcmp(role, "send") == 0) role_send(sock, n, atoi(arg));
    else if (strcmp(role, "recv") == 0) role_recv(sock, n, atoi(arg));
    else if (strcmp(role, "ping") == 0) role_ping(sock, n, arg);
    else if (strcmp(role, "pong") == 0) role_pong(sock, n);
    else if (strcmp(role, "accept") == 0) role_accept(sock, n, atoi(arg));
    else if (strcmp(role, "connect") == 0) role_connect(n, atoi(arg));
    else {
        fprintf(stderr, "fdbench: unknown role %s\n", role);
        return 2;
    }
    return 0;
}
