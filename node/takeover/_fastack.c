/* The trigger's first ACK, sent from C before any Python runs (node.takeover.fastack).
 *
 * On an idle node every Python step of the trigger's path runs cold (bench_takeover's
 * cold_call_us): the interpreter's code and data are out of the caches, ~4-10 µs a small
 * function. This module does the part of a takeover that must come first, in a few cache
 * lines: a queue reader thread waits here, in recv(MSG_PEEK) on its queue's netlink socket
 * (the interpreter lock released); for a packet that is the next in-order chunk of an armed
 * flow and matches an armed pattern, it builds the ACK that seed.first_ack would build from the
 * same state and sends it on the interface the trigger came in on, to the MAC address it came
 * from. The message stays in the socket: the binding reads it next, and the Python path takes
 * the flow over as before, told which ACK is out already.
 *
 * What is armed comes from Python, which tracks the flows (a cache of the stack's state, set
 * after every packet of a watched flow): per flow, the client's next sequence number, its
 * stream position, and the server's side of the ACK (next sequence number, window, TSval).
 * Patterns: a chunk that starts with given bytes (a detector's), or given bytes at a stream
 * offset that lie wholly in the chunk (a specific filter's). Anything else (SYN, RST, FIN, URG,
 * fragments, a packet no link socket reaches) is left to Python, which answers itself.
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>

#include <errno.h>
#include <pthread.h>
#include <stdint.h>
#include <string.h>
#include <sys/socket.h>
#include <unistd.h>

#define KEY_LEN 12
#define NO_POS UINT32_MAX
/* a whole queued packet at the largest copy range (0xFFFF) and its attributes; a packet cut
 * short by a smaller one is longer than what came, which respond leaves to Python */
#define PEEK_BYTES (65536 + 512)

/* nfnetlink_queue: a packet message and its attributes (linux/netfilter/nfnetlink_queue.h) */
#define NFQ_MSG_PACKET ((3 << 8) | 0) /* NFNL_SUBSYS_QUEUE, NFQNL_MSG_PACKET */
#define NFQA_PACKET_HDR 1
#define NFQA_IFINDEX_INDEV 5
#define NFQA_HWADDR 9
#define NFQA_PAYLOAD 10
#define NLA_TYPE_MASK 0x3FFF

#define TCP_FIN 0x01
#define TCP_SYN 0x02
#define TCP_RST 0x04
#define TCP_ACK 0x10
#define TCP_URG 0x20

typedef struct {
    uint8_t key[KEY_LEN]; /* client address, server address, client port, server port */
    uint8_t used, s_fin, ts_on;
    uint16_t window;
    uint32_t expect, pos, s_nxt, s_tsval;
} Entry;

typedef struct {
    long id;      /* the caller's name for it, returned by wait */
    int port;     /* -1: any */
    int anchored; /* 1: at stream offset `offset`; 0: at the chunk's start */
    uint32_t offset;
    Py_ssize_t len;
    uint8_t *bytes;
} Pattern;

typedef struct {
    int ifindex, fd;
    uint8_t mac[6];
} Link;

typedef struct {
    PyObject_HEAD
    pthread_mutex_t mu; /* table and patterns: readers look without the interpreter lock */
    Entry *table;
    size_t cap, n;
    Pattern *pats;
    size_t npats, cappats;
    Link *links; /* added before the first wait; read, and closed, under the mutex */
    size_t nlinks;
    int waited;
    uint32_t max_stream;
    unsigned long long answered, send_errors;
} Responder;

typedef struct {
    uint32_t id, seq, ack, window, tsval, tsecr;
    int ts_on;
    long pattern;
} Answer;

static inline uint32_t be32(const uint8_t *p) {
    return (uint32_t)p[0] << 24 | (uint32_t)p[1] << 16 | (uint32_t)p[2] << 8 | p[3];
}
static inline uint16_t be16(const uint8_t *p) { return (uint16_t)(p[0] << 8 | p[1]); }
static inline void put32(uint8_t *p, uint32_t v) {
    p[0] = v >> 24; p[1] = v >> 16; p[2] = v >> 8; p[3] = v;
}
static inline void put16(uint8_t *p, uint16_t v) { p[0] = v >> 8; p[1] = v; }

