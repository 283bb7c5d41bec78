/* layerstore._fastpath: the per-file syscall sequence of materialization, without the GIL.
 *
 * Why: materializing a layer is ~6 system calls per regular file (create, open the object,
 * FICLONE, optional fchown/fchmod, futimens, two closes).  In Python each file also costs
 * ~40 us of interpreter work under the GIL, so two worker threads could not keep two cores
 * busy and materialization ran at 0.86x the files/s of `cp -a --reflink=always`
 * (docs/benchmarks.md).  This module runs a whole batch of files in C with the GIL released,
 * so both workers issue syscalls in parallel.  It makes no decisions: the Python caller
 * (materialize._Builder) has already validated names, resolved parent directories with
 * openat2(RESOLVE_BENEATH|RESOLVE_NO_SYMLINKS), and chosen modes and owners; any error is
 * handed back per file and handled there, exactly as the pure-Python path would.  If this
 * extension is not built (no compiler), the pure-Python path is used: same results.
 *
 * The import's staging writes are the same story (create, write, close per new object, from
 * two writer threads): stage_files() writes a batch of them with the GIL released.
 *
 * run_batch(items, allow_reflink, allow_cfr) -> (results, reflink_ok, cfr_ok)
 *   items: list of tuples
 *     (parent_fd, name: bytes, src: bytes|None, size, create_mode, mode, uid, gid,
 *      mtime_ns, do_chown, do_chmod, inline: bytes|None)
 *   results: list of (method, errno, stage) per item; method 0 error, 1 reflink,
 *     2 copy_file_range, 3 copy, 4 inline; stage names the failed step for error messages:
 *     1 create, 2 open object, 3 data, 4 chown, 5 chmod, 6 times, 7 close.
 *
 * stage_files(items) -> list of errno (0: written)
 *   items: list of (path: bytes, data: bytes); each file is created O_EXCL with mode 0444 and
 *   filled; on an error the partial file stays (it lives in the import's staging directory,
 *   which the caller discards) and the errno is returned for the caller to raise.
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>

#include <errno.h>
#include <fcntl.h>
#include <linux/fs.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#include <sys/ioctl.h>
#include <sys/stat.h>
#include <sys/types.h>
#include <unistd.h>

#ifndef FICLONE
#define FICLONE _IOW(0x94, 9, int)
#endif

typedef struct {
    int parent_fd;
    const char *name;
    const char *src; /* NULL: inline */
    const char *inline_data;
    Py_ssize_t inline_len;
    long long size;
    int create_mode, mode;
    unsigned int uid, gid;
    long long mtime_ns;
    int do_chown, do_chmod;
    /* results */
    int method, err, stage;
} item_t;

static int no_clone(int e) {
    return e == EOPNOTSUPP || e == ENOTSUP || e == EXDEV || e == EINVAL || e == ENOTTY ||
           e == ENOSYS || e == EPERM || e == ETXTBSY || e == EBADF || e == EISDIR;
}

static int write_all(int fd, const char *buf, size_t len) {
    while (len) {
        ssize_t n = write(fd, buf, len);
        if (n < 0) {
            if (errno == EINTR) continue;
            return -1;
        }
        buf += n;
        len -= (size_t)n;
    }
    return 0;
}

/* 0 ok, -1 error (errno set), 1 unsupported before any byte was copied */
static int copy_cfr(int dst, int src, long long size) {
    long long done = 0;
    while (done < size) {
        loff_t in = done, out = done;
        ssize_t n = copy_file_range(src, &in, dst, &out, (size_t)(size - done), 0);
        if (n < 0) {
            if (errno == EINTR) continue;
            if (done == 0 && (errno == EXDEV || errno == ENOSYS || errno == EOPNOTSUPP ||
                              errno == EINVAL))
                return 1;
            return -1;
        }
        if (n == 0) {
            errno = EIO; /* the object shrank */
            return -1;
        }
        done += n;
    }
    return 0;
}

static int copy_plain(int dst, int src) {
    char buf[1 << 16];
    if (lseek(src, 0, SEEK_SET) < 0) return -1;
    for (;;) {
        ssize_t n = read(src, buf, sizeof buf);
        if (n < 0) {
            if (errno == EINTR) continue;
            return -1;
        }
        if (n == 0) return 0;
        if (write_all(dst, buf, (size_t)n) < 0) return -1;
    }
}

