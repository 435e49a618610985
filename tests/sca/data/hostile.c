/*
 * hostile: a test-only UDP service (port 9999) that misbehaves on request, to check that the
 * sandbox's budgets hold. The first byte of a datagram picks the behaviour:
 *
 *   'E'  echo the datagram back (the well-behaved case)
 *   'L'  spin forever without a syscall (instruction budget)
 *   'Y'  call sched_yield forever (wall-time budget: every syscall checks the deadline)
 *   'M'  grow the heap with brk, then mmap, 64 KiB at a time, touching every page, until the
 *        kernel refuses; answer "M <brk bytes> <mmap bytes> <mmap errno>" and carry on
 *   'P'  take the largest heap brk grants (one brk call per halving), then touch every page of
 *        it without making another syscall until done; answer "P <bytes>"
 *   'F'  fork and execve("/bin/sh") forever (a process-creation storm)
 *   'U'  make unknown syscalls (numbers 1000..1003 and 335); answer their results
 *   'D'  open sockets until the kernel refuses; answer "D <count> <errno>"
 *   'R'  recurse without end (the stack runs out)
 *   'W'  send forever (the sandbox keeps a bounded record)
 *   'N'  call a NULL function pointer (a crash: fetch from address 0)
 *
 * Built freestanding (-nostdlib, own _start and syscall stub) by build.sh. It must never be run
 * natively; tests run it only inside herdwall's emulator (sca.emu).
 */

typedef unsigned long size_t;

__asm__(
    ".text\n"
    ".globl _start\n"
    "_start:\n"
    "    xor %ebp, %ebp\n"
    "    and $-16, %rsp\n"
    "    call main\n"
    "    mov %eax, %edi\n"
    "    mov $60, %eax\n"
    "    syscall\n"
    "    hlt\n"
    ".globl sc\n"
    "sc:\n" /* long sc(nr, a, b, c, d, e, f): the x86-64 syscall ABI */
    "    mov %rdi, %rax\n"
    "    mov %rsi, %rdi\n"
    "    mov %rdx, %rsi\n"
    "    mov %rcx, %rdx\n"
    "    mov %r8, %r10\n"
    "    mov %r9, %r8\n"
    "    mov 8(%rsp), %r9\n"
    "    syscall\n"
    "    ret\n");

long sc(long nr, long a, long b, long c, long d, long e, long f);

#define SYS_SENDTO 44
#define SYS_RECVFROM 45
#define SYS_SOCKET 41
#define SYS_BIND 49
#define SYS_BRK 12
#define SYS_MMAP 9
#define SYS_FORK 57
#define SYS_EXECVE 59
#define SYS_SCHED_YIELD 24

struct sockaddr_in {
    unsigned short sin_family;
    unsigned short sin_port;
    unsigned int sin_addr;
    unsigned char sin_zero[8];
};

static unsigned char pkt[2048];
static char out[256];
static struct sockaddr_in peer;
static unsigned int peer_len;
static int sock;
volatile unsigned long sink;
void (*volatile null_fn)(void);

static char *put_str(char *p, const char *s)
{
    while (*s)
        *p++ = *s++;
    return p;
}

static char *put_num(char *p, long v)
{
    char tmp[24];
    int n = 0;
    if (v < 0) {
        *p++ = '-';
        v = -v;
    }
    do {
        tmp[n++] = (char)('0' + v % 10);
        v /= 10;
    } while (v);
    while (n)
        *p++ = tmp[--n];
    return p;
}

static void answer(const void *buf, long n)
{
    sc(SYS_SENDTO, sock, (long)buf, n, 0, (long)&peer, sizeof peer);
}

static void answer_text(char *end)
{
    answer(out, end - out);
}

