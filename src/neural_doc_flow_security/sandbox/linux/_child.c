/*
 * The sandbox child, in C: clone3 with the namespaces, then execute the ordered
 * list of steps that launch/bootstrap.py builds, with no Python code running
 * between the clone and the payload.
 *
 * Why C: a Python child pays copy-on-write faults for every page of the
 * interpreter it touches after the fork (each trivial stage cost 150-200 us);
 * this loop touches its own stack and the step array only.
 *
 * The steps are plain data (see bootstrap.py for the order and the meaning);
 * this file knows how to do each kind of step, not which ones a sandbox needs.
 * They arrive packed in one byte string (steps.py pack_launch): the parent
 * parses it into C structs before the clone, so the child neither allocates
 * nor calls into Python. A failed step writes "stage NUL errno NUL message" to
 * the error pipe (setup_errors.py) and exits with the sandbox-error status:
 * nothing half-protected runs the payload.
 *
 * A spare (launch/spare.py) is cloned ahead of its launch: its steps end with
 * AWAIT_LAUNCH, which receives the rest of its steps, packed the same way, in
 * a memfd with the payload's fds, and goes on with them.
 *
 * A callable's payload process returns from spawn() into Python (like
 * os.fork()) once all of its steps passed; every other process stays in C.
 */
#define PY_SSIZE_T_CLEAN
#define _GNU_SOURCE
#include <Python.h>

#include <errno.h>
#include <fcntl.h>
#include <grp.h>
#include <linux/capability.h>
#include <linux/filter.h>
#include <linux/seccomp.h>
#include <net/if.h>
#include <netinet/in.h>
#include <poll.h>
#include <signal.h>
#include <stddef.h>
#include <spawn.h>
#include <stdint.h>
#include <string.h>
#include <sys/ioctl.h>
#include <sys/mman.h>
#include <sys/mount.h>
#include <sys/prctl.h>
#include <sys/resource.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <sys/statfs.h>
#include <sys/syscall.h>
#include <sys/wait.h>
#include <time.h>
#include <unistd.h>

#define EXIT_SANDBOX_ERROR 126
#define MAX_ARGS 6
#define MAX_SLOTS 256
#define MAX_LAUNCH_FDS 8
#define LAUNCH_MAGIC 0x4c46444eU /* "NDFL" */

#ifndef SYS_clone3
#define SYS_clone3 435
#endif
#ifndef SYS_close_range
#define SYS_close_range 436
#endif
#ifndef SYS_mount_setattr
#define SYS_mount_setattr 442
#endif
#ifndef SYS_open_tree
#define SYS_open_tree 428
#endif
#ifndef SYS_move_mount
#define SYS_move_mount 429
#endif
#ifndef SYS_openat2
#define SYS_openat2 437
#endif
#ifndef RESOLVE_NO_SYMLINKS
#define RESOLVE_NO_SYMLINKS 0x04
#define RESOLVE_BENEATH 0x08
#endif
#ifndef OPEN_TREE_CLONE
#define OPEN_TREE_CLONE 1
#define OPEN_TREE_CLOEXEC O_CLOEXEC
#endif
#ifndef MOVE_MOUNT_F_EMPTY_PATH
#define MOVE_MOUNT_F_EMPTY_PATH 0x00000004
#define MOVE_MOUNT_T_EMPTY_PATH 0x00000040
#endif
#ifndef CLONE_PIDFD
#define CLONE_PIDFD 0x00001000
#endif
#ifndef CLONE_INTO_CGROUP
#define CLONE_INTO_CGROUP 0x200000000ULL
#endif
#ifndef SYS_pidfd_send_signal
#define SYS_pidfd_send_signal 424
#endif
#ifndef MOUNT_ATTR_IDMAP
#define MOUNT_ATTR_IDMAP 0x00100000
#endif
#ifndef AT_RECURSIVE
#define AT_RECURSIVE 0x8000
#endif
#ifndef SYS_landlock_create_ruleset
#define SYS_landlock_create_ruleset 444
#define SYS_landlock_add_rule 445
#define SYS_landlock_restrict_self 446
#endif
#ifndef PR_CAP_AMBIENT
#define PR_CAP_AMBIENT 47
#define PR_CAP_AMBIENT_RAISE 2
#define PR_CAP_AMBIENT_CLEAR_ALL 4
#endif

/* Step kinds; the numbers are shared with bootstrap.py (Step). */
enum {
    STEP_STAGE = 1,          /* name: what the following steps belong to */
    STEP_SETSID = 2,
    STEP_RESET_SIGNALS = 3,
    STEP_PRCTL = 4,          /* option, arg */
    STEP_WAIT_TOKEN = 5,     /* fd, token */
    STEP_STILL_SUPERVISED = 6, /* fd: the parent holds its other end while it supervises */
    STEP_DIE_WITH_INIT = 7,
    /* File-system steps: no path is resolved through a symlink; a relative one is
     * beneath the working directory (the new root). See "file system" below. */
    STEP_MOUNT = 8,          /* source, target, fstype, flags, data, optional */
    STEP_SETATTR = 9,        /* path, attr_set, recursive */
    STEP_OPEN_SOURCE = 10,   /* slot, path */
    STEP_BIND = 11,          /* slot (-1: source path), source, target, attrs, TARGET_*, keep open */
    STEP_MKDIR = 12,         /* path */
    STEP_SYMLINK = 13,       /* link text, path */
    STEP_WRITE_FILE = 14,    /* path, content */
    STEP_CHDIR = 15,         /* path */
    STEP_PIVOT_ROOT = 16,    /* into the current directory; the old root is detached */
    STEP_SETHOSTNAME = 17,   /* name */
    STEP_LOOPBACK_UP = 18,
    STEP_ARRANGE_FDS = 19,   /* map (int32 target, source pairs), keep (int32 list) */
    STEP_SETRLIMIT = 20,     /* resource, value */
    STEP_IDENTITY = 21,      /* uid, gid, in_user_namespace */
    STEP_CAPABILITIES = 22,  /* allowed mask, ambient mask, last cap */
    STEP_SECCOMP = 23,       /* BPF */
    STEP_CLOSE = 24,         /* fd */
    STEP_FORK_PAYLOAD = 25,  /* status fd, uid, gid, in a user ns, sync fd: this process becomes init */
    STEP_SPAWN_PROGRAM = 26, /* status fd, RLIMIT_AS or -1: start the program, become its init */
    STEP_EXEC_PROGRAM = 27,
    STEP_RETURN = 28,        /* to Python (a callable's payload process) */
    STEP_MOVE_ERROR_FD = 29, /* lowest: above every fd the payload is to get (and the trace fd) */
    STEP_SETNS = 30,         /* fd, namespace type: join a namespace made ahead (then close the fd) */
    STEP_JOIN_CGROUP = 31,   /* int32 fds of cgroup.procs files: write "0" (this process) to each, close */
    STEP_AWAIT_LAUNCH = 32,  /* socket fd, staging fd: receive the rest of the steps, then run them */
    STEP_LANDLOCK_RULESET = 33, /* handled fs rights, handled net rights, scopes */
    STEP_LANDLOCK_PATH = 34,    /* path, rights (a file gets only its file rights) */
    STEP_LANDLOCK_RESTRICT = 35,
    STEP_OVERLAY = 36,          /* target, int32 lower slots, upper slot, work slot, options, flags */
    STEP_SEND_SLOT = 37,        /* socket fd, slot: hand the slot's fd to the parent (then close both) */
    STEP_IDMAP = 38,         /* sandbox uid, gid (-1: the launch's id), host uid, gid: the user namespace
                              * of the binds marked MOUNT_ATTR_IDMAP; all -2: close it */
    STEP_PROXY_LISTENER = 41, /* socket fd, port: listen on 127.0.0.1:port here, send that socket to the parent */
    STEP_LISTENER = 45,      /* mode (1 report, 2 learn), errno per syscall number (int32s), hand over */
    STEP_UMASK = 46,         /* mask: this process's umask */
};

typedef struct {
    int kind;
    long long num[MAX_ARGS];
    const char *str[MAX_ARGS]; /* NUL-terminated (PyBytes), or NULL */
    Py_ssize_t len[MAX_ARGS];
} step_t;

typedef struct {
    step_t *steps;
    Py_ssize_t count;
    char **argv;
    char **envp;
    const char *cwd;
    const char *path_env; /* PATH of the sandbox's environment */
    const char *python;   /* for the payload's Python (a spare's launch), or NULL */
    Py_ssize_t python_len;
    long long sandbox_id; /* the uid and gid of steps that leave them to the launch (-1), or -1 */
} launch_t;

/* ------------------------------------------------------------------ reporting */

static const char *current_stage = "start";
static int error_fd = -1;
static int trace_fd = -1;

/* The seccomp listener (STEP_LISTENER, STEP_SECCOMP with a listener): init answers the
 * filter's SECCOMP_RET_USER_NOTIF with the errno the rule stands for (report) or lets the
 * call continue (learn), and counts each syscall number. A forked payload installs the
 * filter and hands the listener to init over a socketpair. Init runs in the sandbox's
 * cgroup: a payload that floods refused calls spends the sandbox's CPU, not the host's.
 * If init is gone, the kernel fails a referred call with ENOSYS (fail closed). */
enum { LISTENER_REPORT = 1, LISTENER_LEARN = 2, LISTENER_SLOTS = 1024 };
static int listener_mode = 0;
static const char *listener_errnos = NULL; /* int32 per syscall number (0: ENOSYS) */
static Py_ssize_t listener_nerrnos = 0;
static int listener_sock[2] = {-1, -1}; /* init's end, the payload's end */
static int listener_fd = -1;

static size_t append(char *buf, size_t at, size_t cap, const char *text) {
    while (text && *text && at + 1 < cap)
        buf[at++] = *text++;
    buf[at] = '\0';
    return at;
}

static size_t append_int(char *buf, size_t at, size_t cap, long long value) {
    char digits[24];
    int n = 0;
    unsigned long long v = value < 0 ? -(unsigned long long)value : (unsigned long long)value;
    do {
        digits[n++] = (char)('0' + v % 10);
        v /= 10;
    } while (v && n < 23);
    if (value < 0 && at + 1 < cap)
        buf[at++] = '-';
    while (n && at + 1 < cap)
        buf[at++] = digits[--n];
    buf[at] = '\0';
    return at;
}

/* Report "stage NUL errno NUL what what2" and exit: the parent turns it into a SetupError. */
static void fail(int err, const char *what, const char *what2) {
    char buf[1024];
    size_t at = append(buf, 0, sizeof buf, current_stage);
    buf[at++] = '\0';
    at = append_int(buf, at, sizeof buf, err);
    buf[at++] = '\0';
    at = append(buf, at, sizeof buf, what);
    at = append(buf, at, sizeof buf, what2);
    if (error_fd >= 0)
        (void)!write(error_fd, buf, at);
    _exit(EXIT_SANDBOX_ERROR);
}

static void check(long result, const char *what, const char *what2) {
    if (result < 0)
        fail(errno, what, what2);
}

