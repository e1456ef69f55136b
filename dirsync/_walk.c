/* dirsync._walk: the scanner's per-directory listing loop in C (see scan._Scanner.gather).

   A walk is mostly one lstat and a little Python per entry; for 100,000 entries the Python
   part (a DirEntry and a stat_result each, the fingerprint's formatting and hashing, the item
   tuple) cost about twice the system calls. This module does the same work for one directory
   in one call and must give exactly what the Python loop gives (tests/test_walk_c.py compares
   the two on the same trees): scan.py uses it when it was built, and the Python loop otherwise.

   list_dir(path, prefix, prefix_b, items, temps, links, excluded, state_dir, hash, tmp_prefix)
     path      str: the directory to list (absolute, or as the Python loop would open it)
     prefix    str: "" or the directory's relative path plus "/"; prefix_b: the same, fs-encoded
     items     list: (rel, (mode, size, mtime_ns, ino, ctime_ns)) is appended per entry kept
     temps     list: the relative paths of names starting with tmp_prefix (not stat'ed)
     links     dict: rel -> link target (str) for every symlink kept
     excluded  callable(rel, is_dir) -> bool, or None; state_dir: a relative path for which
               `excluded` is asked even when it is None-like (see gather: the "fast" excluder)
     hash      xxhash.xxh3_128_digest (16 bytes, big-endian)
   returns (acc, subdirs, errors, special)
     acc       the sum of the kept entries' fingerprint hashes, modulo 2**128 (only ever used
               masked to 128 bits: manifest.fp_final)
     subdirs   the kept subdirectories' relative paths, in listing order
     errors    [(rel, what, errno)] for an entry whose stat or readlink failed otherwise than
               ENOENT (such an entry is left out, as in the Python loop)
     special   True when an entry other than a file, directory or link was kept
   Raises OSError when the directory itself cannot be opened or read.

   fingerprint_sum(entries, file_kind, dir_kind, link_kind, hash): the same records' hashes
   summed over a manifest's entries, for manifest.fingerprint (see there). */

#define PY_SSIZE_T_CLEAN
#include <Python.h>

#include <dirent.h>
#include <errno.h>
#include <fcntl.h>
#include <limits.h>
#include <stdio.h>
#include <string.h>
#include <sys/stat.h>
#include <unistd.h>

typedef unsigned __int128 u128;

/* A growable byte buffer for one fingerprint record (path lengths are not bounded here). */
typedef struct {
    char *p;
    size_t n, cap;
    char small[512];
} Buf;

static void buf_init(Buf *b) { b->p = b->small; b->n = 0; b->cap = sizeof b->small; }
static void buf_free(Buf *b) { if (b->p != b->small) PyMem_Free(b->p); }

static int buf_put(Buf *b, const char *s, size_t n) {
    if (b->n + n > b->cap) {
        size_t cap = (b->n + n) * 2;
        char *q = PyMem_Malloc(cap);
        if (!q) { PyErr_NoMemory(); return -1; }
        memcpy(q, b->p, b->n);
        if (b->p != b->small) PyMem_Free(b->p);
        b->p = q;
        b->cap = cap;
    }
    memcpy(b->p + b->n, s, n);
    b->n += n;
    return 0;
}

static int buf_u(Buf *b, unsigned long long v) {
    char t[24];
    int k = snprintf(t, sizeof t, "%llu", v);
    return buf_put(b, t, (size_t)k);
}

static int buf_ll(Buf *b, long long v) {
    char t[24];
    int k = snprintf(t, sizeof t, "%lld", v);
    return buf_put(b, t, (size_t)k);
}

/* A timestamp in nanoseconds, as os.stat_result's st_*time_ns: exact for any tv_sec. */
static __int128 ns128(struct timespec t) { return (__int128)t.tv_sec * 1000000000 + t.tv_nsec; }

static int buf_ns(Buf *b, struct timespec t) {  /* %d of ns128(t) */
    __int128 v = ns128(t);
    char d[48], *e = d + sizeof d, *q = e;
    unsigned __int128 u = v < 0 ? -(unsigned __int128)v : (unsigned __int128)v;
    do { *--q = (char)('0' + (int)(u % 10)); u /= 10; } while (u);
    if (v < 0) *--q = '-';
    return buf_put(b, q, (size_t)(e - q));
}

static PyObject *ns_of(struct timespec t) {
    __int128 v = ns128(t);
    if (v >= LLONG_MIN && v <= LLONG_MAX)
        return PyLong_FromLongLong((long long)v);
    unsigned char le[16];
    for (int i = 0; i < 16; i++) { le[i] = (unsigned char)(v & 0xff); v >>= 8; }
    return _PyLong_FromByteArray(le, 16, 1, 1);
}

