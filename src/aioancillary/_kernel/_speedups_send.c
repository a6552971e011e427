/* aioancillary._kernel._speedups: the send hot path in C (included by _speedups.c). This file
 * holds the batches, the sendmsg and the copies of fds; the Outbox type built on them is in
 * _speedups_outbox.c (its sans-I/O interface) and _speedups_write.c (the calls below).
 *
 * Outbox replaces _core/_outbox.py Outbox (same interface, same rules, same counters) and adds
 * the calls the transport's C path makes instead of its Python send code
 * (_asyncio/_writing.py):
 *
 *   try_write(fileno, data, fds)  write_fds whole for the common shapes (bytes, a list or
 *                                 tuple of ints), its checks included; anything else is
 *                                 declined untouched, for the Python checks and then write().
 *   write(fileno, payload, nums)  write_fds after its checks, for borrowed fds: the direct
 *                                 sendmsg (header, payload and SCM_RIGHTS in one call), or,
 *                                 during a burst or on EAGAIN, the message queued with
 *                                 copies of its fds (WriteSide._queue), one per distinct fd.
 *   flush(fileno)                 WriteSide._send_queued's loop: sendmsg of the queued batches
 *                                 until the queue is empty, EAGAIN or a partial write, the
 *                                 sent fds closed here.
 *
 * duplicates(nums) is _syscalls.duplicates (a copy for every entry).
 *
 * Ownership: every fd in a batch is the outbox's (a duplicate made here, or an fd handed over to
 * queue()), owned by exactly one entry (an entry repeating it within its message owns nothing).
 * It leaves the outbox in exactly one way: sent (closed here by flush, or handed back by
 * advance), returned to the caller (discard_first, take_unsent, drop), or closed here when
 * the outbox is deallocated with fds still queued. Duplicates made by write() are closed on
 * every failure before the error is raised.
 *
 * Kernel facts used (unix(7), net/unix/af_unix.c): the fds of a stream sendmsg ride with its
 * first byte, so a batch that sent any byte is sealed; scm_send checks every fd before the
 * socket's buffer, so EAGAIN means the fds were valid; at most SCM_MAX_FD fds per sendmsg.
 */

#include <sys/uio.h>

#define SEND_SCM_MAX 253
#define SEND_HEADER 8

/* What write() asks the Python side to do next (the transport's C path reads these). */
enum { WRITE_DECLINED = -1, WRITE_SENT = 0, WRITE_QUEUED = 1, WRITE_FULL = 2, WRITE_PARTIAL = 3 };
enum { MODE_FRAMED = 0, MODE_RAW = 1, MODE_DATAGRAM = 2 };

static PyObject *InvalidFdError;
static PyObject *import_name(const char *module, const char *name); /* _speedups.c */
static PyObject *ModeFramed, *ModeRaw, *ModeDatagram;
static PyObject *frames_of_func;

/* A stack control buffer for one sendmsg at the kernel's cap (heap above it). */
typedef union {
    struct cmsghdr align;
    char bytes[CMSG_SPACE(SEND_SCM_MAX * sizeof(int))];
} send_control_t;

/* A batch's fds are what its sendmsg carries, in order. own[i] says whether fds[i] is owned
 * by that entry (closed once sent or dropped) or repeats a number an earlier entry of the same
 * message owns: write() makes one copy per distinct fd of a message ([fd, fd] costs one dup
 * and one close, and still sends two fds). */
typedef struct {
    char *data;
    Py_ssize_t len, alloc, sent;
    int *fds;
    unsigned char *own;
    Py_ssize_t nfds, fd_alloc;
    int sealed;
} batch_t;

typedef struct {
    PyObject_HEAD
    batch_t *batches; /* batches[head .. head + count), NULL when nothing is queued */
    Py_ssize_t head, count, alloc;
    Py_ssize_t nbytes, nfds;
    Py_ssize_t size_limit; /* try_write's bound on a payload (the transport's _size_limit) */
    int mode, cap;
    char burst, direct;
} OutboxObject;

/* -- batches ----------------------------------------------------------------------------- */

static void
batch_free(batch_t *b)
{
    PyMem_Free(b->data);
    PyMem_Free(b->fds);
    PyMem_Free(b->own);
    b->data = NULL;
    b->fds = NULL;
    b->own = NULL;
}

