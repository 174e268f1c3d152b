/* ndf-sandbox: the native front of the CLI.
 *
 * A Python interpreter needs ~100 ms to start and import the CLI; this program
 * needs ~1 ms. For `ndf-sandbox run ...` it hands the call, with its fds 0-2, its
 * cwd, umask, rlimits, argv and environment, to a warm per-user CLI server
 * (`ndf-sandbox serve`, cli_server.py) over a unix socket and exits with the
 * status the server sends back. Whenever there is no server (the default), the
 * command is not `run`, or the server answers "fall back", it execv()s the
 * Python CLI, ndf-sandbox-py next to this file: same pid, same argv.
 *
 * The request (little-endian, packed): "NDF1", build id (16 bytes), umask u32,
 * argc u32 (argv[1..]), envc u32, body_len u32, 16 x (cur u64, max u64) rlimits,
 * then the body: argv[1..] and environ as NUL-terminated strings. fds 0, 1, 2 and
 * an O_PATH fd of the cwd ride on the first sendmsg (SCM_RIGHTS). The answer:
 * 'F' (fall back: the server did nothing) or 'X' + status i32. While waiting,
 * SIGINT/SIGTERM/SIGHUP are forwarded as 'S' + signal number.
 */
#define _GNU_SOURCE
#include <errno.h>
#include <fcntl.h>
#include <limits.h>
#include <signal.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/resource.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <sys/un.h>
#include <unistd.h>

#ifndef NDF_BUILD_ID
#define NDF_BUILD_ID ""
#endif

#define BUILD_ID_LEN 16
#define N_RLIMITS 16
#define HEADER_LEN (4 + BUILD_ID_LEN + 4 * 4 + N_RLIMITS * 16)
#define MAX_BODY (4u << 20)

_Static_assert(sizeof NDF_BUILD_ID == 1 || sizeof NDF_BUILD_ID == BUILD_ID_LEN + 1,
               "NDF_BUILD_ID: 16 characters, or empty in a build without one");
static const char build_id[BUILD_ID_LEN + 1] = NDF_BUILD_ID;  /* zero-padded */

extern char **environ;

static const int forwarded[] = {SIGINT, SIGTERM, SIGHUP};
#define N_FORWARDED (sizeof forwarded / sizeof forwarded[0])
static struct sigaction found_actions[N_FORWARDED], found_sigpipe;
static int handlers_installed;

static volatile sig_atomic_t server_fd = -1;  /* set once the whole request is sent */
static volatile sig_atomic_t pending[N_FORWARDED];  /* signals that came before that */
static volatile sig_atomic_t caught[N_FORWARDED];  /* all signals: raised again on falling back */

static void forward_signal(int sig) {
    int saved = errno;
    for (size_t i = 0; i < N_FORWARDED; i++) {
        if (forwarded[i] != sig) continue;
        caught[i] = 1;
        if (server_fd < 0) {
            pending[i] = 1;
        } else {
            /* Not in the middle of the request: server_fd is set only after it. */
            char msg[2] = {'S', (char)sig};
            (void)!send(server_fd, msg, sizeof msg, MSG_NOSIGNAL | MSG_DONTWAIT);
        }
    }
    errno = saved;
}

/* Handlers for the forwarded signals, except those the caller left ignored (as a
 * shell's `cmd &` does with SIGINT): the Python CLI would keep ignoring them too. */
static void install_handlers(void) {
    struct sigaction sa;
    memset(&sa, 0, sizeof sa);
    sa.sa_handler = forward_signal;  /* no SA_RESTART: the wait's read() returns EINTR */
    sigemptyset(&sa.sa_mask);
    for (size_t i = 0; i < N_FORWARDED; i++) {
        sigaction(forwarded[i], NULL, &found_actions[i]);
        if (found_actions[i].sa_handler != SIG_IGN) sigaction(forwarded[i], &sa, NULL);
    }
    struct sigaction ignore;
    memset(&ignore, 0, sizeof ignore);
    ignore.sa_handler = SIG_IGN;
    sigaction(SIGPIPE, &ignore, &found_sigpipe);
    handlers_installed = 1;
}

/* Back to the dispositions found (the signal mask was never changed), then a
 * signal caught is raised again (the server, if it got it, did nothing), so that
 * this process reacts as the Python CLI would have. */
static void restore_signals(void) {
    if (!handlers_installed) return;
    sigaction(SIGPIPE, &found_sigpipe, NULL);
    for (size_t i = 0; i < N_FORWARDED; i++) sigaction(forwarded[i], &found_actions[i], NULL);
    handlers_installed = 0;
    for (size_t i = 0; i < N_FORWARDED; i++)
        if (caught[i]) raise(forwarded[i]);
}