/* ---------------------------------------------------------------- the flow table */

static size_t slot_of(const Responder *r, const uint8_t *key) {
    uint64_t h = 1469598103934665603ULL; /* FNV-1a */
    for (int i = 0; i < KEY_LEN; i++)
        h = (h ^ key[i]) * 1099511628211ULL;
    return (size_t)(h ^ (h >> 29)) & (r->cap - 1);
}

static Entry *find(Responder *r, const uint8_t *key) {
    for (size_t i = slot_of(r, key);; i = (i + 1) & (r->cap - 1)) {
        Entry *e = &r->table[i];
        if (!e->used)
            return NULL;
        if (memcmp(e->key, key, KEY_LEN) == 0)
            return e;
    }
}

static int grow(Responder *r) {
    size_t old = r->cap, cap = old * 2;
    Entry *t = calloc(cap, sizeof(Entry)), *prev = r->table;
    if (t == NULL)
        return -1;
    r->table = t;
    r->cap = cap;
    for (size_t i = 0; i < old; i++) {
        if (!prev[i].used)
            continue;
        size_t j = slot_of(r, prev[i].key);
        while (t[j].used)
            j = (j + 1) & (cap - 1);
        t[j] = prev[i];
    }
    free(prev);
    return 0;
}

/* Linear probing, deletion by shifting back the entries that probed past the hole. */
static void remove_at(Responder *r, size_t i) {
    size_t mask = r->cap - 1, j = i;
    r->table[i].used = 0;
    for (;;) {
        j = (j + 1) & mask;
        if (!r->table[j].used)
            break;
        size_t k = slot_of(r, r->table[j].key);
        if (i <= j ? (i < k && k <= j) : (i < k || k <= j))
            continue; /* its home lies after the hole: it stays */
        r->table[i] = r->table[j];
        r->table[j].used = 0;
        i = j;
    }
    r->n--;
}

/* ---------------------------------------------------------------- the answer */

/* The TSval of a TCP header's timestamp option, as adapter.tcp_tsval reads it. */
static int tsval_of(const uint8_t *tcp, size_t hlen, uint32_t *out) {
    size_t i = 20;
    if (hlen - i >= 12 && tcp[i] == 1 && tcp[i + 1] == 1 && tcp[i + 2] == 8) {
        *out = be32(tcp + i + 4);
        return 1;
    }
    while (i + 1 < hlen) {
        uint8_t kind = tcp[i];
        if (kind == 0)
            break;
        if (kind == 1) {
            i++;
            continue;
        }
        uint8_t size = tcp[i + 1];
        if (size < 2)
            break;
        if (kind == 8 && size == 10 && i + 10 <= hlen) {
            *out = be32(tcp + i + 2);
            return 1;
        }
        i += size;
    }
    return 0;
}

/* The id of the first pattern the chunk matches, or -1. */
static long matches(const Responder *r, const Entry *e, int port, const uint8_t *data,
                    size_t n) {
    for (size_t i = 0; i < r->npats; i++) {
        const Pattern *p = &r->pats[i];
        if (p->port >= 0 && p->port != port)
            continue;
        if (!p->anchored) {
            if ((size_t)p->len <= n && memcmp(data, p->bytes, p->len) == 0)
                return p->id;
            continue;
        }
        uint64_t end = (uint64_t)p->offset + (uint64_t)p->len;
        if (e->pos == NO_POS || p->offset < e->pos || end > (uint64_t)e->pos + n ||
            end > r->max_stream)
            continue;
        if (memcmp(data + (p->offset - e->pos), p->bytes, p->len) == 0)
            return p->id;
    }
    return -1;
}

/* The sum of the 16-bit words of `v`, for checksums reduced modulo 0xFFFF. */
static inline uint64_t words32(uint32_t v) { return (v >> 16) + (v & 0xFFFF); }

