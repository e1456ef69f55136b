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

/* -- encoding: msgpack as msgpack.Packer(use_bin_type=True) packs manifest.encode_rows's rows -- */

typedef struct {
    char *p;
    Py_ssize_t n, cap;
} Out;

static int out_room(Out *o, Py_ssize_t k) {
    if (o->n + k <= o->cap) return 0;
    Py_ssize_t cap = (o->n + k) * 2;
    char *q = PyMem_Realloc(o->p, (size_t)cap);
    if (!q) { PyErr_NoMemory(); return -2; }
    o->p = q;
    o->cap = cap;
    return 0;
}

static int out_put(Out *o, const void *s, Py_ssize_t k) {
    if (out_room(o, k)) return -2;
    memcpy(o->p + o->n, s, (size_t)k);
    o->n += k;
    return 0;
}

static int out_be(Out *o, unsigned char tag, uint64_t v, int width) {
    unsigned char b[9] = {tag};
    for (int k = 0; k < width; k++) b[1 + k] = (unsigned char)(v >> (8 * (width - 1 - k)));
    return out_put(o, b, 1 + width);
}

/* msgpack's int encoding: the smallest form, unsigned for positive values. */
static int out_ll(Out *o, long long d) {
    if (d < -(1LL << 5)) {
        if (d < -(1LL << 15)) return d < -(1LL << 31) ? out_be(o, 0xd3, (uint64_t)d, 8) : out_be(o, 0xd2, (uint64_t)d, 4);
        return d < -(1 << 7) ? out_be(o, 0xd1, (uint64_t)d, 2) : out_be(o, 0xd0, (uint64_t)d, 1);
    }
    if (d < (1 << 7)) { unsigned char c = (unsigned char)d; return out_put(o, &c, 1); }
    return d < (1LL << 16) ? (d < (1 << 8) ? out_be(o, 0xcc, (uint64_t)d, 1) : out_be(o, 0xcd, (uint64_t)d, 2))
                           : (d < (1LL << 32) ? out_be(o, 0xce, (uint64_t)d, 4) : out_be(o, 0xcf, (uint64_t)d, 8));
}

/* An int (not a bool: the caller tells them apart); -1 when it is not one msgpack packs. */
static int out_int(Out *o, PyObject *v) {
    if (!PyLong_CheckExact(v)) return -1;
    int over = 0;
    long long d = PyLong_AsLongLongAndOverflow(v, &over);
    if (d == -1 && PyErr_Occurred()) return -2;
    if (!over) return out_ll(o, d);
    if (over < 0) return -1;
    unsigned long long u = PyLong_AsUnsignedLongLong(v);
    if (u == (unsigned long long)-1 && PyErr_Occurred()) { PyErr_Clear(); return -1; }
    return out_be(o, 0xcf, u, 8);
}

static int out_bin_head(Out *o, Py_ssize_t k) {  /* a bin of k bytes follows */
    return k < 256 ? out_be(o, 0xc4, (uint64_t)k, 1) : k < 65536 ? out_be(o, 0xc5, (uint64_t)k, 2)
                                                      : out_be(o, 0xc6, (uint64_t)k, 4);
}

static int out_bin(Out *o, const char *s, Py_ssize_t k) {
    int e = out_bin_head(o, k);
    return e ? e : out_put(o, s, k);
}

static int out_bytes(Out *o, PyObject *v) {
    if (!PyBytes_CheckExact(v) || PyBytes_GET_SIZE(v) > 0xffffffffLL) return -1;
    return out_bin(o, PyBytes_AS_STRING(v), PyBytes_GET_SIZE(v));
}

static int out_path(Out *o, PyObject *v) {  /* v.encode(fs encoding, "surrogateescape") as bin */
    if (!PyUnicode_CheckExact(v)) return -1;
    if (PyUnicode_IS_ASCII(v))
        return out_bin(o, (const char *)PyUnicode_DATA(v), PyUnicode_GET_LENGTH(v));
    PyObject *b = PyUnicode_EncodeFSDefault(v);
    if (!b) return -2;
    int e = out_bin(o, PyBytes_AS_STRING(b), PyBytes_GET_SIZE(b));
    Py_DECREF(b);
    return e;
}

static int out_array(Out *o, Py_ssize_t k) {
    if (k < 16) { unsigned char c = (unsigned char)(0x90 | k); return out_put(o, &c, 1); }
    return k < 65536 ? out_be(o, 0xdc, (uint64_t)k, 2) : out_be(o, 0xdd, (uint64_t)k, 4);
}

/* A file's chunk sizes as encode_rows(packed=True) leaves them: packed bytes as they are; a
   tuple of ints as pack_sizes packs it (uint16s, else uint32s), or as an array of ints when
   one does not fit 32 bits. */
static int out_sizes(Out *o, PyObject *v) {
    if (PyBytes_CheckExact(v)) return out_bytes(o, v);
    if (!PyTuple_CheckExact(v)) return -1;
    Py_ssize_t k = PyTuple_GET_SIZE(v);
    unsigned long long most = 0;
    int fits = 1;
    for (Py_ssize_t j = 0; j < k; j++) {
        PyObject *x = PyTuple_GET_ITEM(v, j);
        if (!PyLong_CheckExact(x)) return -1;
        int over = 0;
        long long d = PyLong_AsLongLongAndOverflow(x, &over);
        if (d == -1 && PyErr_Occurred()) return -2;
        if (over || d < 0 || d > 0xffffffffLL) fits = 0;
        else if ((unsigned long long)d > most) most = (unsigned long long)d;
    }
    if (!fits) {
        int e = out_array(o, k);
        for (Py_ssize_t j = 0; !e && j < k; j++) e = out_int(o, PyTuple_GET_ITEM(v, j));
        return e;
    }
    int w = most <= 0xffff ? 2 : 4;
    int e = out_bin_head(o, w * k);
    if (e || out_room(o, w * k)) return e ? e : -2;
    for (Py_ssize_t j = 0; j < k; j++) {  /* little-endian, as struct's "<H" / "<I" */
        unsigned long long x = (unsigned long long)PyLong_AsLongLong(PyTuple_GET_ITEM(v, j));
        for (int b = 0; b < w; b++) o->p[o->n++] = (char)(x >> (8 * b));
    }
    return 0;
}

