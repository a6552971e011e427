/* aioancillary._kernel._speedups: the accept burst and the acceptor's batched hand-off in C.
 *
 * #included by _speedups.c (one translation unit: the build compiles that file alone), after
 * the static helpers used here (as_int, close_fds, take_exception). Each function replaces a
 * Python piece behind the selection point (aioancillary/_kernel/_accel.py):
 *
 *   accept_into     _accept.accept_burst with a listener's sock._accept (the Acceptor, with
 *                   `prefix`: each client as its hand-off item, (record, fd), the record
 *                   encoded from the kernel's sockaddr as _handoff/_wire.record_packer does;
 *                   ConnectionServer and AncillaryServer, prefix None: raw fds).
 *   client_batch    _handoff/_link.send_clients's message building: the `C` message of a batch
 *                   of items and the list of their fds, in one pass.
 *   close_item_fds  _handoff/_link.close_items: the fds of the items, closed run by run.
 *   client_record   the record encoder alone, on a raw sockaddr (for tests).
 *
 * Ownership: an fd is owned from the moment accept4(2) returns it. It is the caller's once it
 * is in `into` (even if the burst then fails or raises); before that, every error path closes
 * it (a MemoryError while its record, int or item is built, or while the list grows).
 */
#include <netinet/in.h>
#include <poll.h>
#include <stddef.h>
#include <stdlib.h>
#include <sys/un.h>
#ifdef __linux__
#include <sys/syscall.h>
#endif

/* The kinds of accept error (_accept.AcceptErrorKind). */
enum { KIND_TRANSIENT = 0, KIND_RESOURCE = 1, KIND_FATAL = 2 };

/* From _kernel/_accept.py, imported at the first accept error (never on the hot path, and no
 * import cycle at module init): one classification, defined once, in Python. */
static PyObject *transient_errnos, *resource_errnos, *accept_failure_cls;
static PyObject *kind_objects[3];

static int
load_accept_names(void)
{
    if (accept_failure_cls != NULL) {
        return 0;
    }
    static const char *kind_names[3] = {"TRANSIENT", "RESOURCE", "FATAL"};
    PyObject *mod = PyImport_ImportModule("aioancillary._kernel._accept");
    if (mod == NULL) {
        return -1;
    }
    PyObject *kind_cls = PyObject_GetAttrString(mod, "AcceptErrorKind");
    PyObject *transient = PyObject_GetAttrString(mod, "TRANSIENT_ERRNOS");
    PyObject *resource = PyObject_GetAttrString(mod, "RESOURCE_ERRNOS");
    PyObject *failure = PyObject_GetAttrString(mod, "AcceptFailure");
    Py_DECREF(mod);
    PyObject *kinds[3] = {NULL, NULL, NULL};
    int ok = kind_cls && transient && resource && failure;
    for (int i = 0; ok && i < 3; i++) {
        kinds[i] = PyObject_GetAttrString(kind_cls, kind_names[i]);
        ok = kinds[i] != NULL;
    }
    Py_XDECREF(kind_cls);
    if (!ok) {
        Py_XDECREF(transient);
        Py_XDECREF(resource);
        Py_XDECREF(failure);
        for (int i = 0; i < 3; i++) {
            Py_XDECREF(kinds[i]);
        }
        return -1;
    }
    transient_errnos = transient;
    resource_errnos = resource;
    for (int i = 0; i < 3; i++) {
        kind_objects[i] = kinds[i];
    }
    accept_failure_cls = failure; /* last: it says the rest is loaded */
    return 0;
}

/* The kind of accept error `code` (_accept.classify_accept_error), or -1 with an exception. */
static int
accept_error_kind(int code)
{
    if (load_accept_names() < 0) {
        return -1;
    }
    PyObject *num = PyLong_FromLong(code);
    if (num == NULL) {
        return -1;
    }
    int kind = KIND_FATAL;
    int found = PySet_Contains(transient_errnos, num);
    if (found > 0) {
        kind = KIND_TRANSIENT;
    }
    else if (found == 0) {
        found = PySet_Contains(resource_errnos, num);
        if (found > 0) {
            kind = KIND_RESOURCE;
        }
    }
    Py_DECREF(num);
    return found < 0 ? -1 : kind;
}

