/* aioancillary._kernel._speedups: the hot paths in C.
 *
 * An optional accelerator for the pure-Python paths: this file holds the receive side;
 * _speedups_send.c, _speedups_outbox.c and _speedups_write.c (the send side: the write
 * queue, the direct sendmsg, the flush) and
 * _speedups_accept.c (the accept burst and the acceptor's batched hand-off) are #included
 * below and say what they replace. Each piece here replaces one
 * Python piece behind one selection point (aioancillary/_kernel/_accel.py), with the same
 * interface, the same results, the same errors (types and messages) and the same fds closed:
 *
 *   Receiver      _kernel/_syscalls.py Receiver: recvmsg(2) until EAGAIN or a bound, the
 *                 control-message rules (MSG_CMSG_CLOEXEC or fcntl, MSG_CTRUNC, MSG_TRUNC,
 *                 SCM_PIDFD, SCM_CREDENTIALS), handing back (bytes, fds) reads.
 *   FrameDecoder  _core/_framing.py FrameDecoder: frames and their fds into messages.
 *   messages_of   _core/_message.py messages_of: reads into AncillaryMessage objects.
 *   parse_control the control-message rules alone, on a raw control buffer (for tests and
 *                 the fuzz replay: the same rules as _syscalls._fds_of).
 *
 * Ownership: an fd is owned from the moment recvmsg returns it. Until it is stored in a list
 * handed to the caller it is a C int in a local array, and every error path closes it
 * (including MemoryError while the list is built). Nothing here calls back into Python code
 * while fds are only in the shared control buffer: they are copied out first.
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <structmember.h>

#include <errno.h>
#include <fcntl.h>
#include <limits.h>
#include <stdint.h>
#include <string.h>
#include <sys/socket.h>
#include <unistd.h>

#if PY_VERSION_HEX < 0x030B0000
#error "aioancillary needs Python 3.11 or later"
#endif

/* Linux values (include/linux/socket.h); interpreted only for a Linux platform. */
#define LINUX_SCM_CREDENTIALS 0x02
#define LINUX_SCM_PIDFD 0x04

#ifndef MSG_CMSG_CLOEXEC
#define MSG_CMSG_CLOEXEC 0
#endif

/* How Receiver.read stopped (the AGAIN/LIMIT/END/FAILED constants of _syscalls). */
enum { HOW_AGAIN = 0, HOW_LIMIT = 1, HOW_END = 2, HOW_FAILED = 3 };
/* How a 0-byte read is told from the end of the stream (EOF_* of _syscalls). */
enum { EOF_NEVER = 0, EOF_ON_EMPTY = 1, EOF_NO_CREDENTIALS = 2, EOF_PEEK = 3 };

/* Control buffer shared by every Receiver: read() holds the GIL from recvmsg until the fds
 * are copied into a local array, so one buffer serves all (no per-connection 1.5 KiB). */
#define SHARED_CONTROL 4096
static union {
    struct cmsghdr align;
    char bytes[SHARED_CONTROL];
} shared_control;

/* Module state (single-phase init: one interpreter). */
static PyObject *FdTruncatedError;
static PyObject *DataTruncatedError;
static PyObject *CloexecError;
static PyObject *ProtocolError;
static PyTypeObject *MessageType;
static Py_ssize_t off_data, off_raw, off_fd_count, off_owned, off_discarded;
static PyObject *empty_tuple;
static PyObject *str_fileno, *str_receive_ancbufsize, *str_detach;

/* -- small helpers ----------------------------------------------------------------------- */

/* PyLong_AsInt (public from 3.13 only). */
static int
as_int(PyObject *obj)
{
    long value = PyLong_AsLong(obj);
    if (value == -1 && PyErr_Occurred()) {
        return -1;
    }
    if (value < INT_MIN || value > INT_MAX) {
        PyErr_SetString(PyExc_OverflowError, "Python int too large to convert to C int");
        return -1;
    }
    return (int)value;
}

static void
close_fds(const int *fds, Py_ssize_t n)
{
    for (Py_ssize_t i = 0; i < n; i++) {
        if (fds[i] >= 0) {
            (void)close(fds[i]); /* EBADF ignored, as close_raw does */
        }
    }
}

/* Close every fd (an int item) of a Python list of ints; items that are not ints are skipped. */
static void
close_fd_list(PyObject *list)
{
    Py_ssize_t n = PyList_GET_SIZE(list);
    for (Py_ssize_t i = 0; i < n; i++) {
        long fd = PyLong_AsLong(PyList_GET_ITEM(list, i));
        if (fd == -1 && PyErr_Occurred()) {
            PyErr_Clear();
            continue;
        }
        if (fd >= 0 && fd <= INT_MAX) {
            (void)close((int)fd);
        }
    }
}

/* The pending exception as an object (its traceback kept); NULL if none. */
static PyObject *
take_exception(void)
{
#if PY_VERSION_HEX >= 0x030C0000
    return PyErr_GetRaisedException();
#else
    PyObject *type, *value, *tb;
    PyErr_Fetch(&type, &value, &tb);
    if (type == NULL) {
        return NULL;
    }
    PyErr_NormalizeException(&type, &value, &tb);
    if (tb != NULL && value != NULL) {
        PyException_SetTraceback(value, tb);
    }
    Py_XDECREF(type);
    Py_XDECREF(tb);
    return value;
#endif
}

static void
raise_exception(PyObject *exc) /* steals exc */
{
#if PY_VERSION_HEX >= 0x030C0000
    PyErr_SetRaisedException(exc);
#else
    PyErr_SetObject((PyObject *)Py_TYPE(exc), exc);
    Py_DECREF(exc);
#endif
}

#include "_speedups_send.c"   /* the send path: batches, sendmsg, duplicates */
#include "_speedups_outbox.c" /* the Outbox type: its sans-I/O interface */
#include "_speedups_write.c"  /* the Outbox type: the transport's C path, SEND_METHODS */

/* cls(message, data=data, closed_fds=n): FdTruncatedError / DataTruncatedError. */
static PyObject *
truncation_error(PyObject *cls, PyObject *message, const char *data, Py_ssize_t nbytes,
                 Py_ssize_t closed)
{
    PyObject *exc = NULL;
    PyObject *args = NULL, *kwargs = NULL, *bytes = NULL, *count = NULL;
    if (message == NULL) {
        return NULL;
    }
    args = PyTuple_Pack(1, message);
    bytes = PyBytes_FromStringAndSize(data, nbytes);
    count = PyLong_FromSsize_t(closed);
    kwargs = PyDict_New();
    if (args && bytes && count && kwargs && PyDict_SetItemString(kwargs, "data", bytes) == 0 &&
        PyDict_SetItemString(kwargs, "closed_fds", count) == 0) {
        exc = PyObject_Call(cls, args, kwargs);
    }
    Py_DECREF(message);
    Py_XDECREF(args);
    Py_XDECREF(kwargs);
    Py_XDECREF(bytes);
    Py_XDECREF(count);
    return exc;
}

#include "_speedups_accept.c" /* the accept burst and the hand-off (ACCEPT_METHODS) */

/* -- control messages (cmsg(3)) ---------------------------------------------------------- */

/* The record walk of CPython's socket module (sock_recvmsg_guts), so that this code sees
 * exactly the records that socket.recvmsg would put in its ancdata list: a record cut short
 * by the buffer's end keeps the bytes that are there (macOS leaves cmsg_len untruncated). */
static int
cmsg_data_len(struct msghdr *msg, struct cmsghdr *cmsg, size_t *len)
{
    size_t offset = (size_t)((char *)cmsg - (char *)msg->msg_control);
    size_t controllen = (size_t)msg->msg_controllen;
    if (offset > controllen || controllen - offset < CMSG_LEN(0) || cmsg->cmsg_len < CMSG_LEN(0)) {
        return -1;
    }
    size_t want = (size_t)cmsg->cmsg_len - CMSG_LEN(0);
    size_t data_offset = (size_t)((char *)CMSG_DATA(cmsg) - (char *)msg->msg_control);
    if (data_offset > controllen) {
        return -1;
    }
    size_t space = controllen - data_offset;
    if (space >= want) {
        *len = want;
        return 0;
    }
    *len = space;
    return 1;
}