/* Builds seed.first_ack's packet into `out` (after a 14-byte link header); its length. */
static size_t build(uint8_t *out, const uint8_t *ip, const uint8_t *tcp, const Answer *a) {
    uint8_t *p = out + 14, *t = p + 20;
    size_t len = a->ts_on ? 52 : 40;
    uint32_t saddr = be32(ip + 16), caddr = be32(ip + 12); /* from the server, to the client */
    uint16_t sport = be16(tcp + 2), cport = be16(tcp);
    uint64_t addrs = words32(saddr) + words32(caddr);
    memset(p, 0, len);
    p[0] = 0x45;
    put16(p + 2, (uint16_t)len);
    put16(p + 6, 0x4000); /* DF */
    p[8] = 64;
    p[9] = 6;
    put16(p + 10, (uint16_t)~((addrs + 0x4500 + len + 0x4000 + 0x4006) % 0xFFFF));
    put32(p + 12, saddr);
    put32(p + 16, caddr);
    put16(t, sport);
    put16(t + 2, cport);
    put32(t + 4, a->seq);
    put32(t + 8, a->ack);
    t[12] = a->ts_on ? 0x80 : 0x50;
    t[13] = TCP_ACK;
    put16(t + 14, (uint16_t)a->window);
    uint64_t sum = addrs + 6 + (len - 20) + sport + cport + words32(a->seq) +
                   words32(a->ack) + ((uint32_t)t[12] << 8 | TCP_ACK) + a->window;
    if (a->ts_on) {
        t[20] = 1; t[21] = 1; t[22] = 8; t[23] = 10;
        put32(t + 24, a->tsval);
        put32(t + 28, a->tsecr);
        sum += 0x0101 + 0x080A + words32(a->tsval) + words32(a->tsecr);
    }
    put16(t + 16, (uint16_t)~(sum % 0xFFFF));
    return len;
}