/* AcceptFailure(kind, exc); steals exc. */
static PyObject *
accept_failure(int kind, PyObject *exc)
{
    if (exc == NULL || load_accept_names() < 0) {
        Py_XDECREF(exc);
        return NULL;
    }
    PyObject *failure = PyObject_CallFunctionObjArgs(accept_failure_cls, kind_objects[kind], exc,
                                                     NULL);
    Py_DECREF(exc);
    return failure;
}

/* The OSError accept() raises for `code`, as socket.accept builds it (PyErr_SetFromErrno). */
static PyObject *
accept_oserror(int code)
{
    errno = code;
    PyErr_SetFromErrno(PyExc_OSError);
    return take_exception();
}

/* _unix.listener_shut_down: a listening socket polls POLLRDHUP (or anything at all) only once
 * it was shut down (unix_poll); elsewhere than Linux there is no such report: False. */
static int
listener_is_shut_down(int fd)
{
#ifdef POLLRDHUP
    struct pollfd pfd = {.fd = fd, .events = POLLRDHUP, .revents = 0};
    int ready;
    do {
        ready = poll(&pfd, 1, 0);
    } while (ready < 0 && errno == EINTR);
    return ready > 0;
#else
    (void)fd;
    return 0;
#endif
}

/* accept4(SOCK_CLOEXEC | SOCK_NONBLOCK): the client's fd is never inheritable, and its socket
 * is non-blocking as every user of it makes it (worker, transport, streams). */
static int
accept_nonblocking(int fd, struct sockaddr *addr, socklen_t *len)
{
#if defined(SOCK_CLOEXEC) && defined(SOCK_NONBLOCK)
    return accept4(fd, addr, len, SOCK_CLOEXEC | SOCK_NONBLOCK);
#else
    /* No accept4 (macOS): a fork+exec in another thread between the two calls can inherit
     * the fd, as with socket.accept() there. */
    int client = accept(fd, addr, len);
    if (client >= 0) {
        int flags = fcntl(client, F_GETFL);
        if (fcntl(client, F_SETFD, FD_CLOEXEC) < 0 || flags < 0 ||
            fcntl(client, F_SETFL, flags | O_NONBLOCK) < 0) {
            int err = errno;
            (void)close(client);
            errno = err;
            return -1;
        }
    }
    return client;
#endif
}

/* Longest packed address: an AF_UNIX tag byte and a whole sun_path. */
#define PACKED_MAX (1 + sizeof(((struct sockaddr_un *)0)->sun_path))

/* Pack the address the way _wire.packer_for(family) packs what socket.accept() returned for it
 * (CPython's makesockaddr): AF_INET address + port; AF_INET6 address + port + flowinfo +
 * scope id (big-endian); AF_UNIX "b" + the bytes of a Linux abstract name, else "s" + the path
 * up to its NUL (empty: an unnamed client). Returns the length, or -1 for another family. */
static Py_ssize_t
pack_address(const struct sockaddr_storage *ss, socklen_t len, unsigned char *out)
{
    switch (ss->ss_family) {
    case AF_INET: {
        const struct sockaddr_in *in = (const struct sockaddr_in *)ss;
        memcpy(out, &in->sin_addr, 4);     /* network order: big-endian already */
        memcpy(out + 4, &in->sin_port, 2); /* likewise */
        return 6;
    }
    case AF_INET6: {
        const struct sockaddr_in6 *in6 = (const struct sockaddr_in6 *)ss;
        /* makesockaddr converts port and flowinfo from network order and leaves the scope id
         * in host order; "!HII" packs all three big-endian. */
        uint32_t scope = htonl(in6->sin6_scope_id);
        memcpy(out, &in6->sin6_addr, 16);
        memcpy(out + 16, &in6->sin6_port, 2);
        memcpy(out + 18, &in6->sin6_flowinfo, 4);
        memcpy(out + 22, &scope, 4);
        return 26;
    }
    case AF_UNIX: {
        const struct sockaddr_un *un = (const struct sockaddr_un *)ss;
        size_t offset = offsetof(struct sockaddr_un, sun_path);
        size_t size = (size_t)len > offset ? (size_t)len - offset : 0;
        if (size > sizeof(un->sun_path)) {
            size = sizeof(un->sun_path);
        }
#ifdef __linux__
        if (size > 0 && un->sun_path[0] == '\0') { /* an abstract name: bytes, whole */
            out[0] = 'b';
            memcpy(out + 1, un->sun_path, size);
            return (Py_ssize_t)(1 + size);
        }
#endif
        size_t path = strnlen(un->sun_path, size); /* a str, cut at its NUL */
        out[0] = 's';
        memcpy(out + 1, un->sun_path, path);
        return (Py_ssize_t)(1 + path);
    }
    default:
        return -1;
    }
}