/* What the parse found, fds copied out of the control buffer. */
typedef struct {
    int *rights; /* the peer's fds, in order (>= 0 on the general path) */
    Py_ssize_t nrights;
    int *pidfds; /* kernel-added pidfds (Linux SCM_PIDFD), to be closed */
    Py_ssize_t npidfds;
    int records; /* records seen (CPython's ancdata would have this many) */
    int inline_shape; /* the Receiver's inline case: no EOF check on a 0-byte read */
} parsed_t;

typedef struct {
    int linux_;     /* the platform is Linux: credentials/pidfd records are known */
    int cloexec;    /* the platform's MSG_CMSG_CLOEXEC value (0: none) */
    Py_ssize_t buffer_len; /* the data buffer's size, for the MSG_TRUNC message */
} rules_t;

/* Copy the ints of a record's payload (a partial tail dropped, cmsg(3)). */
static Py_ssize_t
copy_ints(int *out, const unsigned char *data, size_t len, int nonnegative)
{
    Py_ssize_t n = 0;
    size_t count = len / sizeof(int);
    for (size_t i = 0; i < count; i++) {
        int fd;
        memcpy(&fd, data + i * sizeof(int), sizeof(int));
        if (!nonnegative || fd >= 0) {
            out[n++] = fd;
        }
    }
    return n;
}

/* Apply the receive rules of _syscalls._fds_of / _cmsg.extract_fds to one recvmsg's control
 * buffer. On success the peer's fds are in p->rights (owned by the caller) and every pidfd
 * is closed. On error every fd found is closed and an exception is set; returns -1.
 * `scratch` holds at least controllen / sizeof(int) ints, twice. */
static int
parse(struct msghdr *msg, int msg_flags, int recv_flags, const rules_t *rules, const char *data,
      Py_ssize_t nbytes, int *scratch, parsed_t *p)
{
    size_t cap = (size_t)msg->msg_controllen / sizeof(int) + 1;
    int creds = rules->linux_ ? LINUX_SCM_CREDENTIALS : -1;
    int truncated = msg_flags & (MSG_TRUNC | MSG_CTRUNC);
    int cloexec_used = (recv_flags & rules->cloexec) != 0;
    struct cmsghdr *cmsg;
    size_t len;
    int status;

    p->rights = scratch;
    p->pidfds = scratch + cap;
    p->nrights = p->npidfds = 0;
    p->records = 0;
    p->inline_shape = 0;

    /* First pass: the common shapes (see _fds_of and extract_fds). `fast` stays 1 while the
     * records are only SOL_SOCKET/SCM_RIGHTS (one, of whole ints: _fds_of) and Linux
     * credentials; `general_fast` for extract_fds's rule (several SCM_RIGHTS, partial tail
     * dropped, no negative number). */
    int fast = !truncated && cloexec_used;
    int general_fast = !(msg_flags & MSG_CTRUNC) && cloexec_used;
    int nrights_records = 0;
    int last_rights = 0, first_creds = 0;
    for (cmsg = msg->msg_controllen > 0 ? CMSG_FIRSTHDR(msg) : NULL; cmsg != NULL;
         cmsg = CMSG_NXTHDR(msg, cmsg)) {
        status = cmsg_data_len(msg, cmsg, &len);
        if (status < 0) {
            break;
        }
        p->records++;
        int sol = cmsg->cmsg_level == SOL_SOCKET;
        if (sol && cmsg->cmsg_type == SCM_RIGHTS) {
            nrights_records++;
            if (nrights_records > 1 || len % sizeof(int)) {
                fast = 0;
            }
            last_rights = 1;
        }
        else {
            last_rights = 0;
            if (!sol || cmsg->cmsg_type != creds) {
                fast = 0;
                general_fast = 0;
            }
            else if (p->records == 1) {
                first_creds = 1;
            }
        }
        if (!sol) {
            fast = 0;
            general_fast = 0;
        }
        if (status != 0) {
            break;
        }
    }
    p->inline_shape = !truncated && recv_flags != 0 && last_rights && fast &&
                      (p->records == 1 || (p->records == 2 && first_creds));

    /* Second pass: copy the fds out. */
    int all_nonnegative = 1;
    for (cmsg = msg->msg_controllen > 0 ? CMSG_FIRSTHDR(msg) : NULL; cmsg != NULL;
         cmsg = CMSG_NXTHDR(msg, cmsg)) {
        status = cmsg_data_len(msg, cmsg, &len);
        if (status < 0) {
            break;
        }
        if (cmsg->cmsg_level == SOL_SOCKET) {
            if (cmsg->cmsg_type == SCM_RIGHTS) {
                Py_ssize_t before = p->nrights;
                p->nrights += copy_ints(p->rights + p->nrights, CMSG_DATA(cmsg), len, 0);
                for (Py_ssize_t i = before; i < p->nrights; i++) {
                    if (p->rights[i] < 0) {
                        all_nonnegative = 0;
                    }
                }
            }
            else if (rules->linux_ && cmsg->cmsg_type == LINUX_SCM_PIDFD) {
                p->npidfds += copy_ints(p->pidfds + p->npidfds, CMSG_DATA(cmsg), len, 1);
            }
        }
        if (status != 0) {
            break;
        }
    }
    if (fast || (general_fast && all_nonnegative)) {
        /* No pidfd can be here (a pidfd record breaks both shapes). */
        goto data_truncation;
    }

    /* The general path (_wrap, _check): negative numbers are not fds. */
    {
        Py_ssize_t n = 0;
        for (Py_ssize_t i = 0; i < p->nrights; i++) {
            if (p->rights[i] >= 0) {
                p->rights[n++] = p->rights[i];
            }
        }
        p->nrights = n;
    }
    if (msg_flags & MSG_CTRUNC) {
        Py_ssize_t total = p->nrights + p->npidfds;
        /* The set is incomplete: no fd can be matched to its message. */
        close_fds(p->rights, p->nrights);
        close_fds(p->pidfds, p->npidfds);
        p->nrights = p->npidfds = 0;
        PyObject *message = PyUnicode_FromFormat(
            "the kernel dropped file descriptors of a received message (MSG_CTRUNC); the %zd "
            "fd(s) that did arrive were closed. The receiver is probably at its RLIMIT_NOFILE "
            "(close unused fds or raise the limit), or the ancillary buffer was too small (size "
            "it with buffer_size_for_rights(SCM_MAX_FD))",
            total);
        PyObject *exc = truncation_error(FdTruncatedError, message, data, nbytes, total);
        if (exc != NULL) {
            raise_exception(exc);
        }
        return -1;
    }
    if ((p->nrights || p->npidfds) && !(recv_flags & rules->cloexec)) {
        /* No MSG_CMSG_CLOEXEC (macOS, or not asked): set FD_CLOEXEC now. A concurrent
         * fork+exec between recvmsg and here can still inherit the fds. */
        for (Py_ssize_t i = 0; i < p->nrights + p->npidfds; i++) {
            int fd = i < p->nrights ? p->rights[i] : p->pidfds[i - p->nrights];
            int flags = fcntl(fd, F_GETFD);
            if (flags < 0 || fcntl(fd, F_SETFD, flags | FD_CLOEXEC) < 0) {
                int err = errno;
                Py_ssize_t total = p->nrights + p->npidfds;
                /* An fd that may leak across exec must not be handed out. */
                close_fds(p->rights, p->nrights);
                close_fds(p->pidfds, p->npidfds);
                p->nrights = p->npidfds = 0;
                PyObject *cause = PyObject_CallFunction(PyExc_OSError, "is", err, strerror(err));
                PyObject *exc = NULL;
                if (cause != NULL) {
                    exc = PyObject_CallFunction(
                        CloexecError, "iN", err,
                        PyUnicode_FromFormat("could not set FD_CLOEXEC on received fds (%s); all "
                                             "%zd were closed",
                                             strerror(err), total));
                }
                if (exc != NULL) {
                    PyException_SetCause(exc, cause);
                    cause = NULL;
                    raise_exception(exc);
                }
                Py_XDECREF(cause);
                return -1;
            }
        }
    }
    close_fds(p->pidfds, p->npidfds); /* the sender's pidfd: not one the peer sent */
    p->npidfds = 0;

data_truncation:
    if (msg_flags & MSG_TRUNC) {
        Py_ssize_t count = p->nrights;
        close_fds(p->rights, p->nrights); /* the message is incomplete: its fds are unusable */
        p->nrights = 0;
        PyObject *message = PyUnicode_FromFormat(
            "a message did not fit the %zd-byte receive buffer and was cut (MSG_TRUNC); its "
            "tail is lost and its %zd fd(s) were closed. Receive with a larger buffer",
            rules->buffer_len, count);
        PyObject *exc = truncation_error(DataTruncatedError, message, data, nbytes, count);
        if (exc != NULL) {
            raise_exception(exc);
        }
        return -1;
    }
    return 0;
}

