/*
 * resolver: a small SQL Server Resolution Protocol (SSRP) responder on UDP port 1434.
 *
 * A client asks where a named database instance listens. Request datagrams start with a type
 * byte: 0x02 (broadcast) or 0x03 (unicast) ask for every instance, 0x04 is followed by a
 * NUL-terminated instance name and asks for that one, 0x0a is a keep-alive ping. A reply is
 * type 0x05, a 2-byte little-endian length, then "ServerName;...;tcp;PORT;;" text.
 *
 * Built freestanding (-nostdlib -O1): its own _start, raw syscall stubs and its own byte-loop
 * strcpy, so the whole service runs a few hundred instructions per datagram.
 *
 * BUG (deliberate, Slammer-class): lookup_instance() copies the requested name with an unbounded
 * strcpy into a 64-byte stack buffer, so a long name overwrites the saved return address.
 * This program must never be run natively; herdwall runs it only inside its emulator.
 */

#define AF_INET 2
#define SOCK_DGRAM 2
#define SSRP_PORT 1434

#define SSRP_CLNT_BCAST_EX 0x02
#define SSRP_CLNT_UCAST_EX 0x03
#define SSRP_CLNT_UCAST_INST 0x04
#define SSRP_CLNT_PING 0x0a
#define SSRP_SVR_RESP 0x05

typedef unsigned long size_t;

struct sockaddr_in {
    unsigned short sin_family;
    unsigned short sin_port; /* network byte order */
    unsigned int sin_addr;   /* network byte order */
    unsigned char sin_zero[8];
};

/* Raw syscall stubs (x86-64 Linux ABI: number in eax, 4th argument in r10, not rcx).
 * No .p2align: keeping them packed after _start gives addresses without a zero low byte. */
__asm__(
    ".text\n"
    ".globl _start\n"
    "_start:\n"
    "    xor %ebp, %ebp\n"
    "    and $-16, %rsp\n"
    "    call main\n"
    "    mov %eax, %edi\n"
    "    jmp sys_exit\n"
    ".globl sys_socket\n"
    "sys_socket:\n"
    "    mov $41, %eax\n"
    "    syscall\n"
    "    ret\n"
    ".globl sys_bind\n"
    "sys_bind:\n"
    "    mov $49, %eax\n"
    "    syscall\n"
    "    ret\n"
    ".globl sys_recvfrom\n"
    "sys_recvfrom:\n"
    "    mov %rcx, %r10\n"
    "    mov $45, %eax\n"
    "    syscall\n"
    "    ret\n"
    ".globl sys_sendto\n"
    "sys_sendto:\n"
    "    mov %rcx, %r10\n"
    "    mov $44, %eax\n"
    "    syscall\n"
    "    ret\n"
    ".globl sys_exit\n"
    "sys_exit:\n"
    "    mov $60, %eax\n"
    "    syscall\n"
    "    hlt\n");

long sys_socket(long domain, long type, long protocol);
long sys_bind(long fd, const void *addr, long len);
long sys_recvfrom(long fd, void *buf, size_t len, long flags, void *addr, unsigned int *alen);
long sys_sendto(long fd, const void *buf, size_t len, long flags, const void *addr,
                unsigned int alen);
__attribute__((noreturn)) void sys_exit(long status);

struct instance {
    const char *name;
    const char *port;
    const char *version;
};

static const char server_name[] = "HERDDB01";

static const struct instance instances[] = {
    {"MSSQLSERVER", "1433", "8.00.194"},
    {"SQLEXPRESS", "1533", "8.00.534"},
    {"REPORTING", "1633", "8.00.760"},
    {"ARCHIVE", "1733", "8.00.818"},
};
#define N_INSTANCES (sizeof instances / sizeof instances[0])

static unsigned char pkt[2048];  /* one datagram in */
static unsigned char reply[1024]; /* one datagram out */