/* acc += hash(record) as a big-endian 128-bit number */
static int add_hash(u128 *acc, PyObject *hash, Buf *b) {
    PyObject *data = PyBytes_FromStringAndSize(b->p, (Py_ssize_t)b->n);
    if (!data) return -1;
    PyObject *d = PyObject_CallOneArg(hash, data);
    Py_DECREF(data);
    if (!d) return -1;
    if (!PyBytes_Check(d) || PyBytes_GET_SIZE(d) != 16) {
        Py_DECREF(d);
        PyErr_SetString(PyExc_ValueError, "hash must return 16 bytes");
        return -1;
    }
    const unsigned char *p = (const unsigned char *)PyBytes_AS_STRING(d);
    u128 v = 0;
    for (int i = 0; i < 16; i++) v = (v << 8) | p[i];
    Py_DECREF(d);
    *acc += v;
    return 0;
}

static int add_error(PyObject *errors, PyObject *rel, const char *what, int err) {
    PyObject *t = Py_BuildValue("(Osi)", rel, what, err);
    if (!t) return -1;
    int r = PyList_Append(errors, t);
    Py_DECREF(t);
    return r;
}

/* excluded(rel, is_dir) when asked for (see the header); 1 excluded, 0 kept, -1 error */
static int is_excluded(PyObject *excluded, PyObject *state_dir, PyObject *rel, int is_dir) {
    if (excluded == Py_None)
        return 0;
    if (state_dir != Py_None) {  /* the fast excluder: only the state folder is asked about */
        int eq = PyUnicode_Compare(rel, state_dir);
        if (eq == -1 && PyErr_Occurred()) return -1;
        if (eq != 0) return 0;
    }
    PyObject *r = PyObject_CallFunctionObjArgs(excluded, rel, is_dir ? Py_True : Py_False, NULL);
    if (!r) return -1;
    int t = PyObject_IsTrue(r);
    Py_DECREF(r);
    return t;
}