static void run_one(item_t *it, int *reflink_ok, int *cfr_ok) {
    int fd = openat(it->parent_fd, it->name,
                    O_WRONLY | O_CREAT | O_EXCL | O_NOFOLLOW | O_CLOEXEC, it->create_mode);
    if (fd < 0) {
        it->err = errno;
        it->stage = 1;
        return;
    }
    if (it->src == NULL) {
        if (it->inline_len && write_all(fd, it->inline_data, (size_t)it->inline_len) < 0) {
            it->err = errno;
            it->stage = 3;
            goto out;
        }
        it->method = 4;
    } else {
        int sfd = open(it->src, O_RDONLY | O_CLOEXEC);
        if (sfd < 0) {
            it->err = errno;
            it->stage = 2;
            goto out;
        }
        int m = 0;
        if (it->size == 0) {
            m = *reflink_ok ? 1 : 3;
        }
        if (!m && *reflink_ok) {
            if (ioctl(fd, FICLONE, sfd) == 0) {
                m = 1;
            } else if (no_clone(errno)) {
                *reflink_ok = 0;
            } else {
                it->err = errno;
                it->stage = 3;
                close(sfd);
                goto out;
            }
        }
        if (!m && *cfr_ok) {
            int r = copy_cfr(fd, sfd, it->size);
            if (r == 0) {
                m = 2;
            } else if (r == 1) {
                *cfr_ok = 0;
            } else {
                it->err = errno;
                it->stage = 3;
                close(sfd);
                goto out;
            }
        }
        if (!m) {
            if (copy_plain(fd, sfd) < 0) {
                it->err = errno;
                it->stage = 3;
                close(sfd);
                goto out;
            }
            m = 3;
        }
        close(sfd);
        it->method = m;
    }
    /* ownership, then mode (chown clears setuid), times last */
    if (it->do_chown && fchown(fd, it->uid, it->gid) < 0) {
        it->err = errno;
        it->stage = 4;
        goto out;
    }
    if (it->do_chmod && fchmod(fd, (mode_t)it->mode) < 0) {
        it->err = errno;
        it->stage = 5;
        goto out;
    }
    {
        struct timespec ts[2];
        long long s = it->mtime_ns / 1000000000LL, ns = it->mtime_ns % 1000000000LL;
        if (ns < 0) {
            ns += 1000000000LL;
            s -= 1;
        }
        ts[0].tv_sec = ts[1].tv_sec = (time_t)s;
        ts[0].tv_nsec = ts[1].tv_nsec = (long)ns;
        if (futimens(fd, ts) < 0) {
            it->err = errno;
            it->stage = 6;
            goto out;
        }
    }
out:
    if (close(fd) < 0 && !it->err) {
        it->err = errno;
        it->stage = 7;
    }
    if (it->err) it->method = 0;
}

static PyObject *run_batch(PyObject *self, PyObject *args) {
    PyObject *seq;
    int reflink_ok, cfr_ok;
    if (!PyArg_ParseTuple(args, "Opp", &seq, &reflink_ok, &cfr_ok)) return NULL;
    PyObject *fast = PySequence_Fast(seq, "items must be a sequence");
    if (!fast) return NULL;
    Py_ssize_t n = PySequence_Fast_GET_SIZE(fast);
    item_t *items = calloc((size_t)(n ? n : 1), sizeof(item_t));
    if (!items) {
        Py_DECREF(fast);
        return PyErr_NoMemory();
    }
    for (Py_ssize_t i = 0; i < n; i++) {
        PyObject *t = PySequence_Fast_GET_ITEM(fast, i);
        item_t *it = &items[i];
        PyObject *name, *src, *inl;
        if (!PyArg_ParseTuple(t, "iOOLiiIILppO", &it->parent_fd, &name, &src, &it->size,
                              &it->create_mode, &it->mode, &it->uid, &it->gid, &it->mtime_ns,
                              &it->do_chown, &it->do_chmod, &inl))
            goto fail;
        if (!PyBytes_Check(name)) {
            PyErr_SetString(PyExc_TypeError, "name must be bytes");
            goto fail;
        }
        it->name = PyBytes_AS_STRING(name); /* the tuple (held by fast) keeps it alive */
        if (src == Py_None) {
            if (!PyBytes_Check(inl)) {
                PyErr_SetString(PyExc_TypeError, "inline must be bytes when src is None");
                goto fail;
            }
            it->inline_data = PyBytes_AS_STRING(inl);
            it->inline_len = PyBytes_GET_SIZE(inl);
        } else {
            if (!PyBytes_Check(src)) {
                PyErr_SetString(PyExc_TypeError, "src must be bytes or None");
                goto fail;
            }
            it->src = PyBytes_AS_STRING(src);
        }
    }
    Py_BEGIN_ALLOW_THREADS
    for (Py_ssize_t i = 0; i < n; i++) run_one(&items[i], &reflink_ok, &cfr_ok);
    Py_END_ALLOW_THREADS

    PyObject *res = PyList_New(n);
    if (!res) goto fail;
    for (Py_ssize_t i = 0; i < n; i++) {
        PyObject *r = Py_BuildValue("(iii)", items[i].method, items[i].err, items[i].stage);
        if (!r) {
            Py_DECREF(res);
            goto fail;
        }
        PyList_SET_ITEM(res, i, r);
    }
    free(items);
    Py_DECREF(fast);
    return Py_BuildValue("(NOO)", res, reflink_ok ? Py_True : Py_False,
                         cfr_ok ? Py_True : Py_False);
fail:
    free(items);
    Py_DECREF(fast);
    return NULL;
}