/* One peeked netlink message: 1 and `a` filled when this module answered its packet. */
static int respond(Responder *r, const uint8_t *buf, size_t n, Answer *a) {
    if (n < 20)
        return 0;
    uint32_t mlen;
    uint16_t mtype;
    memcpy(&mlen, buf, 4);
    memcpy(&mtype, buf + 4, 2);
    if (mtype != NFQ_MSG_PACKET || mlen > n || mlen < 20)
        return 0;
    const uint8_t *payload = NULL, *hw = NULL;
    size_t plen = 0;
    int have_id = 0, indev = 0;
    for (size_t off = 20; off + 4 <= mlen;) {
        uint16_t alen, atype;
        memcpy(&alen, buf + off, 2);
        memcpy(&atype, buf + off + 2, 2);
        if (alen < 4 || off + alen > mlen)
            break;
        const uint8_t *v = buf + off + 4;
        size_t vlen = alen - 4;
        switch (atype & NLA_TYPE_MASK) {
        case NFQA_PACKET_HDR:
            if (vlen >= 4) {
                a->id = be32(v);
                have_id = 1;
            }
            break;
        case NFQA_IFINDEX_INDEV:
            if (vlen >= 4)
                indev = (int)be32(v);
            break;
        case NFQA_HWADDR:
            if (vlen >= 12 && be16(v) == 6)
                hw = v + 4;
            break;
        case NFQA_PAYLOAD:
            payload = v;
            plen = vlen;
            break;
        }
        off += (alen + 3u) & ~3u;
    }
    if (!have_id || payload == NULL || hw == NULL || indev == 0)
        return 0;
    /* IPv4, TCP, whole, not a fragment; a data segment with ACK and no other flag */
    const uint8_t *ip = payload;
    if (plen < 41 || ip[0] >> 4 != 4 || ip[9] != 6 || (be16(ip + 6) & 0x3FFF) != 0)
        return 0;
    size_t ihl = (size_t)(ip[0] & 15) * 4, total = be16(ip + 2);
    if (ihl < 20 || total != plen || ihl + 20 > total)
        return 0;
    const uint8_t *tcp = ip + ihl;
    size_t doff = (size_t)(tcp[12] >> 4) * 4;
    uint8_t flags = tcp[13];
    if (doff < 20 || ihl + doff >= total || !(flags & TCP_ACK) ||
        (flags & (TCP_SYN | TCP_RST | TCP_FIN | TCP_URG)))
        return 0;
    const uint8_t *data = tcp + doff;
    size_t dlen = total - ihl - doff;
    uint8_t key[KEY_LEN];
    memcpy(key, ip + 12, 8);
    memcpy(key + 8, tcp, 4);
    uint32_t seq = be32(tcp + 4), cack = be32(tcp + 8);

    /* Held to the send: close() may not take the link's socket from under it. */
    pthread_mutex_lock(&r->mu);
    const Link *link = NULL;
    for (size_t i = 0; i < r->nlinks; i++)
        if (r->links[i].ifindex == indev)
            link = &r->links[i];
    Entry *e = link != NULL && r->n ? find(r, key) : NULL;
    long pattern = -1;
    Entry copy;
    if (e != NULL && e->expect == seq) {
        pattern = matches(r, e, be16(tcp + 2), data, dlen);
        copy = *e;
    }
    if (pattern < 0) {
        pthread_mutex_unlock(&r->mu);
        return 0;
    }

    /* seed.first_ack: the server's next sequence number (its FIN's, if it sent one), or the
     * client's acknowledgement when that is ahead; the server's last window and TSval. */
    uint32_t nxt = copy.s_nxt;
    if (!copy.s_fin && (uint32_t)(nxt - cack) >= 0x80000000u)
        nxt = cack;
    a->seq = nxt;
    a->ack = seq + (uint32_t)dlen;
    a->window = copy.window;
    a->ts_on = copy.ts_on;
    a->tsval = copy.s_tsval;
    a->tsecr = 0;
    if (copy.ts_on) {
        uint32_t ts;
        if (tsval_of(tcp, doff, &ts))
            a->tsecr = ts;
    }
    a->pattern = pattern;
    uint8_t frame[14 + 52];
    memcpy(frame, hw, 6);
    memcpy(frame + 6, link->mac, 6);
    frame[12] = 0x08;
    frame[13] = 0x00;
    size_t len = build(frame, ip, tcp, a);
    ssize_t sent = send(link->fd, frame, 14 + len, MSG_DONTWAIT);
    pthread_mutex_unlock(&r->mu);
    if (sent != (ssize_t)(14 + len)) {
        __atomic_add_fetch(&r->send_errors, 1, __ATOMIC_RELAXED);
        return 0; /* Python answers it the way it would have */
    }
    __atomic_add_fetch(&r->answered, 1, __ATOMIC_RELAXED);
    return 1;
}

/* ---------------------------------------------------------------- the Python type */

static int Responder_init(Responder *self, PyObject *args, PyObject *kw) {
    static char *names[] = {"max_stream", NULL};
    unsigned int max_stream;
    if (!PyArg_ParseTupleAndKeywords(args, kw, "I", names, &max_stream))
        return -1;
    if (self->table != NULL) {
        PyErr_SetString(PyExc_RuntimeError, "Responder is initialised already");
        return -1;
    }
    self->cap = 64;
    self->table = calloc(self->cap, sizeof(Entry));
    if (self->table == NULL) {
        PyErr_NoMemory();
        return -1;
    }
    self->max_stream = max_stream;
    pthread_mutex_init(&self->mu, NULL);
    return 0;
}

static void clear_patterns(Responder *self) {
    for (size_t i = 0; i < self->npats; i++)
        free(self->pats[i].bytes);
    self->npats = 0;
}

static void Responder_dealloc(Responder *self) {
    if (self->table != NULL) {
        clear_patterns(self);
        pthread_mutex_destroy(&self->mu);
    }
    for (size_t i = 0; i < self->nlinks; i++)
        close(self->links[i].fd);
    free(self->pats);
    free(self->links);
    free(self->table);
    Py_TYPE(self)->tp_free((PyObject *)self);
}

static int ready(Responder *self) {
    if (self->table == NULL) {
        PyErr_SetString(PyExc_RuntimeError, "Responder.__init__ was not called");
        return 0;
    }
    return 1;
}