static void trace(const char *name) {
    if (trace_fd < 0)
        return;
    struct timespec ts;
    char buf[160];
    clock_gettime(CLOCK_MONOTONIC, &ts);
    size_t at = append_int(buf, 0, sizeof buf, (long long)ts.tv_sec * 1000000000LL + ts.tv_nsec);
    at = append(buf, at, sizeof buf, " ");
    at = append_int(buf, at, sizeof buf, (long long)syscall(SYS_getpid));
    at = append(buf, at, sizeof buf, " ");
    at = append(buf, at, sizeof buf, name);
    at = append(buf, at, sizeof buf, "\n");
    (void)!write(trace_fd, buf, at);
}

/* ------------------------------------------------------------------ the packed launch */

/* Little-endian: u32 magic, u32 step count, each step (i32 kind, u32 argument count,
 * each argument: u8 type 0 none / 1 i64 / 2 bytes (u32 length, the bytes, NUL)), then
 * argv and envp (u32 count, each u32 length, bytes, NUL), cwd (same), the Python part
 * (u32 length, bytes), the sandbox id (i64, -1: none). Strings point into the buffer. */
typedef struct {
    const char *at, *end;
    const char *error;
} reader_t;

static int readable(reader_t *r, size_t n) {
    if (r->error)
        return 0;
    if ((size_t)(r->end - r->at) < n) {
        r->error = "a truncated launch";
        return 0;
    }
    return 1;
}

static uint32_t read_u32(reader_t *r) {
    uint32_t v = 0;
    if (readable(r, 4)) {
        memcpy(&v, r->at, 4);
        r->at += 4;
    }
    return v;
}

static const char *read_bytes(reader_t *r, Py_ssize_t *len, int nul_terminated) {
    uint32_t n = read_u32(r);
    if (!readable(r, (size_t)n + (nul_terminated ? 1 : 0)))
        return NULL;
    const char *bytes = r->at;
    r->at += n;
    if (nul_terminated && *r->at++ != '\0') {
        r->error = "a launch string without its NUL";
        return NULL;
    }
    *len = n;
    return bytes;
}

static const char *read_string(reader_t *r) {
    Py_ssize_t len = 0;
    const char *text = read_bytes(r, &len, 1);
    if (text && strlen(text) != (size_t)len) {
        r->error = "a path, name or argument contains a NUL byte";
        return NULL;
    }
    return text;
}

static char **read_strings(reader_t *r, void *(*alloc)(size_t)) {
    uint32_t count = read_u32(r);
    if (!r->error && count > (uint32_t)(r->end - r->at) / 5)
        r->error = "a truncated launch";
    char **out = r->error ? NULL : alloc(((size_t)count + 1) * sizeof(char *));
    if (!out) {
        r->error = r->error ? r->error : "out of memory";
        return NULL;
    }
    for (uint32_t i = 0; i < count; i++)
        out[i] = (char *)read_string(r);
    out[count] = NULL;
    return r->error ? NULL : out;
}

/* Fill `launch` from `buf`; returns NULL or what is wrong with it. `alloc` returns zeroed memory. */
static const char *parse_launch(const char *buf, size_t len, launch_t *launch, void *(*alloc)(size_t)) {
    reader_t r = {buf, buf + len, NULL};
    memset(launch, 0, sizeof *launch);
    if (read_u32(&r) != LAUNCH_MAGIC)
        return r.error ? r.error : "not a launch";
    uint32_t count = read_u32(&r);
    if (r.error || count > (uint32_t)(len / 8))
        return r.error ? r.error : "a truncated launch";
    launch->steps = alloc(((size_t)count + 1) * sizeof(step_t));
    if (!launch->steps)
        return "out of memory";
    launch->count = count;
    for (uint32_t i = 0; i < count && !r.error; i++) {
        step_t *step = &launch->steps[i];
        step->kind = (int)read_u32(&r);
        uint32_t nargs = read_u32(&r);
        if (nargs > MAX_ARGS)
            return "a step with too many arguments";
        /* Binary arguments: file contents, BPF, fd lists; everything else is a C string. */
        int binary = step->kind == STEP_WRITE_FILE || step->kind == STEP_SECCOMP || step->kind == STEP_ARRANGE_FDS ||
                     step->kind == STEP_JOIN_CGROUP || step->kind == STEP_OVERLAY ||
                     step->kind == STEP_LISTENER;
        for (uint32_t j = 0; j < nargs && !r.error; j++) {
            if (!readable(&r, 1))
                break;
            char type = *r.at++;
            if (type == 1 && readable(&r, 8)) {
                memcpy(&step->num[j], r.at, 8);
                r.at += 8;
            } else if (type == 2) {
                step->str[j] = binary ? read_bytes(&r, &step->len[j], 1) : read_string(&r);
                if (!binary && step->str[j])
                    step->len[j] = (Py_ssize_t)strlen(step->str[j]);
            } else if (type != 0) {
                return "a step argument of unknown type";
            }
        }
    }
    launch->argv = read_strings(&r, alloc);
    launch->envp = read_strings(&r, alloc);
    launch->cwd = read_string(&r);
    launch->python = read_bytes(&r, &launch->python_len, 0);
    if (r.error)
        return r.error;
    if (!readable(&r, 8)) /* always packed (-1: none): a launch without it is truncated */
        return "a launch without its sandbox id";
    memcpy(&launch->sandbox_id, r.at, 8);
    r.at += 8;
    if (r.at != r.end)
        return "trailing bytes after a launch";
    for (char **env = launch->envp; *env; env++)
        if (strncmp(*env, "PATH=", 5) == 0)
            launch->path_env = *env + 5;
    return NULL;
}

/* ------------------------------------------------------------------ file system */

/* Paths in the file-system steps are opened without following a symlink in any
 * component (openat2 RESOLVE_NO_SYMLINKS), and a relative path is resolved beneath
 * the working directory (RESOLVE_BENEATH), which rootfs.py makes the new root: part
 * of that tree can be a writable bind, where an earlier sandbox may have planted a
 * symlink to lead this set-up (root, before pivot_root) to a host directory. Mounts
 * go onto the opened fds, so nothing is resolved twice. */

struct open_how_arg {
    uint64_t flags, mode, resolve;
};

static int open_no_symlinks(int dirfd, const char *path, int flags) {
    struct open_how_arg how = {(uint64_t)(flags | O_CLOEXEC), 0,
                               RESOLVE_NO_SYMLINKS | (path[0] == '/' ? 0 : RESOLVE_BENEATH)};
    return (int)syscall(SYS_openat2, dirfd, path, &how, sizeof how);
}

/* Fail naming `path` as the sandbox will see it (a relative one is under the new root). */
static void fail_path(int err, const char *what, const char *path) {
    char buf[900];
    size_t at = append(buf, 0, sizeof buf, what);
    at = append(buf, at, sizeof buf, path[0] == '/' ? "" : "/");
    at = append(buf, at, sizeof buf, path);
    if (err == ELOOP)
        append(buf, at, sizeof buf, ": a component is a symlink (refused: never followed here)");
    fail(err, buf, "");
}

static int open_path(const char *what, const char *path, int flags) {
    int fd = open_no_symlinks(AT_FDCWD, path, flags);
    if (fd < 0)
        fail_path(errno, what, path);
    return fd;
}

/* Whether an optional path is there: only "no such file" skips it; any other error
 * fails the stage (a mask that cannot be checked is not silently dropped). */
static int open_optional(const char *what, const char *path, int flags) {
    int fd = open_no_symlinks(AT_FDCWD, path, flags);
    if (fd < 0 && errno != ENOENT)
        fail_path(errno, what, path);
    return fd;
}

/* mkdir -p of the first `len` bytes of `path` (all of it, or its parent; none: the
 * working directory), one component at a time; returns an O_PATH fd of that
 * directory. Errors name all of `path`. With `mount_point`, the directories made on
 * the new root's own tmpfs (parents of a bind's target, e.g. /root for an
 * interpreter under /root/.pyenv) are mode 0111: they can be crossed, not listed. */
static int make_dirs(const char *path, size_t len, int mount_point) {
    const char *what = mount_point ? "mount point " : "mkdir ";
    char buf[4096];
    if (len >= sizeof buf)
        fail_path(ENAMETOOLONG, what, path);
    memcpy(buf, len ? path : ".", len ? len : 1);
    buf[len ? len : 1] = '\0';
    int dir = open_no_symlinks(AT_FDCWD, buf, O_PATH | O_DIRECTORY);
    if (dir >= 0 || errno != ENOENT) {
        if (dir < 0)
            fail_path(errno, what, path);
        return dir;
    }
    struct stat root, st;
    check(stat(".", &root), "stat the new root", "");
    dir = open(buf[0] == '/' ? "/" : ".", O_PATH | O_DIRECTORY | O_CLOEXEC);
    check(dir, what, path);
    for (char *name = buf, *next; *name; name = next) {
        for (next = name; *next && *next != '/'; next++)
            ;
        if (*next)
            *next++ = '\0';
        if (*name == '\0' || strcmp(name, ".") == 0)
            continue;
        int child = open_no_symlinks(dir, name, O_PATH | O_DIRECTORY);
        if (child < 0 && errno == ENOENT) {
            mode_t mode = mount_point && fstat(dir, &st) == 0 && st.st_dev == root.st_dev ? 0111 : 0755;
            if (mkdirat(dir, name, mode) < 0 && errno != EEXIST)
                fail_path(errno, what, path);
            child = open_no_symlinks(dir, name, O_PATH | O_DIRECTORY);
        }
        if (child < 0)
            fail_path(errno, what, path);
        close(dir);
        dir = child;
    }
    return dir;
}

/* The directory holding `path` (made if missing) and, in `name`, its last component. */
static int open_parent(const char *path, char *name, size_t cap, int mount_point) {
    const char *slash = strrchr(path, '/');
    const char *last = slash ? slash + 1 : path;
    if (strlen(last) >= cap || *last == '\0')
        fail_path(EINVAL, "not a file path: ", path);
    strcpy(name, last);
    return make_dirs(path, slash == path ? 1 : slash ? (size_t)(slash - path) : 0, mount_point);
}

/* The mount point of a bind target, made if missing (a directory, or an empty file
 * for a file source), as an O_PATH fd. */
static int open_mount_point(const char *target, int is_dir) {
    if (is_dir)
        return make_dirs(target, strlen(target), 1);
    char name[256];
    int parent = open_parent(target, name, sizeof name, 1);
    int fd = openat(parent, name, O_CREAT | O_EXCL | O_WRONLY | O_NOFOLLOW | O_CLOEXEC, 0644);
    if (fd < 0 && errno != EEXIST) /* an existing file is a mount point already */
        fail_path(errno, "mount point ", target);
    if (fd >= 0)
        close(fd);
    fd = open_no_symlinks(parent, name, O_PATH);
    if (fd < 0)
        fail_path(errno, "mount point ", target);
    close(parent);
    return fd;
}

struct mount_attr_arg {
    uint64_t attr_set, attr_clr, propagation, userns_fd;
};

static long clone_child(unsigned long long clone_flags, int cgroup_fd, int *pidfd);

/* The user namespace whose id map an idmapped bind (owner = "caller") applies:
 * the sandbox's uid and gid, and only they, map to the caller's (STEP_IDMAP). */
static int idmap_userns = -1;

