/* aioancillary._kernel._speedups: the Outbox type, part 2 (included by _speedups.c, after
 * _speedups_outbox.c).
 *
 * The transport's C path (try_write, write, flush: see _speedups_send.c's header), the type
 * object with its method table, the module's send functions (SEND_METHODS) and send_init.
 */

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
