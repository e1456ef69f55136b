/* dirsync._files: new small files written in C, many per call (see Replica.stage_new); a small
   file read and hashed in one call (read_small, for scan._Scanner.hash_file: see there).

   An initial copy of many small files spent about 80 us of one process's time per file in
   the apply loop, of which the system calls that create and fill the file were ~35 us; the
   rest was the Python around them (the master reader's generator, stage's layers, the
   checks). This module does the system calls and the checks of one batch in one call. It is
   a fast path only: a file it does not write (any failure, any mismatch) is left absent and
   reported, and the caller builds that file through the Python path, which writes it or
   raises the error it always raised. So no error message is made here.

   write_new(items, hash) -> list, one per item: 0 (or bytes, see cuts) written, else a
   positive errno or -1 (the master file or the bytes are not as the plan says: changed,
   vanished, another type, short, another digest)
     items  list of tuples (dirfd, name, src, data, size, digest, mtime_ns, create_mode, chmod_mode, cuts)
       dirfd        int: the directory to create `name` in (openat)
       name         bytes: a plain name (no "/"), created with O_CREAT|O_EXCL|O_NOFOLLOW
       src, data    exactly one is not None: bytes of the file's content (the master scan held
                    them), or the master file's path (bytes), read here: it must be a regular
                    file of `size` bytes with that mtime, and exactly `size` bytes long
       size         int: the file's size; digest: bytes, the file's whole-content digest,
                    which hash(content) must equal (checked before anything is created)
       mtime_ns     int (64-bit): the file's mtime and atime (futimens)
       create_mode  int: the mode it is created with (the umask applies, as for os.open)
       chmod_mode   int: a mode to fchmod it to after writing, or -1 for none
       cuts         None, or a tuple of chunk sizes adding up to `size`: the file's chunk
                    digests are derived from its bytes (hash of each chunk, concatenated),
                    and given for it instead of 0 (a WriteFile's `derive`)
     hash   xxhash.xxh3_128_digest (16 bytes)
   Every item is parsed before any file is touched (a TypeError leaves the disk as it was).
   A file that fails after its creation is unlinked before the next item. */

#define PY_SSIZE_T_CLEAN
#include <Python.h>

#include <errno.h>
#include <fcntl.h>
#include <stdint.h>
#include <string.h>
#include <sys/stat.h>
#include <unistd.h>

typedef struct {
    int dirfd;
    const char *name;
    const char *src;            /* NULL: `data` */
    PyObject *data;             /* borrowed bytes, or NULL */
    PyObject *cuts;             /* borrowed tuple, or NULL */
    long long size, mtime_ns;
    const char *digest;
    Py_ssize_t digest_len;
    int create_mode, chmod_mode;
} Item;

static int parse_item(PyObject *t, Item *it) {
    PyObject *src, *data, *cuts;
    if (!PyTuple_Check(t)) {
        PyErr_SetString(PyExc_TypeError, "write_new: each item must be a tuple");
        return -1;
    }
    if (!PyArg_ParseTuple(t, "iyOOLy#LiiO", &it->dirfd, &it->name, &src, &data, &it->size, &it->digest,
                          &it->digest_len, &it->mtime_ns, &it->create_mode, &it->chmod_mode, &cuts))
        return -1;
    if (cuts == Py_None) {
        it->cuts = NULL;
    } else if (PyTuple_Check(cuts)) {
        it->cuts = cuts;
        for (Py_ssize_t k = 0; k < PyTuple_GET_SIZE(cuts); k++)
            if (!PyLong_Check(PyTuple_GET_ITEM(cuts, k))) {
                PyErr_SetString(PyExc_TypeError, "write_new: cuts must be a tuple of ints");
                return -1;
            }
    } else {
        PyErr_SetString(PyExc_TypeError, "write_new: cuts must be None or a tuple");
        return -1;
    }
    if ((src == Py_None) == (data == Py_None)) {
        PyErr_SetString(PyExc_TypeError, "write_new: exactly one of src and data must be given");
        return -1;
    }
    if (src != Py_None) {
        if (!PyBytes_Check(src) || (Py_ssize_t)strlen(PyBytes_AS_STRING(src)) != PyBytes_GET_SIZE(src)) {
            PyErr_SetString(PyExc_TypeError, "write_new: src must be bytes without NUL");
            return -1;
        }
        it->src = PyBytes_AS_STRING(src);
        it->data = NULL;
    } else {
        if (!PyBytes_Check(data)) {
            PyErr_SetString(PyExc_TypeError, "write_new: data must be bytes");
            return -1;
        }
        it->src = NULL;
        it->data = data;
    }
    if (it->size < 0 || strchr(it->name, '/') || !*it->name) {
        PyErr_SetString(PyExc_ValueError, "write_new: bad size or name");
        return -1;
    }
    return 0;
}

