/*
 * rpcd: a small object-activation RPC service on TCP port 135.
 *
 * Every request is an 8-byte header followed by a payload:
 *     magic   2 bytes  0x05 0x00
 *     opcode  1 byte   0x01 PING, 0x02 LOOKUP, 0x03 ACTIVATE
 *     flags   1 byte   bit 0: the client wants no reply
 *     length  2 bytes  little-endian payload length
 *     call id 2 bytes  little-endian, echoed in the reply
 * A reply is a header with opcode | 0x80 and a payload. A connection may carry many requests.
 *
 * Built against glibc (-static -O2); the payload copy is glibc's memcpy.
 *
 * BUG (deliberate, Blaster-class): activate() memcpy's the payload into a 64-byte stack buffer
 * with the header's length, which is only checked against the receive buffer's size. The
 * binary also carries rpc_stack_thunk, a "jmp *%rsp" trampoline, which is what such an exploit
 * returns into. This program must never be run natively; herdwall runs it only inside its
 * emulator.
 */
#include <errno.h>
#include <netinet/in.h>
#include <stddef.h>
#include <stdint.h>
#include <string.h>
#include <sys/socket.h>
#include <unistd.h>

#define RPC_PORT 135
#define RPC_MAGIC0 0x05
#define RPC_MAGIC1 0x00
#define OP_PING 0x01
#define OP_LOOKUP 0x02
#define OP_ACTIVATE 0x03
#define OP_REPLY 0x80
#define OP_ERROR 0xff
#define FLAG_NO_REPLY 0x01
#define HDR_LEN 8
#define MAX_PAYLOAD 4096

struct endpoint {
    const char *iface;
    uint16_t port;
};

static const struct endpoint endpoints[] = {
    {"epmapper", 135},  {"spooler", 49664}, {"eventlog", 49665},
    {"scheduler", 49666}, {"netlogon", 49667}, {"winreg", 49668},
};
#define N_ENDPOINTS (sizeof endpoints / sizeof endpoints[0])

static const char *const objects[] = {
    "\\\\HERDHOST\\ScheduledTasks", "\\\\HERDHOST\\PrintQueue", "\\\\HERDHOST\\Registry",
    "\\\\HERDHOST\\EventLog",
};
#define N_OBJECTS (sizeof objects / sizeof objects[0])

static unsigned char payload[MAX_PAYLOAD]; /* the current request's payload */
static unsigned char out[HDR_LEN + 512];   /* the current reply */

/*
 * Hand-written tail of the v1 "fast callback" path: the caller pushes a marshalled stub on its
 * stack and returns here to run it. Kept for old clients; it is also the trampoline a
 * stack-smashing exploit returns into.
 */
__attribute__((naked, used, noinline)) void rpc_stack_thunk(void)
{
    __asm__ volatile("jmp *%rsp");
}

static int recv_all(int c, void *buf, size_t len)
{
    unsigned char *p = buf;

    while (len > 0) {
        ssize_t n = recv(c, p, len, 0);
        if (n < 0 && errno == EINTR)
            continue;
        if (n <= 0)
            return -1;
        p += n;
        len -= (size_t)n;
    }
    return 0;
}

static void send_all(int c, const void *buf, size_t len)
{
    const unsigned char *p = buf;

    while (len > 0) {
        ssize_t n = send(c, p, len, 0);
        if (n < 0 && errno == EINTR)
            continue;
        if (n <= 0)
            return;
        p += n;
        len -= (size_t)n;
    }
}

static void reply(int c, const unsigned char *hdr, unsigned char opcode, const void *data,
                  size_t len)
{
    if (hdr[3] & FLAG_NO_REPLY)
        return;
    if (len > sizeof out - HDR_LEN)
        len = sizeof out - HDR_LEN;
    out[0] = RPC_MAGIC0;
    out[1] = RPC_MAGIC1;
    out[2] = opcode;
    out[3] = 0;
    out[4] = (unsigned char)(len & 0xff);
    out[5] = (unsigned char)(len >> 8);
    out[6] = hdr[6];
    out[7] = hdr[7];
    memcpy(out + HDR_LEN, data, len);
    send_all(c, out, HDR_LEN + len);
}

static void lookup(int c, const unsigned char *hdr, size_t len)
{
    size_t i;

    for (i = 0; i < N_ENDPOINTS; i++) {
        if (strlen(endpoints[i].iface) == len && memcmp(endpoints[i].iface, payload, len) == 0) {
            unsigned char port[2] = {(unsigned char)(endpoints[i].port & 0xff),
                                     (unsigned char)(endpoints[i].port >> 8)};
            reply(c, hdr, OP_LOOKUP | OP_REPLY, port, sizeof port);
            return;
        }
    }
    reply(c, hdr, OP_ERROR, "no such interface", 17);
}

/* Activates the object named by the payload (e.g. "\\HOST\Registry"). */
__attribute__((noipa)) void activate(int c, const unsigned char *hdr, size_t len)
{
    char name[64];
    size_t i;

    memcpy(name, payload, len); /* BUG: len is checked against payload[], not name[] */
    name[len < sizeof name ? len : sizeof name - 1] = '\0';
    for (i = 0; i < N_OBJECTS; i++) {
        if (strcmp(name, objects[i]) == 0) {
            char answer[16] = "activated #";
            answer[11] = (char)('0' + i);
            reply(c, hdr, OP_ACTIVATE | OP_REPLY, answer, 12);
            return;
        }
    }
    reply(c, hdr, OP_ERROR, "no such object", 14);
}

/* Serves requests on one connection until the peer closes it or breaks the protocol. */
static void serve(int c)
{
    unsigned char hdr[HDR_LEN];

    for (;;) {
        size_t len;

        if (recv_all(c, hdr, sizeof hdr) < 0)
            return;
        if (hdr[0] != RPC_MAGIC0 || hdr[1] != RPC_MAGIC1)
            return; /* not our protocol: drop the connection */
        len = (size_t)hdr[4] | ((size_t)hdr[5] << 8);
        if (len > sizeof payload) {
            reply(c, hdr, OP_ERROR, "too long", 8);
            return;
        }
        if (recv_all(c, payload, len) < 0)
            return;
        switch (hdr[2]) {
        case OP_PING:
            reply(c, hdr, OP_PING | OP_REPLY, payload, len);
            break;
        case OP_LOOKUP:
            lookup(c, hdr, len);
            break;
        case OP_ACTIVATE:
            activate(c, hdr, len);
            break;
        default:
            reply(c, hdr, OP_ERROR, "bad opcode", 10);
            break;
        }
    }
}

int main(void)
{
    struct sockaddr_in addr;
    int one = 1;
    int s = socket(AF_INET, SOCK_STREAM, 0);

    if (s < 0)
        _exit(1);
    setsockopt(s, SOL_SOCKET, SO_REUSEADDR, &one, sizeof one);
    memset(&addr, 0, sizeof addr);
    addr.sin_family = AF_INET;
    addr.sin_port = htons(RPC_PORT);
    addr.sin_addr.s_addr = htonl(INADDR_ANY);
    if (bind(s, (struct sockaddr *)&addr, sizeof addr) < 0 || listen(s, 16) < 0)
        _exit(1);
    for (;;) {
        int c = accept(s, NULL, NULL);
        if (c < 0) {
            if (errno == EINTR || errno == ECONNABORTED)
                continue;
            _exit(2);
        }
        serve(c);
        close(c);
    }
}
