/* aioancillary._kernel._speedups: the send hot path in C (included by _speedups.c).
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

/* -- Outbox: construction ---------------------------------------------------------------- */

static PyObject *
Outbox_new(PyTypeObject *type, PyObject *args, PyObject *kwargs)
{
    static char *keywords[] = {"mode", "fd_cap", NULL};
    PyObject *mode;
    int cap;
    if (!PyArg_ParseTupleAndKeywords(args, kwargs, "Oi:Outbox", keywords, &mode, &cap)) {
        return NULL;
    }
    int which;
    if (mode == ModeFramed) {
        which = MODE_FRAMED;
    }
    else if (mode == ModeRaw) {
        which = MODE_RAW;
    }
    else if (mode == ModeDatagram) {
        which = MODE_DATAGRAM;
    }
    else {
        PyErr_Format(PyExc_TypeError, "mode must be a Mode, not %R", mode);
        return NULL;
    }
    OutboxObject *self = (OutboxObject *)type->tp_alloc(type, 0);
    if (self == NULL) {
        return NULL;
    }
    self->mode = which;
    self->cap = cap;
    self->direct = 1;
    return (PyObject *)self;
}

static void
Outbox_dealloc(OutboxObject *self)
{
    /* Fds still queued are the outbox's: nobody else will close them. */
    for (Py_ssize_t i = 0; i < self->count; i++) {
        batch_t *b = &self->batches[self->head + i];
        batch_close_owned(b);
        batch_free(b);
    }
    PyMem_Free(self->batches);
    Py_TYPE(self)->tp_free((PyObject *)self);
}

static int
Outbox_bool(OutboxObject *self)
{
    return self->count > 0;
}

/* -- Outbox: the sans-I/O interface of _outbox.Outbox ------------------------------------- */

static PyObject *
Outbox_sendable_now(OutboxObject *self, PyObject *Py_UNUSED(ignored))
{
    return PyBool_FromLong(self->direct);
}

static PyObject *
Outbox_sent_directly(OutboxObject *self, PyObject *Py_UNUSED(ignored))
{
    if (self->mode == MODE_FRAMED) {
        self->burst = 1;
        self->direct = 0;
    }
    Py_RETURN_NONE;
}

static PyObject *
Outbox_end_burst(OutboxObject *self, PyObject *Py_UNUSED(ignored))
{
    self->burst = 0;
    self->direct = self->count == 0;
    Py_RETURN_NONE;
}

static PyObject *
Outbox_frame(OutboxObject *self, PyObject *const *args, Py_ssize_t nargs)
{
    if (nargs != 2) {
        PyErr_SetString(PyExc_TypeError, "frame() takes (payload, nfds)");
        return NULL;
    }
    if (self->mode != MODE_FRAMED) {
        return list_of(args[0], NULL);
    }
    Py_ssize_t nfds = PyLong_AsSsize_t(args[1]);
    if (nfds == -1 && PyErr_Occurred()) {
        return NULL;
    }
    Py_ssize_t size = PyObject_Length(args[0]);
    if (size < 0) {
        return NULL;
    }
    char header[SEND_HEADER];
    put_header(header, nfds, size);
    PyObject *head = PyBytes_FromStringAndSize(header, SEND_HEADER);
    if (head == NULL) {
        return NULL;
    }
    PyObject *out = list_of(head, args[0]);
    Py_DECREF(head);
    return out;
}

