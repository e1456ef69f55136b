/* dirsync._rows: decoding the rows of our own cache files in C (see manifest._decode_body).

   A cache's rows are msgpack arrays; decoding them with msgpack's Unpacker and building each
   entry in Python cost ~3 us a row (the mixed tree's 10,700 rows: 30-40 ms of a 1% change run).
   This reads the rows straight from the body and builds the entries without calling their
   __init__ (each slot set through its member descriptor, in __slots__ order, which is the order
   __init__ assigns them). It must give exactly what manifest._decode_own_rows gives for the
   same rows (tests/test_rows_c.py compares the two on generated caches), and it gives up on
   anything else: a row of any other shape, a path the Python decoder rejects, a msgpack type
   our writer never writes. Then it returns None and the caller decodes in Python, which
   raises where it should.

   decode_own_rows(body, pos, nrows, file_kind, dir_kind, link_kind)
     body       a buffer (bytes or a memoryview of a mapped file)
     pos        where the first row starts; nrows: how many rows
     *_kind     (class, (member descriptors of its __slots__ in __init__ order)) for FileEntry,
                DirEntry and LinkEntry
   returns (entries, offs, end) or None
     entries    dict path -> entry, in row order (a repeated path: the last row wins)
     offs       bytes: nrows + 1 native uint64, where each row starts and where the last ends
     end        the offset after the last row */

#define PY_SSIZE_T_CLEAN
#include <Python.h>

#include <stdint.h>
#include <string.h>

typedef struct {
    const unsigned char *p;
    Py_ssize_t n, i;
} Rd;

/* Each reader returns 0 on success, -1 when the bytes are not what our writer writes (the
   caller gives up: no Python exception is set) and -2 on a Python error (one is set). */

static int rd_be(Rd *r, int width, uint64_t *out) {
    if (r->i + width > r->n) return -1;
    uint64_t v = 0;
    for (int k = 0; k < width; k++) v = (v << 8) | r->p[r->i + k];
    r->i += width;
    *out = v;
    return 0;
}

static int rd_array(Rd *r, Py_ssize_t *len) {
    if (r->i >= r->n) return -1;
    unsigned char c = r->p[r->i++];
    uint64_t v;
    if ((c & 0xf0) == 0x90) { *len = c & 0x0f; return 0; }
    if (c == 0xdc) { if (rd_be(r, 2, &v)) return -1; *len = (Py_ssize_t)v; return 0; }
    if (c == 0xdd) { if (rd_be(r, 4, &v)) return -1; *len = (Py_ssize_t)v; return 0; }
    return -1;
}

/* An int as msgpack's unpacker gives it. */
static int rd_int(Rd *r, PyObject **out) {
    if (r->i >= r->n) return -1;
    unsigned char c = r->p[r->i++];
    uint64_t v;
    if (c <= 0x7f) { *out = PyLong_FromLong(c); return *out ? 0 : -2; }
    if (c >= 0xe0) { *out = PyLong_FromLong((long)(signed char)c); return *out ? 0 : -2; }
    switch (c) {
    case 0xcc: case 0xcd: case 0xce: case 0xcf:
        if (rd_be(r, 1 << (c - 0xcc), &v)) return -1;
        *out = PyLong_FromUnsignedLongLong(v);
        return *out ? 0 : -2;
    case 0xd0: case 0xd1: case 0xd2: case 0xd3: {
        int w = 1 << (c - 0xd0);
        if (rd_be(r, w, &v)) return -1;
        int64_t s = w == 8 ? (int64_t)v : (int64_t)(v << (64 - 8 * w)) >> (64 - 8 * w);
        *out = PyLong_FromLongLong(s);
        return *out ? 0 : -2;
    }
    }
    return -1;
}

/* A bin: its bytes in place (*s, *len). */
static int rd_bin(Rd *r, const char **s, Py_ssize_t *len) {
    if (r->i >= r->n) return -1;
    unsigned char c = r->p[r->i++];
    uint64_t v;
    if (c < 0xc4 || c > 0xc6 || rd_be(r, 1 << (c - 0xc4), &v)) return -1;
    if (v > (uint64_t)(r->n - r->i)) return -1;
    *s = (const char *)r->p + r->i;
    *len = (Py_ssize_t)v;
    r->i += (Py_ssize_t)v;
    return 0;
}