static const char *fs_name(long type) {
    static const struct {
        long type;
        const char *name;
    } known[] = {{0xEF53, "ext4"}, {0x01021994, "tmpfs"}, {0x58465342, "xfs"}, {0x9123683E, "btrfs"},
                 {(long)0x858458F6, "ramfs"}, {0x6969, "nfs"}, {0x65735546, "fuse"}, {0x794C7630, "overlay"},
                 {0x9FA0, "proc"}, {0x62656572, "sysfs"}, {(long)0xFF534D42, "cifs"}, {0x01021997, "9p"},
                 {0x4D44, "vfat"}, {0x73717368, "squashfs"}, {(long)0xF2F52010, "f2fs"}, {0x2011BAB0, "exfat"}};
    for (size_t i = 0; i < sizeof known / sizeof *known; i++)
        if (known[i].type == type)
            return known[i].name;
    return NULL;
}

/* An idmapped mount the file system refuses (EINVAL: no FS_ALLOW_IDMAP): name the
 * field that asked for it and the file system's type. */
static void fail_idmap(int err, int fd, const char *path) {
    char buf[900];
    size_t at = append(buf, 0, sizeof buf, "owner = \"caller\" (filesystem.binds, --bind-owner) of the bind on /");
    at = append(buf, at, sizeof buf, path);
    struct statfs fs;
    if (err == EINVAL && fstatfs(fd, &fs) == 0) {
        const char *name = fs_name((long)fs.f_type);
        at = append(buf, at, sizeof buf, ": this file system (");
        if (name)
            at = append(buf, at, sizeof buf, name);
        else {
            static const char hex[] = "0123456789abcdef";
            char type[24];
            size_t n = 0;
            unsigned long value = (unsigned long)fs.f_type;
            type[n++] = '0';
            type[n++] = 'x';
            for (int shift = 28; shift >= 0; shift -= 4)
                type[n++] = hex[(value >> shift) & 0xF];
            type[n] = '\0';
            at = append(buf, at, sizeof buf, "type ");
            at = append(buf, at, sizeof buf, type);
        }
        append(buf, at, sizeof buf, ") does not support idmapped mounts");
    } else
        append(buf, at, sizeof buf, ": idmapped mount (mount_setattr MOUNT_ATTR_IDMAP)");
    fail(err, buf, "");
}

static void set_attrs(int fd, const char *path, long long attrs, int recursive) {
    struct mount_attr_arg attr = {(uint64_t)attrs, 0, 0, 0};
    if (attrs & MOUNT_ATTR_IDMAP) {
        if (idmap_userns < 0)
            fail(EINVAL, "an idmapped bind without its user namespace on /", path);
        attr.userns_fd = (uint64_t)idmap_userns;
    }
    if (syscall(SYS_mount_setattr, fd, "", AT_EMPTY_PATH | (recursive ? AT_RECURSIVE : 0), &attr, sizeof attr) < 0) {
        if (attrs & MOUNT_ATTR_IDMAP)
            fail_idmap(errno, fd, path);
        fail_path(errno, "mount_setattr ", path);
    }
}

static void write_id_map(const char *proc_dir, const char *name, long long inside, long long outside) {
    char path[96], line[64];
    size_t at = append(path, 0, sizeof path, proc_dir);
    append(path, at, sizeof path, name);
    at = append_int(line, 0, sizeof line, inside);
    at = append(line, at, sizeof line, " ");
    at = append_int(line, at, sizeof line, outside);
    at = append(line, at, sizeof line, " 1\n");
    int fd = open(path, O_WRONLY | O_CLOEXEC);
    if (fd < 0 || write(fd, line, at) != (ssize_t)at)
        fail(errno, "write the idmapped bind's ", name);
    close(fd);
}

/* A user namespace mapping `outside` (the sandbox's uid/gid, on the host) to `inside`
 * (the caller's), for idmapped binds: files the sandbox makes there belong on disk
 * to the caller, and it can give them no other owner (no other id is mapped). Made
 * by a helper child that only waits; its maps are written from here (root in the
 * host's user namespace), through the host's /proc (this mount namespace still has
 * it) at the helper's pid in that /proc's pid namespace (from its pidfd's fdinfo). */
static void make_idmap(long long uid_outside, long long gid_outside, long long uid_inside, long long gid_inside) {
    int pidfd = -1;
    long helper = clone_child(CLONE_NEWUSER, -1, &pidfd);
    check(helper, "clone the idmapped bind's user namespace", "");
    if (helper == 0) {
        prctl(PR_SET_PDEATHSIG, SIGKILL, 0, 0, 0);
        for (;;)
            pause();
    }
    char path[64], info[512], proc_dir[48];
    append_int(path, append(path, 0, sizeof path, "/proc/self/fdinfo/"), sizeof path, pidfd);
    int fd = open(path, O_RDONLY | O_CLOEXEC);
    ssize_t got = fd < 0 ? -1 : read(fd, info, sizeof info - 1);
    if (fd >= 0)
        close(fd);
    long long host_pid = 0;
    if (got > 0) {
        info[got] = '\0';
        const char *at = strstr(info, "\nPid:");
        if (at)
            for (at += 5; *at == '\t' || *at == ' '; at++)
                ;
        for (; at && *at >= '0' && *at <= '9'; at++)
            host_pid = host_pid * 10 + (*at - '0');
    }
    if (host_pid <= 0) {
        syscall(SYS_pidfd_send_signal, pidfd, SIGKILL, NULL, 0);
        fail(ESRCH, "find the idmapped bind's helper in /proc", "");
    }
    size_t at = append(proc_dir, 0, sizeof proc_dir, "/proc/");
    at = append_int(proc_dir, at, sizeof proc_dir, host_pid);
    append(proc_dir, at, sizeof proc_dir, "/");
    write_id_map(proc_dir, "uid_map", uid_inside, uid_outside);
    write_id_map(proc_dir, "gid_map", gid_inside, gid_outside);
    append(path, append(path, 0, sizeof path, proc_dir), sizeof path, "ns/user");
    idmap_userns = open(path, O_RDONLY | O_CLOEXEC);
    int err = errno;
    syscall(SYS_pidfd_send_signal, pidfd, SIGKILL, NULL, 0);
    while (waitpid((pid_t)helper, NULL, 0) < 0 && errno == EINTR)
        ;
    close(pidfd);
    if (idmap_userns < 0)
        fail(err, "open the idmapped bind's user namespace", "");
}

/* mount(2) onto an fd, through its /proc/self/fd link (the host's /proc, before pivot_root). */
static void mount_on(const char *source, int fd, const char *target, const char *fstype, unsigned long flags,
                     const char *data) {
    char fd_path[64];
    append_int(fd_path, append(fd_path, 0, sizeof fd_path, "/proc/self/fd/"), sizeof fd_path, fd);
    if (mount(source, fd_path, fstype, flags, data) < 0)
        fail_path(errno, "mount on ", target);
}

/* How a bind finds its target: made if missing; skipped if missing; or one that
 * must be there (beneath a writable bind: host storage, where the set-up makes nothing). */
enum { TARGET_MAKE = 0, TARGET_OPTIONAL = 1, TARGET_EXISTING = 2 };

/* A copy of the source's tree (the fd opened by OPEN_SOURCE, else `source`), its
 * attributes set before it is attached, moved onto the target (see TARGET_*). */
static void bind_mount(int source_fd, const char *source, const char *target, long long attrs, int target_how) {
    struct stat st;
    int optional = target_how == TARGET_OPTIONAL;
    int target_fd = optional ? open_optional("bind target ", target, O_PATH)
        : target_how == TARGET_EXISTING
        ? open_path("bind target (beneath a writable bind it must exist already; create it there) ", target, O_PATH)
        : -1;
    if (optional && target_fd < 0)
        return;
    int own_source = source_fd < 0;
    if (own_source)
        source_fd = open_path("bind source ", source, O_PATH);
    if (fstat(source_fd, &st) < 0)
        fail_path(errno, "stat the bind source for ", target);
    if (target_how == TARGET_MAKE)
        target_fd = open_mount_point(target, S_ISDIR(st.st_mode));
    int tree = (int)syscall(SYS_open_tree, source_fd, "",
                            OPEN_TREE_CLONE | OPEN_TREE_CLOEXEC | AT_EMPTY_PATH | AT_RECURSIVE);
    if (tree < 0)
        fail_path(errno, "bind (open_tree) on ", target);
    if (attrs)
        set_attrs(tree, target, attrs, 1);
    if (syscall(SYS_move_mount, tree, "", target_fd, "", MOVE_MOUNT_F_EMPTY_PATH | MOVE_MOUNT_T_EMPTY_PATH) < 0)
        fail_path(errno, "bind mount on ", target);
    close(tree);
    close(target_fd);
    if (own_source)
        close(source_fd);
}

/* "/proc/self/fd/N" appended: how overlayfs is given a layer opened here (never a path
 * it would resolve, through the image's symlinks, itself). */
static size_t append_fd_path(char *buf, size_t at, size_t cap, int fd) {
    at = append(buf, at, cap, "/proc/self/fd/");
    return append_int(buf, at, cap, fd);
}

/* An overlayfs on `target` of the layers in `slots` (lower ones, top first; the upper
 * and work directories, or -1), each an fd opened earlier; all of them are closed. */
static void overlay_mount(int *slots, const char *target, const char *lowers, Py_ssize_t nlowers, long long upper,
                          long long work, const char *options, unsigned long flags) {
    char data[1024];
    size_t at = append(data, 0, sizeof data, "lowerdir=");
    for (Py_ssize_t i = 0; i + 4 <= nlowers; i += 4) {
        int32_t slot;
        memcpy(&slot, lowers + i, 4);
        if (slot < 0 || slot >= MAX_SLOTS || slots[slot] < 0)
            fail(EINVAL, "bad overlay slot", "");
        at = append(data, at, sizeof data, i ? ":" : "");
        at = append_fd_path(data, at, sizeof data, slots[slot]);
    }
    if (upper >= 0) {
        if (upper >= MAX_SLOTS || work < 0 || work >= MAX_SLOTS || slots[upper] < 0 || slots[work] < 0)
            fail(EINVAL, "bad overlay slot", "");
        at = append_fd_path(data, append(data, at, sizeof data, ",upperdir="), sizeof data, slots[upper]);
        at = append_fd_path(data, append(data, at, sizeof data, ",workdir="), sizeof data, slots[work]);
    }
    if (options && *options)
        at = append(data, append(data, at, sizeof data, ","), sizeof data, options);
    int fd = open_path("overlay on ", target, O_PATH | O_DIRECTORY);
    mount_on("overlay", fd, target, "overlay", flags, data);
    close(fd);
    for (Py_ssize_t i = 0; i + 4 <= nlowers; i += 4) {
        int32_t slot;
        memcpy(&slot, lowers + i, 4);
        close(slots[slot]);
        slots[slot] = -1;
    }
    if (upper >= 0) {
        close(slots[upper]);
        close(slots[work]);
        slots[upper] = slots[work] = -1;
    }
}

/* Send `len` bytes of `data` over the unix socket `sock`, with `fd` attached
 * (SCM_RIGHTS) unless it is < 0; EINTR is retried. Returns sendmsg's result. */