static int
batch_add_bytes(batch_t *b, const char *bytes, Py_ssize_t n)
{
    if (b->len + n > b->alloc) {
        Py_ssize_t want = b->alloc ? b->alloc : 256;
        while (want < b->len + n) {
            if (want > PY_SSIZE_T_MAX / 2) {
                PyErr_NoMemory();
                return -1;
            }
            want *= 2;
        }
        char *data = PyMem_Realloc(b->data, (size_t)want);
        if (data == NULL) {
            PyErr_NoMemory();
            return -1;
        }
        b->data = data;
        b->alloc = want;
    }
    if (n) {
        memcpy(b->data + b->len, bytes, (size_t)n);
    }
    b->len += n;
    return 0;
}

/* Room for n more fds (no fd is stored: a failure leaves the batch as it was). */
static int
batch_reserve_fds(batch_t *b, Py_ssize_t n)
{
    if (b->nfds + n <= b->fd_alloc) {
        return 0;
    }
    Py_ssize_t want = b->fd_alloc ? b->fd_alloc : 16;
    while (want < b->nfds + n) {
        want *= 2;
    }
    int *fds = PyMem_Realloc(b->fds, (size_t)want * sizeof(int));
    if (fds == NULL) {
        PyErr_NoMemory();
        return -1;
    }
    b->fds = fds; /* larger: fd_alloc grows once both arrays have */
    unsigned char *own = PyMem_Realloc(b->own, (size_t)want);
    if (own == NULL) {
        PyErr_NoMemory();
        return -1;
    }
    b->own = own;
    b->fd_alloc = want;
    return 0;
}

/* Close the numbers the batch's entries own (the others repeat one of them). */
static void
batch_close_owned(batch_t *b)
{
    for (Py_ssize_t i = 0; i < b->nfds; i++) {
        if (b->own[i]) {
            (void)close(b->fds[i]);
        }
    }
}

/* The numbers the batch's entries own, for a caller who closes them. */
static PyObject *
batch_owned_list(batch_t *b, PyObject *append_to)
{
    PyObject *list = append_to;
    if (list == NULL && (list = PyList_New(0)) == NULL) {
        return NULL;
    }
    for (Py_ssize_t i = 0; i < b->nfds; i++) {
        if (!b->own[i]) {
            continue;
        }
        PyObject *num = PyLong_FromLong(b->fds[i]);
        if (num == NULL || PyList_Append(list, num) < 0) {
            Py_XDECREF(num);
            if (append_to == NULL) {
                Py_DECREF(list);
            }
            return NULL;
        }
        Py_DECREF(num);
    }
    return list;
}

static void
put_header(char *out, Py_ssize_t nfds, Py_ssize_t size)
{
    /* >HHI: version word (version 1, flags 0), fd count, payload length (_framing). */
    uint32_t length = (uint32_t)size;
    out[0] = 1;
    out[1] = 0;
    out[2] = (char)((nfds >> 8) & 0xff);
    out[3] = (char)(nfds & 0xff);
    out[4] = (char)((length >> 24) & 0xff);
    out[5] = (char)((length >> 16) & 0xff);
    out[6] = (char)((length >> 8) & 0xff);
    out[7] = (char)(length & 0xff);
}

static batch_t *
outbox_first(OutboxObject *self)
{
    return &self->batches[self->head];
}

static batch_t *
outbox_last(OutboxObject *self)
{
    return self->count ? &self->batches[self->head + self->count - 1] : NULL;
}

/* A new empty batch at the end (NULL and MemoryError if there is no room). */
static batch_t *
outbox_append(OutboxObject *self)
{
    if (self->head + self->count == self->alloc) {
        if (self->head > 0) {
            memmove(self->batches, self->batches + self->head,
                    (size_t)self->count * sizeof(batch_t));
            self->head = 0;
        }
        else {
            Py_ssize_t want = self->alloc ? 2 * self->alloc : 4;
            batch_t *batches = PyMem_Realloc(self->batches, (size_t)want * sizeof(batch_t));
            if (batches == NULL) {
                PyErr_NoMemory();
                return NULL;
            }
            self->batches = batches;
            self->alloc = want;
        }
    }
    batch_t *b = &self->batches[self->head + self->count];
    memset(b, 0, sizeof(*b));
    self->count++;
    return b;
}

/* As Outbox._emptied: an empty outbox holds no queue of its own. */
static void
outbox_emptied(OutboxObject *self)
{
    if (self->count == 0) {
        PyMem_Free(self->batches);
        self->batches = NULL;
        self->head = self->alloc = 0;
        self->direct = !self->burst;
    }
}

static void
outbox_popleft(OutboxObject *self)
{
    batch_free(outbox_first(self));
    self->head++;
    self->count--;
    outbox_emptied(self);
}

/* A new batch whose last message is dropped if it turns out to be empty (a failure). */
static void
outbox_undo_append(OutboxObject *self, batch_t *b)
{
    if (b->len == 0 && b->nfds == 0 && b == outbox_last(self)) {
        batch_free(b);
        self->count--;
        outbox_emptied(self);
    }
}

