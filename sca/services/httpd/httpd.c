/*
 * httpd: a small static-site web server speaking HTTP/1.0 on TCP port 80.
 *
 * One request per connection: read the head (possibly over several recv calls) up to the blank
 * line, parse "GET /path?query HTTP/1.x", answer 200 with the page or 404, close. A query string
 * may carry "lang=xx" (picks the page's language banner) and, for /search, "q=words".
 *
 * Built against glibc (-static -O2) and using glibc's own strcpy/strstr/memcpy, so their
 * vectorised versions (chosen at start-up through IRELATIVE relocations) are what runs.
 *
 * BUG (deliberate, CodeRed-class): handle_request() copies the query string with strcpy into a
 * 128-byte stack buffer without checking its length, so a long query overwrites the saved
 * return address. This program must never be run natively; herdwall runs it only inside its
 * emulator.
 */
#include <errno.h>
#include <netinet/in.h>
#include <stddef.h>
#include <string.h>
#include <sys/socket.h>
#include <unistd.h>

#define HTTP_PORT 80
#define MAX_HEAD 4096

struct page {
    const char *path;
    const char *type;
    const char *body;
};

static const struct page pages[] = {
    {"/", "text/html",
     "<html><head><title>herdwall sample site</title></head>\n"
     "<body><h1>Welcome</h1><p>This host runs the sample web server.</p>\n"
     "<a href=\"/about.html\">About</a> <a href=\"/search?q=docs\">Search</a></body></html>\n"},
    {"/index.html", "text/html",
     "<html><head><title>herdwall sample site</title></head>\n"
     "<body><h1>Welcome</h1><p>This host runs the sample web server.</p></body></html>\n"},
    {"/about.html", "text/html",
     "<html><body><h1>About</h1><p>A static site served over HTTP/1.0.</p></body></html>\n"},
    {"/robots.txt", "text/plain", "User-agent: *\nDisallow: /cgi-bin/\n"},
    {"/style.css", "text/css", "body { font-family: sans-serif; margin: 2em; }\n"},
    {"/favicon.ico", "image/x-icon", "\x00\x00\x01\x00"},
};
#define N_PAGES (sizeof pages / sizeof pages[0])

static const char *const documents[] = {
    "install guide", "release notes", "docs index", "faq", "contact", "news archive",
};
#define N_DOCUMENTS (sizeof documents / sizeof documents[0])

static char head[MAX_HEAD + 1]; /* the request as received */
static char resp[8192];         /* the whole response, header and body */
static char body[4096];         /* a generated body (search results) */

/* Sends all of buf; a peer that goes away only ends this connection. */
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

/* Writes v in decimal at p; returns the end. */
static char *put_uint(char *p, size_t v)
{
    char tmp[24];
    size_t n = 0;

    do {
        tmp[n++] = (char)('0' + v % 10);
        v /= 10;
    } while (v);
    while (n)
        *p++ = tmp[--n];
    return p;
}

static void respond(int c, const char *status, const char *type, const char *content, size_t len)
{
    char *p = resp;

    p = stpcpy(p, "HTTP/1.0 ");
    p = stpcpy(p, status);
    p = stpcpy(p, "\r\nServer: sample-httpd/1.0\r\nContent-Type: ");
    p = stpcpy(p, type);
    p = stpcpy(p, "\r\nContent-Length: ");
    p = put_uint(p, len);
    p = stpcpy(p, "\r\nConnection: close\r\n\r\n");
    if (len > sizeof resp - (size_t)(p - resp))
        len = sizeof resp - (size_t)(p - resp);
    memcpy(p, content, len);
    send_all(c, resp, (size_t)(p - resp) + len);
}

static void respond_text(int c, const char *status, const char *text)
{
    respond(c, status, "text/html", text, strlen(text));
}