static long long ns_of(struct timespec t) { return (long long)t.tv_sec * 1000000000LL + t.tv_nsec; }

/* Read from the start of `fd` into p up to size + 1 bytes (one more than expected: a file
   that grew shows) or to its end; the bytes read, or -1 with *err set. No GIL needed. */
static long long read_upto(int fd, char *p, long long size, int *err) {
    long long got = 0;
    while (got <= size) {
        ssize_t n = pread(fd, p + got, (size_t)(size + 1 - got), (off_t)got);
        if (n < 0) {
            if (errno == EINTR) continue;
            *err = errno;
            return -1;
        }
        if (n == 0) break;
        got += n;
    }
    return got;
}

/* The master file's content, as the plan describes it, in a new bytes object; NULL with
   *code set (-1 or an errno) when it is not, NULL with a Python error on a memory error. */
static PyObject *read_src(const Item *it, int *code) {
    PyObject *buf = PyBytes_FromStringAndSize(NULL, (Py_ssize_t)it->size + 1);
    if (!buf) return NULL;
    char *p = PyBytes_AS_STRING(buf);
    int fd, e = 0;
    struct stat st;
    Py_BEGIN_ALLOW_THREADS
    fd = open(it->src, O_RDONLY | O_NOFOLLOW | O_NONBLOCK | O_CLOEXEC);
    if (fd < 0) {
        e = errno;
    } else {
        if (fstat(fd, &st) != 0) {
            e = errno;
        } else if (!S_ISREG(st.st_mode) || st.st_size != it->size || st.st_mtim.tv_sec > 9000000000LL
                   || st.st_mtim.tv_sec < -9000000000LL || ns_of(st.st_mtim) != it->mtime_ns) {
            e = -1;
        } else {
            long long got = read_upto(fd, p, it->size, &e);
            if (got >= 0 && got != it->size) e = -1;
        }
        close(fd);
    }
    Py_END_ALLOW_THREADS
    if (e) {
        Py_DECREF(buf);
        *code = e;
        return NULL;
    }
    if (_PyBytes_Resize(&buf, (Py_ssize_t)it->size) < 0) return NULL;
    return buf;
}

/* 1: hash(data) == digest; 0: not; -1: a Python error */
static int digest_matches(PyObject *hash, PyObject *data, const Item *it) {
    PyObject *d = PyObject_CallOneArg(hash, data);
    if (!d) return -1;
    int ok = PyBytes_Check(d) && PyBytes_GET_SIZE(d) == it->digest_len
             && memcmp(PyBytes_AS_STRING(d), it->digest, (size_t)it->digest_len) == 0;
    Py_DECREF(d);
    return ok;
}

/* The chunk digests of `data` cut at `cuts` (a tuple of ints), each `dlen` bytes, concatenated:
   a new bytes object; NULL with *code = -1 when the cuts do not tile the data, NULL with a
   Python error otherwise. (write_new's derived writes; read_small's chunks.) */