/* Outbox.queue for fds already owned (nfds ints; own: which entries own their number, NULL:
 * all): on failure nothing is queued and the fds are still the caller's. Returns 1 if the
 * batch is full, 0 if not, -1 on error. */
static int
outbox_queue(OutboxObject *self, const char *payload, Py_ssize_t size, const int *fds,
             const unsigned char *own, Py_ssize_t nfds)
{
    batch_t *last = outbox_last(self);
    int made = 0;
    if (nfds) {
        /* Only a framed stream merges fd-carrying messages (see Outbox.queue). */
        if (!(self->mode == MODE_FRAMED && last != NULL && !last->sealed &&
              last->nfds + nfds <= self->cap)) {
            last = NULL;
        }
    }
    else if (self->mode == MODE_DATAGRAM) {
        last = NULL;
    }
    if (last == NULL) {
        last = outbox_append(self);
        if (last == NULL) {
            return -1;
        }
        made = 1;
    }
    Py_ssize_t before = last->len;
    if (batch_reserve_fds(last, nfds) < 0) {
        goto fail;
    }
    if (self->mode == MODE_FRAMED) {
        char header[SEND_HEADER];
        put_header(header, nfds, size);
        if (batch_add_bytes(last, header, SEND_HEADER) < 0) {
            goto fail;
        }
    }
    if (batch_add_bytes(last, payload, size) < 0) {
        goto fail;
    }
    if (nfds) {
        memcpy(last->fds + last->nfds, fds, (size_t)nfds * sizeof(int));
        if (own != NULL) {
            memcpy(last->own + last->nfds, own, (size_t)nfds);
        }
        else {
            memset(last->own + last->nfds, 1, (size_t)nfds);
        }
        last->nfds += nfds;
        self->nfds += nfds;
    }
    self->nbytes += last->len - before;
    self->direct = 0;
    return last->nfds >= self->cap;
fail:
    last->len = before;
    if (made) {
        outbox_undo_append(self, last);
    }
    return -1;
}

static int
outbox_queue_rest(OutboxObject *self, const char *rest, Py_ssize_t n)
{
    batch_t *b = outbox_append(self);
    if (b == NULL) {
        return -1;
    }
    if (batch_add_bytes(b, rest, n) < 0) {
        outbox_undo_append(self, b);
        return -1;
    }
    b->sealed = 1;
    self->nbytes += n;
    self->direct = 0;
    return 0;
}

/* -- sendmsg ------------------------------------------------------------------------------ */

/* One sendmsg of iov with fds in one SCM_RIGHTS record. Returns bytes sent, -1 with errno set
 * (EINTR retried, as socket.sendmsg retries it (PEP 475); -2 if a signal handler raised). */
static Py_ssize_t
send_with_fds(int sockfd, struct iovec *iov, int niov, const int *fds, Py_ssize_t nfds)
{
    send_control_t stack;
    char *control = stack.bytes;
    struct msghdr msg;
    memset(&msg, 0, sizeof(msg));
    msg.msg_iov = iov;
    msg.msg_iovlen = (size_t)niov;
    if (nfds) {
        size_t payload = (size_t)nfds * sizeof(int);
        size_t space = CMSG_SPACE(payload);
        if (space > sizeof(stack.bytes)) {
            control = PyMem_Calloc(1, space);
            if (control == NULL) {
                PyErr_NoMemory();
                return -2;
            }
        }
        else {
            memset(control, 0, space);
        }
        msg.msg_control = control;
        msg.msg_controllen = space;
        struct cmsghdr *cmsg = CMSG_FIRSTHDR(&msg);
        cmsg->cmsg_level = SOL_SOCKET;
        cmsg->cmsg_type = SCM_RIGHTS;
        cmsg->cmsg_len = CMSG_LEN(payload);
        memcpy(CMSG_DATA(cmsg), fds, payload);
    }
    ssize_t n;
    for (;;) {
        n = sendmsg(sockfd, &msg, 0);
        if (n >= 0 || errno != EINTR) {
            break;
        }
        if (PyErr_CheckSignals() < 0) {
            n = -2;
            break;
        }
    }
    int err = errno;
    if (control != stack.bytes) {
        PyMem_Free(control);
    }
    errno = err;
    return (Py_ssize_t)n;
}

/* The OSError socket.sendmsg would raise for errno (BlockingIOError, BrokenPipeError...),
 * returned, not raised. */
static PyObject *
send_error(int err)
{
    errno = err;
    PyErr_SetFromErrno(PyExc_OSError);
    return take_exception();
}

/* -- duplicates --------------------------------------------------------------------------- */