/* A list of the ints, or NULL with every fd closed and MemoryError set. */
static PyObject *
fd_list(const int *fds, Py_ssize_t n)
{
    PyObject *list = PyList_New(n);
    if (list == NULL) {
        close_fds(fds, n);
        return NULL;
    }
    for (Py_ssize_t i = 0; i < n; i++) {
        PyObject *num = PyLong_FromLong(fds[i]);
        if (num == NULL) {
            Py_DECREF(list);
            close_fds(fds, n);
            return NULL;
        }
        PyList_SET_ITEM(list, i, num);
    }
    return list;
}

/* The errno of OSError `exc` -> the library's error (_syscalls._recv_error). Steals exc. */
static PyObject *
recv_error(PyObject *exc, int err)
{
    if (err != EMFILE) {
        return exc;
    }
    PyObject *message = PyUnicode_FromString(
        "recvmsg failed with EMFILE: the process is at its RLIMIT_NOFILE and the kernel "
        "discarded the fds of a message. Close unused fds or raise the limit");
    PyObject *error = truncation_error(FdTruncatedError, message, "", 0, 0);
    if (error == NULL) {
        Py_DECREF(exc);
        return take_exception();
    }
    PyException_SetCause(error, exc);
    return error;
}

static int
platform_rules(PyObject *platform, rules_t *rules, Py_ssize_t *fixed_ancbufsize)
{
    PyObject *name = PyObject_GetAttrString(platform, "name");
    if (name == NULL) {
        return -1;
    }
    rules->linux_ = PyUnicode_CompareWithASCIIString(name, "linux") == 0;
    Py_DECREF(name);
    PyObject *flag = PyObject_GetAttrString(platform, "cmsg_cloexec");
    if (flag == NULL) {
        return -1;
    }
    rules->cloexec = as_int(flag);
    Py_DECREF(flag);
    if (rules->cloexec == -1 && PyErr_Occurred()) {
        return -1;
    }
    if (fixed_ancbufsize != NULL) {
        PyObject *cap = PyObject_GetAttrString(platform, "scm_max_fd");
        if (cap == NULL) {
            return -1;
        }
        *fixed_ancbufsize = 0;
        if (cap != Py_None) {
            PyObject *size = PyObject_CallMethodNoArgs(platform, str_receive_ancbufsize);
            if (size == NULL) {
                Py_DECREF(cap);
                return -1;
            }
            *fixed_ancbufsize = PyLong_AsSsize_t(size);
            Py_DECREF(size);
            if (*fixed_ancbufsize < 0) {
                Py_DECREF(cap);
                if (!PyErr_Occurred()) {
                    PyErr_SetString(PyExc_ValueError, "negative ancillary buffer size");
                }
                return -1;
            }
        }
        Py_DECREF(cap);
    }
    return 0;
}

/* parse_control(control, msg_flags, recv_flags, platform, data=b"", buffer_len=0) -> list
 *
 * The receive rules on a raw control buffer, as _syscalls._fds_of applies them to what
 * recvmsg returned. For tests and the fuzz replay: the fds in `control` are owned from the
 * call on (returned, or closed before the error is raised). */
static PyObject *
parse_control(PyObject *Py_UNUSED(module), PyObject *args, PyObject *kwargs)
{
    static char *keywords[] = {"control", "msg_flags", "recv_flags", "platform", "data",
                               "buffer_len", NULL};
    Py_buffer control;
    Py_buffer data = {0};
    int msg_flags, recv_flags;
    PyObject *platform;
    Py_ssize_t buffer_len = 0;
    rules_t rules;
    if (!PyArg_ParseTupleAndKeywords(args, kwargs, "y*iiO|y*n:parse_control", keywords,
                                     &control, &msg_flags, &recv_flags, &platform, &data,
                                     &buffer_len)) {
        return NULL;
    }
    PyObject *result = NULL;
    char *copy = NULL;
    int *scratch = NULL;
    if (platform_rules(platform, &rules, NULL) < 0) {
        goto done;
    }
    rules.buffer_len = buffer_len;
    /* An aligned copy: CMSG_* macros need cmsghdr alignment. */
    copy = PyMem_Calloc((size_t)control.len + sizeof(struct cmsghdr), 1);
    scratch = PyMem_Calloc(2 * ((size_t)control.len / sizeof(int) + 1), sizeof(int));
    if (copy == NULL || scratch == NULL) {
        PyErr_NoMemory();
        goto done;
    }
    if (control.len > 0) {
        memcpy(copy, control.buf, (size_t)control.len);
    }
    struct msghdr msg;
    memset(&msg, 0, sizeof(msg));
    msg.msg_control = copy;
    msg.msg_controllen = (size_t)control.len;
    msg.msg_flags = msg_flags;
    parsed_t parsed;
    if (parse(&msg, msg_flags, recv_flags, &rules, data.buf ? data.buf : "", data.len, scratch,
              &parsed) == 0) {
        result = fd_list(parsed.rights, parsed.nrights);
    }
done:
    PyMem_Free(copy);
    PyMem_Free(scratch);
    PyBuffer_Release(&control);
    if (data.obj != NULL) {
        PyBuffer_Release(&data);
    }
    return result;
}

/* -- AncillaryMessage objects ------------------------------------------------------------ */

#define SLOT(obj, off) (*(PyObject **)((char *)(obj) + (off)))

/* A message owning `raw` (a list of ints, or None), built as new_message() builds it. */
static PyObject *
new_message(PyObject *data, PyObject *raw)
{
    PyObject *msg = MessageType->tp_alloc(MessageType, 0);
    if (msg == NULL) {
        return NULL;
    }
    Py_ssize_t count = raw == Py_None ? 0 : PyList_GET_SIZE(raw);
    PyObject *fd_count = PyLong_FromSsize_t(count);
    if (fd_count == NULL) {
        Py_DECREF(msg);
        return NULL;
    }
    SLOT(msg, off_data) = Py_NewRef(data);
    SLOT(msg, off_raw) = Py_NewRef(raw);
    SLOT(msg, off_fd_count) = fd_count;
    SLOT(msg, off_owned) = Py_NewRef(empty_tuple);
    SLOT(msg, off_discarded) = PyLong_FromLong(0);
    return msg;
}

/* Close the fds of every read of `reads` from index `start` on. */
static void
close_reads(PyObject *reads, Py_ssize_t start)
{
    for (Py_ssize_t i = start; i < PyList_GET_SIZE(reads); i++) {
        PyObject *item = PyList_GET_ITEM(reads, i);
        if (PyTuple_Check(item) && PyTuple_GET_SIZE(item) == 2 &&
            PyList_Check(PyTuple_GET_ITEM(item, 1))) {
            close_fd_list(PyTuple_GET_ITEM(item, 1));
        }
    }
}