static PyObject *chunk_digests(PyObject *hash, PyObject *data, PyObject *cuts, Py_ssize_t dlen, int *code) {
    Py_ssize_t n = PyTuple_GET_SIZE(cuts), len = PyBytes_GET_SIZE(data), pos = 0;
    PyObject *out = PyBytes_FromStringAndSize(NULL, n * dlen);
    if (!out) return NULL;
    for (Py_ssize_t k = 0; k < n; k++) {
        long long c = PyLong_AsLongLong(PyTuple_GET_ITEM(cuts, k));
        if (c == -1 && PyErr_Occurred()) { Py_DECREF(out); return NULL; }
        if (c <= 0 || c > len - pos) { Py_DECREF(out); *code = -1; return NULL; }
        PyObject *view = PyMemoryView_FromMemory(PyBytes_AS_STRING(data) + pos, (Py_ssize_t)c, PyBUF_READ);
        if (!view) { Py_DECREF(out); return NULL; }
        PyObject *d = PyObject_CallOneArg(hash, view);
        Py_DECREF(view);
        if (!d) { Py_DECREF(out); return NULL; }
        if (!PyBytes_Check(d) || PyBytes_GET_SIZE(d) != dlen) {
            Py_DECREF(d);
            Py_DECREF(out);
            PyErr_SetString(PyExc_ValueError, "hash gave a digest of another size");
            return NULL;
        }
        memcpy(PyBytes_AS_STRING(out) + k * dlen, PyBytes_AS_STRING(d), (size_t)dlen);
        Py_DECREF(d);
        pos += (Py_ssize_t)c;
    }
    if (pos != len) { Py_DECREF(out); *code = -1; return NULL; }
    return out;
}

/* Create, fill and stamp one file; 0 or an errno (the file is then gone again). */
static int write_one(const Item *it, const char *p, Py_ssize_t n) {
    int e = 0;
    Py_BEGIN_ALLOW_THREADS
    int fd = openat(it->dirfd, it->name, O_WRONLY | O_CREAT | O_EXCL | O_NOFOLLOW | O_CLOEXEC, it->create_mode);
    if (fd < 0) {
        e = errno;
    } else {
        Py_ssize_t done = 0;
        while (done < n) {
            ssize_t w = write(fd, p + done, (size_t)(n - done));
            if (w < 0) {
                if (errno == EINTR) continue;
                e = errno;
                break;
            }
            if (w == 0) { e = EIO; break; }
            done += w;
        }
        if (!e && it->chmod_mode >= 0 && fchmod(fd, (mode_t)it->chmod_mode) != 0)
            e = errno;
        if (!e) {
            struct timespec ts[2];
            long long s = it->mtime_ns / 1000000000LL, ns = it->mtime_ns % 1000000000LL;
            if (ns < 0) { ns += 1000000000LL; s -= 1; }
            ts[0].tv_sec = ts[1].tv_sec = (time_t)s;
            ts[0].tv_nsec = ts[1].tv_nsec = (long)ns;
            if (futimens(fd, ts) != 0)
                e = errno;
        }
        if (close(fd) != 0 && !e)
            e = errno;
        if (e)
            unlinkat(it->dirfd, it->name, 0);
    }
    Py_END_ALLOW_THREADS
    return e;
}