static PyObject *
Outbox_group_size(OutboxObject *self, PyObject *const *args, Py_ssize_t nargs)
{
    if (nargs != 2) {
        PyErr_SetString(PyExc_TypeError, "group_size() takes (messages, start)");
        return NULL;
    }
    if (self->mode == MODE_DATAGRAM) {
        return PyLong_FromLong(1);
    }
    Py_ssize_t start = PyLong_AsSsize_t(args[1]);
    if (start == -1 && PyErr_Occurred()) {
        return NULL;
    }
    Py_ssize_t total = PyObject_Length(args[0]);
    if (total < 0) {
        return NULL;
    }
    Py_ssize_t nfds = 0, count = 0;
    for (Py_ssize_t i = start; i < total; i++) {
        PyObject *item = PySequence_GetItem(args[0], i);
        if (item == NULL) {
            return NULL;
        }
        PyObject *fds = PySequence_GetItem(item, 1);
        Py_DECREF(item);
        if (fds == NULL) {
            return NULL;
        }
        Py_ssize_t n = PyObject_Length(fds);
        Py_DECREF(fds);
        if (n < 0) {
            return NULL;
        }
        if (count && n && (self->mode == MODE_RAW || nfds + n > self->cap)) {
            break;
        }
        nfds += n;
        count++;
    }
    return PyLong_FromSsize_t(count ? count : 1);
}

static PyObject *
Outbox_queue(OutboxObject *self, PyObject *const *args, Py_ssize_t nargs)
{
    if (nargs != 2) {
        PyErr_SetString(PyExc_TypeError, "queue() takes (payload, fds)");
        return NULL;
    }
    int room[16];
    int *fds = NULL;
    Py_ssize_t nfds = int_items(args[1], room, 16, &fds);
    if (nfds < 0) {
        return NULL;
    }
    Py_buffer view;
    int full = -1;
    if (PyObject_GetBuffer(args[0], &view, PyBUF_SIMPLE) == 0) {
        full = outbox_queue(self, view.buf, view.len, fds, NULL, nfds);
        PyBuffer_Release(&view);
    }
    if (full < 0) {
        close_fds(fds, nfds); /* the outbox owned them from this call on */
    }
    if (fds != room) {
        PyMem_Free(fds);
    }
    return full < 0 ? NULL : PyBool_FromLong(full);
}

static PyObject *
Outbox_queue_rest(OutboxObject *self, PyObject *rest)
{
    Py_buffer view;
    if (PyObject_GetBuffer(rest, &view, PyBUF_SIMPLE) < 0) {
        return NULL;
    }
    int ok = outbox_queue_rest(self, view.buf, view.len);
    PyBuffer_Release(&view);
    if (ok < 0) {
        return NULL;
    }
    Py_RETURN_NONE;
}

static PyObject *
Outbox_pending(OutboxObject *self, PyObject *Py_UNUSED(ignored))
{
    if (self->count == 0) {
        PyErr_SetString(PyExc_IndexError, "pending() of an empty outbox");
        return NULL;
    }
    batch_t *b = outbox_first(self);
    /* A copy: the batch's buffer may move while the caller holds the view. */
    PyObject *bytes = PyBytes_FromStringAndSize(b->data + b->sent, b->len - b->sent);
    if (bytes == NULL) {
        return NULL;
    }
    PyObject *view = PyMemoryView_FromObject(bytes);
    Py_DECREF(bytes);
    PyObject *fds = view ? fds_to_list(b->fds, b->nfds) : NULL;
    PyObject *out = fds ? PyTuple_Pack(2, view, fds) : NULL;
    Py_XDECREF(view);
    Py_XDECREF(fds);
    return out;
}

/* Record `sent` bytes of the first batch as taken by the kernel; its fds, gone with them,
 * are closed (close != 0) or handed back in *out. */
static int
outbox_advance(OutboxObject *self, Py_ssize_t sent, int close, PyObject **out)
{
    batch_t *b = outbox_first(self);
    if (out != NULL) {
        *out = batch_owned_list(b, NULL);
        if (*out == NULL) {
            return -1;
        }
    }
    if (close) {
        batch_close_owned(b); /* sent: the kernel holds its own references */
    }
    self->nfds -= b->nfds;
    b->nfds = 0;
    b->sealed = 1;
    b->sent += sent;
    self->nbytes -= sent;
    if (b->sent >= b->len || self->mode == MODE_DATAGRAM) {
        outbox_popleft(self);
    }
    return 0;
}