static PyObject *Responder_add_link(Responder *self, PyObject *args) {
    int ifindex, fd;
    Py_buffer mac;
    if (!ready(self) || !PyArg_ParseTuple(args, "iiy*", &ifindex, &fd, &mac))
        return NULL;
    if (mac.len != 6) {
        PyBuffer_Release(&mac);
        return PyErr_Format(PyExc_ValueError, "a MAC address is 6 bytes, not %zd", mac.len);
    }
    if (self->waited) { /* readers look at the links without the mutex */
        PyBuffer_Release(&mac);
        PyErr_SetString(PyExc_RuntimeError, "links are added before the first wait");
        return NULL;
    }
    Link *links = realloc(self->links, (self->nlinks + 1) * sizeof(Link));
    if (links == NULL) {
        PyBuffer_Release(&mac);
        return PyErr_NoMemory();
    }
    self->links = links;
    int own = dup(fd); /* ours to close: the caller's socket may go first */
    if (own < 0) {
        PyBuffer_Release(&mac);
        return PyErr_SetFromErrno(PyExc_OSError);
    }
    links[self->nlinks] = (Link){.ifindex = ifindex, .fd = own};
    memcpy(links[self->nlinks].mac, mac.buf, 6);
    self->nlinks++;
    PyBuffer_Release(&mac);
    Py_RETURN_NONE;
}

static PyObject *add_pattern(Responder *self, long id, int port, int anchored,
                             unsigned int offset, Py_buffer *value) {
    if (value->len <= 0 || value->len > 65535) {
        PyBuffer_Release(value);
        return PyErr_Format(PyExc_ValueError, "a pattern is 1 to 65535 bytes, not %zd",
                            value->len);
    }
    uint8_t *bytes = malloc(value->len);
    if (bytes == NULL) {
        PyBuffer_Release(value);
        return PyErr_NoMemory();
    }
    memcpy(bytes, value->buf, value->len);
    pthread_mutex_lock(&self->mu);
    if (self->npats == self->cappats) {
        size_t cap = self->cappats ? self->cappats * 2 : 8;
        Pattern *p = realloc(self->pats, cap * sizeof(Pattern));
        if (p == NULL) {
            pthread_mutex_unlock(&self->mu);
            free(bytes);
            PyBuffer_Release(value);
            return PyErr_NoMemory();
        }
        self->pats = p;
        self->cappats = cap;
    }
    self->pats[self->npats++] = (Pattern){id, port, anchored, offset, value->len, bytes};
    pthread_mutex_unlock(&self->mu);
    PyBuffer_Release(value);
    Py_RETURN_NONE;
}

static PyObject *Responder_add_prefix(Responder *self, PyObject *args) {
    long id;
    int port;
    Py_buffer value;
    if (!ready(self) || !PyArg_ParseTuple(args, "liy*", &id, &port, &value))
        return NULL;
    return add_pattern(self, id, port, 0, 0, &value);
}

static PyObject *Responder_add_bytes(Responder *self, PyObject *args) {
    long id;
    int port;
    unsigned int offset;
    Py_buffer value;
    if (!ready(self) || !PyArg_ParseTuple(args, "liIy*", &id, &port, &offset, &value))
        return NULL;
    return add_pattern(self, id, port, 1, offset, &value);
}

static PyObject *Responder_remove_pattern(Responder *self, PyObject *args) {
    long id;
    if (!ready(self) || !PyArg_ParseTuple(args, "l", &id))
        return NULL;
    pthread_mutex_lock(&self->mu);
    for (size_t i = 0; i < self->npats;) {
        if (self->pats[i].id != id) {
            i++;
            continue;
        }
        free(self->pats[i].bytes);
        self->pats[i] = self->pats[--self->npats];
    }
    pthread_mutex_unlock(&self->mu);
    Py_RETURN_NONE;
}