static PyObject *stage_files(PyObject *self, PyObject *args) {
    PyObject *seq;
    if (!PyArg_ParseTuple(args, "O", &seq)) return NULL;
    PyObject *fast = PySequence_Fast(seq, "items must be a sequence");
    if (!fast) return NULL;
    Py_ssize_t n = PySequence_Fast_GET_SIZE(fast);
    const char **paths = calloc((size_t)(n ? n : 1), sizeof(char *));
    const char **bufs = calloc((size_t)(n ? n : 1), sizeof(char *));
    Py_ssize_t *lens = calloc((size_t)(n ? n : 1), sizeof(Py_ssize_t));
    int *errs = calloc((size_t)(n ? n : 1), sizeof(int));
    PyObject *res = NULL;
    if (!paths || !bufs || !lens || !errs) {
        PyErr_NoMemory();
        goto out;
    }
    for (Py_ssize_t i = 0; i < n; i++) {
        PyObject *t = PySequence_Fast_GET_ITEM(fast, i);
        PyObject *path, *data;
        if (!PyArg_ParseTuple(t, "OO", &path, &data)) goto out;
        if (!PyBytes_Check(path) || !PyBytes_Check(data)) {
            PyErr_SetString(PyExc_TypeError, "items must be (bytes, bytes)");
            goto out;
        }
        paths[i] = PyBytes_AS_STRING(path); /* kept alive by the tuples that fast holds */
        bufs[i] = PyBytes_AS_STRING(data);
        lens[i] = PyBytes_GET_SIZE(data);
    }
    Py_BEGIN_ALLOW_THREADS
    for (Py_ssize_t i = 0; i < n; i++) {
        int fd = open(paths[i], O_WRONLY | O_CREAT | O_EXCL | O_CLOEXEC, 0444);
        if (fd < 0) {
            errs[i] = errno;
            continue;
        }
        if (write_all(fd, bufs[i], (size_t)lens[i]) != 0) errs[i] = errno;
        if (close(fd) != 0 && !errs[i]) errs[i] = errno;
    }
    Py_END_ALLOW_THREADS
    res = PyList_New(n);
    if (!res) goto out;
    for (Py_ssize_t i = 0; i < n; i++) {
        PyObject *e = PyLong_FromLong(errs[i]);
        if (!e) {
            Py_CLEAR(res);
            goto out;
        }
        PyList_SET_ITEM(res, i, e);
    }
out:
    free(paths);
    free(bufs);
    free(lens);
    free(errs);
    Py_DECREF(fast);
    return res;
}

static PyMethodDef methods[] = {
    {"run_batch", run_batch, METH_VARARGS,
     "Create, fill (FICLONE > copy_file_range > copy), own, chmod and time a batch of files "
     "with the GIL released; per-file (method, errno, stage) results."},
    {"stage_files", stage_files, METH_VARARGS,
     "Create (O_EXCL, 0444) and fill a batch of staged object files with the GIL released; "
     "per-file errno (0: written)."},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef module = {PyModuleDef_HEAD_INIT, "_fastpath", NULL, -1, methods};

PyMODINIT_FUNC PyInit__fastpath(void) { return PyModule_Create(&module); }