static ssize_t send_with_fd(int sock, const void *data, size_t len, int fd) {
    struct iovec iov = {(void *)data, len};
    union {
        struct cmsghdr header;
        char buf[CMSG_SPACE(sizeof(int))];
    } control;
    struct msghdr msg;
    memset(&msg, 0, sizeof msg);
    memset(&control, 0, sizeof control);
    msg.msg_iov = &iov;
    msg.msg_iovlen = 1;
    if (fd >= 0) {
        msg.msg_control = control.buf;
        msg.msg_controllen = sizeof control.buf;
        struct cmsghdr *c = CMSG_FIRSTHDR(&msg);
        c->cmsg_level = SOL_SOCKET;
        c->cmsg_type = SCM_RIGHTS;
        c->cmsg_len = CMSG_LEN(sizeof(int));
        memcpy(CMSG_DATA(c), &fd, sizeof(int));
    }
    ssize_t rc;
    do
        rc = sendmsg(sock, &msg, MSG_NOSIGNAL);
    while (rc < 0 && errno == EINTR);
    return rc;
}

/* Send `fd` over `sock` with the one byte `tag`; a failure fails the stage, naming `what`. */
static void send_fd(int sock, char tag, int fd, const char *what) {
    check(send_with_fd(sock, &tag, 1, fd), what, "");
}

static void write_file(const char *path, const char *content, Py_ssize_t len) {
    char name[256];
    int parent = open_parent(path, name, sizeof name, 0);
    int fd = openat(parent, name, O_CREAT | O_WRONLY | O_TRUNC | O_CLOEXEC | O_NOFOLLOW, 0644);
    if (fd < 0)
        fail_path(errno, "create ", path);
    close(parent);
    while (len > 0) {
        ssize_t n = write(fd, content, (size_t)len);
        if (n < 0 && errno == EINTR)
            continue;
        if (n < 0)
            fail_path(errno, "write ", path);
        content += n;
        len -= n;
    }
    close(fd);
}

static void make_symlink(const char *link, const char *path) {
    char name[256];
    int parent = open_parent(path, name, sizeof name, 0);
    if (symlinkat(link, parent, name) < 0)
        fail_path(errno, "symlink ", path);
    close(parent);
}

/* ------------------------------------------------------------------ process */

static void reset_signals(void) {
    struct sigaction dfl;
    memset(&dfl, 0, sizeof dfl);
    dfl.sa_handler = SIG_DFL;
    for (int sig = 1; sig < 32; sig++) /* the classic signals: nothing here sets real-time ones */
        if (sig != SIGKILL && sig != SIGSTOP)
            check(sigaction(sig, &dfl, NULL), "sigaction", "");
    sigset_t none;
    sigemptyset(&none);
    check(sigprocmask(SIG_SETMASK, &none, NULL), "sigprocmask", "");
}

/* The connect proxy's listening socket (linux/connect_proxy.py), made in the sandbox's
 * network namespace and handed to the parent, which gives it to the proxy on the host. */
static void proxy_listener(int sock, int port) {
    int fd = socket(AF_INET, SOCK_STREAM | SOCK_CLOEXEC, 0);
    check(fd, "socket", "");
    struct sockaddr_in address;
    memset(&address, 0, sizeof address);
    address.sin_family = AF_INET;
    address.sin_port = htons((uint16_t)port);
    address.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
    check(bind(fd, (struct sockaddr *)&address, sizeof address), "bind the proxy's address", "");
    check(listen(fd, 128), "listen", "");
    send_fd(sock, 'p', fd, "send the proxy's socket to the parent");
    close(fd);
    close(sock);
}

static void loopback_up(void) {
    int sock = socket(AF_INET, SOCK_DGRAM | SOCK_CLOEXEC, 0);
    check(sock, "socket", "");
    struct ifreq req;
    memset(&req, 0, sizeof req);
    strcpy(req.ifr_name, "lo");
    check(ioctl(sock, SIOCGIFFLAGS, &req), "SIOCGIFFLAGS lo", "");
    req.ifr_flags |= IFF_UP;
    check(ioctl(sock, SIOCSIFFLAGS, &req), "SIOCSIFFLAGS lo", "");
    close(sock);
}

/* Give the payload exactly the fds of `map` (target <- source pairs); close all
 * others but `keep`, the error pipe and the trace fd. Any fd number works: the
 * kept ones are sorted and the gaps between them closed. */
static void arrange_fds(const int32_t *map, Py_ssize_t pairs, const int32_t *keep, Py_ssize_t nkeep) {
    enum { MAX_PAIRS = 64, MAX_KEPT = MAX_PAIRS * 2 + 3 };
    int above = 3, staged[MAX_PAIRS], kept[MAX_KEPT], nkept = 0;
    if (pairs > MAX_PAIRS || nkeep > MAX_PAIRS)
        fail(EINVAL, "too many fds to pass", "");
    for (Py_ssize_t i = 0; i < pairs; i++) {
        if (map[2 * i] < 0 || map[2 * i + 1] < 0)
            fail(EBADF, "a negative fd in the fd map", "");
        if (map[2 * i] + 1 > above)
            above = map[2 * i] + 1;
    }
    for (Py_ssize_t i = 0; i < pairs; i++) {
        staged[i] = fcntl(map[2 * i + 1], F_DUPFD_CLOEXEC, above);
        check(staged[i], "dup of a passed fd", "");
    }
    for (Py_ssize_t i = 0; i < pairs; i++) {
        check(dup2(staged[i], map[2 * i]), "dup2 of a passed fd", "");
        close(staged[i]);
        kept[nkept++] = map[2 * i];
    }
    for (Py_ssize_t i = 0; i < nkeep; i++)
        if (keep[i] >= 0)
            kept[nkept++] = keep[i];
    if (error_fd >= 0)
        kept[nkept++] = error_fd;
    if (trace_fd >= 0)
        kept[nkept++] = trace_fd;
    if (listener_sock[1] >= 0)
        kept[nkept++] = listener_sock[1];
    for (int i = 1; i < nkept; i++) /* insertion sort: a handful of fds */
        for (int j = i; j > 0 && kept[j - 1] > kept[j]; j--) {
            int swap = kept[j];
            kept[j] = kept[j - 1];
            kept[j - 1] = swap;
        }
    unsigned int first = 0;
    for (int i = 0; i < nkept; i++) {
        if ((unsigned int)kept[i] > first)
            check(syscall(SYS_close_range, first, (unsigned int)kept[i] - 1, 0), "close_range", "");
        if ((unsigned int)kept[i] + 1 > first)
            first = (unsigned int)kept[i] + 1;
    }
    check(syscall(SYS_close_range, first, ~0U, 0), "close_range", "");
}

static void set_identity(uid_t uid, gid_t gid, int in_user_namespace) {
    uid_t ruid, euid, suid;
    gid_t rgid, egid, sgid;
    check(prctl(PR_SET_KEEPCAPS, 1, 0, 0, 0), "PR_SET_KEEPCAPS", "");
    if (!in_user_namespace)
        check(setgroups(0, NULL), "setgroups", "");
    check(setresgid(gid, gid, gid), "setresgid", "");
    check(setresuid(uid, uid, uid), "setresuid", "");
    getresuid(&ruid, &euid, &suid);
    getresgid(&rgid, &egid, &sgid);
    if (ruid != uid || euid != uid || suid != uid || rgid != gid || egid != gid || sgid != gid)
        fail(EPERM, "uid/gid did not change to the sandbox's", "");
}

static void caps_get(struct __user_cap_data_struct data[2]) {
    struct __user_cap_header_struct header = {_LINUX_CAPABILITY_VERSION_3, 0};
    check(syscall(SYS_capget, &header, data), "capget", "");
}

static void caps_set(uint64_t effective, uint64_t permitted, uint64_t inheritable) {
    struct __user_cap_header_struct header = {_LINUX_CAPABILITY_VERSION_3, 0};
    struct __user_cap_data_struct data[2];
    for (int i = 0; i < 2; i++) {
        data[i].effective = (uint32_t)(effective >> (32 * i));
        data[i].permitted = (uint32_t)(permitted >> (32 * i));
        data[i].inheritable = (uint32_t)(inheritable >> (32 * i));
    }
    check(syscall(SYS_capset, &header, data), "capset", "");
}

/* Clear the bounding set but for `allowed`, set the permitted/effective/inheritable
 * sets to `allowed`, raise `ambient`. Runs after the uid change (keep-caps kept the
 * permitted set, so CAP_SETPCAP can still be made effective to shrink the bounding set). */
static void apply_capabilities(uint64_t allowed, uint64_t ambient, int last_cap) {
    struct __user_cap_data_struct data[2];
    caps_get(data);
    uint64_t permitted = data[0].permitted | ((uint64_t)data[1].permitted << 32);
    caps_set(permitted, permitted, 0);
    for (int cap = 0; cap <= last_cap; cap++)
        if (!(allowed & (1ULL << cap)))
            check(prctl(PR_CAPBSET_DROP, cap, 0, 0, 0), "PR_CAPBSET_DROP", "");
    if ((allowed & permitted) != allowed)
        fail(EPERM, "capabilities not held by the launcher", "");
    caps_set(allowed, allowed, allowed);
    check(prctl(PR_CAP_AMBIENT, PR_CAP_AMBIENT_CLEAR_ALL, 0, 0, 0), "PR_CAP_AMBIENT_CLEAR_ALL", "");
    for (int cap = 0; cap <= last_cap; cap++)
        if (ambient & (1ULL << cap))
            check(prctl(PR_CAP_AMBIENT, PR_CAP_AMBIENT_RAISE, cap, 0, 0), "PR_CAP_AMBIENT_RAISE", "");
}

/* Install the filter; with `listener`, keep its listener (init confines itself before it
 * spawns a program: the filter never refers init's own calls to it, see seccomp.py) or
 * hand it to init (a forked payload) and close it: the payload never holds it. */
static void install_seccomp(const char *bpf, Py_ssize_t len, int listener) {
    struct sock_fprog prog = {(unsigned short)(len / sizeof(struct sock_filter)), (struct sock_filter *)bpf};
    long fd = syscall(SYS_seccomp, SECCOMP_SET_MODE_FILTER, listener ? SECCOMP_FILTER_FLAG_NEW_LISTENER : 0, &prog);
    if (fd < 0) {
        if (errno == EACCES)
            fail(EACCES, "the kernel refused the filter: no_new_privs is not set and the process lacks "
                         "CAP_SYS_ADMIN", "");
        fail(errno, "the kernel refused the filter", "");
    }
    if (!listener)
        return;
    if (listener_sock[1] < 0) {
        listener_fd = (int)fd; /* close-on-exec: the program never gets it */
        return;
    }
    /* Unanswered notifications fail with ENOSYS once the listener is gone: closed. */
    send_fd(listener_sock[1], 'L', (int)fd, "hand the seccomp listener to init");
    close((int)fd);
    close(listener_sock[1]);
    listener_sock[1] = -1;
}

/* ------------------------------------------------------------------ the listener (in init) */

static ssize_t receive_with_fds(int sock, void *buf, size_t len, int *fds, int max_fds, int *nfds,
                                int *truncated);

static uint64_t syscall_counts[LISTENER_SLOTS + 1]; /* the last slot: numbers above */
static int64_t syscall_first_us[LISTENER_SLOTS + 1];