static PyObject *write_new(PyObject *self, PyObject *args) {
    PyObject *items, *hash;
    if (!PyArg_ParseTuple(args, "O!O", &PyList_Type, &items, &hash))
        return NULL;
    Py_ssize_t count = PyList_GET_SIZE(items);
    PyObject *keep = PyList_GetSlice(items, 0, count);  /* holds every item (and its strings) alive */
    if (!keep) return NULL;
    Item *its = PyMem_Calloc(count ? (size_t)count : 1, sizeof(Item));
    char *wrote = PyMem_Calloc(count ? (size_t)count : 1, 1);
    PyObject *out = NULL;
    if (!its || !wrote) { PyErr_NoMemory(); goto done; }
    for (Py_ssize_t i = 0; i < count; i++)
        if (parse_item(PyList_GET_ITEM(keep, i), &its[i]) < 0) goto done;
    out = PyList_New(count);
    if (!out) goto done;
    for (Py_ssize_t i = 0; i < count; i++) {
        const Item *it = &its[i];
        int code = 0;
        PyObject *data;
        if (it->data) {
            data = it->data;
            Py_INCREF(data);
            if (PyBytes_GET_SIZE(data) != it->size) { code = -1; Py_CLEAR(data); }
        } else {
            data = read_src(it, &code);
            if (!data && !code) { Py_CLEAR(out); goto done; }
        }
        PyObject *digests = NULL;
        if (data) {
            int m = digest_matches(hash, data, it);
            if (m < 0) { Py_DECREF(data); Py_CLEAR(out); goto done; }
            if (!m) code = -1;
            if (!code && it->cuts) {  /* (derived before the file is made: a bad cut makes none) */
                digests = chunk_digests(hash, data, it->cuts, it->digest_len, &code);
                if (!digests && !code) { Py_DECREF(data); Py_CLEAR(out); goto done; }
            }
            if (!code) code = write_one(it, PyBytes_AS_STRING(data), PyBytes_GET_SIZE(data));
            Py_DECREF(data);
            wrote[i] = code == 0;
        }
        PyObject *c = code == 0 && digests ? digests : PyLong_FromLong(code);
        if (c != digests) Py_XDECREF(digests);
        if (!c) { Py_CLEAR(out); goto done; }
        PyList_SET_ITEM(out, i, c);
    }
done:
    if (!out)  /* a Python error midway: the files made by this call go again (none is reported) */
        for (Py_ssize_t i = 0; i < count; i++)
            if (wrote && wrote[i]) unlinkat(its[i].dirfd, its[i].name, 0);
    PyMem_Free(its);
    PyMem_Free(wrote);
    Py_DECREF(keep);
    return out;
}

/* read_checked(path, size, mtime_ns, digest, hash) -> bytes or None: a master file's bytes as
   write_new reads them (a regular file, not followed through a link, of that size and mtime,
   exactly `size` bytes whose hash is `digest`), for apply.MasterReader.whole; None on any
   failure or mismatch (the caller reads it in Python then, which raises what it raises). */
static PyObject *read_checked(PyObject *self, PyObject *args) {
    PyObject *path, *hash;
    Item it = {0};
    if (!PyArg_ParseTuple(args, "O&LLy#O", PyUnicode_FSConverter, &path, &it.size, &it.mtime_ns, &it.digest,
                          &it.digest_len, &hash))
        return NULL;
    PyObject *out = NULL;
    int code = 0;
    it.src = PyBytes_AS_STRING(path);
    if (it.size < 0 || (Py_ssize_t)strlen(it.src) != PyBytes_GET_SIZE(path)) {
        out = Py_None;
        Py_INCREF(out);
    } else {
        PyObject *data = read_src(&it, &code);
        if (data) {
            int m = digest_matches(hash, data, &it);
            if (m > 0) { out = data; data = NULL; }
            else if (m == 0) { out = Py_None; Py_INCREF(out); }
            Py_XDECREF(data);
        } else if (code) {
            out = Py_None;
            Py_INCREF(out);
        }
    }
    Py_DECREF(path);
    return out;
}

/* -- reading and hashing a small file (scan._Scanner.hash_file) ---------------------------- */

/* pyfastcdc's FastCDC 2020 cut (its _cut_gear, normalized chunking), on the tables and masks
   the caller takes from pyfastcdc itself: the offset where the chunk starting at buf ends. */