static PyObject *
Outbox_advance(OutboxObject *self, PyObject *arg)
{
    Py_ssize_t sent = PyLong_AsSsize_t(arg);
    if (sent == -1 && PyErr_Occurred()) {
        return NULL;
    }
    if (self->count == 0) {
        PyErr_SetString(PyExc_IndexError, "advance() of an empty outbox");
        return NULL;
    }
    PyObject *fds;
    if (outbox_advance(self, sent, 0, &fds) < 0) {
        return NULL;
    }
    return fds;
}

static PyObject *
Outbox_discard_first(OutboxObject *self, PyObject *Py_UNUSED(ignored))
{
    if (self->count == 0) {
        PyErr_SetString(PyExc_IndexError, "discard_first() of an empty outbox");
        return NULL;
    }
    batch_t *b = outbox_first(self);
    PyObject *fds = batch_owned_list(b, NULL);
    if (fds == NULL) {
        return NULL;
    }
    self->nbytes -= b->len - b->sent;
    self->nfds -= b->nfds;
    outbox_popleft(self);
    return fds;
}

static PyObject *
Outbox_take_unsent(OutboxObject *self, PyObject *Py_UNUSED(ignored))
{
    /* An entry repeating a number gets a copy of its own now: each message handed back owns
     * each of its fds. A batch for which a copy cannot be made (RLIMIT_NOFILE) is not handed
     * back: it is sealed, so drop() returns its fds to be closed, as a partly sent batch's. */
    for (Py_ssize_t i = 0; i < self->count; i++) {
        batch_t *b = &self->batches[self->head + i];
        for (Py_ssize_t j = 0; j < b->nfds && !b->sealed; j++) {
            if (!b->own[j]) {
                int copy = fcntl(b->fds[j], F_DUPFD_CLOEXEC, 0);
                if (copy < 0) {
                    b->sealed = 1;
                    break;
                }
                b->fds[j] = copy;
                b->own[j] = 1;
            }
        }
    }
    PyObject *out = PyList_New(0);
    if (out == NULL) {
        return NULL;
    }
    /* Build every result first: on failure the outbox is left as it was. */
    for (Py_ssize_t i = 0; i < self->count; i++) {
        batch_t *b = &self->batches[self->head + i];
        if (b->sealed) {
            continue;
        }
        PyObject *data = PyBytes_FromStringAndSize(b->data, b->len);
        PyObject *fds = data ? fds_to_list(b->fds, b->nfds) : NULL;
        int ok = -1;
        if (fds != NULL) {
            if (self->mode == MODE_FRAMED) {
                PyObject *frames = PyObject_CallFunctionObjArgs(frames_of_func, data, fds, NULL);
                if (frames != NULL) {
                    PyObject *extended = PySequence_InPlaceConcat(out, frames);
                    ok = extended ? 0 : -1;
                    Py_XDECREF(extended);
                    Py_DECREF(frames);
                }
            }
            else {
                PyObject *pair = PyTuple_Pack(2, data, fds);
                ok = pair ? PyList_Append(out, pair) : -1;
                Py_XDECREF(pair);
            }
        }
        Py_XDECREF(data);
        Py_XDECREF(fds);
        if (ok < 0) {
            Py_DECREF(out);
            return NULL;
        }
    }
    /* Now keep only the sealed batches (their fds already left). */
    Py_ssize_t kept = 0;
    for (Py_ssize_t i = 0; i < self->count; i++) {
        batch_t *b = &self->batches[self->head + i];
        if (b->sealed) {
            self->batches[self->head + kept++] = *b;
        }
        else {
            self->nbytes -= b->len;
            self->nfds -= b->nfds;
            batch_free(b);
        }
    }
    self->count = kept;
    outbox_emptied(self);
    return out;
}