/* The record of a client (_wire.record_packer): the 2-byte listener id, the packed address's
 * length (one byte), the packed address. */
static PyObject *
make_record(const char *prefix, const struct sockaddr_storage *ss, socklen_t len)
{
    unsigned char packed[PACKED_MAX];
    Py_ssize_t size = pack_address(ss, len, packed);
    if (size < 0) {
        PyErr_Format(PyExc_ValueError,
                     "clients of family %d are not supported: use AF_INET, AF_INET6 or AF_UNIX",
                     (int)ss->ss_family);
        return NULL;
    }
    PyObject *record = PyBytes_FromStringAndSize(NULL, 3 + size);
    if (record == NULL) {
        return NULL;
    }
    char *p = PyBytes_AS_STRING(record);
    p[0] = prefix[0];
    p[1] = prefix[1];
    p[2] = (char)(unsigned char)size;
    memcpy(p + 3, packed, (size_t)size);
    return record;
}

/* Append the client `fd` to `into`: the int, or (record, fd) given a prefix. On failure the fd
 * is closed (it never reached the caller) and -1 returned with an exception. */
static int
append_client(PyObject *into, int fd, const char *prefix, const struct sockaddr_storage *ss,
              socklen_t len)
{
    PyObject *item = PyLong_FromLong(fd);
    if (item != NULL && prefix != NULL) {
        PyObject *record = make_record(prefix, ss, len);
        PyObject *pair = record != NULL ? PyTuple_New(2) : NULL;
        if (pair == NULL) {
            Py_XDECREF(record);
            Py_DECREF(item);
            item = NULL;
        }
        else {
            PyTuple_SET_ITEM(pair, 0, record);
            PyTuple_SET_ITEM(pair, 1, item);
            item = pair;
        }
    }
    if (item == NULL || PyList_Append(into, item) < 0) {
        Py_XDECREF(item);
        (void)close(fd); /* not in `into`: nobody else knows of it */
        return -1;
    }
    Py_DECREF(item);
    return 0;
}

static PyObject *
accept_into(PyObject *Py_UNUSED(module), PyObject *const *args, Py_ssize_t nargs)
{
    if (nargs != 4) {
        PyErr_Format(PyExc_TypeError, "accept_into() takes 4 arguments (%zd given)", nargs);
        return NULL;
    }
    int lfd = as_int(args[0]);
    if (lfd == -1 && PyErr_Occurred()) {
        return NULL;
    }
    Py_ssize_t limit = PyLong_AsSsize_t(args[1]);
    if (limit == -1 && PyErr_Occurred()) {
        return NULL;
    }
    PyObject *into = args[2];
    if (!PyList_Check(into)) {
        PyErr_SetString(PyExc_TypeError, "accept_into(): into must be a list");
        return NULL;
    }
    const char *prefix = NULL;
    if (args[3] != Py_None) {
        if (!PyBytes_Check(args[3]) || PyBytes_GET_SIZE(args[3]) != 2) {
            PyErr_SetString(PyExc_TypeError,
                            "accept_into(): prefix must be None or 2 bytes (the listener id)");
            return NULL;
        }
        prefix = PyBytes_AS_STRING(args[3]);
    }
    Py_ssize_t tries = 0, transient = 0;
    int last = 0;
    while (tries < limit) {
        struct sockaddr_storage ss;
        socklen_t len = (socklen_t)sizeof(ss);
        memset(&ss, 0, sizeof(ss));
        int fd = accept_nonblocking(lfd, (struct sockaddr *)&ss, &len);
        if (fd < 0) {
            int code = errno;
            if (code == EINTR) {
                /* PEP 475, as socket.accept: retried unless a signal handler raised. */
                if (PyErr_CheckSignals() < 0) {
                    return NULL;
                }
                continue;
            }
            if (code == EAGAIN || code == EWOULDBLOCK) {
                /* A Unix listener shut down underneath polls ready for good while accept()
                 * finds nothing: see _accept's module docstring. */
                if (tries == 0 && listener_is_shut_down(lfd)) {
                    PyObject *exc = PyObject_CallFunction(PyExc_OSError, "is", ESHUTDOWN,
                                                          "the listening socket was shut down");
                    return accept_failure(KIND_FATAL, exc);
                }
                Py_RETURN_NONE;
            }
            tries++;
            int kind = accept_error_kind(code);
            if (kind < 0) {
                return NULL;
            }
            if (kind == KIND_TRANSIENT) { /* that client is gone: the next one may be fine */
                transient++;
                last = code;
                continue;
            }
            return accept_failure(kind, accept_oserror(code));
        }
        tries++;
        if (append_client(into, fd, prefix, &ss, len) < 0) {
            return NULL;
        }
    }
    if (transient == limit && last != 0) {
        /* Every try failed the same way: not about one client (a seccomp filter, an LSM). */
        return accept_failure(KIND_RESOURCE, accept_oserror(last));
    }
    Py_RETURN_NONE;
}

