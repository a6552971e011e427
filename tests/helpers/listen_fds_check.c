/* A socket-activated program in C, for the spawn_with_fds tests (compiled by them with cc).
 *
 * Usage: listen_fds_check EXPECTED_NAMES
 *
 * It checks what sd_listen_fds(3) promises, without libsystemd:
 *   - LISTEN_PID is this process's own pid (getpid());
 *   - LISTEN_FDS is the number of names in EXPECTED_NAMES (":"-separated), and LISTEN_FDNAMES
 *     equals EXPECTED_NAMES;
 *   - fds 3 .. 3+LISTEN_FDS-1 are open and inheritable (no FD_CLOEXEC), and nothing else
 *     beyond 0-2 is open (/proc/self/fd, minus the directory's own fd);
 * then accepts one connection on fd 3 (a listening socket) and writes
 * "ok pid=<pid> fds=<n>\n" to it. Any failed check is written to stderr and to the client
 * instead ("fail <reason>\n"), and the exit status is 1.
 */
#include <dirent.h>
#include <fcntl.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <unistd.h>

static char failure[512];

static void fail(const char *reason) {
    if (!failure[0])
        snprintf(failure, sizeof failure, "%s", reason);
}

static int count_names(const char *names) {
    int n = 1;
    if (!*names)
        return 0;
    for (const char *p = names; *p; p++)
        if (*p == ':')
            n++;
    return n;
}

static void check_environment(const char *expected, int *nfds) {
    char buf[256];
    const char *pid = getenv("LISTEN_PID");
    const char *fds = getenv("LISTEN_FDS");
    const char *names = getenv("LISTEN_FDNAMES");
    *nfds = count_names(expected);
    if (!pid || atol(pid) != (long)getpid()) {
        snprintf(buf, sizeof buf, "LISTEN_PID=%s but getpid()=%ld", pid ? pid : "(unset)",
                 (long)getpid());
        fail(buf);
    }
    if (!fds || atoi(fds) != *nfds) {
        snprintf(buf, sizeof buf, "LISTEN_FDS=%s, expected %d", fds ? fds : "(unset)", *nfds);
        fail(buf);
    }
    if (*nfds && (!names || strcmp(names, expected) != 0)) {
        snprintf(buf, sizeof buf, "LISTEN_FDNAMES=%s, expected %s", names ? names : "(unset)",
                 expected);
        fail(buf);
    }
}

static void check_open_fds(int nfds) {
    char buf[256];
    DIR *dir = opendir("/proc/self/fd");
    struct dirent *ent;
    if (!dir) {
        fail("cannot open /proc/self/fd");
        return;
    }
    while ((ent = readdir(dir)) != NULL) {
        if (ent->d_name[0] == '.')
            continue;
        int fd = atoi(ent->d_name);
        if (fd == dirfd(dir) || fd <= 2)
            continue;
        if (fd >= 3 + nfds) {
            snprintf(buf, sizeof buf, "fd %d is open: only 0-2 and 3..%d should be", fd,
                     2 + nfds);
            fail(buf);
        }
    }
    closedir(dir);
    for (int fd = 3; fd < 3 + nfds; fd++) {
        int flags = fcntl(fd, F_GETFD);
        if (flags < 0) {
            snprintf(buf, sizeof buf, "fd %d (named) is not open", fd);
            fail(buf);
        } else if (flags & FD_CLOEXEC) {
            snprintf(buf, sizeof buf, "fd %d has FD_CLOEXEC set", fd);
            fail(buf);
        }
    }
}

int main(int argc, char **argv) {
    char reply[600];
    int nfds = 0;
    if (argc != 2) {
        fprintf(stderr, "usage: %s EXPECTED_NAMES\n", argv[0]);
        return 2;
    }
    check_environment(argv[1], &nfds);
    check_open_fds(nfds);
    if (nfds < 1)
        return failure[0] ? 1 : 0;
    int client = accept(3, NULL, NULL);
    if (client < 0) {
        fprintf(stderr, "accept on fd 3 failed\n");
        return 1;
    }
    if (failure[0])
        snprintf(reply, sizeof reply, "fail %s\n", failure);
    else
        snprintf(reply, sizeof reply, "ok pid=%ld fds=%d\n", (long)getpid(), nfds);
    if (write(client, reply, strlen(reply)) < 0)
        return 1;
    close(client);
    if (failure[0]) {
        fprintf(stderr, "%s\n", failure);
        return 1;
    }
    return 0;
}