static int out_slot(Out *o, PyObject *kind, PyObject *e, Py_ssize_t k, int (*put)(Out *, PyObject *)) {
    PyObject *d = PyTuple_GET_ITEM(PyTuple_GET_ITEM(kind, 1), k);
    PyObject *v = Py_TYPE(d)->tp_descr_get(d, e, (PyObject *)Py_TYPE(e));
    if (!v) return -2;
    int r = put(o, v);
    Py_DECREF(v);
    return r;
}

static int out_trusted(Out *o, PyObject *v) {
    if (v == Py_True || v == Py_False) { unsigned char c = v == Py_True ? 0xc3 : 0xc2; return out_put(o, &c, 1); }
    return out_int(o, v);
}

/* encode_own_rows(entries, file_kind, dir_kind, link_kind, base): the rows msgpack packs of
   manifest.encode_rows(entries, packed=True), concatenated, and their offsets (bytes: n + 1
   native uint64, from `base`: where each row starts, where the last ends); None when an entry
   is not one it encodes as Python would (another class or type, an int beyond 64 bits): the
   caller encodes in Python then, which raises where it should. */
static PyObject *encode_own_rows(PyObject *self, PyObject *args) {
    PyObject *entries, *fk, *dk, *lk;
    unsigned long long base;
    if (!PyArg_ParseTuple(args, "O!OOOK", &PyList_Type, &entries, &fk, &dk, &lk, &base))
        return NULL;
    if (check_kind(fk, 11) || check_kind(dk, 3) || check_kind(lk, 3)) return NULL;
    Py_ssize_t n = PyList_GET_SIZE(entries);
    Out o = {NULL, 0, 0};
    PyObject *offs = PyBytes_FromStringAndSize(NULL, (n + 1) * (Py_ssize_t)sizeof(uint64_t)), *result = NULL;
    if (!offs || out_room(&o, 64 * (n + 1))) goto done;
    uint64_t *of = (uint64_t *)PyBytes_AS_STRING(offs);
    for (Py_ssize_t i = 0; i < n; i++) {
        PyObject *e = PyList_GET_ITEM(entries, i);
        PyObject *cls = (PyObject *)Py_TYPE(e);
        of[i] = base + (uint64_t)o.n;
        int r;
        if (cls == PyTuple_GET_ITEM(fk, 0)) {
            /* (0, path, size, mode, mtime_ns, digest, avg, sizes, digests, ino, ctime_ns, trusted) */
            r = out_array(&o, 12);
            if (!r) r = out_ll(&o, 0);
            if (!r) r = out_slot(&o, fk, e, 0, out_path);
            for (Py_ssize_t k = 1; !r && k < 11; k++)
                r = out_slot(&o, fk, e, k, k == 4 || k == 7 ? out_bytes : k == 6 ? out_sizes : k == 10 ? out_trusted
                                                                                                 : out_int);
        } else if (cls == PyTuple_GET_ITEM(dk, 0)) {  /* (1, path, mode, mtime_ns) */
            r = out_array(&o, 4);
            if (!r) r = out_ll(&o, 1);
            if (!r) r = out_slot(&o, dk, e, 0, out_path);
            if (!r) r = out_slot(&o, dk, e, 1, out_int);
            if (!r) r = out_slot(&o, dk, e, 2, out_int);
        } else if (cls == PyTuple_GET_ITEM(lk, 0)) {  /* (2, path, target, mtime_ns) */
            r = out_array(&o, 4);
            if (!r) r = out_ll(&o, 2);
            if (!r) r = out_slot(&o, lk, e, 0, out_path);
            if (!r) r = out_slot(&o, lk, e, 1, out_path);
            if (!r) r = out_slot(&o, lk, e, 2, out_int);
        } else {
            r = -1;
        }
        if (r == -2) goto done;
        if (r == -1) { result = Py_None; Py_INCREF(result); goto done; }
    }
    of[n] = base + (uint64_t)o.n;
    {
        PyObject *body = PyBytes_FromStringAndSize(o.p, o.n);
        if (body) result = Py_BuildValue("(NO)", body, offs);
    }
done:
    PyMem_Free(o.p);
    Py_XDECREF(offs);
    return result;
}

static PyMethodDef methods[] = {
    {"decode_own_rows", decode_own_rows, METH_VARARGS, "Decode a cache's rows (see the module's header)."},
    {"encode_own_rows", encode_own_rows, METH_VARARGS, "Encode a cache's rows (see there)."},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef module = {PyModuleDef_HEAD_INIT, "dirsync._rows", NULL, -1, methods, NULL, NULL, NULL, NULL};

/* API: what the Python side expects (scan.py / manifest.py check it): a build left over from
   an older source (an install not redone after a pull) is then ignored, not called wrongly. */
PyMODINIT_FUNC PyInit__rows(void) {
    PyObject *m = PyModule_Create(&module);
    if (m && PyModule_AddIntConstant(m, "API", 2) < 0) {
        Py_DECREF(m);
        return NULL;
    }
    return m;
}