/* A message dropped before it was handed over: its fds are closed here (not by __del__,
 * which would warn), and it no longer holds them. */
static void
drop_message(PyObject *msg)
{
    PyObject *raw = SLOT(msg, off_raw);
    if (raw != NULL && PyList_Check(raw)) {
        close_fd_list(raw);
    }
    Py_XSETREF(SLOT(msg, off_raw), Py_NewRef(Py_None));
    Py_XSETREF(SLOT(msg, off_fd_count), PyLong_FromLong(0));
}

static void
drop_messages(PyObject *messages)
{
    for (Py_ssize_t i = 0; i < PyList_GET_SIZE(messages); i++) {
        drop_message(PyList_GET_ITEM(messages, i));
    }
}

/* A message whose fds are owned elsewhere again: it must not close them. */
static void
disown_message(PyObject *msg)
{
    Py_XSETREF(SLOT(msg, off_raw), Py_NewRef(Py_None));
    Py_XSETREF(SLOT(msg, off_fd_count), PyLong_FromLong(0));
}

/* messages_of(reads) -> list[AncillaryMessage]: one message per (data, fds or None) read.
 * The fds of every read are owned from the call on: on an error, those of the messages built
 * and of the reads not yet made messages are closed before it is raised. */
static PyObject *
messages_of(PyObject *Py_UNUSED(module), PyObject *reads)
{
    if (!PyList_Check(reads)) {
        PyErr_SetString(PyExc_TypeError, "messages_of() takes a list of (data, fds) reads");
        return NULL;
    }
    Py_ssize_t n = PyList_GET_SIZE(reads);
    PyObject *out = PyList_New(0);
    if (out == NULL) {
        close_reads(reads, 0);
        return NULL;
    }
    for (Py_ssize_t i = 0; i < n; i++) {
        PyObject *item = PyList_GET_ITEM(reads, i);
        PyObject *msg = NULL;
        if (PyTuple_Check(item) && PyTuple_GET_SIZE(item) == 2) {
            PyObject *raw = PyTuple_GET_ITEM(item, 1);
            if (raw == Py_None || PyList_CheckExact(raw)) {
                msg = new_message(PyTuple_GET_ITEM(item, 0), raw);
            }
            else {
                PyErr_SetString(PyExc_TypeError, "a read's fds must be a list or None");
            }
        }
        else {
            PyErr_SetString(PyExc_TypeError, "messages_of() takes a list of (data, fds) reads");
        }
        if (msg != NULL && PyList_Append(out, msg) < 0) {
            disown_message(msg); /* its fds are still those of reads[i], closed below */
            Py_CLEAR(msg);
        }
        if (msg == NULL) {
            PyObject *exc = take_exception();
            drop_messages(out);
            Py_DECREF(out);
            close_reads(reads, i);
            raise_exception(exc);
            return NULL;
        }
        Py_DECREF(msg);
    }
    return out;
}

/* -- Receiver ---------------------------------------------------------------------------- */

typedef struct {
    PyObject_HEAD
    PyObject *sock;
    PyObject *buffer_obj;
    PyObject *platform;
    Py_buffer view;
    rules_t rules;
    Py_ssize_t ancbufsize; /* fixed where the kernel has a cap; 0: asked per read (macOS) */
    int eof;
    int recv_flags;
} ReceiverObject;

static int
Receiver_init(ReceiverObject *self, PyObject *args, PyObject *kwargs)
{
    static char *keywords[] = {"sock", "buffer", "platform", "eof", NULL};
    PyObject *sock, *buffer, *platform;
    int eof;
    if (!PyArg_ParseTupleAndKeywords(args, kwargs, "OOOi:Receiver", keywords, &sock, &buffer,
                                     &platform, &eof)) {
        return -1;
    }
    if (self->view.obj != NULL) {
        PyErr_SetString(PyExc_RuntimeError, "Receiver is already initialised");
        return -1;
    }
    if (eof < EOF_NEVER || eof > EOF_PEEK) {
        PyErr_Format(PyExc_ValueError, "unknown eof rule %d", eof);
        return -1;
    }
    if (platform_rules(platform, &self->rules, &self->ancbufsize) < 0) {
        return -1;
    }
    if (PyObject_GetBuffer(buffer, &self->view, PyBUF_WRITABLE) < 0) {
        return -1;
    }
    self->rules.buffer_len = self->view.len;
    self->sock = Py_NewRef(sock);
    self->buffer_obj = Py_NewRef(buffer);
    self->platform = Py_NewRef(platform);
    self->eof = eof;
    self->recv_flags = self->rules.cloexec;
    return 0;
}

static int
Receiver_traverse(ReceiverObject *self, visitproc visit, void *arg)
{
    Py_VISIT(self->sock);
    Py_VISIT(self->buffer_obj);
    Py_VISIT(self->platform);
    return 0;
}

static int
Receiver_clear(ReceiverObject *self)
{
    if (self->view.obj != NULL) {
        PyBuffer_Release(&self->view);
    }
    Py_CLEAR(self->sock);
    Py_CLEAR(self->buffer_obj);
    Py_CLEAR(self->platform);
    return 0;
}

static void
Receiver_dealloc(ReceiverObject *self)
{
    PyObject_GC_UnTrack(self);
    Receiver_clear(self);
    Py_TYPE(self)->tp_free((PyObject *)self);
}

/* peek_is_eof: after a 0-byte SOCK_SEQPACKET read, end of stream or an empty message? A peek
 * without a control buffer installs no fd (unix(7)). */
static int
peek_is_eof(int fd)
{
    char byte;
    ssize_t n = recv(fd, &byte, 1, MSG_PEEK | MSG_DONTWAIT);
    if (n < 0) {
        return !(errno == EAGAIN || errno == EWOULDBLOCK || errno == EINTR);
    }
    return n == 0;
}

static int
at_eof(ReceiverObject *self, int fd, int ancillary)
{
    switch (self->eof) {
    case EOF_NEVER:
        return 0;
    case EOF_NO_CREDENTIALS:
        return !ancillary;
    case EOF_PEEK:
        return peek_is_eof(fd);
    default:
        return 1;
    }
}

/* (bytes, fds or None), the fds closed if it cannot be built. */
static PyObject *
make_read(const char *data, Py_ssize_t nbytes, const int *fds, Py_ssize_t nfds)
{
    PyObject *bytes = PyBytes_FromStringAndSize(data, nbytes); /* first: not GC-tracked */
    if (bytes == NULL) {
        close_fds(fds, nfds);
        return NULL;
    }
    PyObject *list = Py_None;
    if (nfds) {
        list = fd_list(fds, nfds);
        if (list == NULL) {
            Py_DECREF(bytes);
            return NULL;
        }
    }
    else {
        Py_INCREF(list);
    }
    PyObject *pair = PyTuple_New(2);
    if (pair == NULL) {
        if (list != Py_None) {
            close_fd_list(list);
        }
        Py_DECREF(list);
        Py_XDECREF(bytes);
        return NULL;
    }
    PyTuple_SET_ITEM(pair, 0, bytes);
    PyTuple_SET_ITEM(pair, 1, list);
    return pair;
}