static _Noreturn void exec_python_cli(char **argv) {
    char exe[PATH_MAX], path[PATH_MAX + 32];
    restore_signals();
    if (!realpath("/proc/self/exe", exe)) {
        fprintf(stderr, "ndf-sandbox: cannot find the Python CLI: /proc/self/exe: %s\n", strerror(errno));
        exit(126);
    }
    char *slash = strrchr(exe, '/');
    if (slash) *slash = '\0';
    snprintf(path, sizeof path, "%s/ndf-sandbox-py", exe);
    char *alone[] = {path, NULL};
    if (argv[0]) argv[0] = path; else argv = alone;
    execv(path, argv);
    fprintf(stderr, "ndf-sandbox: cannot run the Python CLI %s: %s\n", path, strerror(errno));
    exit(126);
}

/* Only a directory of our own that nobody else may enter can hold the server's
 * socket: another user must not be able to plant one there. */
static int safe_directory(const char *dir) {
    struct stat st;
    return lstat(dir, &st) == 0 && S_ISDIR(st.st_mode) && st.st_uid == geteuid() && (st.st_mode & 077) == 0;
}

/* The server's socket path into addr, or 0 if there can be no server. */
static int socket_address(struct sockaddr_un *addr) {
    char path[PATH_MAX], dir[PATH_MAX];
    const char *given = getenv("NDF_SANDBOX_SOCKET");
    if (given && *given) {
        if (given[0] != '/' || strlen(given) >= sizeof path) return 0;
        strcpy(path, given);
        strcpy(dir, given);
        char *slash = strrchr(dir, '/');
        if (slash == dir) slash[1] = '\0'; else *slash = '\0';
    } else {
        const char *base = getenv("XDG_RUNTIME_DIR");
        if (!base || base[0] != '/') base = "/tmp";
        int n = snprintf(dir, sizeof dir, "%s/ndf-sandbox-%u", base, (unsigned)geteuid());
        if (n < 0 || (size_t)n >= sizeof dir) return 0;
        n = snprintf(path, sizeof path, "%s/%s.sock", dir, build_id);
        if (n < 0 || (size_t)n >= sizeof path) return 0;
    }
    if (strlen(path) >= sizeof addr->sun_path || !safe_directory(dir)) return 0;
    memset(addr, 0, sizeof *addr);
    addr->sun_family = AF_UNIX;
    strcpy(addr->sun_path, path);
    return 1;
}

static unsigned char *put32(unsigned char *p, uint32_t v) {
    for (int i = 0; i < 4; i++) *p++ = (unsigned char)(v >> (8 * i));
    return p;
}

static unsigned char *put64(unsigned char *p, uint64_t v) {
    for (int i = 0; i < 8; i++) *p++ = (unsigned char)(v >> (8 * i));
    return p;
}

static uint64_t rlimit_value(rlim_t v) {
    return v == RLIM_INFINITY ? UINT64_MAX : (uint64_t)v;
}

/* The request, header and body, in one malloc'd buffer; NULL to fall back. */
static unsigned char *build_request(int argc, char **argv, size_t *len) {
    size_t body = 0, envc = 0;
    for (int i = 1; i < argc; i++) body += strlen(argv[i]) + 1;
    for (char **e = environ; *e; e++, envc++) body += strlen(*e) + 1;
    if (body > MAX_BODY) return NULL;
    unsigned char *buf = malloc(HEADER_LEN + body);
    if (!buf) return NULL;
    mode_t mask = umask(0);
    umask(mask);
    unsigned char *p = buf;
    memcpy(p, "NDF1", 4);
    memcpy(p + 4, build_id, BUILD_ID_LEN);
    p = put32(p + 4 + BUILD_ID_LEN, (uint32_t)mask);
    p = put32(p, (uint32_t)(argc - 1));
    p = put32(p, (uint32_t)envc);
    p = put32(p, (uint32_t)body);
    for (int r = 0; r < N_RLIMITS; r++) {
        struct rlimit rl;
        if (getrlimit(r, &rl) != 0) { free(buf); return NULL; }
        p = put64(put64(p, rlimit_value(rl.rlim_cur)), rlimit_value(rl.rlim_max));
    }
    for (int i = 1; i < argc; i++) { size_t n = strlen(argv[i]) + 1; memcpy(p, argv[i], n); p += n; }
    for (char **e = environ; *e; e++) { size_t n = strlen(*e) + 1; memcpy(p, *e, n); p += n; }
    *len = HEADER_LEN + body;
    return buf;
}