static void answer_notification(int fd) {
    struct seccomp_notif req;
    struct seccomp_notif_resp resp;
    memset(&req, 0, sizeof req);
    if (ioctl(fd, SECCOMP_IOCTL_NOTIF_RECV, &req) < 0)
        return; /* EINTR, or the caller died meanwhile (ENOENT) */
    unsigned int nr = (unsigned int)req.data.nr;
    unsigned int slot = nr < LISTENER_SLOTS ? nr : LISTENER_SLOTS;
    if (syscall_counts[slot]++ == 0) {
        struct timespec now;
        clock_gettime(CLOCK_REALTIME, &now); /* the vDSO: no syscall */
        syscall_first_us[slot] = (int64_t)now.tv_sec * 1000000 + now.tv_nsec / 1000;
    }
    memset(&resp, 0, sizeof resp);
    resp.id = req.id;
    if (listener_mode == LISTENER_LEARN) {
        resp.flags = SECCOMP_USER_NOTIF_FLAG_CONTINUE;
    } else {
        int32_t err = 0;
        if ((Py_ssize_t)nr < listener_nerrnos)
            memcpy(&err, listener_errnos + 4 * (size_t)nr, sizeof err);
        resp.error = -(err > 0 ? err : ENOSYS);
    }
    (void)ioctl(fd, SECCOMP_IOCTL_NOTIF_SEND, &resp); /* ENOENT: the caller was killed */
}

/* The listener's counts for init's report: " s<nr>:<count>:<first, us since the epoch>" each
 * (the slot LISTENER_SLOTS for numbers above), then " omitted <n>" for what did not fit. */
static size_t append_syscalls(char *buf, size_t at, size_t cap) {
    long long omitted = 0;
    for (unsigned int slot = 0; slot <= LISTENER_SLOTS; slot++) {
        if (!syscall_counts[slot])
            continue;
        if (at + 64 > cap) {
            omitted++;
            continue;
        }
        at = append(buf, at, cap, " s");
        at = append_int(buf, at, cap, slot);
        at = append(buf, at, cap, ":");
        at = append_int(buf, at, cap, (long long)syscall_counts[slot]);
        at = append(buf, at, cap, ":");
        at = append_int(buf, at, cap, listener_mode == LISTENER_LEARN ? 0 : syscall_first_us[slot]); /* room */
    }
    if (omitted) {
        at = append(buf, at, cap, " omitted ");
        at = append_int(buf, at, cap, omitted);
    }
    return at;
}

/* Receive the listener the payload hands over (EOF: it failed before its filter). */
static void receive_listener(void) {
    int fds[1], nfds, truncated;
    char tag;
    ssize_t got = receive_with_fds(listener_sock[0], &tag, 1, fds, 1, &nfds, &truncated);
    if (got > 0 && nfds == 1)
        listener_fd = fds[0];
    close(listener_sock[0]);
    listener_sock[0] = -1;
}

/* ------------------------------------------------------------------ Landlock */

/* The structs of include/uapi/linux/landlock.h, ABI 6 (the build host's header may be older).
 * A kernel of a lower ABI accepts the larger ruleset struct as long as the fields it does
 * not know are zero, which linux/landlock.py ensures by masking them for its ABI. */
struct landlock_ruleset_v6 {
    uint64_t handled_access_fs, handled_access_net, scoped;
};

struct landlock_path_beneath_v1 {
    uint64_t allowed_access;
    int32_t parent_fd;
} __attribute__((packed));

#define LANDLOCK_RULE_PATH_BENEATH_ 1
/* Execute, write, read, truncate, ioctl on devices: the rights a rule on a file may hold. */
#define LANDLOCK_FILE_RIGHTS ((1ULL << 0) | (1ULL << 1) | (1ULL << 2) | (1ULL << 14) | (1ULL << 15))

static int landlock_fd = -1;

static void landlock_ruleset(uint64_t fs, uint64_t net, uint64_t scoped) {
    struct landlock_ruleset_v6 attr = {fs, net, scoped};
    landlock_fd = (int)syscall(SYS_landlock_create_ruleset, &attr, sizeof attr, 0);
    check(landlock_fd, "landlock_create_ruleset", "");
}

/* Allow `access` beneath `path` (absolute, in the new root; no symlink followed). */
static void landlock_path(const char *path, uint64_t access) {
    struct stat st;
    int fd = open_path("landlock rule on ", path, O_PATH);
    if (fstat(fd, &st) < 0)
        fail_path(errno, "stat for a landlock rule ", path);
    if (!S_ISDIR(st.st_mode))
        access &= LANDLOCK_FILE_RIGHTS;
    struct landlock_path_beneath_v1 rule = {access, fd};
    if (access && syscall(SYS_landlock_add_rule, landlock_fd, LANDLOCK_RULE_PATH_BENEATH_, &rule, 0) < 0)
        fail_path(errno, "landlock_add_rule ", path);
    close(fd);
}

static void landlock_restrict(void) {
    check(syscall(SYS_landlock_restrict_self, landlock_fd, 0), "landlock_restrict_self", "");
    close(landlock_fd);
    landlock_fd = -1;
}

/* ------------------------------------------------------------------ init */

static volatile pid_t payload_pid = -1;

static void forward(int sig) {
    int saved = errno;
    if (payload_pid > 0)
        kill(payload_pid, sig);
    errno = saved;
}

static const int forwarded[] = {SIGINT, SIGTERM, SIGHUP, SIGQUIT, SIGUSR1, SIGUSR2, SIGPIPE};

/* init cannot do its job (a seccomp profile may deny what it needs): say so on
 * the status pipe and exit, which kills the sandbox (pid 1) or lets the parent
 * kill its cgroup. */
static void init_failed(int status_fd, const char *what) {
    char buf[64];
    size_t at = append(buf, 0, sizeof buf, "initfail ");
    at = append_int(buf, at, sizeof buf, errno);
    at = append(buf, at, sizeof buf, " ");
    at = append(buf, at, sizeof buf, what);
    (void)!write(status_fd, buf, at);
    _exit(EXIT_SANDBOX_ERROR);
}

/* Reap until the payload ends; returns its wait status. */
static int wait_for(pid_t payload, int status_fd) {
    for (;;) {
        int st;
        pid_t pid = waitpid(-1, &st, 0);
        if (pid < 0) {
            if (errno == EINTR)
                continue;
            init_failed(status_fd, "waitpid"); /* never report a payload it did not see end */
        }
        if (pid == payload)
            return st;
    }
}

static void child_ended(int sig) {
    (void)sig; /* only interrupts ppoll */
}

/* REPORT_SIGNAL asks init to end the payload now and report (its host-side killer sends it,
 * then waits briefly before its SIGKILL): the listener's counts survive a kill. The payload
 * may send it too (pid 1 in its namespace has a handler): that only ends the payload, as
 * its own SIGKILL would; the counts in the report are still init's. */
#define REPORT_SIGNAL (SIGRTMAX)
static volatile sig_atomic_t report_asked = 0;

static void ask_report(int sig) {
    (void)sig;
    report_asked = 1;
}

/* Reap and answer the listener until the payload ends. SIGCHLD is blocked but while in
 * ppoll, so that no child's end is missed between the reaping and the wait. */
static int wait_answering(pid_t payload, int status_fd) {
    struct sigaction act;
    memset(&act, 0, sizeof act);
    act.sa_handler = child_ended;
    struct sigaction report_act;
    memset(&report_act, 0, sizeof report_act);
    report_act.sa_handler = ask_report;
    sigset_t chld, during_poll;
    sigemptyset(&chld);
    sigaddset(&chld, SIGCHLD);
    sigaddset(&chld, REPORT_SIGNAL);
    if (sigaction(SIGCHLD, &act, NULL) < 0 || sigaction(REPORT_SIGNAL, &report_act, NULL) < 0 ||
        sigprocmask(SIG_BLOCK, &chld, &during_poll) < 0)
        init_failed(status_fd, "sigaction");
    sigdelset(&during_poll, SIGCHLD);
    sigdelset(&during_poll, REPORT_SIGNAL);
    int payload_killed = 0;
    for (;;) {
        int st;
        pid_t pid;
        if (report_asked && !payload_killed) {
            payload_killed = 1;
            kill(payload, SIGKILL); /* then reaped below: the report follows as at its end */
        }
        while ((pid = waitpid(-1, &st, WNOHANG)) > 0)
            if (pid == payload)
                return st;
        if (pid < 0 && errno != EINTR)
            init_failed(status_fd, "waitpid");
        if (listener_fd < 0)
            return wait_for(payload, status_fd);
        struct pollfd p = {listener_fd, POLLIN, 0};
        if (ppoll(&p, 1, NULL, &during_poll) < 0) {
            if (errno == EINTR)
                continue;
            init_failed(status_fd, "ppoll");
        }
        if (p.revents & POLLIN) {
            answer_notification(listener_fd);
        } else if (p.revents & (POLLHUP | POLLERR | POLLNVAL)) {
            close(listener_fd); /* no filtered process is left */
            listener_fd = -1;
        }
    }
}

/* pid 1: reap every process, forward signals to the payload, and when it ends
 * report its wait status, the reaped children's peak memory (KiB) and CPU time
 * (user, system, us) ("exit N maxrss K cpu U S" / "signal N maxrss K cpu U S")
 * and exit, which ends every process of the pid namespace. */