static uint64_t cut_gear(const unsigned char *buf, uint64_t len, uint64_t min_size, uint64_t avg_size,
                         uint64_t max_size, uint64_t mask_s, uint64_t mask_l, const uint64_t *gear,
                         const uint64_t *gear_ls) {
    uint64_t remaining = len;
    if (remaining <= min_size) return remaining;
    uint64_t center = avg_size;
    if (remaining > max_size) remaining = max_size;
    else if (remaining < center) center = remaining;
    uint64_t h = 0, mask_s_ls = mask_s << 1, mask_l_ls = mask_l << 1;
    uint64_t start = (min_size / 2) * 2, mid = (center / 2) * 2, end = (remaining / 2) * 2, pos;
    for (pos = start; pos < mid; pos += 2) {
        h = (h << 2) + gear_ls[buf[pos]];
        if (!(h & mask_s_ls)) return pos;
        h = h + gear[buf[pos + 1]];
        if (!(h & mask_s)) return pos + 1;
    }
    for (pos = mid; pos < end; pos += 2) {
        h = (h << 2) + gear_ls[buf[pos]];
        if (!(h & mask_l_ls)) return pos;
        h = h + gear[buf[pos + 1]];
        if (!(h & mask_l)) return pos + 1;
    }
    return remaining;
}

typedef struct {
    unsigned long long min, avg, max, mask_s, mask_l;
    Py_buffer gear, gear_ls;
} Cutter;

/* (sizes, digests) of `data` cut by `c` (avg 0: one chunk, whose digest is `whole`) */
static PyObject *chunk_data(PyObject *data, const Cutter *c, PyObject *whole, PyObject *hash) {
    const unsigned char *p = (const unsigned char *)PyBytes_AS_STRING(data);
    uint64_t len = (uint64_t)PyBytes_GET_SIZE(data);
    if (!len) return Py_BuildValue("(()y)", "");
    if (!c->avg) return Py_BuildValue("((K)O)", (unsigned long long)len, whole);
    PyObject *sizes = PyList_New(0), *cuts = NULL, *digests = NULL, *out = NULL;
    if (!sizes) return NULL;
    for (uint64_t off = 0; off < len;) {
        uint64_t n = cut_gear(p + off, len - off, c->min, c->avg, c->max, c->mask_s, c->mask_l,
                              (const uint64_t *)c->gear.buf, (const uint64_t *)c->gear_ls.buf);
        PyObject *k = PyLong_FromUnsignedLongLong(n);
        if (!k || PyList_Append(sizes, k) < 0) { Py_XDECREF(k); goto done; }
        Py_DECREF(k);
        off += n;
    }
    int code = 0;  /* (the cuts tile the data by construction) */
    if ((cuts = PyList_AsTuple(sizes)) && (digests = chunk_digests(hash, data, cuts, PyBytes_GET_SIZE(whole), &code)))
        out = Py_BuildValue("(OO)", cuts, digests);
done:
    Py_DECREF(sizes);
    Py_XDECREF(cuts);
    Py_XDECREF(digests);
    return out;
}

/* read_small(path, ino, size, cut, hash) -> (data, sizes, digests, whole, mode, mtime_ns, ctime_ns)
   or None. What scan._Scanner.hash_file does for a file of at most a buffer's size, with the
   same checks: opened without following a link, a regular file with the walk's inode and size,
   read whole (a byte more is asked for: a grown file shows), unchanged in size, mtime and ctime
   from before the read to after it. None on any failure or mismatch, or a time beyond 64 bits:
   the caller reads the file in Python then, which raises or reports as it always did.
     cut    (min, avg, max, mask_s, mask_l, gear, gear_ls): pyfastcdc's cutter for the file's
            chunk class (avg 0: the file is one chunk), gear tables as buffers of 256 uint64 */