static int rd_bytes(Rd *r, PyObject **out) {
    const char *s;
    Py_ssize_t len;
    int e = rd_bin(r, &s, &len);
    if (e) return e;
    *out = PyBytes_FromStringAndSize(s, len);
    return *out ? 0 : -2;
}

/* A path the Python decoder accepts: not empty components, ".", "..", NUL, or over 4096
   characters (checked on the decoded str by the caller). */
static int path_ok(const char *s, Py_ssize_t n) {
    if (n == 0) return 1;
    if (memchr(s, 0, (size_t)n)) return 0;
    Py_ssize_t start = 0;
    for (Py_ssize_t k = 0; k <= n; k++) {
        if (k == n || s[k] == '/') {
            Py_ssize_t len = k - start;
            if (len == 0) return 0;
            if (len == 1 && s[start] == '.') return 0;
            if (len == 2 && s[start] == '.' && s[start + 1] == '.') return 0;
            start = k + 1;
        }
    }
    return 1;
}

/* kind: (class, descriptors); builds an instance with its slots set to vals[0..n). */
static PyObject *make(PyObject *kind, PyObject **vals, Py_ssize_t n) {
    PyTypeObject *cls = (PyTypeObject *)PyTuple_GET_ITEM(kind, 0);
    PyObject *descrs = PyTuple_GET_ITEM(kind, 1);
    PyObject *o = cls->tp_alloc(cls, 0);
    if (!o) return NULL;
    for (Py_ssize_t k = 0; k < n; k++) {
        PyObject *d = PyTuple_GET_ITEM(descrs, k);
        if (Py_TYPE(d)->tp_descr_set(d, o, vals[k]) < 0) {
            Py_DECREF(o);
            return NULL;
        }
    }
    return o;
}

static int check_kind(PyObject *kind, Py_ssize_t n) {
    if (!PyTuple_Check(kind) || PyTuple_GET_SIZE(kind) != 2 || !PyType_Check(PyTuple_GET_ITEM(kind, 0))
        || !PyTuple_Check(PyTuple_GET_ITEM(kind, 1)) || PyTuple_GET_SIZE(PyTuple_GET_ITEM(kind, 1)) != n) {
        PyErr_SetString(PyExc_TypeError, "kind must be (class, descriptors)");
        return -1;
    }
    for (Py_ssize_t k = 0; k < n; k++) {
        PyObject *d = PyTuple_GET_ITEM(PyTuple_GET_ITEM(kind, 1), k);
        if (!Py_TYPE(d)->tp_descr_set) {
            PyErr_SetString(PyExc_TypeError, "descriptors must be settable");
            return -1;
        }
    }
    return 0;
}