static PyObject *
Receiver_read(ReceiverObject *self, PyObject *const *args, Py_ssize_t nargs)
{
    if (nargs != 2) {
        PyErr_SetString(PyExc_TypeError, "read() takes (limit, max_fds)");
        return NULL;
    }
    Py_ssize_t limit = PyLong_AsSsize_t(args[0]);
    if (limit == -1 && PyErr_Occurred()) {
        return NULL;
    }
    Py_ssize_t max_fds = PyLong_AsSsize_t(args[1]);
    if (max_fds == -1 && PyErr_Occurred()) {
        return NULL;
    }
    if (self->view.obj == NULL) {
        PyErr_SetString(PyExc_RuntimeError, "Receiver is not initialised");
        return NULL;
    }
    PyObject *fileno = PyObject_CallMethodNoArgs(self->sock, str_fileno);
    if (fileno == NULL) {
        return NULL;
    }
    int fd = as_int(fileno);
    Py_DECREF(fileno);
    if (fd == -1 && PyErr_Occurred()) {
        return NULL;
    }
    Py_ssize_t ancbufsize = self->ancbufsize;
    if (!ancbufsize) {
        /* No fixed cap (macOS): sized by RLIMIT_NOFILE, asked per read. */
        PyObject *size = PyObject_CallMethodNoArgs(self->platform, str_receive_ancbufsize);
        if (size == NULL) {
            return NULL;
        }
        ancbufsize = PyLong_AsSsize_t(size);
        Py_DECREF(size);
        if (ancbufsize < 0) {
            if (!PyErr_Occurred()) {
                PyErr_SetString(PyExc_ValueError, "negative ancillary buffer size");
            }
            return NULL;
        }
    }
    char *control = shared_control.bytes;
    if (ancbufsize > SHARED_CONTROL) {
        control = PyMem_Malloc((size_t)ancbufsize);
        if (control == NULL) {
            return PyErr_NoMemory();
        }
    }
    int *scratch = PyMem_Malloc(2 * ((size_t)ancbufsize / sizeof(int) + 1) * sizeof(int));
    PyObject *reads = PyList_New(0);
    if (scratch == NULL || reads == NULL) {
        if (control != shared_control.bytes) {
            PyMem_Free(control);
        }
        PyMem_Free(scratch);
        Py_XDECREF(reads);
        return PyErr_NoMemory();
    }

    char *buf = self->view.buf;
    Py_ssize_t buflen = self->view.len;
    int how = HOW_LIMIT;
    PyObject *error = NULL;
    Py_ssize_t nfds_total = 0;
    struct iovec iov;
    struct msghdr msg;
    if (fd < 0) {
        errno = EBADF;
        PyErr_SetFromErrno(PyExc_OSError);
        error = take_exception();
        how = HOW_FAILED;
        limit = 0;
    }
    for (Py_ssize_t i = 0; i < limit; i++) {
        iov.iov_base = buf;
        iov.iov_len = (size_t)buflen;
        memset(&msg, 0, sizeof(msg));
        msg.msg_iov = &iov;
        msg.msg_iovlen = 1;
        msg.msg_control = control;
        msg.msg_controllen = (size_t)ancbufsize;
        /* MSG_DONTWAIT: the GIL is held; a blocking socket must not block here. */
        ssize_t n = recvmsg(fd, &msg, self->recv_flags | MSG_DONTWAIT);
        if (n < 0) {
            int err = errno;
            if (err == EINTR) {
                if (PyErr_CheckSignals() < 0) {
                    error = take_exception();
                    how = HOW_FAILED;
                    break;
                }
                i--; /* retried, as socket.recvmsg_into retries (PEP 475) */
                continue;
            }
            if (err == EAGAIN || err == EWOULDBLOCK) {
                how = HOW_AGAIN;
                break;
            }
            PyErr_SetFromErrno(PyExc_OSError);
            error = recv_error(take_exception(), err);
            how = HOW_FAILED;
            break;
        }
        Py_ssize_t nbytes = (Py_ssize_t)n;
        int msg_flags = msg.msg_flags;
        PyObject *pair;
        if ((msg.msg_controllen > 0 && CMSG_FIRSTHDR(&msg) != NULL) ||
            (msg_flags & (MSG_TRUNC | MSG_CTRUNC))) {
            parsed_t parsed;
            if (parse(&msg, msg_flags, self->recv_flags, &self->rules, buf, nbytes, scratch,
                      &parsed) < 0) {
                error = take_exception(); /* parse closed the fds of this read */
                how = HOW_FAILED;
                break;
            }
            if (parsed.records == 0 && !(msg_flags & (MSG_TRUNC | MSG_CTRUNC))) {
                /* No record that socket.recvmsg would report: a read without ancillary data. */
                goto plain;
            }
            if (!parsed.inline_shape && !nbytes && !parsed.nrights && at_eof(self, fd, 1)) {
                how = HOW_END;
                break;
            }
            pair = make_read(buf, nbytes, parsed.rights, parsed.nrights);
            if (pair == NULL || PyList_Append(reads, pair) < 0) {
                if (pair != NULL) {
                    if (PyTuple_GET_ITEM(pair, 1) != Py_None) {
                        close_fd_list(PyTuple_GET_ITEM(pair, 1)); /* not handed over */
                    }
                    Py_DECREF(pair);
                }
                error = take_exception();
                how = HOW_FAILED;
                break;
            }
            Py_DECREF(pair);
            nfds_total += parsed.nrights;
            if (nfds_total >= max_fds) {
                how = HOW_LIMIT;
                break;
            }
            continue;
        }
    plain:
        if (!nbytes && at_eof(self, fd, 0)) {
            how = HOW_END;
            break;
        }
        pair = make_read(buf, nbytes, NULL, 0);
        if (pair == NULL || PyList_Append(reads, pair) < 0) {
            Py_XDECREF(pair);
            error = take_exception();
            how = HOW_FAILED;
            break;
        }
        Py_DECREF(pair);
    }
    if (control != shared_control.bytes) {
        PyMem_Free(control);
    }
    PyMem_Free(scratch);
    PyObject *result = PyTuple_New(3);
    PyObject *how_obj = PyLong_FromLong(how);
    if (result == NULL || how_obj == NULL) {
        /* The reads cannot be handed over: their fds are closed rather than leaked. */
        close_reads(reads, 0);
        Py_DECREF(reads);
        Py_XDECREF(result);
        Py_XDECREF(how_obj);
        Py_XDECREF(error);
        return NULL;
    }
    PyTuple_SET_ITEM(result, 0, reads);
    PyTuple_SET_ITEM(result, 1, how_obj);
    PyTuple_SET_ITEM(result, 2, error != NULL ? error : Py_NewRef(Py_None));
    return result;
}

static PyMethodDef Receiver_methods[] = {
    {"read", (PyCFunction)(void (*)(void))Receiver_read, METH_FASTCALL,
     "read(limit, max_fds) -> (reads, how, error): as _syscalls.Receiver.read."},
    {NULL, NULL, 0, NULL},
};

static PyTypeObject ReceiverType = {
    PyVarObject_HEAD_INIT(NULL, 0).tp_name = "aioancillary._kernel._speedups.Receiver",
    .tp_basicsize = sizeof(ReceiverObject),
    .tp_flags = Py_TPFLAGS_DEFAULT | Py_TPFLAGS_HAVE_GC,
    .tp_doc = "Receiver(sock, buffer, platform, eof): as _syscalls.Receiver, in C.",
    .tp_new = PyType_GenericNew,
    .tp_init = (initproc)Receiver_init,
    .tp_dealloc = (destructor)Receiver_dealloc,
    .tp_traverse = (traverseproc)Receiver_traverse,
    .tp_clear = (inquiry)Receiver_clear,
    .tp_methods = Receiver_methods,
};

/* -- FrameDecoder -------------------------------------------------------------------------- */

#define HEADER_SIZE 8
#define VERSION 1
#define VERSION_WORD (VERSION << 8)

typedef struct {
    PyObject_HEAD
    PyObject *failure;           /* the ProtocolError once the peer broke the protocol */
    char *buf;                   /* an incomplete frame's bytes */
    Py_ssize_t buflen, bufcap;
    int *fifo;                   /* received fds no frame has claimed yet, in order */
    Py_ssize_t nfifo, fifocap;
    int *claimed;                /* the fds of a frame whose payload is incomplete */
    Py_ssize_t nclaimed, claimedcap;
    int has_claimed;             /* a frame's header is taken (its fds, maybe none, claimed) */
    Py_ssize_t need;             /* bytes the buffered partial frame needs to complete */
    Py_ssize_t max_size, max_fds, max_pending;
} FrameDecoderObject;