static PyObject *list_dir(PyObject *self, PyObject *args) {
    PyObject *path, *prefix, *prefix_b, *items, *temps, *links, *excluded, *state_dir, *hash, *tmp_prefix;
    if (!PyArg_ParseTuple(args, "UUSO!O!O!OOOS", &path, &prefix, &prefix_b, &PyList_Type, &items,
                          &PyList_Type, &temps, &PyDict_Type, &links, &excluded, &state_dir, &hash, &tmp_prefix))
        return NULL;
    PyObject *path_b = PyUnicode_EncodeFSDefault(path);
    if (!path_b) return NULL;
    int fd, err0 = 0;
    Py_BEGIN_ALLOW_THREADS
    fd = open(PyBytes_AS_STRING(path_b), O_RDONLY | O_DIRECTORY | O_CLOEXEC);
    if (fd < 0)
        err0 = errno;
    Py_END_ALLOW_THREADS
    if (fd < 0) {
        errno = err0;
        PyErr_SetFromErrnoWithFilenameObject(PyExc_OSError, path);
        Py_DECREF(path_b);
        return NULL;
    }
    DIR *dir = fdopendir(fd);
    if (!dir) {
        PyErr_SetFromErrnoWithFilenameObject(PyExc_OSError, path);
        close(fd);
        Py_DECREF(path_b);
        return NULL;
    }
    Py_DECREF(path_b);

    /* The names first (as os.scandir lists a directory whole before the loop looks at it). */
    PyObject *names = PyList_New(0);
    if (!names) { closedir(dir); return NULL; }
    for (;;) {
        struct dirent *de;
        int err;
        Py_BEGIN_ALLOW_THREADS
        errno = 0;  /* (here: releasing the GIL may itself set errno) */
        de = readdir(dir);
        err = errno;
        Py_END_ALLOW_THREADS
        if (!de) {
            if (err) {
                errno = err;
                PyErr_SetFromErrnoWithFilenameObject(PyExc_OSError, path);
                Py_DECREF(names);
                closedir(dir);
                return NULL;
            }
            break;
        }
        const char *n = de->d_name;
        if (n[0] == '.' && (n[1] == 0 || (n[1] == '.' && n[2] == 0)))
            continue;
        PyObject *b = PyBytes_FromString(n);
        if (!b || PyList_Append(names, b) < 0) {
            Py_XDECREF(b);
            Py_DECREF(names);
            closedir(dir);
            return NULL;
        }
        Py_DECREF(b);
    }

    PyObject *subdirs = PyList_New(0), *errors = PyList_New(0), *result = NULL;
    u128 acc = 0;
    int special = 0;
    Buf b;
    buf_init(&b);
    const char *pb = PyBytes_AS_STRING(prefix_b);
    size_t pbn = (size_t)PyBytes_GET_SIZE(prefix_b);
    const char *tp = PyBytes_AS_STRING(tmp_prefix);
    size_t tpn = (size_t)PyBytes_GET_SIZE(tmp_prefix);
    if (!subdirs || !errors) goto done;
    Py_ssize_t count = PyList_GET_SIZE(names);
    for (Py_ssize_t i = 0; i < count; i++) {
        PyObject *nb = PyList_GET_ITEM(names, i);
        const char *name = PyBytes_AS_STRING(nb);
        size_t nn = (size_t)PyBytes_GET_SIZE(nb);
        PyObject *uname = PyUnicode_DecodeFSDefaultAndSize(name, (Py_ssize_t)nn);
        if (!uname) goto done;
        PyObject *rel = PyUnicode_Concat(prefix, uname);
        Py_DECREF(uname);
        if (!rel) goto done;
        if (nn >= tpn && memcmp(name, tp, tpn) == 0) {  /* dirsync's own temp: never part of a tree */
            int r = PyList_Append(temps, rel);
            Py_DECREF(rel);
            if (r < 0) goto done;
            continue;
        }
        struct stat st;
        int rc;
        int e = 0;
        Py_BEGIN_ALLOW_THREADS
        rc = fstatat(dirfd(dir), name, &st, AT_SYMLINK_NOFOLLOW);
        if (rc != 0)
            e = errno;
        Py_END_ALLOW_THREADS
        if (rc != 0) {
            int r = e == ENOENT ? 0 : add_error(errors, rel, "stat", e);  /* vanished: simply absent */
            Py_DECREF(rel);
            if (r < 0) goto done;
            continue;
        }
        unsigned m = st.st_mode, fmt = m & S_IFMT;
        int ex = is_excluded(excluded, state_dir, rel, fmt == S_IFDIR);
        if (ex) {
            Py_DECREF(rel);
            if (ex < 0) goto done;
            continue;
        }
        b.n = 0;
        int bad = buf_put(&b, fmt == S_IFREG ? "f" : fmt == S_IFDIR ? "d" : "l", 1) || buf_put(&b, pb, pbn)
                  || buf_put(&b, name, nn) || buf_put(&b, "\0", 1);
        if (bad) { Py_DECREF(rel); goto done; }
        if (fmt == S_IFREG) {  /* manifest.FP_FILE: path, mode, size, mtime_ns, ino, ctime_ns */
            bad = buf_u(&b, m & 07777) || buf_put(&b, " ", 1) || buf_ll(&b, (long long)st.st_size)
                  || buf_put(&b, " ", 1) || buf_ns(&b, st.st_mtim) || buf_put(&b, " ", 1)
                  || buf_u(&b, (unsigned long long)st.st_ino) || buf_put(&b, " ", 1) || buf_ns(&b, st.st_ctim)
                  || add_hash(&acc, hash, &b);
        } else if (fmt == S_IFDIR) {  /* manifest.fp_dir */
            bad = buf_u(&b, m & 07777) || buf_put(&b, " ", 1) || buf_ns(&b, st.st_mtim)
                  || add_hash(&acc, hash, &b) || PyList_Append(subdirs, rel) < 0;
        } else if (fmt == S_IFLNK) {  /* manifest.fp_link */
            char target[PATH_MAX + 1];
            ssize_t tn;
            Py_BEGIN_ALLOW_THREADS
            tn = readlinkat(dirfd(dir), name, target, sizeof target);
            if (tn < 0)
                e = errno;
            Py_END_ALLOW_THREADS
            if (tn < 0 || tn > PATH_MAX) {
                e = tn < 0 ? e : ENAMETOOLONG;
                int r = e == ENOENT ? 0 : add_error(errors, rel, "read link", e);
                Py_DECREF(rel);
                if (r < 0) goto done;
                continue;
            }
            PyObject *t = PyUnicode_DecodeFSDefaultAndSize(target, tn);
            bad = !t || PyDict_SetItem(links, rel, t) < 0;
            Py_XDECREF(t);
            bad = bad || buf_ns(&b, st.st_mtim) || buf_put(&b, "\0", 1) || buf_put(&b, target, (size_t)tn)
                  || add_hash(&acc, hash, &b);
        } else {
            special = 1;  /* kept as an item; the scan warns about it */
        }
        PyObject *item = bad ? NULL : Py_BuildValue("(O(INNNN))", rel, m, PyLong_FromLongLong((long long)st.st_size),
                                                    ns_of(st.st_mtim),
                                                    PyLong_FromUnsignedLongLong((unsigned long long)st.st_ino),
                                                    ns_of(st.st_ctim));
        Py_DECREF(rel);
        if (!item || PyList_Append(items, item) < 0) { Py_XDECREF(item); goto done; }
        Py_DECREF(item);
    }
    {
        unsigned char out[16];
        u128 v = acc;
        for (int i = 0; i < 16; i++) { out[i] = (unsigned char)(v & 0xff); v >>= 8; }
        PyObject *a = _PyLong_FromByteArray(out, 16, 1, 0);
        if (a)
            result = Py_BuildValue("(NOOO)", a, subdirs, errors, special ? Py_True : Py_False);
    }
done:
    buf_free(&b);
    Py_XDECREF(subdirs);
    Py_XDECREF(errors);
    Py_DECREF(names);
    closedir(dir);
    return result;
}