static void run_init(pid_t payload, int status_fd, const long long *identity) {
    struct sigaction act;
    memset(&act, 0, sizeof act);
    act.sa_handler = forward;
    payload_pid = payload;
    for (size_t i = 0; i < sizeof forwarded / sizeof *forwarded; i++)
        if (sigaction(forwarded[i], &act, NULL) < 0)
            init_failed(status_fd, "sigaction");
    if (identity) {
        /* Init of a forked payload: become the payload's uid/gid with no capability
         * at all (signalling a process of one's own uid needs none) and no new privileges. */
        struct __user_cap_header_struct header = {_LINUX_CAPABILITY_VERSION_3, 0};
        struct __user_cap_data_struct none[2];
        uid_t uid = (uid_t)identity[0];
        gid_t gid = (gid_t)identity[1];
        uid_t ruid, euid, suid;
        gid_t rgid, egid, sgid;
        memset(none, 0, sizeof none);
        if ((!identity[2] && setgroups(0, NULL) < 0) || setresgid(gid, gid, gid) < 0)
            init_failed(status_fd, "setresgid");
        if (setresuid(uid, uid, uid) < 0)
            init_failed(status_fd, "setresuid");
        if (syscall(SYS_capset, &header, none) < 0)
            init_failed(status_fd, "capset");
        if (prctl(PR_CAP_AMBIENT, PR_CAP_AMBIENT_CLEAR_ALL, 0, 0, 0) < 0 ||
            prctl(PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0) < 0)
            init_failed(status_fd, "prctl");
        getresuid(&ruid, &euid, &suid);
        getresgid(&rgid, &egid, &sgid);
        if (ruid != uid || euid != uid || suid != uid || rgid != gid || egid != gid || sgid != gid) {
            errno = EPERM;
            init_failed(status_fd, "identity");
        }
        /* The uid change cleared the parent-death signal: re-arm it, then make sure the
         * parent did not die in between (it holds the sync pipe's write end while it
         * supervises: a hang-up means it is gone). */
        int sync_fd = (int)identity[3];
        struct pollfd hangup = {sync_fd, POLLIN, 0};
        if (prctl(PR_SET_PDEATHSIG, SIGKILL, 0, 0, 0) < 0)
            init_failed(status_fd, "prctl");
        if (poll(&hangup, 1, 0) != 0) {
            errno = ESRCH;
            init_failed(status_fd, "parent_gone");
        }
        close(sync_fd);
    }
    if (listener_sock[0] >= 0)
        receive_listener();
    if (prctl(PR_SET_DUMPABLE, 0, 0, 0, 0) < 0)
        init_failed(status_fd, "prctl");
    int keep[2] = {status_fd < listener_fd ? status_fd : listener_fd, status_fd < listener_fd ? listener_fd : status_fd};
    unsigned int first = 0;
    for (int k = 0; k < 2; k++) {
        if (keep[k] < 0)
            continue;
        if ((unsigned int)keep[k] > first && syscall(SYS_close_range, first, (unsigned int)keep[k] - 1, 0) < 0)
            init_failed(status_fd, "close_range");
        first = (unsigned int)keep[k] + 1;
    }
    if (syscall(SYS_close_range, first, ~0U, 0) < 0)
        init_failed(status_fd, "close_range");
    int status = listener_fd >= 0 ? wait_answering(payload, status_fd) : wait_for(payload, status_fd);
    /* As pid 1, end the rest of the tree before reporting: the report is taken as the
     * sandbox's end (the parent may answer before init itself is reaped), and what
     * the others used counts. kill(-1) from pid 1 reaches only its own pid namespace
     * (all of one uid, no capabilities); without a pid namespace the parent's cgroup
     * kill does this instead. */
    if (getpid() == 1 && kill(-1, SIGKILL) == 0) /* ESRCH: nobody left; another error (a seccomp
                                                  profile): the namespace's end kills them */
        while (waitpid(-1, NULL, 0) > 0 || errno == EINTR)
            ;
    /* The largest resident set of the processes init reaped, in KiB: init's own
     * (a copy of its parent's memory) would overstate a small program. */
    struct rusage children;
    char buf[4096]; /* at most PIPE_BUF: one atomic write */
    size_t at;
    if (WIFSIGNALED(status)) {
        at = append(buf, 0, sizeof buf, "signal ");
        at = append_int(buf, at, sizeof buf, WTERMSIG(status));
    } else {
        at = append(buf, 0, sizeof buf, "exit ");
        at = append_int(buf, at, sizeof buf, WEXITSTATUS(status));
    }
    if (getrusage(RUSAGE_CHILDREN, &children) == 0) {
        at = append(buf, at, sizeof buf, " maxrss ");
        at = append_int(buf, at, sizeof buf, children.ru_maxrss);
        at = append(buf, at, sizeof buf, " cpu ");
        at = append_int(buf, at, sizeof buf, children.ru_utime.tv_sec * 1000000LL + children.ru_utime.tv_usec);
        at = append(buf, at, sizeof buf, " ");
        at = append_int(buf, at, sizeof buf, children.ru_stime.tv_sec * 1000000LL + children.ru_stime.tv_usec);
    }
    if (listener_mode)
        at = append_syscalls(buf, at, sizeof buf);
    (void)!write(status_fd, buf, at); /* one write: the parent may take it before we exit */
    _exit(0);
}

/* The program's path: argv[0] if it has a slash, else the first executable file
 * of that name in the sandbox's PATH (looked up inside the sandbox). */
static const char *find_program(const launch_t *launch, char *buf, size_t cap) {
    const char *name = launch->argv[0];
    if (strchr(name, '/'))
        return name;
    const char *dirs = launch->path_env ? launch->path_env : "/usr/bin:/bin";
    while (*dirs) {
        const char *end = strchrnul(dirs, ':');
        size_t n = (size_t)(end - dirs);
        if (n && n + strlen(name) + 2 < cap) {
            struct stat st;
            memcpy(buf, dirs, n);
            buf[n] = '/';
            strcpy(buf + n + 1, name);
            if (stat(buf, &st) == 0 && S_ISREG(st.st_mode) && access(buf, X_OK) == 0)
                return buf;
        }
        dirs = *end ? end + 1 : end;
    }
    fail(ENOENT, "command not found: ", name);
    return NULL;
}

/* ------------------------------------------------------------------ the steps */

static const char *s(const step_t *step, int i) {
    return step->str[i];
}