static int
grow(void **array, Py_ssize_t *cap, Py_ssize_t want, size_t item)
{
    if (want <= *cap) {
        return 0;
    }
    /* Small first: every connection that has received an fd keeps these arrays, and a
       message rarely carries more than a few fds (64 ints each made 512 bytes per idle
       connection). 64 bytes for the byte buffer, 8 items for the fd arrays. */
    Py_ssize_t size = *cap ? *cap : (item == 1 ? 64 : 8);
    while (size < want) {
        size *= 2;
    }
    void *bigger = PyMem_Realloc(*array, (size_t)size * item);
    if (bigger == NULL) {
        PyErr_NoMemory();
        return -1;
    }
    *array = bigger;
    *cap = size;
    return 0;
}

/* Close every fd the decoder holds and drop buffered bytes (_discard). */
static void
decoder_discard(FrameDecoderObject *self)
{
    close_fds(self->fifo, self->nfifo); /* no message will ever own these */
    close_fds(self->claimed, self->nclaimed);
    self->nfifo = 0;
    self->nclaimed = 0;
    self->has_claimed = 0;
    self->buflen = 0;
    self->need = 0;
}

static void
decoder_fail(FrameDecoderObject *self, PyObject *exc) /* steals exc (NULL: error set) */
{
    if (exc == NULL) {
        exc = take_exception();
    }
    Py_XSETREF(self->failure, exc);
    decoder_discard(self);
}

static PyObject *
protocol_error(PyObject *message)
{
    if (message == NULL) {
        return NULL;
    }
    PyObject *exc = PyObject_CallOneArg(ProtocolError, message);
    Py_DECREF(message);
    return exc;
}

static void
decoder_check_pending(FrameDecoderObject *self)
{
    if (self->nfifo > self->max_pending) {
        decoder_fail(self, protocol_error(PyUnicode_FromFormat(
                               "the peer sent %zd fds that no frame has claimed (limit %zd); "
                               "it is not following the framing protocol",
                               self->nfifo, self->max_pending)));
    }
}

static PyObject *
bad_header(FrameDecoderObject *self, unsigned int word, unsigned int nfds, unsigned long length)
{
    if (word >> 8 != VERSION) {
        return protocol_error(PyUnicode_FromFormat(
            "received a frame of wire-format version %u (expected %d); the peer does not speak "
            "aioancillary's framing, or the stream is corrupt. Use framed=False to talk to a "
            "peer that does not frame",
            word >> 8, VERSION));
    }
    if (word & 0xFF) {
        char hex[8];
        snprintf(hex, sizeof(hex), "%02x", word & 0xFF);
        return protocol_error(
            PyUnicode_FromFormat("received a frame with reserved flags 0x%s set", hex));
    }
    if (length > (unsigned long)self->max_size) {
        return protocol_error(PyUnicode_FromFormat(
            "received a frame of %lu bytes, over the %zd-byte limit; raise max_frame_size if "
            "the peer legitimately sends such messages",
            length, self->max_size));
    }
    return protocol_error(PyUnicode_FromFormat(
        "received a frame declaring %u fds, over the per-frame limit of %zd", nfds,
        self->max_fds));
}

/* Take ownership of `fds` (None, or a sequence of ints or OwnedFd): append them to the FIFO.
 * Items that cannot be taken are skipped (never closed: they are not ours). */
static int
decoder_take(FrameDecoderObject *self, PyObject *fds)
{
    if (fds == Py_None) {
        return 0;
    }
    PyObject *seq = PySequence_Fast(fds, "fds must be a sequence of fds or None");
    if (seq == NULL) {
        return -1;
    }
    Py_ssize_t n = PySequence_Fast_GET_SIZE(seq);
    if (grow((void **)&self->fifo, &self->fifocap, self->nfifo + n, sizeof(int)) < 0) {
        /* Ours from the call on, whatever happens. */
        for (Py_ssize_t i = 0; i < n; i++) {
            PyObject *item = PySequence_Fast_GET_ITEM(seq, i);
            if (PyLong_Check(item)) {
                int fd = as_int(item);
                if (fd >= 0) {
                    (void)close(fd);
                }
            }
        }
        PyErr_Clear();
        Py_DECREF(seq);
        PyErr_NoMemory();
        return -1;
    }
    for (Py_ssize_t i = 0; i < n; i++) {
        PyObject *item = PySequence_Fast_GET_ITEM(seq, i);
        PyObject *num;
        if (PyLong_Check(item)) {
            num = Py_NewRef(item);
        }
        else {
            num = PyObject_CallMethodNoArgs(item, str_detach); /* an OwnedFd */
            if (num == NULL) {
                PyErr_Clear();
                continue;
            }
        }
        int fd = as_int(num);
        Py_DECREF(num);
        if (fd == -1 && PyErr_Occurred()) {
            PyErr_Clear();
            continue;
        }
        self->fifo[self->nfifo++] = fd;
    }
    Py_DECREF(seq);
    return 0;
}

static int
buf_append(FrameDecoderObject *self, const char *data, Py_ssize_t len)
{
    if (grow((void **)&self->buf, &self->bufcap, self->buflen + len, 1) < 0) {
        return -1;
    }
    if (len > 0) { /* memcpy needs valid pointers even for 0 bytes (C11 7.24.1) */
        memcpy(self->buf + self->buflen, data, (size_t)len);
    }
    self->buflen += len;
    return 0;
}

static unsigned int
be16(const unsigned char *p)
{
    return (unsigned int)p[0] << 8 | (unsigned int)p[1];
}

static unsigned long
be32(const unsigned char *p)
{
    return (unsigned long)p[0] << 24 | (unsigned long)p[1] << 16 | (unsigned long)p[2] << 8 |
           (unsigned long)p[3];
}