static PyObject *Responder_arm(Responder *self, PyObject *args) {
    Py_buffer key;
    unsigned int expect, pos, s_nxt, window;
    int s_fin;
    long long ts;
    if (!ready(self) ||
        !PyArg_ParseTuple(args, "y*IIIpIL", &key, &expect, &pos, &s_nxt, &s_fin, &window, &ts))
        return NULL;
    if (key.len != KEY_LEN || window > 0xFFFF || ts > 0xFFFFFFFFLL) {
        PyBuffer_Release(&key);
        return PyErr_Format(PyExc_ValueError, "bad flow: key %zd bytes, window %u, ts %lld",
                            key.len, window, ts);
    }
    pthread_mutex_lock(&self->mu);
    Entry *e = find(self, key.buf);
    if (e == NULL) {
        if ((self->n + 1) * 2 > self->cap && grow(self) < 0) {
            pthread_mutex_unlock(&self->mu);
            PyBuffer_Release(&key);
            return PyErr_NoMemory();
        }
        size_t i = slot_of(self, key.buf);
        while (self->table[i].used)
            i = (i + 1) & (self->cap - 1);
        e = &self->table[i];
        memcpy(e->key, key.buf, KEY_LEN);
        e->used = 1;
        self->n++;
    }
    e->expect = expect;
    e->pos = pos;
    e->s_nxt = s_nxt;
    e->s_fin = (uint8_t)s_fin;
    e->window = (uint16_t)window;
    e->ts_on = ts >= 0;
    e->s_tsval = ts >= 0 ? (uint32_t)ts : 0;
    pthread_mutex_unlock(&self->mu);
    PyBuffer_Release(&key);
    Py_RETURN_NONE;
}

static PyObject *Responder_disarm(Responder *self, PyObject *args) {
    Py_buffer key;
    if (!ready(self) || !PyArg_ParseTuple(args, "y*", &key))
        return NULL;
    if (key.len == KEY_LEN) {
        pthread_mutex_lock(&self->mu);
        Entry *e = find(self, key.buf);
        if (e != NULL)
            remove_at(self, (size_t)(e - self->table));
        pthread_mutex_unlock(&self->mu);
    }
    PyBuffer_Release(&key);
    Py_RETURN_NONE;
}

static PyObject *Responder_close(Responder *self, PyObject *Py_UNUSED(unused)) {
    if (!ready(self))
        return NULL;
    pthread_mutex_lock(&self->mu); /* a reader still in respond holds it while it sends */
    for (size_t i = 0; i < self->nlinks; i++)
        close(self->links[i].fd);
    self->nlinks = 0;
    pthread_mutex_unlock(&self->mu);
    Py_RETURN_NONE;
}

static PyObject *Responder_wait(Responder *self, PyObject *args) {
    int fd, block;
    if (!ready(self) || !PyArg_ParseTuple(args, "ip", &fd, &block))
        return NULL;
    uint8_t buf[PEEK_BYTES];
    Answer a = {0};
    int answered = 0, err = 0;
    ssize_t n;
    self->waited = 1;
    Py_BEGIN_ALLOW_THREADS
    n = recv(fd, buf, sizeof buf, MSG_PEEK | (block ? 0 : MSG_DONTWAIT));
    if (n < 0)
        err = errno;
    else
        answered = respond(self, buf, (size_t)n, &a);
    Py_END_ALLOW_THREADS
    if (n < 0) {
        /* ENOBUFS: the kernel dropped messages for a full socket; the binding's read goes
         * on past it, and so does this one */
        if (err == EAGAIN || err == EWOULDBLOCK || err == EINTR || err == ENOBUFS)
            Py_RETURN_NONE;
        errno = err;
        return PyErr_SetFromErrno(PyExc_OSError);
    }
    if (!answered)
        Py_RETURN_NONE;
    if (!a.ts_on)
        return Py_BuildValue("(IlIIIOO)", a.id, a.pattern, a.seq, a.ack, a.window, Py_None,
                             Py_None);
    return Py_BuildValue("(IlIIIII)", a.id, a.pattern, a.seq, a.ack, a.window, a.tsval,
                         a.tsecr);
}

static PyObject *Responder_get_armed(Responder *self, void *Py_UNUSED(closure)) {
    return PyLong_FromSize_t(self->n);
}