static PyObject *
Outbox_drop(OutboxObject *self, PyObject *Py_UNUSED(ignored))
{
    PyObject *out = PyList_New(0);
    if (out == NULL) {
        return NULL;
    }
    for (Py_ssize_t i = 0; i < self->count; i++) {
        if (batch_owned_list(&self->batches[self->head + i], out) == NULL) {
            Py_DECREF(out);
            return NULL;
        }
    }
    for (Py_ssize_t i = 0; i < self->count; i++) {
        batch_free(&self->batches[self->head + i]);
    }
    self->count = 0;
    self->nbytes = self->nfds = 0;
    self->burst = 0;
    outbox_emptied(self); /* direct again */
    return out;
}

/* -- Outbox: the transport's C path ------------------------------------------------------- */

/* Copies of the borrowed fds, one per distinct number (repeats share it: own[i] = 0), with
 * _syscalls.duplicates' errors and rules (the dup-number collision); on failure every copy is
 * closed. */
static int
duplicate_distinct(const int *nums, Py_ssize_t n, int *out, unsigned char *own)
{
    Py_ssize_t made = 0;
    int err = 0;
    for (Py_ssize_t i = 0; i < n && !err; i++) {
        Py_ssize_t first = 0;
        while (nums[first] != nums[i]) {
            first++;
        }
        if (first < i) {
            out[i] = out[first];
            own[i] = 0;
            continue;
        }
        int copy = fcntl(nums[i], F_DUPFD_CLOEXEC, 0);
        if (copy < 0) {
            err = errno;
            break;
        }
        out[i] = copy;
        own[i] = 1;
        made = i + 1;
        if (n > 1) {
            for (Py_ssize_t j = 0; j < n; j++) {
                if (nums[j] == copy) {
                    err = EBADF; /* that entry was closed: see duplicate_fds */
                    break;
                }
            }
        }
    }
    if (!err) {
        return 0;
    }
    for (Py_ssize_t i = 0; i < made; i++) {
        if (own[i]) {
            (void)close(out[i]); /* none of them was queued */
        }
    }
    raise_dup_error(err);
    return -1;
}

/* Duplicate the borrowed fds and queue the message with the copies (WriteSide._queue). */
static PyObject *
outbox_queue_borrowed(OutboxObject *self, const char *payload, Py_ssize_t size,
                      const int *nums, Py_ssize_t nfds)
{
    int copies[SEND_SCM_MAX] = {0};
    unsigned char own[SEND_SCM_MAX] = {0};
    if (nfds > SEND_SCM_MAX) {
        PyErr_Format(PyExc_ValueError, "more than %d fds in one message", SEND_SCM_MAX);
        return NULL;
    }
    if (duplicate_distinct(nums, nfds, copies, own) < 0) {
        return NULL;
    }
    int full = outbox_queue(self, payload, size, copies, own, nfds);
    if (full < 0) {
        for (Py_ssize_t i = 0; i < nfds; i++) {
            if (own[i]) {
                (void)close(copies[i]); /* never queued */
            }
        }
        return NULL;
    }
    return PyLong_FromLong(full ? WRITE_FULL : WRITE_QUEUED);
}

/* write() after the checks: the direct sendmsg, or the message queued with copies of the
 * borrowed fds (on EAGAIN too). Returns the WRITE_* code, or the sendmsg OSError (returned). */
