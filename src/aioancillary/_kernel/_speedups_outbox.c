/* aioancillary._kernel._speedups: the Outbox type, part 1 (included by _speedups.c, after
 * _speedups_send.c, whose batches, sendmsg and duplicates it uses).
 *
 * Construction and the sans-I/O interface of _core/_outbox.py's Outbox: the same methods,
 * rules and counters (queue, queue_rest, pending, advance, discard_first, take_unsent, drop,
 * the burst). The transport's C path (try_write, write, flush) and the type object are in
 * _speedups_write.c. The ownership rules are _speedups_send.c's.
 */

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