/* The C library's strcpy, as such freestanding servers carry it: no bound. */
__attribute__((noinline)) char *strcpy(char *dst, const char *src)
{
    char *d = dst;
    while ((*d++ = *src++) != '\0')
        ;
    return dst;
}

static int lower(int c)
{
    return c >= 'A' && c <= 'Z' ? c + ('a' - 'A') : c;
}

/* Instance names are case-insensitive in SSRP. */
static int name_eq(const char *a, const char *b)
{
    while (*a && lower(*a) == lower(*b)) {
        a++;
        b++;
    }
    return *a == *b || lower(*a) == lower(*b);
}

/* Appends s at p without going past end; the reply buffer is never overrun. */
static unsigned char *append(unsigned char *p, const unsigned char *end, const char *s)
{
    while (*s && p < end)
        *p++ = (unsigned char)*s++;
    return p;
}

static unsigned char *append_instance(unsigned char *p, const unsigned char *end,
                                      const struct instance *in)
{
    p = append(p, end, "ServerName;");
    p = append(p, end, server_name);
    p = append(p, end, ";InstanceName;");
    p = append(p, end, in->name);
    p = append(p, end, ";IsClustered;No;Version;");
    p = append(p, end, in->version);
    p = append(p, end, ";tcp;");
    p = append(p, end, in->port);
    p = append(p, end, ";;");
    return p;
}

/* Writes the SVR_RESP header for a body that ends at p; returns the datagram length. */
static long finish_reply(unsigned char *p)
{
    long body = p - (reply + 3);
    reply[0] = SSRP_SVR_RESP;
    reply[1] = (unsigned char)(body & 0xff);
    reply[2] = (unsigned char)(body >> 8);
    return body + 3;
}

/* Answers CLNT_UCAST_INST: the instance whose name follows the type byte, or nothing. */
__attribute__((noinline)) long lookup_instance(const char *requested)
{
    char name[64];
    unsigned long i;

    strcpy(name, requested); /* BUG: no length check (Slammer-class overflow) */
    for (i = 0; i < N_INSTANCES; i++) {
        if (name_eq(name, instances[i].name)) {
            unsigned char *p = append_instance(reply + 3, reply + sizeof reply, &instances[i]);
            return finish_reply(p);
        }
    }
    return 0; /* SSRP stays silent about instances it does not have */
}

static long list_instances(void)
{
    unsigned char *p = reply + 3;
    unsigned long i;

    for (i = 0; i < N_INSTANCES; i++)
        p = append_instance(p, reply + sizeof reply, &instances[i]);
    return finish_reply(p);
}

static long handle(long n)
{
    switch (pkt[0]) {
    case SSRP_CLNT_BCAST_EX:
    case SSRP_CLNT_UCAST_EX:
        return list_instances();
    case SSRP_CLNT_UCAST_INST:
        return n > 1 ? lookup_instance((const char *)pkt + 1) : 0;
    case SSRP_CLNT_PING:
        reply[0] = SSRP_CLNT_PING;
        return 1;
    default:
        return 0;
    }
}

int main(void)
{
    struct sockaddr_in addr = {0};
    long fd = sys_socket(AF_INET, SOCK_DGRAM, 0);

    if (fd < 0)
        sys_exit(1);
    addr.sin_family = AF_INET;
    addr.sin_port = (unsigned short)((SSRP_PORT >> 8) | ((SSRP_PORT & 0xff) << 8));
    if (sys_bind(fd, &addr, sizeof addr) < 0)
        sys_exit(1);
    for (;;) {
        struct sockaddr_in peer;
        unsigned int plen = sizeof peer;
        long n = sys_recvfrom(fd, pkt, sizeof pkt - 1, 0, &peer, &plen);
        long len;

        if (n <= 0)
            continue;
        pkt[n] = 0; /* a name cut off by the datagram's end still ends in a NUL */
        len = handle(n);
        if (len > 0)
            sys_sendto(fd, reply, (size_t)len, 0, &peer, plen);
    }
}
