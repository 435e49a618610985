/*
 * mgmtd: a small host-management service on TCP port 7070, line based.
 *
 *     PING                 -> "PONG"
 *     HELP                 -> the command list
 *     RUN <command> [tag]  -> runs a fixed, allow-listed command ("status", "uptime", "disk",
 *                             "who"); the optional tag is the client's job label, echoed back
 *     QUIT                 -> closes the connection
 *
 * RUN works like an inetd handler: it calls execve directly with the command's fixed path,
 * argv and environment (never request bytes). When execve fails, the service answers an error
 * and goes on with the next line.
 *
 * Built against glibc (-static -O2), using glibc's strcpy.
 *
 * BUG (deliberate, function-argument class): run() keeps the job in
 * struct job { char tag[32]; char path[64]; } and strcpy's the tag after filling in the path, so
 * a tag of 32 bytes or more spills into path: request bytes become execve's path.
 * This program must never be run natively; herdwall runs it only inside its emulator.
 */
#include <errno.h>
#include <netinet/in.h>
#include <stddef.h>
#include <string.h>
#include <sys/socket.h>
#include <unistd.h>

#define MGMT_PORT 7070
#define MAX_LINE 512

struct command {
    const char *name;
    const char *path;
    const char *const *argv;
};

struct job {
    char tag[32];
    char path[64];
};

static const char *const status_argv[] = {"uname", "-a", NULL};
static const char *const uptime_argv[] = {"uptime", NULL};
static const char *const disk_argv[] = {"df", "-h", "/", NULL};
static const char *const who_argv[] = {"who", NULL};
static const char *const run_env[] = {"PATH=/usr/bin:/bin", "LC_ALL=C", NULL};

static const struct command commands[] = {
    {"status", "/bin/uname", status_argv},
    {"uptime", "/usr/bin/uptime", uptime_argv},
    {"disk", "/bin/df", disk_argv},
    {"who", "/usr/bin/who", who_argv},
};
#define N_COMMANDS (sizeof commands / sizeof commands[0])

static const char help_text[] =
    "commands: PING, HELP, QUIT, RUN <status|uptime|disk|who> [tag]\n";

static char line[MAX_LINE + 1]; /* bytes received and not yet handled */
static size_t line_len;
static char out[1024];

static void send_all(int c, const char *buf, size_t len)
{
    while (len > 0) {
        ssize_t n = send(c, buf, len, 0);
        if (n < 0 && errno == EINTR)
            continue;
        if (n <= 0)
            return;
        buf += n;
        len -= (size_t)n;
    }
}

/* Sends the concatenation of up to three strings (any may be NULL) as one reply. */
static void say(int c, const char *a, const char *b, const char *d)
{
    char *p = out, *end = out + sizeof out - 1;
    const char *parts[3] = {a, b, d};
    size_t i;

    for (i = 0; i < 3; i++) {
        size_t n = parts[i] ? strlen(parts[i]) : 0;
        if (n > (size_t)(end - p))
            n = (size_t)(end - p);
        memcpy(p, parts[i], n);
        p += n;
    }
    send_all(c, out, (size_t)(p - out));
}

/* Runs one allow-listed command for a client; returns only if execve failed. */
__attribute__((noipa)) void run(int c, const struct command *cmd, const char *tag)
{
    struct job job;

    strcpy(job.path, cmd->path);
    strcpy(job.tag, tag); /* BUG: no length check; a long tag runs on into job.path */
    say(c, "OK ", job.tag, " started\n");
    execve(job.path, (char *const *)cmd->argv, (char *const *)run_env);
    say(c, "ERR ", job.tag, " exec failed\n");
}

/* Handles one request line (without its line end); returns 0 to close the connection. */
static int handle_line(int c, char *req)
{
    char *verb = req, *name, *tag;
    size_t i;

    name = strchr(req, ' ');
    if (name)
        *name++ = '\0';
    if (strcmp(verb, "PING") == 0) {
        say(c, "PONG\n", NULL, NULL);
        return 1;
    }
    if (strcmp(verb, "HELP") == 0) {
        say(c, help_text, NULL, NULL);
        return 1;
    }
    if (strcmp(verb, "QUIT") == 0) {
        say(c, "BYE\n", NULL, NULL);
        return 0;
    }
    if (strcmp(verb, "RUN") != 0 || !name) {
        say(c, "ERR unknown request\n", NULL, NULL);
        return 1;
    }
    tag = strchr(name, ' ');
    if (tag)
        *tag++ = '\0';
    else
        tag = "-";
    for (i = 0; i < N_COMMANDS; i++) {
        if (strcmp(name, commands[i].name) == 0) {
            run(c, &commands[i], tag);
            return 1;
        }
    }
    say(c, "ERR no such command ", name, "\n");
    return 1;
}

/* Serves lines on one connection until QUIT, end of stream, or an overlong line. */
static void serve(int c)
{
    line_len = 0;
    for (;;) {
        char *nl;
        ssize_t n;

        while ((nl = memchr(line, '\n', line_len)) != NULL) {
            size_t used = (size_t)(nl - line) + 1;
            *nl = '\0';
            if (nl > line && nl[-1] == '\r')
                nl[-1] = '\0';
            if (!handle_line(c, line))
                return;
            memmove(line, line + used, line_len - used);
            line_len -= used;
        }
        if (line_len == MAX_LINE) {
            say(c, "ERR line too long\n", NULL, NULL);
            return;
        }
        n = recv(c, line + line_len, MAX_LINE - line_len, 0);
        if (n < 0 && errno == EINTR)
            continue;
        if (n <= 0)
            return;
        line_len += (size_t)n;
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
    addr.sin_port = htons(MGMT_PORT);
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