/* client_record(prefix, sockaddr): the record of a client whose raw sockaddr is given. */
static PyObject *
client_record(PyObject *Py_UNUSED(module), PyObject *const *args, Py_ssize_t nargs)
{
    if (nargs != 2 || !PyBytes_Check(args[0]) || PyBytes_GET_SIZE(args[0]) != 2 ||
        !PyBytes_Check(args[1])) {
        PyErr_SetString(PyExc_TypeError, "client_record(prefix: 2 bytes, sockaddr: bytes)");
        return NULL;
    }
    struct sockaddr_storage ss;
    Py_ssize_t size = PyBytes_GET_SIZE(args[1]);
    if (size < (Py_ssize_t)sizeof(sa_family_t) || size > (Py_ssize_t)sizeof(ss)) {
        PyErr_SetString(PyExc_ValueError, "client_record(): not a sockaddr");
        return NULL;
    }
    memset(&ss, 0, sizeof(ss));
    memcpy(&ss, PyBytes_AS_STRING(args[1]), (size_t)size);
    return make_record(PyBytes_AS_STRING(args[0]), &ss, (socklen_t)size);
}

/* The fd of a hand-off item (record: bytes, fd: int), or -1 with an exception. */
static int
item_fd(PyObject *item, PyObject **record)
{
    if (!PyTuple_CheckExact(item) || PyTuple_GET_SIZE(item) != 2 ||
        !PyBytes_Check(PyTuple_GET_ITEM(item, 0)) || !PyLong_Check(PyTuple_GET_ITEM(item, 1))) {
        /* An int, not anything with __index__: no Python code runs while a list is walked. */
        PyErr_SetString(PyExc_TypeError, "hand-off items must be (record: bytes, fd: int)");
        return -1;
    }
    *record = PyTuple_GET_ITEM(item, 0);
    int fd = as_int(PyTuple_GET_ITEM(item, 1));
    if (fd < 0 && !PyErr_Occurred()) {
        PyErr_Format(PyExc_ValueError, "hand-off item with fd %d", fd);
    }
    return fd < 0 ? -1 : fd;
}

/* client_batch(items) -> (b"C" + records, [fd, ...]): _wire.client_message of the records
 * and the list of the fds, in order. Touches no fd. */