/* One row into *entry (and *path); 0, -1 (give up) or -2 (Python error). */
static int one_row(Rd *r, PyObject *fk, PyObject *dk, PyObject *lk, PyObject **path, PyObject **entry) {
    Py_ssize_t len;
    if (rd_array(r, &len) || len < 2 || r->i >= r->n) return -1;
    unsigned char t = r->p[r->i++];
    const char *ps;
    Py_ssize_t pn;
    if (t > 2 || rd_bin(r, &ps, &pn)) return -1;
    if ((t == 0 && len != 12) || (t != 0 && len != 4) || !path_ok(ps, pn) || (pn == 0 && t != 1)) return -1;
    PyObject *p = PyUnicode_DecodeFSDefaultAndSize(ps, pn);
    if (!p) return -2;
    if (PyUnicode_GET_LENGTH(p) > 4096) { Py_DECREF(p); return -1; }
    PyObject *v[11] = {p};
    int n = t == 0 ? 11 : 3, e = 0;
    if (t == 0) {
        /* size, mode, mtime, digest, avg, sizes (bin or array of ints), digests, ino, ctime, trusted */
        e = rd_int(r, &v[1]);
        if (!e) e = rd_int(r, &v[2]);
        if (!e) e = rd_int(r, &v[3]);
        if (!e) e = rd_bytes(r, &v[4]);
        if (!e) e = rd_int(r, &v[5]);
        if (!e) {
            if (r->i < r->n && r->p[r->i] >= 0xc4 && r->p[r->i] <= 0xc6) {
                e = rd_bytes(r, &v[6]);
            } else {
                Py_ssize_t m;
                e = rd_array(r, &m);
                if (!e && m > r->n - r->i) e = -1;  /* (each int takes a byte at least) */
                if (!e && !(v[6] = PyTuple_New(m))) e = -2;
                for (Py_ssize_t k = 0; !e && k < m; k++) {
                    PyObject *x = NULL;
                    e = rd_int(r, &x);
                    if (!e) PyTuple_SET_ITEM(v[6], k, x);
                }
            }
        }
        if (!e) e = rd_bytes(r, &v[7]);
        if (!e) e = rd_int(r, &v[8]);
        if (!e) e = rd_int(r, &v[9]);
        if (!e) {
            if (r->i < r->n && (r->p[r->i] == 0xc2 || r->p[r->i] == 0xc3)) {
                v[10] = r->p[r->i++] == 0xc3 ? Py_True : Py_False;
                Py_INCREF(v[10]);
            } else {
                e = -1;
            }
        }
        if (!e && PyBytes_Check(v[6])) {  /* packed sizes: 2 or 4 bytes per 16-byte digest */
            Py_ssize_t ls = PyBytes_GET_SIZE(v[6]), ld = PyBytes_GET_SIZE(v[7]);
            if (ls != (ld >> 3) && ls != (ld >> 2)) e = -1;
        }
    } else if (t == 1) {  /* mode, mtime */
        e = rd_int(r, &v[1]);
        if (!e) e = rd_int(r, &v[2]);
    } else {  /* target, mtime */
        const char *ts;
        Py_ssize_t tn;
        e = rd_bin(r, &ts, &tn);
        if (!e && !(v[1] = PyUnicode_DecodeFSDefaultAndSize(ts, tn))) e = -2;
        if (!e) e = rd_int(r, &v[2]);
    }
    if (!e) {
        *entry = make(t == 0 ? fk : t == 1 ? dk : lk, v, n);
        if (!*entry) e = -2;
    }
    for (int k = 1; k < n; k++) Py_XDECREF(v[k]);
    if (e) { Py_DECREF(p); return e; }
    *path = p;
    return 0;
}

static PyObject *decode_own_rows(PyObject *self, PyObject *args) {
    Py_buffer buf;
    Py_ssize_t pos, nrows;
    PyObject *fk, *dk, *lk;
    if (!PyArg_ParseTuple(args, "y*nnOOO", &buf, &pos, &nrows, &fk, &dk, &lk))
        return NULL;
    PyObject *entries = NULL, *offs = NULL, *result = NULL;
    if (check_kind(fk, 11) || check_kind(dk, 3) || check_kind(lk, 3)) goto done;
    if (pos < 0 || pos > buf.len || nrows < 0 || nrows > buf.len) { result = Py_None; Py_INCREF(result); goto done; }
    entries = PyDict_New();
    offs = PyBytes_FromStringAndSize(NULL, (nrows + 1) * (Py_ssize_t)sizeof(uint64_t));
    if (!entries || !offs) goto done;
    uint64_t *o = (uint64_t *)PyBytes_AS_STRING(offs);
    Rd r = {(const unsigned char *)buf.buf, buf.len, pos};
    for (Py_ssize_t k = 0; k < nrows; k++) {
        o[k] = (uint64_t)r.i;
        PyObject *path = NULL, *entry = NULL;
        int e = one_row(&r, fk, dk, lk, &path, &entry);
        if (e == -2) goto done;
        if (e == -1) { result = Py_None; Py_INCREF(result); goto done; }
        int s = PyDict_SetItem(entries, path, entry);
        Py_DECREF(path);
        Py_DECREF(entry);
        if (s < 0) goto done;
    }
    o[nrows] = (uint64_t)r.i;
    result = Py_BuildValue("(OOn)", entries, offs, r.i);
done:
    Py_XDECREF(entries);
    Py_XDECREF(offs);
    PyBuffer_Release(&buf);
    return result;
}

static PyMethodDef methods[] = {
    {"decode_own_rows", decode_own_rows, METH_VARARGS, "Decode a cache's rows (see the module's header)."},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef module = {PyModuleDef_HEAD_INIT, "dirsync._rows", NULL, -1, methods, NULL, NULL, NULL, NULL};

/* API: what the Python side expects (scan.py / manifest.py check it): a build left over from
   an older source (an install not redone after a pull) is then ignored, not called wrongly. */
PyMODINIT_FUNC PyInit__rows(void) {
    PyObject *m = PyModule_Create(&module);
    if (m && PyModule_AddIntConstant(m, "API", 1) < 0) {
        Py_DECREF(m);
        return NULL;
    }
    return m;
}