/* Raise `cls(message)` from OSError(err), as `raise cls(message) from exc` in an except
 * block (cause and context both set). */
static void
raise_from_errno(PyObject *cls, int err, PyObject *message)
{
    PyObject *cause = send_error(err);
    PyObject *exc = NULL;
    if (cause != NULL && message != NULL) {
        exc = cls == PyExc_OSError ? PyObject_CallFunction(cls, "iO", err, message)
                                   : PyObject_CallOneArg(cls, message);
    }
    Py_XDECREF(message);
    if (exc == NULL) {
        Py_XDECREF(cause);
        return;
    }
    PyException_SetContext(exc, Py_NewRef(cause));
    PyException_SetCause(exc, cause);
    raise_exception(exc);
}

static void raise_dup_error(int err);

/* Duplicates (close-on-exec) of the borrowed fds, as _syscalls.duplicates: on any failure the
 * copies made are closed and InvalidFdError (EBADF) or OSError (RLIMIT_NOFILE...) raised. */
static int
duplicate_fds(const int *nums, Py_ssize_t n, int *out)
{
    Py_ssize_t made = 0;
    int err = 0;
    for (Py_ssize_t i = 0; i < n; i++) {
        int copy = fcntl(nums[i], F_DUPFD_CLOEXEC, 0);
        if (copy < 0) {
            err = errno;
            break;
        }
        out[made++] = copy;
        if (n > 1) {
            /* dup returns the lowest free number: if that is one of the numbers to send, that
             * entry was closed, and would otherwise send our copy instead. */
            for (Py_ssize_t j = 0; j < n; j++) {
                if (nums[j] == copy) {
                    err = EBADF;
                    break;
                }
            }
            if (err) {
                break;
            }
        }
    }
    if (!err) {
        return 0;
    }
    close_fds(out, made); /* none of them was queued */
    raise_dup_error(err);
    return -1;
}

/* InvalidFdError (EBADF) or OSError (RLIMIT_NOFILE...), as _syscalls.duplicates raises them. */
static void
raise_dup_error(int err)
{
    if (err == EBADF) {
        raise_from_errno(InvalidFdError, err,
                         PyUnicode_FromString("cannot send: an fd in the list is not open "
                                              "(EBADF); nothing was queued"));
    }
    else {
        raise_from_errno(PyExc_OSError, err,
                         PyUnicode_FromFormat("cannot queue fds to send: duplicating one failed "
                                              "(%s); the process is probably at its "
                                              "RLIMIT_NOFILE. Nothing was queued",
                                              strerror(err)));
    }
}

/* -- argument helpers --------------------------------------------------------------------- */

/* The ints of a list or tuple into out (heap if more than `room`); *heap set if allocated. */
static Py_ssize_t
int_items(PyObject *seq, int *room, Py_ssize_t nroom, int **out)
{
    PyObject *fast = PySequence_Fast(seq, "fds must be a sequence of ints");
    if (fast == NULL) {
        return -1;
    }
    Py_ssize_t n = PySequence_Fast_GET_SIZE(fast);
    int *buf = room;
    if (n > nroom) {
        buf = PyMem_Malloc((size_t)n * sizeof(int));
        if (buf == NULL) {
            Py_DECREF(fast);
            PyErr_NoMemory();
            return -1;
        }
    }
    PyObject **items = PySequence_Fast_ITEMS(fast);
    for (Py_ssize_t i = 0; i < n; i++) {
        int fd = as_int(items[i]);
        if (fd == -1 && PyErr_Occurred()) {
            if (buf != room) {
                PyMem_Free(buf);
            }
            Py_DECREF(fast);
            return -1;
        }
        buf[i] = fd;
    }
    Py_DECREF(fast);
    *out = buf;
    return n;
}

/* [a] or [a, b] (there is no PyList_Pack). */
static PyObject *
list_of(PyObject *a, PyObject *b)
{
    PyObject *list = PyList_New(b ? 2 : 1);
    if (list != NULL) {
        PyList_SET_ITEM(list, 0, Py_NewRef(a));
        if (b) {
            PyList_SET_ITEM(list, 1, Py_NewRef(b));
        }
    }
    return list;
}

static PyObject *
fds_to_list(const int *fds, Py_ssize_t n)
{
    PyObject *list = PyList_New(n);
    if (list == NULL) {
        return NULL;
    }
    for (Py_ssize_t i = 0; i < n; i++) {
        PyObject *num = PyLong_FromLong(fds[i]);
        if (num == NULL) {
            Py_DECREF(list);
            return NULL;
        }
        PyList_SET_ITEM(list, i, num);
    }
    return list;
}