static PyObject *
client_batch(PyObject *Py_UNUSED(module), PyObject *items)
{
    if (!PyList_Check(items)) {
        PyErr_SetString(PyExc_TypeError, "client_batch(): items must be a list");
        return NULL;
    }
    Py_ssize_t n = PyList_GET_SIZE(items);
    Py_ssize_t total = 1;
    PyObject *record;
    for (Py_ssize_t i = 0; i < n; i++) {
        if (item_fd(PyList_GET_ITEM(items, i), &record) < 0) {
            return NULL;
        }
        total += PyBytes_GET_SIZE(record);
    }
    PyObject *data = PyBytes_FromStringAndSize(NULL, total);
    PyObject *fds = PyList_New(n);
    if (data == NULL || fds == NULL) {
        Py_XDECREF(data);
        Py_XDECREF(fds);
        return NULL;
    }
    char *p = PyBytes_AS_STRING(data);
    *p++ = 'C';
    for (Py_ssize_t i = 0; i < n; i++) {
        /* The list cannot have changed: nothing above ran Python code after the check. */
        PyObject *item = PyList_GET_ITEM(items, i);
        record = PyTuple_GET_ITEM(item, 0);
        Py_ssize_t size = PyBytes_GET_SIZE(record);
        memcpy(p, PyBytes_AS_STRING(record), (size_t)size);
        p += size;
        PyObject *fd = PyTuple_GET_ITEM(item, 1);
        Py_INCREF(fd);
        PyList_SET_ITEM(fds, i, fd);
    }
    return Py_BuildValue("(NN)", data, fds);
}

static int
compare_ints(const void *a, const void *b)
{
    int x = *(const int *)a, y = *(const int *)b;
    return (x > y) - (x < y);
}

/* Close first..last (both included), every one of them in the caller's list. */
static void
close_run(int first, int last)
{
#if defined(__linux__) && defined(SYS_close_range)
    if (last > first && syscall(SYS_close_range, (unsigned int)first, (unsigned int)last, 0) == 0) {
        return; /* one close_range(2) for the run (Linux 5.9+) */
    }
#endif
    for (int fd = first; fd <= last; fd++) {
        (void)close(fd); /* EBADF ignored, as close_raw does */
    }
}

/* close_item_fds(items): close the fds of hand-off items (_link.close_items), run by run: the
 * clients of one wake are mostly consecutive numbers. Only numbers of the items are closed. */
static PyObject *
close_item_fds(PyObject *Py_UNUSED(module), PyObject *items)
{
    if (!PyList_Check(items)) {
        PyErr_SetString(PyExc_TypeError, "close_item_fds(): items must be a list");
        return NULL;
    }
    Py_ssize_t n = PyList_GET_SIZE(items);
    if (n == 0) {
        Py_RETURN_NONE;
    }
    int small[64];
    int *fds = n <= 64 ? small : PyMem_New(int, (size_t)n);
    if (fds == NULL) {
        return PyErr_NoMemory();
    }
    Py_ssize_t count = 0;
    PyObject *record, *error = NULL;
    for (Py_ssize_t i = 0; i < n; i++) {
        int fd = item_fd(PyList_GET_ITEM(items, i), &record);
        if (fd < 0) { /* closed what it can, then says what it could not */
            if (error == NULL) {
                error = take_exception();
            }
            else {
                PyErr_Clear();
            }
            continue;
        }
        fds[count++] = fd;
    }
    qsort(fds, (size_t)count, sizeof(int), compare_ints);
    Py_ssize_t start = 0;
    for (Py_ssize_t i = 1; i <= count; i++) {
        if (i == count || fds[i] > fds[i - 1] + 1) {
            close_run(fds[start], fds[i - 1]);
            start = i;
        }
    }
    if (fds != small) {
        PyMem_Free(fds);
    }
    if (error != NULL) {
        raise_exception(error);
        return NULL;
    }
    Py_RETURN_NONE;
}

#define ACCEPT_METHODS                                                                         \
    {"accept_into", (PyCFunction)(void (*)(void))accept_into, METH_FASTCALL,                   \
     "accept_into(fd, limit, into, prefix) -> AcceptFailure | None: _accept.accept_burst on "   \
     "the listener fd, appending raw fds (prefix None) or hand-off items (record, fd)."},      \
    {"client_record", (PyCFunction)(void (*)(void))client_record, METH_FASTCALL,               \
     "client_record(prefix, sockaddr) -> bytes: the hand-off record of a raw sockaddr."},      \
    {"client_batch", (PyCFunction)client_batch, METH_O,                                        \
     "client_batch(items) -> (bytes, list[int]): the C message of the items and their fds."}, \
    {"close_item_fds", (PyCFunction)close_item_fds, METH_O,                                    \
     "close_item_fds(items) -> None: close the fds of hand-off items."},