/* The first sendmsg carries the fds with (at least) the first bytes; the rest
 * follows in plain sends. 0 if the request could not be sent whole. */
static int send_request(int sock, const unsigned char *buf, size_t len, int cwd_fd) {
    int fds[4] = {0, 1, 2, cwd_fd};
    union { char buf[CMSG_SPACE(sizeof fds)]; struct cmsghdr align; } control;
    struct iovec iov = {(void *)buf, len};
    struct msghdr msg;
    memset(&msg, 0, sizeof msg);
    memset(&control, 0, sizeof control);
    msg.msg_iov = &iov;
    msg.msg_iovlen = 1;
    msg.msg_control = control.buf;
    msg.msg_controllen = sizeof control.buf;
    struct cmsghdr *cmsg = CMSG_FIRSTHDR(&msg);
    cmsg->cmsg_level = SOL_SOCKET;
    cmsg->cmsg_type = SCM_RIGHTS;
    cmsg->cmsg_len = CMSG_LEN(sizeof fds);
    memcpy(CMSG_DATA(cmsg), fds, sizeof fds);
    ssize_t n;
    do n = sendmsg(sock, &msg, MSG_NOSIGNAL); while (n < 0 && errno == EINTR);
    if (n <= 0) return 0;
    for (size_t sent = (size_t)n; sent < len; sent += (size_t)n) {
        do n = send(sock, buf + sent, len - sent, MSG_NOSIGNAL); while (n < 0 && errno == EINTR);
        if (n <= 0) return 0;
    }
    return 1;
}

static int read_full(int fd, unsigned char *buf, size_t len) {
    for (size_t got = 0; got < len;) {
        ssize_t n = read(fd, buf + got, len - got);
        if (n < 0 && errno == EINTR) continue;
        if (n <= 0) return 0;
        got += (size_t)n;
    }
    return 1;
}

/* Serve `run` through the server; returns only to fall back. */
static void try_server(int argc, char **argv) {
    struct sockaddr_un addr;
    if (!socket_address(&addr)) return;
    /* Closed fds 0-2 get /dev/null before any fd of ours can take their number. */
    for (int fd = 0; fd <= 2; fd++) {
        if (fcntl(fd, F_GETFD) == -1 && errno == EBADF && open("/dev/null", O_RDWR) != fd) return;
    }
    install_handlers();
    /* All that can fail on this side before connecting: a server never sees half a call. */
    size_t len;
    unsigned char *request = build_request(argc, argv, &len);
    if (!request) return;
    int cwd_fd = open(".", O_PATH | O_DIRECTORY | O_CLOEXEC);
    int sock = socket(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0);
    int rc = -1;
    if (cwd_fd >= 0 && sock >= 0) {
        do rc = connect(sock, (struct sockaddr *)&addr, sizeof addr); while (rc < 0 && errno == EINTR);
    }
    int sent = rc == 0 && send_request(sock, request, len, cwd_fd);
    free(request);
    if (cwd_fd >= 0) close(cwd_fd);
    if (!sent) {  /* the server did not get the whole request: it did nothing */
        if (sock >= 0) close(sock);
        return;
    }
    server_fd = sock;
    for (size_t i = 0; i < N_FORWARDED; i++) {
        if (pending[i]) {
            pending[i] = 0;
            char msg[2] = {'S', (char)forwarded[i]};
            (void)!send(sock, msg, sizeof msg, MSG_NOSIGNAL | MSG_DONTWAIT);
        }
    }
    unsigned char answer[5];
    if (!read_full(sock, answer, 1)) {
        fprintf(stderr, "ndf-sandbox: the CLI server ended without an answer\n");
        exit(126);
    }
    if (answer[0] == 'F') {
        server_fd = -1;
        close(sock);
        return;
    }
    if (answer[0] != 'X' || !read_full(sock, answer + 1, 4)) {
        fprintf(stderr, "ndf-sandbox: the CLI server ended without an answer\n");
        exit(126);
    }
    uint32_t status = (uint32_t)answer[1] | (uint32_t)answer[2] << 8 | (uint32_t)answer[3] << 16
                      | (uint32_t)answer[4] << 24;
    exit((int)(status & 0xff));
}

int main(int argc, char **argv) {
    const char *server = getenv("NDF_SANDBOX_SERVER");
    int off = server && (!strcmp(server, "off") || !strcmp(server, "0") || !strcmp(server, "no"));
    if (argc >= 2 && !strcmp(argv[1], "run") && !off && strlen(build_id) == BUILD_ID_LEN)
        try_server(argc, argv);
    exec_python_cli(argv);
}