static PyObject *
outbox_write_checked(OutboxObject *self, int sockfd, const char *payload, Py_ssize_t size,
                     const int *nums, Py_ssize_t nfds)
{
    PyObject *result = NULL;
    if (!self->direct) {
        return outbox_queue_borrowed(self, payload, size, nums, nfds);
    }
    /* The direct path: one sendmsg with the caller's own fds (no duplicate). */
    char header[SEND_HEADER];
    struct iovec iov[2];
    int niov = 0;
    if (self->mode == MODE_FRAMED) {
        put_header(header, nfds, size);
        iov[niov].iov_base = header;
        iov[niov++].iov_len = SEND_HEADER;
    }
    iov[niov].iov_base = (void *)payload;
    iov[niov++].iov_len = (size_t)size;
    Py_ssize_t total = size + (self->mode == MODE_FRAMED ? SEND_HEADER : 0);
    Py_ssize_t sent = send_with_fds(sockfd, iov, niov, nums, nfds);
    if (sent == -2) {
        return result; /* a signal handler raised, or no memory */
    }
    if (sent < 0) {
        int err = errno;
        if (err == EAGAIN || err == EWOULDBLOCK) {
            /* The kernel checked the fds before it found the buffer full (scm_send comes
             * first in unix_stream_sendmsg): they are open. Queue the message whole. */
            result = outbox_queue_borrowed(self, payload, size, nums, nfds);
        }
        else {
            result = send_error(err); /* returned: the caller translates it */
        }
        return result;
    }
    if (self->mode == MODE_FRAMED) {
        self->burst = 1;
        self->direct = 0;
    }
    if (sent < total) {
        /* The fds went with the first byte: only the bytes are left to send. */
        int failed;
        if (sent < SEND_HEADER && self->mode == MODE_FRAMED) {
            failed = outbox_queue_rest(self, header + sent, SEND_HEADER - sent);
            if (!failed) {
                failed = batch_add_bytes(outbox_last(self), payload, size);
                if (!failed) {
                    self->nbytes += size;
                }
            }
        }
        else {
            Py_ssize_t skip = sent - (total - size);
            failed = outbox_queue_rest(self, payload + skip, size - skip);
        }
        if (failed) {
            return result;
        }
        result = PyLong_FromLong(WRITE_PARTIAL);
        return result;
    }
    return PyLong_FromLong(WRITE_SENT);
}

static PyObject *
Outbox_write(OutboxObject *self, PyObject *const *args, Py_ssize_t nargs)
{
    if (nargs != 3) {
        PyErr_SetString(PyExc_TypeError, "write() takes (fileno, payload, nums)");
        return NULL;
    }
    int sockfd = as_int(args[0]);
    if (sockfd == -1 && PyErr_Occurred()) {
        return NULL;
    }
    int room[16];
    int *nums = NULL;
    Py_ssize_t nfds = int_items(args[2], room, 16, &nums);
    if (nfds < 0) {
        return NULL;
    }
    Py_buffer view;
    PyObject *result = NULL;
    /* A buffer export: the payload cannot move or shrink while it is sent or copied. */
    if (PyObject_GetBuffer(args[1], &view, PyBUF_SIMPLE) == 0) {
        result = outbox_write_checked(self, sockfd, view.buf, view.len, nums, nfds);
        PyBuffer_Release(&view);
    }
    if (nums != room) {
        PyMem_Free(nums);
    }
    return result;
}

/* try_write(fileno, data, fds): write_fds's common case whole, checks included: bytes and a
 * list or tuple of at most fd_cap ints in range, 0 < len(data) <= size_limit. Anything else
 * returns WRITE_DECLINED with nothing done: the caller runs the full checks (payload_of,
 * borrowed_fds, check_message) and then write(). */
static PyObject *
Outbox_try_write(OutboxObject *self, PyObject *const *args, Py_ssize_t nargs)
{
    if (nargs != 3) {
        PyErr_SetString(PyExc_TypeError, "try_write() takes (fileno, data, fds)");
        return NULL;
    }
    int sockfd = as_int(args[0]);
    if (sockfd == -1 && PyErr_Occurred()) {
        return NULL;
    }
    PyObject *data = args[1], *fds = args[2];
    if (!PyBytes_CheckExact(data) || !(PyTuple_CheckExact(fds) || PyList_CheckExact(fds))) {
        return PyLong_FromLong(WRITE_DECLINED);
    }
    Py_ssize_t size = PyBytes_GET_SIZE(data);
    Py_ssize_t nfds = PySequence_Fast_GET_SIZE(fds);
    if (size == 0 || size > self->size_limit || nfds > self->cap || nfds > SEND_SCM_MAX) {
        return PyLong_FromLong(WRITE_DECLINED);
    }
    int nums[SEND_SCM_MAX];
    PyObject **items = PySequence_Fast_ITEMS(fds);
    for (Py_ssize_t i = 0; i < nfds; i++) {
        if (!PyLong_CheckExact(items[i])) {
            return PyLong_FromLong(WRITE_DECLINED);
        }
        int overflow;
        long fd = PyLong_AsLongAndOverflow(items[i], &overflow);
        if (overflow || fd < 0 || fd > INT_MAX) {
            return PyLong_FromLong(WRITE_DECLINED); /* refused by the full checks */
        }
        nums[i] = (int)fd;
    }
    return outbox_write_checked(self, sockfd, PyBytes_AS_STRING(data), size, nums, nfds);
}