/* Slot k of entry o through its kind's member descriptor (a new reference, or NULL). */
static PyObject *slot(PyObject *kind, PyObject *o, Py_ssize_t k) {
    PyObject *d = PyTuple_GET_ITEM(PyTuple_GET_ITEM(kind, 1), k);
    return Py_TYPE(d)->tp_descr_get(d, o, (PyObject *)Py_TYPE(o));
}

/* "%d" of an int slot; 0, 1 (not an int of 64 bits: the caller gives up) or -1 (error). */
static int buf_int(Buf *b, PyObject *v) {
    if (!PyLong_CheckExact(v)) return 1;
    int over = 0;
    long long x = PyLong_AsLongLongAndOverflow(v, &over);
    if (over) return 1;
    if (x == -1 && PyErr_Occurred()) return -1;
    char d[24], *e = d + sizeof d, *q = e;  /* (snprintf costs more than the rest of an entry) */
    unsigned long long u = x < 0 ? 0ULL - (unsigned long long)x : (unsigned long long)x;
    do { *--q = (char)('0' + (int)(u % 10)); u /= 10; } while (u);
    if (x < 0) *--q = '-';
    return buf_put(b, q, (size_t)(e - q)) ? -1 : 0;
}

static int buf_str(Buf *b, PyObject *v) {  /* v.encode(fs encoding, "surrogateescape"); 1: not a str */
    if (!PyUnicode_CheckExact(v)) return 1;
    if (PyUnicode_IS_ASCII(v))  /* (the same bytes in any fs encoding this runs with: utf-8) */
        return buf_put(b, (const char *)PyUnicode_DATA(v), (size_t)PyUnicode_GET_LENGTH(v)) ? -1 : 0;
    PyObject *e = PyUnicode_EncodeFSDefault(v);
    if (!e) return -1;
    int r = buf_put(b, PyBytes_AS_STRING(e), (size_t)PyBytes_GET_SIZE(e)) ? -1 : 0;
    Py_DECREF(e);
    return r;
}

/* fingerprint_sum(entries, file_kind, dir_kind, link_kind, hash): manifest.fingerprint's sum
   of the entries' fingerprint hashes (fp_file, fp_dir, fp_link), modulo 2**128, as an int;
   None when a file entry is untrusted or has no inode (fingerprint() gives b"" then);
   NotImplemented for anything else it does not format as Python would (another class, an
   int beyond 64 bits, a str subclass): the caller computes it in Python.
     entries    a list of entries; *_kind: manifest._row_kinds()'s (class, member descriptors
                of its __slots__) for FileEntry, DirEntry and LinkEntry */