/* One read's bytes and fds -> the completed messages (FrameDecoder.feed). */
static PyObject *
decoder_feed(FrameDecoderObject *self, PyObject *data, PyObject *fds)
{
    if (decoder_take(self, fds) < 0) {
        return NULL;
    }
    if (self->failure != NULL) {
        decoder_discard(self); /* a broken stream cannot be resynchronised */
        return PyList_New(0);
    }
    Py_buffer view;
    if (PyObject_GetBuffer(data, &view, PyBUF_SIMPLE) < 0) {
        return NULL;
    }
    PyObject *messages = PyList_New(0);
    if (messages == NULL) {
        PyBuffer_Release(&view);
        return NULL;
    }
    const unsigned char *src;
    Py_ssize_t end;
    Py_ssize_t pos = 0, head = 0, need = HEADER_SIZE;
    PyObject *fault = NULL;
    int from_buf = self->buflen > 0;
    if (from_buf) {
        if (buf_append(self, view.buf, view.len) < 0) {
            goto nomem;
        }
        if (self->buflen < self->need) {
            /* Still inside one frame (a large one arrives over many reads). */
            PyBuffer_Release(&view);
            decoder_check_pending(self);
            return messages;
        }
        src = (const unsigned char *)self->buf;
        end = self->buflen;
    }
    else {
        src = view.buf;
        end = view.len;
    }
    while (end - pos >= HEADER_SIZE) {
        unsigned long length = be32(src + pos + 4);
        if (!self->has_claimed) {
            unsigned int word = be16(src + pos);
            unsigned int nfds = be16(src + pos + 2);
            if (word != VERSION_WORD || length > (unsigned long)self->max_size ||
                (Py_ssize_t)nfds > self->max_fds) {
                fault = bad_header(self, word, nfds, length);
                if (fault == NULL) {
                    goto nomem;
                }
                break;
            }
            if (self->nfifo - head < (Py_ssize_t)nfds) {
                fault = protocol_error(PyUnicode_FromFormat(
                    "a frame declares %u fd(s) but only %zd arrived with or before its header; "
                    "the peer is not following the framing protocol (fds must ride with the "
                    "frame's first byte)",
                    nfds, self->nfifo - head));
                if (fault == NULL) {
                    goto nomem;
                }
                break;
            }
            if (grow((void **)&self->claimed, &self->claimedcap, (Py_ssize_t)nfds,
                     sizeof(int)) < 0) {
                goto nomem;
            }
            if (nfds) {
                memcpy(self->claimed, self->fifo + head, nfds * sizeof(int));
            }
            self->nclaimed = (Py_ssize_t)nfds;
            self->has_claimed = 1;
            head += (Py_ssize_t)nfds;
        }
        Py_ssize_t start = pos + HEADER_SIZE;
        if ((unsigned long)(end - start) < length) {
            need = start + (Py_ssize_t)length - pos;
            break;
        }
        Py_ssize_t stop = start + (Py_ssize_t)length;
        PyObject *payload = PyBytes_FromStringAndSize((const char *)src + start, stop - start);
        if (payload == NULL) {
            goto nomem;
        }
        PyObject *raw = Py_None;
        if (self->nclaimed) {
            raw = PyList_New(self->nclaimed);
            if (raw == NULL) {
                Py_DECREF(payload);
                goto nomem;
            }
            for (Py_ssize_t i = 0; i < self->nclaimed; i++) {
                PyObject *num = PyLong_FromLong(self->claimed[i]);
                if (num == NULL) {
                    /* The list holds what it holds; the claimed array is still ours. */
                    for (Py_ssize_t j = i; j < self->nclaimed; j++) {
                        PyList_SET_ITEM(raw, j, Py_NewRef(Py_None));
                    }
                    Py_DECREF(raw);
                    Py_DECREF(payload);
                    goto nomem;
                }
                PyList_SET_ITEM(raw, i, num);
            }
        }
        else {
            Py_INCREF(raw);
        }
        PyObject *msg = new_message(payload, raw);
        Py_DECREF(payload);
        if (msg != NULL && PyList_Append(messages, msg) < 0) {
            disown_message(msg); /* the claimed array still holds its fds */
            Py_CLEAR(msg);
        }
        if (msg == NULL) {
            Py_DECREF(raw);
            goto nomem;
        }
        Py_DECREF(msg);
        Py_DECREF(raw);
        /* The message owns the claimed fds from here. */
        self->nclaimed = 0;
        self->has_claimed = 0;
        pos = stop;
    }
    self->need = need;
    if (fault == NULL && pos < end) {
        if (from_buf) {
            memmove(self->buf, self->buf + pos, (size_t)(end - pos));
            self->buflen = end - pos;
        }
        else if (buf_append(self, (const char *)src + pos, end - pos) < 0) {
            goto nomem;
        }
    }
    else if (from_buf) {
        self->buflen = 0;
    }
    if (head) {
        memmove(self->fifo, self->fifo + head, (size_t)(self->nfifo - head) * sizeof(int));
        self->nfifo -= head;
    }
    PyBuffer_Release(&view);
    if (fault != NULL) {
        decoder_fail(self, fault);
    }
    else if (self->nfifo > self->max_pending) {
        decoder_check_pending(self);
    }
    return messages;

nomem:
    /* Out of memory mid-feed: the stream cannot be followed any more. Every fd of this feed
     * is closed (the messages built are dropped), and so is everything the decoder held. */
    {
        PyObject *exc = take_exception();
        /* fifo[:head] holds the fds of the messages built (closed with them here) and of the
         * frame being claimed (still in the claimed array, closed by decoder_discard): it is
         * dropped without closing, so that no fd is closed twice. */
        drop_messages(messages);
        Py_DECREF(messages);
        if (head) {
            memmove(self->fifo, self->fifo + head, (size_t)(self->nfifo - head) * sizeof(int));
            self->nfifo -= head;
        }
        decoder_discard(self);
        Py_XDECREF(fault);
        PyBuffer_Release(&view);
        raise_exception(exc != NULL ? exc : Py_NewRef(PyExc_MemoryError));
        return NULL;
    }
}

static PyObject *
FrameDecoder_feed(FrameDecoderObject *self, PyObject *const *args, Py_ssize_t nargs)
{
    if (nargs != 2) {
        PyErr_SetString(PyExc_TypeError, "feed() takes (data, fds)");
        return NULL;
    }
    return decoder_feed(self, args[0], args[1]);
}

static PyObject *
FrameDecoder_feed_reads(FrameDecoderObject *self, PyObject *reads)
{
    if (!PyList_Check(reads)) {
        PyErr_SetString(PyExc_TypeError, "feed_reads() takes a list of (data, fds) reads");
        return NULL;
    }
    PyObject *out = NULL;
    Py_ssize_t n = PyList_GET_SIZE(reads);
    for (Py_ssize_t i = 0; i < n; i++) {
        PyObject *item = PyList_GET_ITEM(reads, i);
        if (!PyTuple_Check(item) || PyTuple_GET_SIZE(item) != 2) {
            close_reads(reads, i);
            Py_XDECREF(out);
            PyErr_SetString(PyExc_TypeError, "feed_reads() takes a list of (data, fds) reads");
            return NULL;
        }
        PyObject *got = decoder_feed(self, PyTuple_GET_ITEM(item, 0), PyTuple_GET_ITEM(item, 1));
        if (got == NULL) {
            close_reads(reads, i + 1); /* the decoder owns all of them from the call on */
            if (out != NULL) {
                drop_messages(out);
                Py_DECREF(out);
            }
            return NULL;
        }
        if (out == NULL) {
            out = got;
        }
        else {
            if (PyList_SetSlice(out, PyList_GET_SIZE(out), PyList_GET_SIZE(out), got) < 0) {
                drop_messages(got);
                Py_DECREF(got);
                drop_messages(out);
                Py_DECREF(out);
                close_reads(reads, i + 1);
                decoder_discard(self);
                return NULL;
            }
            Py_DECREF(got);
        }
        if (self->failure != NULL) {
            close_reads(reads, i + 1); /* after a failure nothing more is read from this */
            break;
        }
    }
    return out != NULL ? out : PyList_New(0);
}

static PyObject *
FrameDecoder_eof(FrameDecoderObject *self, PyObject *Py_UNUSED(ignored))
{
    if (self->failure == NULL && (self->buflen || self->nfifo || self->nclaimed)) {
        PyObject *exc = protocol_error(PyUnicode_FromFormat(
            "the stream ended inside a frame: %zd byte(s) of an incomplete frame and %zd fd(s) "
            "never delivered (all closed). The peer closed or crashed mid-message",
            self->buflen, self->nfifo + self->nclaimed));
        if (exc == NULL) {
            return NULL;
        }
        decoder_fail(self, exc);
    }
    Py_RETURN_NONE;
}

static PyObject *
FrameDecoder_close(FrameDecoderObject *self, PyObject *Py_UNUSED(ignored))
{
    decoder_discard(self);
    Py_RETURN_NONE;
}

static int
FrameDecoder_init(FrameDecoderObject *self, PyObject *args, PyObject *kwargs)
{
    static char *keywords[] = {"max_frame_size", "max_fds_per_frame", "max_pending_fds", NULL};
    Py_ssize_t max_size = 1 << 20, max_fds = 253, max_pending = 253;
    if (!PyArg_ParseTupleAndKeywords(args, kwargs, "|$nnn:FrameDecoder", keywords, &max_size,
                                     &max_fds, &max_pending)) {
        return -1;
    }
    self->max_size = max_size;
    self->max_fds = max_fds;
    self->max_pending = max_pending;
    return 0;
}

static int
FrameDecoder_traverse(FrameDecoderObject *self, visitproc visit, void *arg)
{
    Py_VISIT(self->failure);
    return 0;
}