static PyObject *
Outbox_flush(OutboxObject *self, PyObject *arg)
{
    int sockfd = as_int(arg);
    if (sockfd == -1 && PyErr_Occurred()) {
        return NULL;
    }
    while (self->count) {
        batch_t *b = outbox_first(self);
        struct iovec iov;
        iov.iov_base = b->data + b->sent;
        iov.iov_len = (size_t)(b->len - b->sent);
        Py_ssize_t size = b->len - b->sent;
        Py_ssize_t sent = send_with_fds(sockfd, &iov, 1, b->fds, b->nfds);
        if (sent == -2) {
            return NULL;
        }
        if (sent < 0) {
            int err = errno;
            if (err == EAGAIN || err == EWOULDBLOCK) {
                break;
            }
            return send_error(err); /* nothing changed: the caller decides */
        }
        (void)outbox_advance(self, sent, 1, NULL); /* closes the fds that went out */
        if (sent < size && self->mode != MODE_DATAGRAM) {
            break; /* partial write: the socket is full */
        }
    }
    Py_RETURN_NONE;
}

static PyMethodDef Outbox_methods[] = {
    {"sendable_now", (PyCFunction)Outbox_sendable_now, METH_NOARGS,
     "True when a new message may be sent at once instead of queued."},
    {"sent_directly", (PyCFunction)Outbox_sent_directly, METH_NOARGS,
     "Note that a message went out directly: on a framed stream a burst begins."},
    {"end_burst", (PyCFunction)Outbox_end_burst, METH_NOARGS, "The burst is over."},
    {"frame", (PyCFunction)(void (*)(void))Outbox_frame, METH_FASTCALL,
     "frame(payload, nfds) -> the buffers that carry one message."},
    {"group_size", (PyCFunction)(void (*)(void))Outbox_group_size, METH_FASTCALL,
     "group_size(messages, start) -> how many share the next sendmsg."},
    {"queue", (PyCFunction)(void (*)(void))Outbox_queue, METH_FASTCALL,
     "queue(payload, fds) -> True if the batch is full; the outbox owns fds from now on."},
    {"queue_rest", (PyCFunction)Outbox_queue_rest, METH_O,
     "queue_rest(rest): queue what a direct sendmsg left unsent."},
    {"pending", (PyCFunction)Outbox_pending, METH_NOARGS,
     "pending() -> (bytes, fds) of the next sendmsg."},
    {"advance", (PyCFunction)Outbox_advance, METH_O,
     "advance(sent) -> the fds that went out (the caller closes them)."},
    {"discard_first", (PyCFunction)Outbox_discard_first, METH_NOARGS,
     "discard_first() -> the fds of the dropped datagram."},
    {"take_unsent", (PyCFunction)Outbox_take_unsent, METH_NOARGS,
     "take_unsent() -> the messages none of whose bytes reached the kernel."},
    {"drop", (PyCFunction)Outbox_drop, METH_NOARGS, "drop() -> every fd the outbox owned."},
    {"write", (PyCFunction)(void (*)(void))Outbox_write, METH_FASTCALL,
     "write(fileno, payload, nums) -> 0 sent, 1 queued, 2 queued (batch full), 3 partly "
     "sent (the rest queued), or the sendmsg OSError (returned, not raised)."},
    {"try_write", (PyCFunction)(void (*)(void))Outbox_try_write, METH_FASTCALL,
     "try_write(fileno, data, fds) -> as write(), with write_fds's checks, or -1 (nothing "
     "done) for an input the full checks must see."},
    {"flush", (PyCFunction)Outbox_flush, METH_O,
     "flush(fileno) -> None, or the sendmsg OSError (returned; the queue unchanged)."},
    {NULL, NULL, 0, NULL},
};