static PyObject *read_small(PyObject *self, PyObject *args) {
    PyObject *path, *hash;
    unsigned long long ino, size;
    Cutter c;
    if (!PyArg_ParseTuple(args, "O&KK(KKKKKy*y*)O", PyUnicode_FSConverter, &path, &ino, &size, &c.min, &c.avg,
                          &c.max, &c.mask_s, &c.mask_l, &c.gear, &c.gear_ls, &hash))
        return NULL;
    PyObject *data = NULL, *out = NULL;
    if (c.gear.len != 256 * 8 || c.gear_ls.len != 256 * 8) {
        PyErr_SetString(PyExc_ValueError, "read_small: gear tables must be 256 uint64s");
        goto done;
    }
    if (size > (1ULL << 30)) { out = Py_None; Py_INCREF(out); goto done; }
    data = PyBytes_FromStringAndSize(NULL, (Py_ssize_t)size + 1);
    if (!data) goto done;
    int fail = 0, err = 0;
    uint64_t got = 0;
    struct stat st0, st1;
    Py_BEGIN_ALLOW_THREADS
    int fd = open(PyBytes_AS_STRING(path), O_RDONLY | O_NOFOLLOW | O_NONBLOCK | O_CLOEXEC);
    if (fd < 0) {
        fail = 1;
    } else {
        if (fstat(fd, &st0) != 0 || !S_ISREG(st0.st_mode) || (unsigned long long)st0.st_ino != ino
            || (unsigned long long)st0.st_size != size) {
            fail = 1;
        } else {
            long long n = read_upto(fd, PyBytes_AS_STRING(data), (long long)size, &err);
            if (n < 0) fail = 1;
            else got = (uint64_t)n;
            if (!fail && (got != size || fstat(fd, &st1) != 0 || st1.st_size != st0.st_size
                          || st1.st_mtim.tv_sec != st0.st_mtim.tv_sec || st1.st_mtim.tv_nsec != st0.st_mtim.tv_nsec
                          || st1.st_ctim.tv_sec != st0.st_ctim.tv_sec || st1.st_ctim.tv_nsec != st0.st_ctim.tv_nsec
                          || st1.st_mtim.tv_sec > 9000000000LL || st1.st_mtim.tv_sec < -9000000000LL
                          || st1.st_ctim.tv_sec > 9000000000LL || st1.st_ctim.tv_sec < -9000000000LL))
                fail = 1;
        }
        close(fd);
    }
    Py_END_ALLOW_THREADS
    if (fail) { out = Py_None; Py_INCREF(out); goto done; }
    if (_PyBytes_Resize(&data, (Py_ssize_t)size) < 0) goto done;
    PyObject *whole = PyObject_CallOneArg(hash, data);
    if (!whole) goto done;
    if (!PyBytes_Check(whole)) {
        Py_DECREF(whole);
        PyErr_SetString(PyExc_TypeError, "hash must return bytes");
        goto done;
    }
    PyObject *ch = chunk_data(data, &c, whole, hash);
    if (ch) {
        out = Py_BuildValue("(OOONILL)", data, PyTuple_GET_ITEM(ch, 0), PyTuple_GET_ITEM(ch, 1), whole,
                            (unsigned int)(st1.st_mode & 07777), ns_of(st1.st_mtim), ns_of(st1.st_ctim));
        Py_DECREF(ch);
    } else {
        Py_DECREF(whole);
    }
done:
    Py_XDECREF(data);
    Py_DECREF(path);
    PyBuffer_Release(&c.gear);
    PyBuffer_Release(&c.gear_ls);
    return out;
}

static PyMethodDef methods[] = {
    {"write_new", write_new, METH_VARARGS, "Write new small files (see the module's header)."},
    {"read_small", read_small, METH_VARARGS, "Read and hash a small file (see there)."},
    {"read_checked", read_checked, METH_VARARGS, "Read a master file as write_new does (see there)."},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef module = {PyModuleDef_HEAD_INIT, "dirsync._files", NULL, -1, methods, NULL, NULL, NULL, NULL};

/* API: what the Python side expects (replica.py checks it): a build left over from an older
   source (an install not redone after a pull) is then ignored, not called wrongly. */
PyMODINIT_FUNC PyInit__files(void) {
    PyObject *m = PyModule_Create(&module);
    if (m && PyModule_AddIntConstant(m, "API", 3) < 0) {
        Py_DECREF(m);
        return NULL;
    }
    return m;
}