static int
FrameDecoder_clear(FrameDecoderObject *self)
{
    Py_CLEAR(self->failure);
    return 0;
}

static void
FrameDecoder_dealloc(FrameDecoderObject *self)
{
    PyObject_GC_UnTrack(self);
    decoder_discard(self); /* fds no message owns: closed rather than leaked */
    PyMem_Free(self->buf);
    PyMem_Free(self->fifo);
    PyMem_Free(self->claimed);
    Py_CLEAR(self->failure);
    Py_TYPE(self)->tp_free((PyObject *)self);
}

static PyObject *
FrameDecoder_get_failure(FrameDecoderObject *self, void *Py_UNUSED(closure))
{
    return Py_NewRef(self->failure != NULL ? self->failure : Py_None);
}

static int
FrameDecoder_set_failure(FrameDecoderObject *self, PyObject *value, void *Py_UNUSED(closure))
{
    Py_XSETREF(self->failure, value == NULL || value == Py_None ? NULL : Py_NewRef(value));
    return 0;
}

static PyObject *
FrameDecoder_get_pending_fds(FrameDecoderObject *self, void *Py_UNUSED(closure))
{
    return PyLong_FromSsize_t(self->nfifo + self->nclaimed);
}

static PyObject *
FrameDecoder_get_buffered_bytes(FrameDecoderObject *self, void *Py_UNUSED(closure))
{
    return PyLong_FromSsize_t(self->buflen);
}

static PyGetSetDef FrameDecoder_getset[] = {
    {"failure", (getter)FrameDecoder_get_failure, (setter)FrameDecoder_set_failure,
     "The ProtocolError once the peer has broken the protocol, else None.", NULL},
    {"pending_fds", (getter)FrameDecoder_get_pending_fds, NULL,
     "Fds held by the decoder that belong to no completed message yet.", NULL},
    {"buffered_bytes", (getter)FrameDecoder_get_buffered_bytes, NULL,
     "Bytes of an incomplete frame held by the decoder.", NULL},
    {NULL, NULL, NULL, NULL, NULL},
};

static PyMethodDef FrameDecoder_methods[] = {
    {"feed", (PyCFunction)(void (*)(void))FrameDecoder_feed, METH_FASTCALL,
     "feed(data, fds) -> list[AncillaryMessage]: as _framing.FrameDecoder.feed."},
    {"feed_reads", (PyCFunction)FrameDecoder_feed_reads, METH_O,
     "feed_reads(reads) -> list[AncillaryMessage]: feed every read in order."},
    {"eof", (PyCFunction)FrameDecoder_eof, METH_NOARGS, "Signal the end of the stream."},
    {"close", (PyCFunction)FrameDecoder_close, METH_NOARGS,
     "Close every fd the decoder still holds and drop buffered bytes."},
    {NULL, NULL, 0, NULL},
};

static PyTypeObject FrameDecoderType = {
    PyVarObject_HEAD_INIT(NULL, 0).tp_name = "aioancillary._kernel._speedups.FrameDecoder",
    .tp_basicsize = sizeof(FrameDecoderObject),
    .tp_flags = Py_TPFLAGS_DEFAULT | Py_TPFLAGS_HAVE_GC,
    .tp_doc = "FrameDecoder(*, max_frame_size, max_fds_per_frame, max_pending_fds): as "
              "_framing.FrameDecoder, in C.",
    .tp_new = PyType_GenericNew,
    .tp_init = (initproc)FrameDecoder_init,
    .tp_dealloc = (destructor)FrameDecoder_dealloc,
    .tp_traverse = (traverseproc)FrameDecoder_traverse,
    .tp_clear = (inquiry)FrameDecoder_clear,
    .tp_methods = FrameDecoder_methods,
    .tp_getset = FrameDecoder_getset,
};

/* -- module -------------------------------------------------------------------------------- */

static PyMethodDef module_methods[] = {
    {"messages_of", (PyCFunction)messages_of, METH_O,
     "messages_of(reads) -> list[AncillaryMessage]: as _message.messages_of."},
    SEND_METHODS
    {"parse_control", (PyCFunction)(void (*)(void))parse_control, METH_VARARGS | METH_KEYWORDS,
     "parse_control(control, msg_flags, recv_flags, platform, data=b'', buffer_len=0) -> "
     "list[int]: the receive rules on a raw control buffer."},
    ACCEPT_METHODS
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef speedups_module = {
    PyModuleDef_HEAD_INIT,
    .m_name = "aioancillary._kernel._speedups",
    .m_doc = "The receive hot path in C (optional; see aioancillary._kernel._accel).",
    .m_size = -1,
    .m_methods = module_methods,
};

static int
slot_offset(PyObject *cls, const char *name, Py_ssize_t *offset)
{
    PyObject *descr = PyObject_GetAttrString(cls, name);
    if (descr == NULL) {
        return -1;
    }
    int ok = Py_IS_TYPE(descr, &PyMemberDescr_Type) &&
             ((PyMemberDescrObject *)descr)->d_member->type == T_OBJECT_EX;
    if (ok) {
        *offset = ((PyMemberDescrObject *)descr)->d_member->offset;
    }
    Py_DECREF(descr);
    if (!ok) {
        PyErr_Format(PyExc_ImportError, "AncillaryMessage.%s is not a slot", name);
        return -1;
    }
    return 0;
}

static PyObject *
import_name(const char *module, const char *name)
{
    PyObject *mod = PyImport_ImportModule(module);
    if (mod == NULL) {
        return NULL;
    }
    PyObject *value = PyObject_GetAttrString(mod, name);
    Py_DECREF(mod);
    return value;
}

PyMODINIT_FUNC
PyInit__speedups(void)
{
    if (PyType_Ready(&ReceiverType) < 0 || PyType_Ready(&FrameDecoderType) < 0) {
        return NULL;
    }
    FdTruncatedError = import_name("aioancillary._core._errors", "FdTruncatedError");
    DataTruncatedError = import_name("aioancillary._core._errors", "DataTruncatedError");
    CloexecError = import_name("aioancillary._core._errors", "CloexecError");
    ProtocolError = import_name("aioancillary._core._errors", "ProtocolError");
    PyObject *cls = import_name("aioancillary._core._message", "AncillaryMessage");
    if (!FdTruncatedError || !DataTruncatedError || !CloexecError || !ProtocolError || !cls) {
        Py_XDECREF(cls);
        return NULL;
    }
    if (!PyType_Check(cls) || slot_offset(cls, "data", &off_data) < 0 ||
        slot_offset(cls, "_raw", &off_raw) < 0 || slot_offset(cls, "fd_count", &off_fd_count) < 0 ||
        slot_offset(cls, "_owned", &off_owned) < 0 ||
        slot_offset(cls, "discarded_fds", &off_discarded) < 0) {
        Py_DECREF(cls);
        return NULL;
    }
    MessageType = (PyTypeObject *)cls;
    empty_tuple = PyTuple_New(0);
    str_fileno = PyUnicode_InternFromString("fileno");
    str_receive_ancbufsize = PyUnicode_InternFromString("receive_ancbufsize");
    str_detach = PyUnicode_InternFromString("detach");
    if (!empty_tuple || !str_fileno || !str_receive_ancbufsize || !str_detach) {
        return NULL;
    }
    PyObject *module = PyModule_Create(&speedups_module);
    if (module == NULL) {
        return NULL;
    }
    if (PyModule_AddObjectRef(module, "Receiver", (PyObject *)&ReceiverType) < 0 ||
        PyModule_AddObjectRef(module, "FrameDecoder", (PyObject *)&FrameDecoderType) < 0 ||
        send_init(module) < 0 ||
        PyModule_AddIntConstant(module, "CONTROL_BUFFER", SHARED_CONTROL) < 0) {
        Py_DECREF(module);
        return NULL;
    }
    return module;
}