static PyMemberDef Outbox_members[] = {
    {"nbytes", T_PYSSIZET, offsetof(OutboxObject, nbytes), READONLY,
     "Bytes queued and not yet sent."},
    {"nfds", T_PYSSIZET, offsetof(OutboxObject, nfds), READONLY,
     "Fds queued (owned here) and not yet sent."},
    {"direct", T_BOOL, offsetof(OutboxObject, direct), READONLY,
     "A new message may be sent at once instead of queued."},
    {"size_limit", T_PYSSIZET, offsetof(OutboxObject, size_limit), 0,
     "Largest payload try_write sends without the full checks (0: none)."},
    {NULL, 0, 0, 0, NULL},
};

static PyNumberMethods Outbox_as_number = {
    .nb_bool = (inquiry)Outbox_bool,
};

static PyTypeObject OutboxType = {
    PyVarObject_HEAD_INIT(NULL, 0).tp_name = "aioancillary._kernel._speedups.Outbox",
    .tp_basicsize = sizeof(OutboxObject),
    .tp_flags = Py_TPFLAGS_DEFAULT,
    .tp_doc = "Outbox(mode, fd_cap): as _outbox.Outbox, in C, with write() and flush().",
    .tp_new = Outbox_new,
    .tp_dealloc = (destructor)Outbox_dealloc,
    .tp_as_number = &Outbox_as_number,
    .tp_methods = Outbox_methods,
    .tp_members = Outbox_members,
};

/* duplicates(nums) -> list[int]: _syscalls.duplicates in C (a copy for every entry). */
static PyObject *
send_duplicates(PyObject *Py_UNUSED(module), PyObject *arg)
{
    int room[16];
    int *nums = NULL;
    Py_ssize_t n = int_items(arg, room, 16, &nums);
    if (n < 0) {
        return NULL;
    }
    int stack[16];
    int *copies = n > 16 ? PyMem_Malloc((size_t)n * sizeof(int)) : stack;
    PyObject *out = NULL;
    if (copies == NULL) {
        PyErr_NoMemory();
    }
    else if (duplicate_fds(nums, n, copies) == 0) {
        out = fds_to_list(copies, n);
        if (out == NULL) {
            close_fds(copies, n); /* not handed over */
        }
    }
    if (copies != stack) {
        PyMem_Free(copies);
    }
    if (nums != room) {
        PyMem_Free(nums);
    }
    return out;
}

/* The send path's entries in the module's method table (_speedups.c). */
#define SEND_METHODS                                                                             \
    {"duplicates", (PyCFunction)send_duplicates, METH_O,                                         \
     "duplicates(nums) -> list[int]: close-on-exec copies of borrowed fds, as "                  \
     "_syscalls.duplicates (InvalidFdError or OSError, no copy left open, on failure)."},

/* At module init: the names the send path needs, and the Outbox type. */
static int
send_init(PyObject *module)
{
    PyObject *mode = import_name("aioancillary._core._framing", "Mode");
    if (mode == NULL) {
        return -1;
    }
    ModeFramed = PyObject_GetAttrString(mode, "FRAMED");
    ModeRaw = PyObject_GetAttrString(mode, "RAW");
    ModeDatagram = PyObject_GetAttrString(mode, "DATAGRAM");
    Py_DECREF(mode);
    frames_of_func = import_name("aioancillary._core._framing", "frames_of");
    InvalidFdError = import_name("aioancillary._core._errors", "InvalidFdError");
    if (!ModeFramed || !ModeRaw || !ModeDatagram || !frames_of_func || !InvalidFdError) {
        return -1;
    }
    if (PyType_Ready(&OutboxType) < 0) {
        return -1;
    }
    return PyModule_AddObjectRef(module, "Outbox", (PyObject *)&OutboxType);
}