/* Zeroed memory for a launch received by a spare (the child never returns it). */
static void *child_alloc(size_t size) {
    void *mem = mmap(NULL, size ? size : 1, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
    return mem == MAP_FAILED ? NULL : mem;
}

/* One record on `sock`: its bytes into `buf`, and up to `max_fds` passed fds (close-on-
 * exec) into `fds`. Returns the byte count, 0 at EOF, -1 on an error (no fds then);
 * `truncated`: the bytes or the fds did not all fit. */
static ssize_t receive_with_fds(int sock, void *buf, size_t len, int *fds, int max_fds, int *nfds,
                                int *truncated) {
    enum { MOST_FDS = 64 };
    struct iovec iov = {buf, len};
    union {
        struct cmsghdr header;
        char buf[CMSG_SPACE(sizeof(int) * MOST_FDS)];
    } control;
    struct msghdr msg;
    memset(&msg, 0, sizeof msg);
    msg.msg_iov = &iov;
    msg.msg_iovlen = 1;
    msg.msg_control = control.buf;
    msg.msg_controllen = CMSG_SPACE(sizeof(int) * (size_t)(max_fds < MOST_FDS ? max_fds : MOST_FDS));
    ssize_t got;
    do
        got = recvmsg(sock, &msg, MSG_CMSG_CLOEXEC);
    while (got < 0 && errno == EINTR);
    *nfds = 0;
    *truncated = 0;
    if (got < 0)
        return got;
    for (struct cmsghdr *c = CMSG_FIRSTHDR(&msg); c; c = CMSG_NXTHDR(&msg, c))
        if (c->cmsg_level == SOL_SOCKET && c->cmsg_type == SCM_RIGHTS)
            for (size_t at = 0; at + sizeof(int) <= c->cmsg_len - CMSG_LEN(0); at += sizeof(int)) {
                int fd;
                memcpy(&fd, CMSG_DATA(c) + at, sizeof(int));
                if (*nfds < max_fds) {
                    fds[(*nfds)++] = fd;
                } else {
                    close(fd);
                    *truncated = 1;
                }
            }
    if (msg.msg_flags & (MSG_CTRUNC | MSG_TRUNC))
        *truncated = 1;
    return got;
}

/* A spare waits here for its launch: one record on `sock` whose fds are a memfd
 * holding the packed launch and then the payload's fds, which are placed at
 * `staging`, `staging`+1, ... (the launch's fd map takes them from there). EOF
 * means the spare was discarded unused. */
static void await_launch(launch_t *launch, int sock, int staging) {
    char tag;
    int fds[MAX_LAUNCH_FDS], nfds, truncated;
    ssize_t got = receive_with_fds(sock, &tag, 1, fds, MAX_LAUNCH_FDS, &nfds, &truncated);
    if (got == 0)
        _exit(0);
    check(got, "receive the launch", "");
    if (truncated || nfds < 1)
        fail(EINVAL, "a malformed launch record", "");
    /* Out of the way first, then onto the staging numbers: no fd is overwritten. */
    for (int i = 1; i < nfds; i++) {
        int moved = fcntl(fds[i], F_DUPFD_CLOEXEC, staging + MAX_LAUNCH_FDS);
        check(moved, "move a passed fd", "");
        close(fds[i]);
        fds[i] = moved;
    }
    for (int i = 1; i < nfds; i++) {
        check(dup3(fds[i], staging + i - 1, O_CLOEXEC), "place a passed fd", "");
        close(fds[i]);
    }
    struct stat st;
    check(fstat(fds[0], &st), "stat the launch", "");
    const char *buf = mmap(NULL, (size_t)st.st_size ? (size_t)st.st_size : 1, PROT_READ, MAP_PRIVATE, fds[0], 0);
    if (buf == MAP_FAILED)
        fail(errno, "map the launch", "");
    close(fds[0]);
    close(sock);
    const char *error = parse_launch(buf, (size_t)st.st_size, launch, child_alloc);
    if (error)
        fail(EINVAL, error, "");
}

/* A step's uid or gid: its own, or (-1) the launch's sandbox id. */
static long long launch_id(const launch_t *launch, long long id) {
    if (id >= 0)
        return id;
    if (launch->sandbox_id < 0)
        fail(EINVAL, "the launch has no sandbox id for its uid/gid", "");
    return launch->sandbox_id;
}

/* Run the steps. Returns only in a callable's payload process (STEP_RETURN). */
/* posix_spawn with RLIMIT_AS set in the program's own process just before its execve:
 * init, a copy of a large Python process, could not map posix_spawn's stack under a
 * small limit. The exec's error comes back through a close-on-exec pipe. */
static int spawn_with_address_limit(pid_t *pid, const char *path, launch_t *launch, rlim_t limit) {
    int report[2];
    if (pipe2(report, O_CLOEXEC) < 0)
        return errno;
    pid_t child = fork();
    if (child < 0) {
        int err = errno;
        close(report[0]);
        close(report[1]);
        return err;
    }
    if (child == 0) {
        struct rlimit rl = {limit, limit};
        int err = setrlimit(RLIMIT_AS, &rl) < 0 ? errno : 0;
        if (!err) {
            execve(path, launch->argv, launch->envp);
            err = errno;
        }
        ssize_t unused = write(report[1], &err, sizeof err);
        (void)unused;
        _exit(127);
    }
    close(report[1]);
    int err = 0;
    ssize_t got;
    do
        got = read(report[0], &err, sizeof err);
    while (got < 0 && errno == EINTR);
    close(report[0]);
    if (got == (ssize_t)sizeof err && err) {
        while (waitpid(child, NULL, 0) < 0 && errno == EINTR)
            ;
        return err;
    }
    *pid = child;
    return 0;
}

static void run_steps(launch_t *launch) {
    static int slots[MAX_SLOTS];
    pid_t init_pid = (pid_t)syscall(SYS_getpid);
    for (Py_ssize_t i = 0; i < launch->count; i++) {
        const step_t *st = &launch->steps[i];
        const long long *n = st->num;
        switch (st->kind) {
        case STEP_STAGE:
            current_stage = s(st, 0);
            trace(current_stage);
            break;
        case STEP_SETSID:
            check(setsid(), "setsid", "");
            break;
        case STEP_RESET_SIGNALS:
            reset_signals();
            break;
        case STEP_PRCTL:
            check(prctl((int)n[0], (unsigned long)n[1], 0, 0, 0), "prctl", "");
            break;
        case STEP_WAIT_TOKEN: {
            char token = 0;
            ssize_t got;
            do
                got = read((int)n[0], &token, 1);
            while (got < 0 && errno == EINTR);
            if (got != 1 || token != (char)n[1])
                fail(ESRCH, "the parent exited before releasing the sandbox", "");
            break;
        }
        case STEP_STILL_SUPERVISED: {
            /* Outside our pid namespace the parent is invisible (getppid() is 0); it
             * holds the other end of this pipe while it supervises: a hang-up means
             * it died before the parent-death signal was armed. */
            check(prctl(PR_SET_PDEATHSIG, SIGKILL, 0, 0, 0), "PR_SET_PDEATHSIG", "");
            struct pollfd p = {(int)n[0], POLLIN, 0};
            /* A token not read yet is no hang-up: only POLLHUP (no writer left) is. */
            if (poll(&p, 1, 0) != 0 && (p.revents & (POLLHUP | POLLERR | POLLNVAL)))
                fail(ESRCH, "the parent exited", "");
            break;
        }
        case STEP_DIE_WITH_INIT:
            check(prctl(PR_SET_PDEATHSIG, SIGKILL, 0, 0, 0), "PR_SET_PDEATHSIG", "");
            if (getppid() != init_pid)
                fail(ESRCH, "the sandbox init exited", "");
            break;
        case STEP_MOUNT: {
            int fd = n[5] ? open_optional("mount on ", s(st, 1), O_PATH) : open_path("mount on ", s(st, 1), O_PATH);
            if (fd >= 0) {
                mount_on(s(st, 0), fd, s(st, 1), s(st, 2), (unsigned long)n[3], s(st, 4));
                close(fd);
            }
            break;
        }
        case STEP_SETATTR: {
            int fd = open_path("mount_setattr ", s(st, 0), O_PATH);
            set_attrs(fd, s(st, 0), n[1], (int)n[2]);
            close(fd);
            break;
        }
        case STEP_OPEN_SOURCE:
            if (n[0] < 0 || n[0] >= MAX_SLOTS)
                fail(EINVAL, "bad slot", "");
            slots[n[0]] = open_path("bind source ", s(st, 1), O_PATH);
            break;
        case STEP_BIND:
            if (n[0] >= MAX_SLOTS)
                fail(EINVAL, "bad slot", "");
            bind_mount(n[0] >= 0 ? slots[n[0]] : -1, s(st, 1), s(st, 2), n[3], (int)n[4]);
            if (n[0] >= 0 && !n[5]) {
                close(slots[n[0]]);
                slots[n[0]] = -1;
            }
            break;
        case STEP_SEND_SLOT:
            if (n[1] < 0 || n[1] >= MAX_SLOTS)
                fail(EINVAL, "bad slot", "");
            send_fd((int)n[0], 'f', slots[n[1]], "send the overlay's upper layer to the parent");
            close(slots[n[1]]);
            slots[n[1]] = -1;
            close((int)n[0]);
            break;
        case STEP_OVERLAY:
            overlay_mount(slots, s(st, 0), s(st, 1), st->len[1], n[2], n[3], s(st, 4), (unsigned long)n[5]);
            break;
        case STEP_MKDIR:
            close(make_dirs(s(st, 0), (size_t)st->len[0], 0));
            break;
        case STEP_SYMLINK:
            make_symlink(s(st, 0), s(st, 1));
            break;
        case STEP_WRITE_FILE:
            write_file(s(st, 0), s(st, 1), st->len[1]);
            break;
        case STEP_CHDIR:
            check(chdir(s(st, 0)), "chdir ", s(st, 0));
            break;
        case STEP_PIVOT_ROOT:
            check(syscall(SYS_pivot_root, ".", "."), "pivot_root", "");
            check(umount2(".", MNT_DETACH), "detach the old root", "");
            check(chdir("/"), "chdir /", "");
            break;
        case STEP_SETHOSTNAME:
            check(sethostname(s(st, 0), strlen(s(st, 0))), "sethostname", "");
            break;
        case STEP_UMASK:
            umask((mode_t)n[0]);
            break;
        case STEP_LOOPBACK_UP:
            loopback_up();
            break;
        case STEP_PROXY_LISTENER:
            if (n[1] < 1 || n[1] > 65535)
                fail(EINVAL, "bad port", "");
            proxy_listener((int)n[0], (int)n[1]);
            break;
        case STEP_ARRANGE_FDS:
            arrange_fds((const int32_t *)s(st, 0), st->len[0] / 8, (const int32_t *)s(st, 1), st->len[1] / 4);
            break;
        case STEP_SETRLIMIT: {
            struct rlimit limit = {(rlim_t)n[1], (rlim_t)n[1]};
            check(setrlimit((int)n[0], &limit), "setrlimit", "");
            break;
        }
        case STEP_IDENTITY:
            set_identity((uid_t)launch_id(launch, n[0]), (gid_t)launch_id(launch, n[1]), (int)n[2]);
            break;
        case STEP_CAPABILITIES:
            apply_capabilities((uint64_t)n[0], (uint64_t)n[1], (int)n[2]);
            break;
        case STEP_SECCOMP:
            install_seccomp(s(st, 0), st->len[0], (int)n[1]);
            break;
        case STEP_LISTENER:
            listener_mode = (int)n[0];
            listener_errnos = s(st, 1);
            listener_nerrnos = st->len[1] / 4;
            if (n[2]) { /* a forked payload will hand it over: above every fd it is to get */
                int pair[2];
                check(socketpair(AF_UNIX, SOCK_SEQPACKET | SOCK_CLOEXEC, 0, pair), "socketpair", "");
                for (int k = 0; k < 2; k++) {
                    listener_sock[k] = fcntl(pair[k], F_DUPFD_CLOEXEC, error_fd + 1);
                    check(listener_sock[k], "move the listener socket", "");
                    close(pair[k]);
                }
            }
            break;
        case STEP_LANDLOCK_RULESET:
            landlock_ruleset((uint64_t)n[0], (uint64_t)n[1], (uint64_t)n[2]);
            break;
        case STEP_LANDLOCK_PATH:
            landlock_path(s(st, 0), (uint64_t)n[1]);
            break;
        case STEP_LANDLOCK_RESTRICT:
            landlock_restrict();
            break;
        case STEP_IDMAP:
            if (idmap_userns >= 0) {
                close(idmap_userns);
                idmap_userns = -1;
            }
            if (n[0] != -2)
                make_idmap(launch_id(launch, n[0]), launch_id(launch, n[1]), n[2], n[3]);
            break;
        case STEP_CLOSE:
            close((int)n[0]);
            break;
        case STEP_FORK_PAYLOAD: {
            init_pid = (pid_t)syscall(SYS_getpid);
            long long identity[4] = {launch_id(launch, n[1]), launch_id(launch, n[2]), n[3], n[4]};
            pid_t pid = (pid_t)syscall(SYS_clone, SIGCHLD, 0, 0, 0, 0);
            check(pid, "fork the payload", "");
            if (pid > 0) {
                close(error_fd);
                if (listener_sock[1] >= 0) {
                    close(listener_sock[1]);
                    listener_sock[1] = -1;
                }
                run_init(pid, (int)n[0], identity);
            }
            close((int)n[0]);
            close((int)n[4]);
            if (listener_sock[0] >= 0) {
                close(listener_sock[0]);
                listener_sock[0] = -1;
            }
            break;
        }
        case STEP_SPAWN_PROGRAM: {
            char path_buf[4096];
            const char *path = find_program(launch, path_buf, sizeof path_buf);
            check(chdir(launch->cwd), "chdir ", launch->cwd);
            pid_t pid;
            int err = n[1] >= 0 ? spawn_with_address_limit(&pid, path, launch, (rlim_t)n[1])
                                : posix_spawn(&pid, path, NULL, NULL, launch->argv, launch->envp);
            if (err)
                fail(err, "cannot execute ", path);
            close(error_fd);
            run_init(pid, (int)n[0], NULL); /* init confined itself like the program */
            break;
        }
        case STEP_EXEC_PROGRAM: {
            char path_buf[4096];
            const char *path = find_program(launch, path_buf, sizeof path_buf);
            check(chdir(launch->cwd), "chdir ", launch->cwd);
            execve(path, launch->argv, launch->envp); /* the error pipe closes on success */
            fail(errno, "cannot execute ", path);
            break;
        }
        case STEP_RETURN:
            close(error_fd);
            if (trace_fd >= 0)
                close(trace_fd); /* benchmarks only: never left to the callable */
            return;
        case STEP_SETNS:
            check(setns((int)n[0], (int)n[1]), "setns", "");
            close((int)n[0]);
            break;
        case STEP_JOIN_CGROUP:
            for (Py_ssize_t at = 0; at + 4 <= st->len[0]; at += 4) {
                int32_t fd;
                memcpy(&fd, s(st, 0) + at, 4);
                check(write(fd, "0", 1), "join the cgroup", "");
                close(fd);
            }
            break;
        case STEP_AWAIT_LAUNCH:
            await_launch(launch, (int)n[0], (int)n[1]);
            i = -1; /* go on with the launch's steps */
            break;
        case STEP_MOVE_ERROR_FD: {
            int moved = fcntl(error_fd, F_DUPFD_CLOEXEC, (int)n[0]);
            check(moved, "move the error pipe", "");
            close(error_fd);
            error_fd = moved;
            if (trace_fd >= 0) {
                moved = fcntl(trace_fd, F_DUPFD_CLOEXEC, (int)n[0]);
                trace_fd = moved; /* -1 on failure: no more tracing */
            }
            break;
        }
        default:
            fail(EINVAL, "unknown step", "");
        }
    }
    fail(EINVAL, "the steps ended without starting the payload", "");
}

/* ------------------------------------------------------------------ Python entry */

struct clone_args_v2 {
    uint64_t flags, pidfd, child_tid, parent_tid, exit_signal, stack, stack_size, tls, set_tid,
        set_tid_size, cgroup;
};

PyDoc_STRVAR(spawn_doc,
"spawn(clone_flags, cgroup_fd, error_fd, launch, trace_fd=-1) -> (pid, pidfd, python)\n\n"
"clone3 a child with `clone_flags` (and CLONE_INTO_CGROUP when cgroup_fd >= 0) that runs\n"
"the packed `launch` (steps.pack_launch) in C. Returns (pid, pidfd, None) in the parent;\n"
"returns (0, -1, python) only in a callable's payload process, after its last step\n"
"(STEP_RETURN), where `python` is the Python part of a spare's launch (else None).\n"
"The caller must be single-threaded.");

static void *parent_alloc(size_t size) {
    return PyMem_Calloc(1, size ? size : 1);
}

static void free_launch(launch_t *launch) {
    PyMem_Free(launch->steps);
    PyMem_Free(launch->argv);
    PyMem_Free(launch->envp);
}

/* clone3 with CLONE_PIDFD (and into the v2 cgroup `cgroup_fd` if >= 0). */
static long clone_child(unsigned long long clone_flags, int cgroup_fd, int *pidfd) {
    struct clone_args_v2 cargs;
    memset(&cargs, 0, sizeof cargs);
    cargs.flags = clone_flags | CLONE_PIDFD;
    cargs.pidfd = (uint64_t)(uintptr_t)pidfd;
    /* A child of our parent gets our exit signal (SIGCHLD): clone3 refuses another one. */
    cargs.exit_signal = (clone_flags & CLONE_PARENT) ? 0 : SIGCHLD;
    if (cgroup_fd >= 0) {
        cargs.flags |= CLONE_INTO_CGROUP;
        cargs.cgroup = (uint64_t)cgroup_fd;
    }
    return syscall(SYS_clone3, &cargs, sizeof cargs);
}

/* Where this process's argv and environment strings lie (/proc/self/stat fields 48-51,
 * read at import). Every sandbox's init is a clone of the process that started it
 * (the CLI, a manager, a zygote's template), and /proc/<pid>/cmdline shows that
 * memory to anyone in the sandbox: the host's command line (file names) and its
 * environment strings. Changing the range needs CAP_SYS_RESOURCE (PR_SET_MM_ARG_*),
 * so the child zeroes the strings instead; the interpreter keeps its own copies. */
static unsigned long arg_env_area[4]; /* arg_start, arg_end, env_start, env_end */

static void find_arg_env_area(void) {
    char buf[2048];
    int fd = open("/proc/self/stat", O_RDONLY | O_CLOEXEC);
    if (fd < 0)
        return;
    ssize_t got = read(fd, buf, sizeof buf - 1);
    close(fd);
    if (got <= 0)
        return;
    buf[got] = 0;
    char *at = strrchr(buf, ')'); /* the command name may hold spaces */
    unsigned long found[4];
    int field = 2;
    if (!at)
        return;
    for (char *p = at + 1; *p && field < 51; p++)
        if (*p == ' ') {
            field++;
            if (field >= 48)
                found[field - 48] = strtoul(p + 1, NULL, 10);
        }
    if (field == 51 && found[0] <= found[1] && found[2] <= found[3])
        memcpy(arg_env_area, found, sizeof found);
}

/* Zero [start, end) unless it is zero already (a write copies the page). */
static void wipe(unsigned long start, unsigned long end) {
    volatile char *p = (volatile char *)start;
    size_t n = end - start;
    size_t i = 0;
    while (i < n && p[i] == 0)
        i++;
    if (i < n)
        memset((char *)start, 0, n);
}

static void wipe_arg_env_area(void) {
    wipe(arg_env_area[0], arg_env_area[1]);
    wipe(arg_env_area[2], arg_env_area[3]);
}

/* In the child: run the steps; returns to Python only in a callable's payload process. */
static PyObject *become_child(launch_t *launch, int err_fd, int trace) {
    error_fd = err_fd;
    trace_fd = trace;
    wipe_arg_env_area();
    run_steps(launch); /* returns only in a callable's payload process */
    PyOS_AfterFork_Child();
    if (launch->python && launch->python_len > 0)
        return Py_BuildValue("(iiy#)", 0, -1, launch->python, launch->python_len);
    return Py_BuildValue("(iiO)", 0, -1, Py_None); /* the launch is never freed in the child */
}

static PyObject *child_spawn(PyObject *Py_UNUSED(self), PyObject *args) {
    unsigned long long clone_flags;
    int cgroup_fd, err_fd, trace = -1;
    Py_buffer packed;
    if (!PyArg_ParseTuple(args, "Kiiy*|i", &clone_flags, &cgroup_fd, &err_fd, &packed, &trace))
        return NULL;
    launch_t launch;
    PyObject *result = NULL;
    const char *error = parse_launch(packed.buf, (size_t)packed.len, &launch, parent_alloc);
    if (error) {
        PyErr_SetString(PyExc_ValueError, error);
        goto done;
    }
    int pidfd = -1;
    PyOS_BeforeFork();
    long pid = clone_child(clone_flags, cgroup_fd, &pidfd);
    if (pid == 0) {
        result = become_child(&launch, err_fd, trace);
        PyBuffer_Release(&packed);
        return result;
    }
    int saved = errno;
    PyOS_AfterFork_Parent();
    if (pid < 0) {
        errno = saved;
        PyErr_SetFromErrno(PyExc_OSError);
        goto done;
    }
    result = Py_BuildValue("(liO)", pid, pidfd, Py_None);
done:
    free_launch(&launch);
    PyBuffer_Release(&packed);
    return result;
}

PyDoc_STRVAR(check_doc,
"check(launch) -> None\n\n"
"Raise ValueError if the packed `launch` is malformed (what serve() would refuse).");

static PyObject *child_check(PyObject *Py_UNUSED(self), PyObject *args) {
    Py_buffer packed;
    if (!PyArg_ParseTuple(args, "y*", &packed))
        return NULL;
    launch_t launch;
    const char *error = parse_launch(packed.buf, (size_t)packed.len, &launch, parent_alloc);
    free_launch(&launch);
    PyBuffer_Release(&packed);
    if (error) {
        PyErr_SetString(PyExc_ValueError, error);
        return NULL;
    }
    Py_RETURN_NONE;
}

/* ------------------------------------------------------------------ the clone server */

/* One request on the server socket: u64 clone flags, i32 cgroup fd, i32 error fd,
 * i32 trace fd, u32 n, n x i32 fd numbers; attached: a memfd with the packed launch,
 * then the n fds, which are placed at those same numbers for the clone (the
 * requester's numbers, so that its steps need no translation). */
#define MAX_SERVED_FDS 32

typedef struct {
    uint64_t clone_flags;
    int32_t cgroup_fd, error_fd, trace_fd;
    uint32_t count;
    int32_t numbers[MAX_SERVED_FDS];
} request_t;

static int receive_request(int sock, request_t *request, int *fds, int *nfds) {
    int truncated;
    ssize_t got = receive_with_fds(sock, request, sizeof *request, fds, MAX_SERVED_FDS + 1, nfds, &truncated);
    if (got < 0)
        return 0; /* the socket is broken: end the server */
    return truncated ? -1 : (int)got;
}

static void reply(int sock, long pid_or_error, int pidfd) {
    int64_t value = pid_or_error;
    (void)!send_with_fd(sock, &value, sizeof value, pidfd);
}

/* Place the received fds at the requested numbers (out of the way first, so that no
 * fd is overwritten; the server's own socket moves if it is in the way). */
static int place_fds(int *sock, const request_t *request, int *fds, int nfds) {
    int top = *sock;
    for (uint32_t i = 0; i < request->count; i++)
        if (request->numbers[i] < 0 || request->numbers[i] > 1 << 20)
            return -EBADF;
        else if (request->numbers[i] > top)
            top = request->numbers[i];
    for (uint32_t i = 0; i < request->count; i++)
        if (request->numbers[i] == *sock) {
            int moved = fcntl(*sock, F_DUPFD_CLOEXEC, top + 1);
            if (moved < 0)
                return -errno;
            close(*sock);
            *sock = moved;
            top = moved;
        }
    for (int i = 1; i < nfds; i++) {
        int moved = fcntl(fds[i], F_DUPFD_CLOEXEC, top + 1);
        if (moved < 0)
            return -errno; /* the caller closes fds[i..] (received or moved) */
        close(fds[i]);
        fds[i] = moved;
    }
    for (int i = 1; i < nfds; i++) {
        if (dup3(fds[i], request->numbers[i - 1], O_CLOEXEC) < 0) {
            int err = errno;
            for (int j = 1; j < i; j++) /* placed already */
                close(request->numbers[j - 1]);
            return -err; /* the caller closes fds[i..] */
        }
        close(fds[i]);
        fds[i] = -1;
    }
    return 0;
}

PyDoc_STRVAR(serve_doc,
"serve(sock, parent) -> None | (0, -1, python)\n\n"
"The clone server of a template process: for each request on the SOCK_SEQPACKET\n"
"socket `sock`, clone3 a child with CLONE_PARENT (its parent is the requester,\n"
"which can wait for it and holds the reply's pidfd) that runs the packed launch,\n"
"and reply with its pid (or -errno) and pidfd. No Python runs in the server, so\n"
"its pages stay shared with everything it clones. Returns None at EOF (or when\n"
"`parent`, the requester, is gone), and (0, -1, python) in a callable's payload process.");

static PyObject *child_serve(PyObject *Py_UNUSED(self), PyObject *args) {
    int sock, parent;
    if (!PyArg_ParseTuple(args, "ii", &sock, &parent))
        return NULL;
    /* Die with the requester; it may have died before the signal was armed. */
    if (prctl(PR_SET_PDEATHSIG, SIGKILL, 0, 0, 0) < 0 || getppid() != parent)
        Py_RETURN_NONE;
    /* Every clone below is a fork of this process as far as Python is concerned, and
     * the payload process calls PyOS_AfterFork_Child (become_child), which releases
     * what PyOS_BeforeFork took: the import lock and, from 3.13, the runtime's
     * recursive mutexes, which must be owned by the forking thread (else a fatal
     * error). No Python runs in the server, so it takes them once, here, and stays
     * "before the fork" until its socket ends. */
    PyOS_BeforeFork();
    wipe_arg_env_area(); /* once here: its clones share the zeroed page */
    for (;;) {
        request_t request;
        int fds[MAX_SERVED_FDS + 1], nfds;
        memset(&request, 0, sizeof request);
        int got = receive_request(sock, &request, fds, &nfds);
        if (got == 0) {
            PyOS_AfterFork_Parent();
            Py_RETURN_NONE; /* the requester is gone */
        }
        long outcome = -EINVAL;
        launch_t launch;
        memset(&launch, 0, sizeof launch);
        const char *buf = MAP_FAILED;
        struct stat st = {0};
        if (got >= (int)offsetof(request_t, numbers) && nfds >= 1 && request.count <= MAX_SERVED_FDS &&
            (size_t)got == offsetof(request_t, numbers) + request.count * sizeof(int32_t) &&
            (uint32_t)nfds == request.count + 1 && fstat(fds[0], &st) == 0 && st.st_size > 0)
            buf = mmap(NULL, (size_t)st.st_size, PROT_READ, MAP_PRIVATE, fds[0], 0);
        if (nfds >= 1)
            close(fds[0]);
        if (buf != MAP_FAILED && !parse_launch(buf, (size_t)st.st_size, &launch, parent_alloc)) {
            int placed = place_fds(&sock, &request, fds, nfds);
            int pidfd = -1;
            if (placed < 0) {
                outcome = placed;
                for (int i = 1; i < nfds; i++)
                    if (fds[i] >= 0)
                        close(fds[i]);
                reply(sock, outcome, -1);
            } else {
                long pid = clone_child(request.clone_flags | CLONE_PARENT, request.cgroup_fd, &pidfd);
                if (pid == 0) {
                    close(sock);
                    return become_child(&launch, request.error_fd, request.trace_fd);
                }
                outcome = pid < 0 ? -errno : pid;
                reply(sock, outcome, pidfd);
                if (pidfd >= 0)
                    close(pidfd);
                for (uint32_t i = 0; i < request.count; i++)
                    close(request.numbers[i]);
            }
        } else {
            for (int i = 1; i < nfds; i++)
                close(fds[i]);
            reply(sock, outcome, -1);
        }
        free_launch(&launch);
        if (buf != MAP_FAILED)
            munmap((void *)buf, (size_t)st.st_size);
    }
}

static PyMethodDef methods[] = {
    {"spawn", child_spawn, METH_VARARGS, spawn_doc},
    {"check", child_check, METH_VARARGS, check_doc},
    {"serve", child_serve, METH_VARARGS, serve_doc},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef module = {
    PyModuleDef_HEAD_INIT, "_child", "The sandbox child's steps, executed in C (see _child.c).", -1, methods,
};

PyMODINIT_FUNC PyInit__child(void) {
    find_arg_env_area();
    if (arg_env_area[1] == 0) { /* fail closed: every sandbox would show the host's argv */
        PyErr_SetString(PyExc_ImportError,
                        "cannot find this process's argv and environment area in /proc/self/stat "
                        "(a sandbox's init must wipe it)");
        return NULL;
    }
    return PyModule_Create(&module);
}