static void grow_memory(void)
{
    const long step = 64 * 1024;
    long base = sc(SYS_BRK, 0, 0, 0, 0, 0, 0);
    long cur = base;
    for (;;) {
        long want = cur + step;
        long got = sc(SYS_BRK, want, 0, 0, 0, 0, 0);
        if (got != want)
            break;
        for (long a = cur; a < want; a += 4096)
            *(volatile char *)a = 1;
        cur = want;
    }
    long mapped = 0, err = 0;
    for (;;) {
        /* mmap(NULL, step, PROT_READ|PROT_WRITE, MAP_PRIVATE|MAP_ANONYMOUS, -1, 0) */
        long a = sc(SYS_MMAP, 0, step, 3, 0x22, -1, 0);
        if (a < 0 && a > -4096) {
            err = -a;
            break;
        }
        for (long p = a; p < a + step; p += 4096)
            *(volatile char *)p = 1;
        mapped += step;
    }
    char *p = put_str(out, "M ");
    p = put_num(p, cur - base);
    p = put_str(p, " ");
    p = put_num(p, mapped);
    p = put_str(p, " ");
    p = put_num(p, err);
    answer_text(p);
}

static void touch_heap(void)
{
    long base = sc(SYS_BRK, 0, 0, 0, 0, 0, 0);
    long size = 1L << 30;
    while (size >= 4096 && sc(SYS_BRK, base + size, 0, 0, 0, 0, 0) != base + size)
        size /= 2;
    if (size < 4096)
        size = 0;
    for (long a = base; a < base + size; a += 4096)
        *(volatile char *)a = 1;
    char *p = put_str(out, "P ");
    p = put_num(p, size);
    answer_text(p);
}

static void storm(void)
{
    static char sh[] = "/bin/sh";
    static char *argv[] = {sh, 0};
    for (;;) {
        sc(SYS_FORK, 0, 0, 0, 0, 0, 0);
        sc(SYS_EXECVE, (long)sh, (long)argv, 0, 0, 0, 0);
    }
}

static void unknown_syscalls(void)
{
    static const long numbers[] = {1000, 1001, 1002, 1003, 335};
    char *p = put_str(out, "U");
    for (unsigned i = 0; i < sizeof numbers / sizeof numbers[0]; i++) {
        p = put_str(p, " ");
        p = put_num(p, sc(numbers[i], 1, 2, 3, 4, 5, 6));
    }
    answer_text(p);
}

static void many_sockets(void)
{
    long count = 0, r;
    for (;;) {
        r = sc(SYS_SOCKET, 2, 2, 0, 0, 0, 0);
        if (r < 0)
            break;
        count++;
    }
    char *p = put_str(out, "D ");
    p = put_num(p, count);
    p = put_str(p, " ");
    p = put_num(p, -r);
    answer_text(p);
}

#pragma GCC diagnostic ignored "-Winfinite-recursion"
__attribute__((noinline)) unsigned long recurse(unsigned long n)
{
    volatile char pad[256];
    pad[0] = (char)n;
    return recurse(n + 1) + pad[0];
}

int main(void)
{
    struct sockaddr_in addr = {2, (unsigned short)((9999 >> 8) | ((9999 & 0xff) << 8)), 0, {0}};
    sock = (int)sc(SYS_SOCKET, 2, 2, 0, 0, 0, 0);
    if (sock < 0 || sc(SYS_BIND, sock, (long)&addr, sizeof addr, 0, 0, 0) < 0)
        return 1;
    for (;;) {
        peer_len = sizeof peer;
        long n = sc(SYS_RECVFROM, sock, (long)pkt, sizeof pkt, 0, (long)&peer, (long)&peer_len);
        if (n <= 0)
            continue;
        switch (pkt[0]) {
        case 'E':
            answer(pkt, n);
            break;
        case 'L':
            for (;;)
                sink++;
        case 'Y':
            for (;;)
                sc(SYS_SCHED_YIELD, 0, 0, 0, 0, 0, 0);
        case 'M':
            grow_memory();
            break;
        case 'P':
            touch_heap();
            break;
        case 'F':
            storm();
            break;
        case 'U':
            unknown_syscalls();
            break;
        case 'D':
            many_sockets();
            break;
        case 'R':
            sink = recurse(0);
            break;
        case 'N':
            null_fn();
            break;
        case 'W':
            for (;;)
                answer(pkt, n);
        default:
            break;
        }
    }
}