static PyObject *Responder_get_answered(Responder *self, void *Py_UNUSED(closure)) {
    return PyLong_FromUnsignedLongLong(__atomic_load_n(&self->answered, __ATOMIC_RELAXED));
}

static PyObject *Responder_get_send_errors(Responder *self, void *Py_UNUSED(closure)) {
    return PyLong_FromUnsignedLongLong(__atomic_load_n(&self->send_errors, __ATOMIC_RELAXED));
}

static PyMethodDef Responder_methods[] = {
    {"add_link", (PyCFunction)Responder_add_link, METH_VARARGS,
     "add_link(ifindex, fd, mac): answers to triggers that came in on ifindex go out on the "
     "AF_PACKET socket fd (bound to it), from our MAC address mac"},
    {"add_prefix", (PyCFunction)Responder_add_prefix, METH_VARARGS,
     "add_prefix(id, port, value): a chunk to port (-1: any) that starts with value"},
    {"add_bytes", (PyCFunction)Responder_add_bytes, METH_VARARGS,
     "add_bytes(id, port, offset, value): value at stream offset, wholly in the chunk"},
    {"remove_pattern", (PyCFunction)Responder_remove_pattern, METH_VARARGS,
     "remove_pattern(id): the patterns added with that id"},
    {"arm", (PyCFunction)Responder_arm, METH_VARARGS,
     "arm(key, expect, pos, s_nxt, s_fin, window, ts): the flow's next client chunk "
     "(key: client address, server address, client port, server port) is checked at "
     "sequence number expect, stream position pos (0xFFFFFFFF: unknown); its ACK is from "
     "s_nxt (a FIN's if s_fin), window, TSval ts (-1: no timestamps)"},
    {"disarm", (PyCFunction)Responder_disarm, METH_VARARGS, "disarm(key)"},
    {"close", (PyCFunction)Responder_close, METH_NOARGS,
     "close(): the link sockets closed (nothing is answered any more)"},
    {"wait", (PyCFunction)Responder_wait, METH_VARARGS,
     "wait(fd, block) -> None or (packet id, pattern id, seq, ack, window, tsval, tsecr): peek "
     "at the next message of the queue's netlink socket fd (blocking as the socket is, unless "
     "block is false), answer it if it is an armed trigger; the message stays in the socket"},
    {NULL, NULL, 0, NULL},
};

static PyGetSetDef Responder_getset[] = {
    {"armed", (getter)Responder_get_armed, NULL, "flows armed", NULL},
    {"answered", (getter)Responder_get_answered, NULL, "triggers answered", NULL},
    {"send_errors", (getter)Responder_get_send_errors, NULL, "answers not sent", NULL},
    {NULL, NULL, NULL, NULL, NULL},
};

static PyTypeObject ResponderType = {
    PyVarObject_HEAD_INIT(NULL, 0)
    .tp_name = "node.takeover._fastack.Responder",
    .tp_basicsize = sizeof(Responder),
    .tp_flags = Py_TPFLAGS_DEFAULT,
    .tp_doc = "Armed flows and patterns; a queue reader waits in wait() (see the module)",
    .tp_new = PyType_GenericNew,
    .tp_init = (initproc)Responder_init,
    .tp_dealloc = (destructor)Responder_dealloc,
    .tp_methods = Responder_methods,
    .tp_getset = Responder_getset,
};

static struct PyModuleDef module = {
    PyModuleDef_HEAD_INIT, "_fastack",
    "The trigger's first ACK, sent from C before any Python runs.", -1, NULL, NULL, NULL, NULL,
    NULL,
};

PyMODINIT_FUNC PyInit__fastack(void) {
    if (PyType_Ready(&ResponderType) < 0)
        return NULL;
    PyObject *m = PyModule_Create(&module);
    if (m == NULL)
        return NULL;
    Py_INCREF(&ResponderType);
    if (PyModule_AddObject(m, "Responder", (PyObject *)&ResponderType) < 0) {
        Py_DECREF(&ResponderType);
        Py_DECREF(m);
        return NULL;
    }
    return m;
}