/* Finds "key=" in a query ("a=1&b=2"); returns the value and its length in *len. */
static const char *param(const char *query, const char *key, size_t *len)
{
    size_t klen = strlen(key);
    const char *p = query;

    while (*p) {
        const char *end = strchr(p, '&');
        size_t plen = end ? (size_t)(end - p) : strlen(p);
        if (plen > klen && memcmp(p, key, klen) == 0 && p[klen] == '=') {
            *len = plen - klen - 1;
            return p + klen + 1;
        }
        if (!end)
            break;
        p = end + 1;
    }
    return NULL;
}

static void search(int c, const char *q, size_t qlen)
{
    char *p = stpcpy(body, "<html><body><h1>Search results</h1><ul>\n");
    size_t i, hits = 0;

    for (i = 0; i < N_DOCUMENTS; i++) {
        /* A document matches when the query names its first word. */
        const char *sp = strchr(documents[i], ' ');
        size_t wlen = sp ? (size_t)(sp - documents[i]) : strlen(documents[i]);
        if (qlen >= wlen && memcmp(q, documents[i], wlen) == 0) {
            p = stpcpy(p, "<li>");
            p = stpcpy(p, documents[i]);
            p = stpcpy(p, "</li>\n");
            hits++;
        }
    }
    if (!hits)
        p = stpcpy(p, "<li>no matches</li>\n");
    p = stpcpy(p, "</ul></body></html>\n");
    respond(c, "200 OK", "text/html", body, (size_t)(p - body));
}

/* Serves one parsed request line. */
__attribute__((noipa)) void handle_request(int c, const char *path, const char *query)
{
    char params[128];
    const char *lang = NULL, *q = NULL;
    size_t lang_len = 0, q_len = 0;
    size_t i;

    if (query) {
        /* Kept as a private copy so the page code can keep pointers into it. */
        strcpy(params, query); /* BUG: no length check (CodeRed-class overflow) */
        lang = param(params, "lang", &lang_len);
        q = param(params, "q", &q_len);
    }
    if (strcmp(path, "/search") == 0) {
        search(c, q ? q : "", q ? q_len : 0);
        return;
    }
    for (i = 0; i < N_PAGES; i++) {
        if (strcmp(path, pages[i].path) == 0) {
            /* Only English pages exist; other languages still get them. */
            (void)lang;
            (void)lang_len;
            respond(c, "200 OK", pages[i].type, pages[i].body,
                    pages[i].type[0] == 'i' ? 4 : strlen(pages[i].body));
            return;
        }
    }
    respond_text(c, "404 Not Found", "<html><body><h1>404 Not Found</h1></body></html>\n");
}

/* Reads a request head (up to "\r\n\r\n"); returns its length, or -1 if the peer went away. */
static ssize_t read_head(int c)
{
    size_t n = 0;

    while (n < MAX_HEAD) {
        ssize_t r = recv(c, head + n, MAX_HEAD - n, 0);
        if (r < 0 && errno == EINTR)
            continue;
        if (r <= 0)
            return -1;
        n += (size_t)r;
        head[n] = '\0';
        if (strstr(head, "\r\n\r\n"))
            return (ssize_t)n;
    }
    return (ssize_t)n; /* too long: the caller answers 400 */
}

static void serve(int c)
{
    ssize_t n = read_head(c);
    char *eol, *target, *sp, *query;

    if (n < 0)
        return;
    eol = strstr(head, "\r\n");
    if (!eol || !strstr(head, "\r\n\r\n")) {
        respond_text(c, "400 Bad Request", "<html><body>400 Bad Request</body></html>\n");
        return;
    }
    *eol = '\0';
    if (strncmp(head, "GET ", 4) != 0) {
        respond_text(c, "501 Not Implemented", "<html><body>501</body></html>\n");
        return;
    }
    target = head + 4;
    sp = strchr(target, ' ');
    if (!sp || strncmp(sp + 1, "HTTP/1.", 7) != 0 || target[0] != '/') {
        respond_text(c, "400 Bad Request", "<html><body>400 Bad Request</body></html>\n");
        return;
    }
    *sp = '\0';
    query = strchr(target, '?');
    if (query)
        *query++ = '\0';
    handle_request(c, target, query);
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
    addr.sin_port = htons(HTTP_PORT);
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