static PyObject *fingerprint_sum(PyObject *self, PyObject *args) {
    PyObject *entries, *fk, *dk, *lk, *hash;
    if (!PyArg_ParseTuple(args, "O!OOOO", &PyList_Type, &entries, &fk, &dk, &lk, &hash))
        return NULL;
    PyObject *kinds[3] = {fk, dk, lk};
    Py_ssize_t nslots[3] = {11, 3, 3};
    for (int k = 0; k < 3; k++) {
        PyObject *kd = kinds[k];
        if (!PyTuple_Check(kd) || PyTuple_GET_SIZE(kd) != 2 || !PyType_Check(PyTuple_GET_ITEM(kd, 0))
            || !PyTuple_Check(PyTuple_GET_ITEM(kd, 1)) || PyTuple_GET_SIZE(PyTuple_GET_ITEM(kd, 1)) != nslots[k]) {
            PyErr_SetString(PyExc_TypeError, "kinds must be (class, descriptors)");
            return NULL;
        }
        for (Py_ssize_t j = 0; j < nslots[k]; j++)
            if (!Py_TYPE(PyTuple_GET_ITEM(PyTuple_GET_ITEM(kd, 1), j))->tp_descr_get) {
                PyErr_SetString(PyExc_TypeError, "descriptors must be readable");
                return NULL;
            }
    }
    u128 acc = 0;
    Buf b;
    buf_init(&b);
    PyObject *result = NULL;
    int give_up = 0, untrusted = 0;
    for (Py_ssize_t i = 0; i < PyList_GET_SIZE(entries) && !give_up && !untrusted; i++) {
        PyObject *e = PyList_GET_ITEM(entries, i);
        PyObject *cls = (PyObject *)Py_TYPE(e);
        int k = cls == PyTuple_GET_ITEM(fk, 0) ? 0 : cls == PyTuple_GET_ITEM(dk, 0) ? 1
                : cls == PyTuple_GET_ITEM(lk, 0) ? 2 : -1;
        if (k < 0) { give_up = 1; break; }
        PyObject *v[11] = {NULL};
        int r = 0;
        for (Py_ssize_t j = 0; j < nslots[k] && !r; j++)
            if ((k != 0 || j < 4 || j > 7) && !(v[j] = slot(kinds[k], e, j))) r = -1;  /* (not a file's digests) */
        b.n = 0;
        if (!r && k == 0) {  /* FP_FILE: path, mode, size, mtime_ns, ino, ctime_ns */
            int t = PyObject_IsTrue(v[10]), ino = PyObject_IsTrue(v[8]);
            if (t < 0 || ino < 0) r = -1;
            else if (!t || !ino) untrusted = 1;
            else {
                r = buf_put(&b, "f", 1) ? -1 : buf_str(&b, v[0]);
                if (!r) r = buf_put(&b, "\0", 1) ? -1 : buf_int(&b, v[2]);
                if (!r) r = buf_put(&b, " ", 1) ? -1 : buf_int(&b, v[1]);
                if (!r) r = buf_put(&b, " ", 1) ? -1 : buf_int(&b, v[3]);
                if (!r) r = buf_put(&b, " ", 1) ? -1 : buf_int(&b, v[8]);
                if (!r) r = buf_put(&b, " ", 1) ? -1 : buf_int(&b, v[9]);
            }
        } else if (!r && k == 1) {  /* fp_dir: path, mode, mtime_ns */
            r = buf_put(&b, "d", 1) ? -1 : buf_str(&b, v[0]);
            if (!r) r = buf_put(&b, "\0", 1) ? -1 : buf_int(&b, v[1]);
            if (!r) r = buf_put(&b, " ", 1) ? -1 : buf_int(&b, v[2]);
        } else if (!r) {  /* fp_link: path, mtime_ns, target */
            r = buf_put(&b, "l", 1) ? -1 : buf_str(&b, v[0]);
            if (!r) r = buf_put(&b, "\0", 1) ? -1 : buf_int(&b, v[2]);
            if (!r) r = buf_put(&b, "\0", 1) ? -1 : buf_str(&b, v[1]);
        }
        if (!r && !untrusted) r = add_hash(&acc, hash, &b);
        for (int j = 0; j < 11; j++) Py_XDECREF(v[j]);
        if (r < 0) goto done;
        if (r > 0) give_up = 1;
    }
    if (give_up) {
        result = Py_NotImplemented;
        Py_INCREF(result);
    } else if (untrusted) {
        result = Py_None;
        Py_INCREF(result);
    } else {
        unsigned char out[16];
        u128 x = acc;
        for (int j = 0; j < 16; j++) { out[j] = (unsigned char)(x & 0xff); x >>= 8; }
        result = _PyLong_FromByteArray(out, 16, 1, 0);
    }
done:
    buf_free(&b);
    return result;
}

static PyMethodDef methods[] = {
    {"list_dir", list_dir, METH_VARARGS, "List one directory for scan._Scanner.gather (see the module's header)."},
    {"fingerprint_sum", fingerprint_sum, METH_VARARGS, "manifest.fingerprint's sum (see there)."},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef module = {PyModuleDef_HEAD_INIT, "dirsync._walk", NULL, -1, methods};

/* API: what the Python side expects (scan.py / manifest.py check it): a build left over from
   an older source (an install not redone after a pull) is then ignored, not called wrongly. */
PyMODINIT_FUNC PyInit__walk(void) {
    PyObject *m = PyModule_Create(&module);
    if (m && PyModule_AddIntConstant(m, "API", 2) < 0) {
        Py_DECREF(m);
        return NULL;
    }
    return m;
}
