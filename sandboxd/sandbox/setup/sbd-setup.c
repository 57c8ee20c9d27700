/*
 * sbd-setup: the interpreter of a sandbox's set-up program (sandboxd/sandbox/program.py).
 *
 * The fork server starts it with vfork semantics (posix_spawn) as the spawner of a sandbox's
 * init (`spawn`, below: it clones the init from itself, the host's side of a user namespace
 * done), and the init, a copy of this small process, walks the program (`interpret`). Or, on
 * its own, for tests and scripts/bench (and `sbd-setup userns READY DONE`: hold_userns):
 *
 *     sbd-setup PROGRAM_FD CHANNEL_FD SYSFS_FD
 *
 * The walk reads the whole program from PROGRAM_FD (the encoding is ops.py's), moves the status channel
 * clear of the service's fds 3.., and runs the ops in order, as bubblewrap walks its SetupOp
 * list: each op's guards are tested at that moment, every call is checked, and the first that
 * fails ends it: SetupFailed(step, detail, path, 127) on the channel, the same JSON the Python
 * code sends (protocol.py: encode; confine.py: failure), then exit 127. The last ops report
 * Executing(CLOCK_MONOTONIC ns), with the bind() listener by SCM_RIGHTS when there is one, and
 * `init_exec`: the command is forked as pid 2 and executed, and this process stays as the
 * sandbox's init (pid 1: it forwards signals, reaps orphans, exits as the command did); the
 * channel's EOF says the command executed. sandboxd/sandbox/reference.py is this file's twin in
 * Python, for unit tests.
 *
 * No dependency beyond libc and the kernel's headers; built static by scripts/build-setup.sh.
 */
#define _GNU_SOURCE
#include <errno.h>
#include <fcntl.h>
#include <dirent.h>
#include <grp.h>
#include <malloc.h>
#include <linux/capability.h>
#include <linux/filter.h>
#include <linux/seccomp.h>
#include <net/if.h>
#include <sched.h>
#include <signal.h>
#include <stdarg.h>
#include <stdbool.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/ioctl.h>
#include <sys/mount.h>
#include <sys/prctl.h>
#include <sys/resource.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <sys/syscall.h>
#include <sys/wait.h>
#include <time.h>
#include <unistd.h>

#define EXIT_SETUP_FAILED 127
#define EXIT_UNEXPECTED 126
#define MAX_REGISTERS 64
#define MAX_ARGS 8
#define MAX_GUARDS 8
#define MAX_TOLERATED 8
#define PATH_BUF 8192

#ifndef AT_RECURSIVE
#define AT_RECURSIVE 0x8000
#endif
#define SBD_MOVE_MOUNT_F_EMPTY_PATH 0x4
#define SBD_MOUNT_ATTR_RDONLY 0x1
#define SBD_MOUNT_ATTR_NOSUID 0x2
#define SBD_MOUNT_ATTR_NODEV 0x4

/* The calls, in the order of ops.CALLS (tests/unit/test_program.py compares the two lists). */
enum call {
    C_RESET_SIGNALS, C_WRITE, C_CLOSE, C_SETNS, C_UNSHARE, C_SETSID, C_SETHOSTNAME, C_LOOPBACK_UP,
    C_PRCTL, C_SETGROUPS, C_SETRESGID, C_SETRESUID, C_SETGID, C_SETUID, C_DROP_BOUNDING_SET,
    C_KEEP_ONLY_CAPABILITIES, C_INSTALL_SECCOMP, C_INSTALL_SECCOMP_LISTENER, C_OPEN, C_DUP_ABOVE,
    C_DUP2, C_CLOSE_OTHERS, C_MOUNT, C_UMOUNT2, C_MOUNT_SETATTR, C_MOVE_MOUNT, C_PIVOT_ROOT,
    C_CHDIR, C_MKDIR, C_MAKEDIRS, C_CREATE_FILE, C_SYMLINK, C_RMDIR, C_FAIL, C_BIND_INSIDE,
    C_TMPFS_INSIDE, C_SEAL_COVERS, C_REPORT_EXECUTING, C_REPORT_EXECUTING_WITH, C_INIT_EXEC, C_COUNT
};

/* The guards, in the order of ops.GUARD_TESTS. */
enum test { G_DIR, G_NOT_DIR, G_EXISTS, G_ABSENT, G_LINK, G_OWN_MOUNT, G_MARKED, G_COUNT };

struct arg {
    char tag;             /* i f s n b S I, as ops.py writes them */
    int64_t i;            /* i, f */
    const char *s;        /* s (NULL for n) */
    uint32_t n;           /* b: bytes; S, I: items */
    const uint8_t *bytes; /* b */
    char **strs;          /* S, NULL-terminated */
    int64_t *ints;        /* I */
};

struct guard {
    uint8_t test;
    int16_t mark;
    const char *path;
};

struct op {
    uint16_t call;
    int16_t into, mark;
    uint8_t nguards, ntolerated, nargs;
    const char *step;
    struct guard guards[MAX_GUARDS];
    int32_t tolerated[MAX_TOLERATED];
    struct arg args[MAX_ARGS];
};

struct mount_attr_arg {
    uint64_t attr_set, attr_clr, propagation, userns_fd;
};

static int channel = -1;
static const char *step = "read the set-up program";
static const struct op *current;
static int registers[MAX_REGISTERS];
static uint64_t marks;

/* ── the reports, byte for byte what protocol.encode writes (json.dumps, ensure_ascii) ── */

struct text {
    char *data;
    size_t length, size;
};

static void put(struct text *t, const char *s, size_t n)
{
    if (t->length + n + 1 > t->size) {
        size_t size = (t->size + n + 1) * 2;
        char *grown = realloc(t->data, size);
        if (!grown)
            _exit(EXIT_UNEXPECTED);
        t->data = grown;
        t->size = size;
    }
    memcpy(t->data + t->length, s, n);
    t->length += n;
    t->data[t->length] = 0;
}

static void putf(struct text *t, const char *format, ...)
{
    char buffer[64];
    va_list ap;
    va_start(ap, format);
    int n = vsnprintf(buffer, sizeof buffer, format, ap);
    va_end(ap);
    put(t, buffer, (size_t)n);
}

/* The length of the UTF-8 sequence at s (and its code point), or 0 if it is not one: Python's
 * strings carry an undecodable byte as a lone surrogate U+DC80..U+DCFF (surrogateescape). */
static size_t utf8(const unsigned char *s, uint32_t *point)
{
    size_t n = s[0] >= 0xF0 && s[0] < 0xF5 ? 4 : s[0] >= 0xE0 ? 3 : s[0] >= 0xC2 && s[0] < 0xE0 ? 2 : 0;
    if (!n)
        return 0;
    uint32_t c = s[0] & (0x7F >> n);
    for (size_t k = 1; k < n; k++) {
        if ((s[k] & 0xC0) != 0x80)
            return 0;
        c = (c << 6) | (s[k] & 0x3F);
    }
    if ((n == 3 && (c < 0x800 || (c >= 0xD800 && c < 0xE000))) || (n == 4 && (c < 0x10000 || c > 0x10FFFF)))
        return 0;
    *point = c;
    return n;
}

static void put_json_string(struct text *t, const char *s)
{
    put(t, "\"", 1);
    for (const unsigned char *p = (const unsigned char *)s; *p;) {
        uint32_t c = *p;
        size_t n = 1;
        if (c >= 0x80 && !(n = utf8(p, &c))) {
            c = 0xDC00 + *p;
            n = 1;
        }
        p += n;
        switch (c) {
        case '"': put(t, "\\\"", 2); break;
        case '\\': put(t, "\\\\", 2); break;
        case '\n': put(t, "\\n", 2); break;
        case '\r': put(t, "\\r", 2); break;
        case '\t': put(t, "\\t", 2); break;
        case '\b': put(t, "\\b", 2); break;
        case '\f': put(t, "\\f", 2); break;
        default:
            if (c < 0x20 || c > 0x7E) {
                if (c >= 0x10000) {
                    c -= 0x10000;
                    putf(t, "\\u%04x\\u%04x", 0xD800 + (c >> 10), 0xDC00 + (c & 0x3FF));
                } else {
                    putf(t, "\\u%04x", c);
                }
            } else {
                char ch = (char)c;
                put(t, &ch, 1);
            }
        }
    }
    put(t, "\"", 1);
}

static _Noreturn void fail_with(const char *detail, const char *path, int code)
{
    struct text t = {0};
    put(&t, "{\"type\":\"setup-failed\",\"arg\":{\"step\":", 37);
    put_json_string(&t, step);
    put(&t, ",\"detail\":", 10);
    put_json_string(&t, detail);
    put(&t, ",\"path\":", 8);
    put_json_string(&t, path ? path : "");
    putf(&t, ",\"exit\":%d}}", code);
    if (send(channel, t.data, t.length, MSG_NOSIGNAL) < 0) {
        /* a reader that is gone changes nothing for the sender */
    }
    _exit(code);
}

/* An OSError's report: "PREFIXstrerror (path)", as linux.py's wrappers and confine.failure make it. */
static _Noreturn void fail_errno_with(const char *prefix, int error, const char *path, int code)
{
    struct text t = {0};
    put(&t, prefix, strlen(prefix));
    const char *message = strerror(error);
    put(&t, message, strlen(message));
    if (path && *path) {
        put(&t, " (", 2);
        put(&t, path, strlen(path));
        put(&t, ")", 1);
    }
    fail_with(t.data, path, code);
}

static _Noreturn void fail_errno(const char *prefix, int error, const char *path)
{
    fail_errno_with(prefix, error, path, EXIT_SETUP_FAILED);
}

static bool tolerated(int error)
{
    for (int k = 0; k < current->ntolerated; k++)
        if (current->tolerated[k] == error)
            return true;
    return false;
}

#define CHECK(result, prefix, path)                                                                \
    do {                                                                                           \
        if ((result) < 0 && !tolerated(errno))                                                    \
            fail_errno((prefix), errno, (path));                                                   \
    } while (0)

/* ── reading the program (ops.py's encoding; every string is followed by a NUL) ── */

struct reader {
    const uint8_t *p, *end;
};

static _Noreturn void malformed(void)
{
    fail_with("the set-up program is malformed", "", EXIT_UNEXPECTED);
}

static const uint8_t *take(struct reader *r, size_t n)
{
    if ((size_t)(r->end - r->p) < n)
        malformed();
    const uint8_t *at = r->p;
    r->p += n;
    return at;
}

static uint64_t take_le(struct reader *r, size_t n)
{
    const uint8_t *at = take(r, n);
    uint64_t value = 0;
    for (size_t k = n; k-- > 0;)
        value = (value << 8) | at[k];
    return value;
}

static const char *take_str(struct reader *r)
{
    uint32_t n = (uint32_t)take_le(r, 4);
    const char *s = (const char *)take(r, (size_t)n + 1);
    if (s[n] != 0 || memchr(s, 0, n))
        malformed();
    return s;
}

static void read_arg(struct reader *r, struct arg *a)
{
    a->tag = (char)*take(r, 1);
    switch (a->tag) {
    case 'i': a->i = (int64_t)take_le(r, 8); break;
    case 'f': a->i = (int32_t)take_le(r, 4); break;
    case 's': a->s = take_str(r); break;
    case 'n': a->s = NULL; break;
    case 'b':
        a->n = (uint32_t)take_le(r, 4);
        a->bytes = take(r, a->n);
        break;
    case 'S':
        a->n = (uint32_t)take_le(r, 4);
        if (a->n > (size_t)(r->end - r->p))
            malformed();
        a->strs = calloc((size_t)a->n + 1, sizeof *a->strs);
        for (uint32_t k = 0; k < a->n; k++)
            a->strs[k] = (char *)take_str(r);
        break;
    case 'I':
        a->n = (uint32_t)take_le(r, 4);
        if (a->n > (size_t)(r->end - r->p) / 8)
            malformed();
        a->ints = calloc((size_t)a->n + 1, sizeof *a->ints);
        for (uint32_t k = 0; k < a->n; k++)
            a->ints[k] = (int64_t)take_le(r, 8);
        break;
    default: malformed();
    }
}

static void read_op(struct reader *r, struct op *op)
{
    uint32_t length = (uint32_t)take_le(r, 4);
    struct reader body = {take(r, length - 4 <= length ? length - 4 : SIZE_MAX), NULL};
    body.end = body.p + (length - 4);
    op->call = (uint16_t)take_le(&body, 2);
    op->into = (int16_t)take_le(&body, 2);
    op->mark = (int16_t)take_le(&body, 2);
    op->nguards = *take(&body, 1);
    op->ntolerated = *take(&body, 1);
    op->nargs = *take(&body, 1);
    if (op->call >= C_COUNT || op->nguards > MAX_GUARDS || op->ntolerated > MAX_TOLERATED || op->nargs > MAX_ARGS || op->into >= MAX_REGISTERS || op->mark >= 64)
        malformed();
    op->step = take_str(&body);
    for (int k = 0; k < op->nguards; k++) {
        op->guards[k].test = *take(&body, 1);
        op->guards[k].mark = (int16_t)take_le(&body, 2);
        op->guards[k].path = take_str(&body);
        if (op->guards[k].test >= G_COUNT || op->guards[k].mark >= 64)
            malformed();
    }
    for (int k = 0; k < op->ntolerated; k++)
        op->tolerated[k] = (int32_t)take_le(&body, 4);
    for (int k = 0; k < op->nargs; k++)
        read_arg(&body, &op->args[k]);
    if (body.p != body.end)
        malformed();
}

static uint8_t *read_all(int fd, size_t *length)
{
    size_t size = 1 << 16, n = 0;
    uint8_t *data = malloc(size);
    for (;;) {
        if (!data)
            _exit(EXIT_UNEXPECTED);
        ssize_t got = read(fd, data + n, size - n);
        if (got < 0 && errno == EINTR)
            continue;
        if (got < 0)
            fail_errno("", errno, "");
        if (got == 0)
            break;
        n += (size_t)got;
        if (n == size)
            data = realloc(data, size *= 2);
    }
    *length = n;
    return data;
}

/* ── paths: what Python's os.path and os.makedirs do, for the same answers and errors ── */

static const char *S(const struct op *op, int k)
{
    if (op->args[k].tag != 's' && op->args[k].tag != 'n')
        malformed();
    return op->args[k].s;
}

static int64_t I(const struct op *op, int k)
{
    if (op->args[k].tag != 'i')
        malformed();
    return op->args[k].i;
}

static int FD(const struct op *op, int k)
{
    if (op->args[k].tag != 'f')
        malformed();
    int64_t value = op->args[k].i;
    if (value >= 0)
        return (int)value;
    if (-value - 1 >= MAX_REGISTERS)
        malformed();
    return registers[-value - 1];
}

/* posixpath.dirname */
static void dirname_of(const char *path, char *out)
{
    const char *slash = strrchr(path, '/');
    size_t n = slash ? (size_t)(slash - path) + 1 : 0;
    memcpy(out, path, n);
    out[n] = 0;
    size_t all_slashes = strspn(out, "/");
    if (n && all_slashes != n)
        while (n > 1 && out[n - 1] == '/')
            out[--n] = 0;
}

static bool is_dir(const char *path)
{
    struct stat st;
    return stat(path, &st) == 0 && S_ISDIR(st.st_mode);
}

static bool lexists(const char *path)
{
    struct stat st;
    return lstat(path, &st) == 0;
}

/* os.makedirs(path, mode, exist_ok=True); a failure names the path that failed. `inner`: for a
 * parent, whose EEXIST is no failure (the mkdir of the path itself then says what is wrong). */
static void makedirs_at(const char *path, mode_t mode, bool inner)
{
    char head[PATH_BUF];
    const char *tail = strrchr(path, '/') ? strrchr(path, '/') + 1 : path;
    dirname_of(path, head);
    if (!*tail) {
        char trimmed[PATH_BUF];
        snprintf(trimmed, sizeof trimmed, "%s", head);
        tail = strrchr(trimmed, '/') ? strrchr(trimmed, '/') + 1 : trimmed;
        dirname_of(trimmed, head);
    }
    struct stat st;
    if (*head && *tail && stat(head, &st) != 0)
        makedirs_at(head, 0777, true);
    if (mkdir(path, mode) != 0) {
        int error = errno;
        if (!is_dir(path) && !(inner && error == EEXIST))
            fail_errno("", error, path);
    }
}

static void makedirs(const char *path, mode_t mode)
{
    makedirs_at(path, mode, false);
}

static bool holds(const struct guard *g)
{
    struct stat st, parent_st;
    char parent[PATH_BUF];
    switch (g->test) {
    case G_DIR: return is_dir(g->path);
    case G_NOT_DIR: return !is_dir(g->path);
    case G_EXISTS: return lexists(g->path);
    case G_ABSENT: return !lexists(g->path);
    case G_LINK: return lstat(g->path, &st) == 0 && S_ISLNK(st.st_mode);
    case G_OWN_MOUNT:
        if (stat(g->path, &st) != 0)
            fail_errno("", errno, g->path);
        dirname_of(g->path, parent);
        if (stat(parent, &parent_st) != 0)
            fail_errno("", errno, parent);
        return st.st_dev != parent_st.st_dev;
    case G_MARKED: return g->mark >= 0 && (marks >> g->mark) & 1;
    }
    malformed();
}

/* ── the calls that are more than one syscall ── */

static void reset_signals(void)
{
    /* The kernel's own call: glibc's sigaction refuses its two internal signals (32, 33), and an
     * ignored one would be ignored in the command too (as a launcher that ignored them left it). */
    struct { void (*handler)(int); unsigned long flags; void (*restorer)(void); uint64_t mask; } action = {.handler = SIG_DFL};
    sigset_t none;
    for (int sig = 1; sig < _NSIG; sig++)
        if (sig != SIGKILL && sig != SIGSTOP)
            syscall(SYS_rt_sigaction, sig, &action, NULL, sizeof action.mask);
    sigemptyset(&none);
    sigprocmask(SIG_SETMASK, &none, NULL);
}

static void loopback_up(void)
{
    struct ifreq ifr = {0};
    int s = socket(AF_INET, SOCK_DGRAM | SOCK_CLOEXEC, 0);
    CHECK(s, "", "");
    strcpy(ifr.ifr_name, "lo");
    CHECK(ioctl(s, SIOCGIFFLAGS, &ifr), "", "");
    ifr.ifr_flags |= IFF_UP;
    CHECK(ioctl(s, SIOCSIFFLAGS, &ifr), "", "");
    close(s);
}

static bool kept(const struct arg *keep, int64_t cap)
{
    for (uint32_t k = 0; k < keep->n; k++)
        if (keep->ints[k] == cap)
            return true;
    return false;
}

/* Every capability the kernel knows (PR_CAPBSET_READ says EINVAL past the last) not kept. Not
 * from /proc/sys/kernel/cap_last_cap: this runs after pivot_root, where a bind of the spec's may
 * cover that file (through a symlink of the image's) and say "0". */
static void drop_bounding_set(const struct arg *keep)
{
    for (int cap = 0; cap < 64 && (prctl(PR_CAPBSET_READ, cap, 0, 0, 0) >= 0 || errno != EINVAL); cap++) {
        if (kept(keep, cap))
            continue;
        if (prctl(PR_CAPBSET_DROP, cap, 0, 0, 0) < 0) {
            int error = errno;
            char prefix[64];
            snprintf(prefix, sizeof prefix, "prctl(PR_CAPBSET_DROP, %d): ", cap);
            fail_errno(prefix, error, "");
        }
    }
}

static void keep_only_capabilities(const struct arg *keep)
{
    struct __user_cap_header_struct header = {_LINUX_CAPABILITY_VERSION_3, 0};
    struct __user_cap_data_struct data[2] = {{0}};
    for (uint32_t k = 0; k < keep->n; k++) {
        int64_t cap = keep->ints[k];
        if (cap < 0 || cap >= 64)
            malformed();
        data[cap / 32].effective |= 1u << (cap % 32);
    }
    for (int word = 0; word < 2; word++)
        data[word].permitted = data[word].inheritable = data[word].effective;
    CHECK(syscall(SYS_capset, &header, data), "capset: ", "");
    for (uint32_t k = 0; k < keep->n; k++) { /* sorted by the compiler */
        if (prctl(PR_CAP_AMBIENT, PR_CAP_AMBIENT_RAISE, keep->ints[k], 0, 0) < 0) {
            int error = errno;
            char prefix[64];
            snprintf(prefix, sizeof prefix, "prctl(PR_CAP_AMBIENT_RAISE, %d): ", (int)keep->ints[k]);
            fail_errno(prefix, error, "");
        }
    }
}

static struct sock_fprog filter_of(const struct arg *program)
{
    struct sock_fprog fprog = {(unsigned short)(program->n / 8), malloc(program->n + 8)};
    if (!fprog.filter)
        _exit(EXIT_UNEXPECTED);
    memcpy(fprog.filter, program->bytes, program->n); /* aligned for the kernel */
    return fprog;
}

static void close_others(int low, int keep)
{
    int ranges[2][2] = {{low, keep}, {keep + 1, 1 << 20}};
    for (int k = 0; k < 2; k++) { /* os.closerange(low, high): low .. high - 1 */
        if (ranges[k][0] >= ranges[k][1])
            continue;
        if (syscall(SYS_close_range, ranges[k][0], ranges[k][1] - 1, 0) < 0)
            for (int fd = ranges[k][0]; fd < ranges[k][1]; fd++)
                close(fd);
    }
}

/* One message with one descriptor (SCM_RIGHTS). */
static ssize_t send_with_fd(int socket_fd, const char *data, size_t n, int fd)
{
    union {
        char buffer[CMSG_SPACE(sizeof(int))];
        struct cmsghdr align;
    } control = {{0}};
    struct iovec iov = {(void *)data, n};
    struct msghdr msg = {.msg_iov = &iov, .msg_iovlen = 1, .msg_control = control.buffer, .msg_controllen = sizeof control.buffer};
    struct cmsghdr *cmsg = CMSG_FIRSTHDR(&msg);
    cmsg->cmsg_level = SOL_SOCKET;
    cmsg->cmsg_type = SCM_RIGHTS;
    cmsg->cmsg_len = CMSG_LEN(sizeof(int));
    memcpy(CMSG_DATA(cmsg), &fd, sizeof(int));
    return sendmsg(socket_fd, &msg, MSG_NOSIGNAL);
}

static void report_executing(int listener)
{
    struct timespec now;
    char json[96];
    clock_gettime(CLOCK_MONOTONIC, &now);
    int n = snprintf(json, sizeof json, "{\"type\":\"executing\",\"arg\":{\"exec_ns\":%lld}}", (long long)now.tv_sec * 1000000000LL + now.tv_nsec);
    if (listener < 0) {
        if (send(channel, json, (size_t)n, MSG_NOSIGNAL) < 0) {
            /* a reader that is gone changes nothing: the exec goes on */
        }
        return;
    }
    CHECK(send_with_fd(channel, json, (size_t)n, listener), "", "");
}

/* ── bind_inside, tmpfs_inside, seal_covers: the spec's mounts, after pivot_root ──
 *
 * A target is resolved once, by descriptors, and mounted on the descriptor it resolved to: the
 * kernel never looks the path up again, so nothing renamed or swapped for a symlink in between
 * (by a service of another sandbox writing a volume that an image's symlink leads into) moves
 * the mount. The walk goes one name at a time with openat2(O_PATH | O_NOFOLLOW,
 * RESOLVE_IN_ROOT | RESOLVE_NO_MAGICLINKS); a symlink is read and its target walked in its place
 * from the sandbox's root (absolute) or where it is (relative), `..` goes back to the folder the
 * walk came from (never above the root): posixpath.realpath's answer, found inside the sandbox.
 * More than 40 symlinks is ELOOP at the link where it stops; a walk that reaches `refuse_under`
 * (the host's root, still at OLD_ROOT) is refused before anything is made there.
 *
 * What is missing of the target is made (folders, then a folder or an empty file), in the
 * deepest folder that exists. When that folder is read-only (the host's root, a folder bound
 * from it, a mask), it is covered first, in the sandbox's mount namespace only: a tmpfs over it
 * holds a mount point for each of its entries (a folder, an empty file, the symlink itself) with
 * a copy of that entry's mount tree bound on it (open_tree(OPEN_TREE_CLONE | AT_RECURSIVE): the
 * mounts below it, masks included, come along), and then the new mount point. seal_covers makes
 * every cover read-only (itself only: the binds on it keep their flags) once all mounts are made.
 * The host's file system is never written.
 */

#define SBD_OPEN_TREE_CLONE 1
#define SBD_MOVE_MOUNT_T_EMPTY_PATH 0x40
#define SBD_FSCONFIG_SET_FLAG 0
#define SBD_FSCONFIG_SET_STRING 1
#define SBD_FSCONFIG_CMD_CREATE 6
#define SBD_RESOLVE_NO_MAGICLINKS 0x02
#define SBD_RESOLVE_IN_ROOT 0x10
#define MAX_DEPTH 256
#define MAX_COVERS 64

struct sbd_open_how {
    uint64_t flags, mode, resolve;
};

/* "A/B" into `out` (of PATH_BUF), or "/B" when A is "/"; a longer path is ENAMETOOLONG. */
static void path_of(char *out, const char *a, const char *b)
{
    if (snprintf(out, PATH_BUF, "%s/%s", strcmp(a, "/") ? a : "", b) >= PATH_BUF)
        fail_errno("", ENAMETOOLONG, a);
}

static int covers[MAX_COVERS];
static int ncovers;

/* The entry `name` of the folder `dir` itself (a symlink is not followed), as O_PATH. */
static int open_entry(int dir, const char *name)
{
    struct sbd_open_how how = {O_PATH | O_NOFOLLOW | O_CLOEXEC, 0, SBD_RESOLVE_IN_ROOT | SBD_RESOLVE_NO_MAGICLINKS};
    return (int)syscall(SYS_openat2, dir, name, &how, sizeof how);
}

static void attach(int tree, int target, const char *path)
{
    CHECK(syscall(SYS_move_mount, tree, "", target, "", SBD_MOVE_MOUNT_F_EMPTY_PATH | SBD_MOVE_MOUNT_T_EMPTY_PATH), "move_mount: ", path);
}

static void set_attr(int mount_fd, uint64_t set, uint64_t clear, bool recursive, const char *path)
{
    struct mount_attr_arg attr = {set, clear, 0, 0};
    CHECK(syscall(SYS_mount_setattr, mount_fd, "", AT_EMPTY_PATH | (recursive ? AT_RECURSIVE : 0), &attr, sizeof attr), "mount_setattr: ", path);
}

/* A detached tmpfs with `options` ("key=value,..."; a key alone is a flag), nosuid and nodev. */
static int new_tmpfs(const char *options, const char *path)
{
    int fs = (int)syscall(SYS_fsopen, "tmpfs", 1 /* FSOPEN_CLOEXEC */);
    CHECK(fs, "fsopen: ", path);
    char copy[PATH_BUF];
    snprintf(copy, sizeof copy, "%s", options ? options : "");
    for (char *save = NULL, *option = strtok_r(copy, ",", &save); option; option = strtok_r(NULL, ",", &save)) {
        char *value = strchr(option, '=');
        if (value)
            *value++ = 0;
        CHECK(syscall(SYS_fsconfig, fs, value ? SBD_FSCONFIG_SET_STRING : SBD_FSCONFIG_SET_FLAG, option, value, 0), "fsconfig: ", path);
    }
    CHECK(syscall(SYS_fsconfig, fs, SBD_FSCONFIG_CMD_CREATE, NULL, NULL, 0), "fsconfig: ", path);
    int mnt = (int)syscall(SYS_fsmount, fs, 1 /* FSMOUNT_CLOEXEC */, SBD_MOUNT_ATTR_NOSUID | SBD_MOUNT_ATTR_NODEV);
    CHECK(mnt, "fsmount: ", path);
    close(fs);
    return mnt;
}

/* The names in the folder `dir` (O_PATH), but . and .., as one NUL-separated list; `*count` of them. */
static char *list_names(int dir, const char *path, size_t *count)
{
    int fd = openat(dir, ".", O_RDONLY | O_DIRECTORY | O_CLOEXEC);
    CHECK(fd, "", path);
    DIR *d = fdopendir(fd);
    if (!d)
        fail_errno("", errno, path);
    struct text names = {0};
    put(&names, "", 0);
    *count = 0;
    for (struct dirent *e; (errno = 0, e = readdir(d));) {
        if (strcmp(e->d_name, ".") == 0 || strcmp(e->d_name, "..") == 0)
            continue;
        put(&names, e->d_name, strlen(e->d_name) + 1);
        ++*count;
    }
    if (errno)
        fail_errno("", errno, path);
    closedir(d);
    return names.data;
}

/* The entry `name` of `dir` again in the cover `mnt`: its mount point, and a copy of its tree on it. */
static void copy_entry(int dir, int mnt, const char *name, const char *path)
{
    struct stat st;
    char where[PATH_BUF];
    path_of(where, path, name);
    CHECK(fstatat(dir, name, &st, AT_SYMLINK_NOFOLLOW), "", where);
    if (S_ISLNK(st.st_mode)) {
        char link[PATH_BUF];
        ssize_t n = readlinkat(dir, name, link, sizeof link - 1);
        CHECK(n, "", where);
        link[n] = 0;
        CHECK(symlinkat(link, mnt, name), "", where);
        return;
    }
    if (S_ISDIR(st.st_mode)) {
        CHECK(mkdirat(mnt, name, 0755), "", where);
    } else {
        int fd = openat(mnt, name, O_CREAT | O_EXCL | O_WRONLY | O_NOFOLLOW | O_CLOEXEC, 0644);
        CHECK(fd, "", where);
        close(fd);
    }
    int tree = (int)syscall(SYS_open_tree, dir, name, SBD_OPEN_TREE_CLONE | O_CLOEXEC | AT_RECURSIVE | AT_SYMLINK_NOFOLLOW);
    CHECK(tree, "open_tree: ", where);
    int point = open_entry(mnt, name);
    CHECK(point, "", where);
    attach(tree, point, where);
    close(point);
    close(tree);
}

/* Cover the read-only folder `dir` (at `path`) with a tmpfs that shows the same entries and can
 * take new mount points; returns the tmpfs's root, where the walk goes on. */
static int cover(int dir, const char *path)
{
    if (ncovers == MAX_COVERS)
        fail_with("too many read-only folders to make mount points in", path, EXIT_SETUP_FAILED);
    struct stat st;
    CHECK(fstat(dir, &st), "", path);
    size_t count;
    char *names = list_names(dir, path, &count);
    char options[128];
    snprintf(options, sizeof options, "mode=%o,uid=%u,gid=%u,size=1m,nr_inodes=%zu", (unsigned)(st.st_mode & 07777), (unsigned)st.st_uid, (unsigned)st.st_gid, count + 1024);
    int mnt = new_tmpfs(options, path);
    const char *name = names;
    for (size_t k = 0; k < count; k++, name += strlen(name) + 1)
        copy_entry(dir, mnt, name, path);
    free(names);
    attach(mnt, dir, path);
    covers[ncovers++] = mnt;
    return mnt;
}

struct walk {
    int fds[MAX_DEPTH]; /* fds[0] the sandbox's root, fds[k] the folder k names down */
    int depth;
    char path[PATH_BUF]; /* where the walk is, as realpath names it */
    const char *target, *refuse_under;
};

static void walk_down(struct walk *w, int fd, const char *name)
{
    if (w->depth + 1 == MAX_DEPTH)
        fail_errno("", ENAMETOOLONG, w->target);
    w->fds[++w->depth] = fd;
    size_t n = strlen(w->path);
    snprintf(w->path + n, sizeof w->path - n, "%s%s", n > 1 ? "/" : "", name);
    size_t u = strlen(w->refuse_under);
    if (u && strncmp(w->path, w->refuse_under, u) == 0 && (w->path[u] == 0 || w->path[u] == '/')) {
        char detail[PATH_BUF + 64];
        snprintf(detail, sizeof detail, "leads out of the sandbox through a symlink (%s)", w->target);
        fail_with(detail, w->target, EXIT_SETUP_FAILED);
    }
}

static void walk_up(struct walk *w, int to)
{
    while (w->depth > to) {
        close(w->fds[w->depth--]);
        char *slash = strrchr(w->path, '/');
        slash[slash == w->path ? 1 : 0] = 0;
    }
}

/* Make the missing `name` in the folder the walk is at (a folder, or an empty file), covering
 * that folder first if it is read-only; returns it as O_PATH. Something made there meanwhile
 * (EEXIST) is taken as it is: its kind is checked like any found. */
static int make_entry(struct walk *w, const char *name, bool folder)
{
    char where[PATH_BUF];
    path_of(where, w->path, name);
    for (bool covered = false;; covered = true) {
        int dir = w->fds[w->depth];
        int made = folder ? mkdirat(dir, name, 0755) : openat(dir, name, O_CREAT | O_EXCL | O_WRONLY | O_NOFOLLOW | O_CLOEXEC, 0644);
        if (made >= 0 || errno == EEXIST) {
            if (made >= 0 && !folder)
                close(made);
            break;
        }
        if (errno != EROFS || covered)
            fail_errno("", errno, where);
        if (w->depth == 0)
            fail_with("is a new top-level path on the sandbox's read-only root, reached through a symlink", w->target, EXIT_SETUP_FAILED);
        int mnt = cover(dir, w->path);
        close(dir);
        w->fds[w->depth] = fcntl(mnt, F_DUPFD_CLOEXEC, 0);
        CHECK(w->fds[w->depth], "", w->path);
    }
    int fd = open_entry(w->fds[w->depth], name);
    CHECK(fd, "", where);
    return fd;
}

/* Resolve the absolute `w->target` inside the sandbox's root (above), making what is missing of
 * it (the last name a folder if `directory`); the walk ends at it. */
static void resolve_target(struct walk *w, bool directory)
{
    char todo[PATH_BUF], next[PATH_BUF], where[PATH_BUF], link[PATH_BUF];
    int links = 0;
    bool making = false;
    snprintf(todo, sizeof todo, "%s", w->target);
    w->depth = 0;
    strcpy(w->path, "/");
    w->fds[0] = open("/", O_PATH | O_DIRECTORY | O_CLOEXEC);
    CHECK(w->fds[0], "", "/");
    for (char *rest = todo; *(rest += strspn(rest, "/"));) {
        size_t n = strcspn(rest, "/");
        char name[PATH_BUF];
        snprintf(name, sizeof name, "%.*s", (int)n, rest);
        rest += n;
        bool last = !rest[strspn(rest, "/")];
        path_of(where, w->path, name);
        if (strcmp(name, ".") == 0)
            continue;
        if (strcmp(name, "..") == 0) {
            if (making)
                fail_errno("", ENOENT, where);
            walk_up(w, w->depth ? w->depth - 1 : 0);
            continue;
        }
        int fd = making ? -1 : open_entry(w->fds[w->depth], name);
        if (fd < 0 && !making && errno != ENOENT)
            fail_errno("", errno, where);
        if (fd < 0) {
            making = true;
            fd = make_entry(w, name, !last || directory);
        }
        struct stat st;
        CHECK(fstat(fd, &st), "", where);
        if (S_ISLNK(st.st_mode)) {
            if (++links > 40)
                fail_errno("", ELOOP, where);
            ssize_t length = readlinkat(fd, "", link, sizeof link - 1);
            CHECK(length, "", where);
            link[length] = 0;
            close(fd);
            if (link[0] == '/')
                walk_up(w, 0);
            path_of(next, link, rest);
            memcpy(todo, next, strlen(next) + 1);
            rest = todo;
            continue;
        }
        walk_down(w, fd, name);
        if (!last && !S_ISDIR(st.st_mode))
            fail_errno("", ENOTDIR, w->path);
    }
    if (w->depth == 0)
        fail_with("leads to the sandbox's root, which sandboxd mounts", w->target, EXIT_SETUP_FAILED);
}

/* bind_inside (target, tree, readonly, is_dir, refuse_under), tmpfs_inside (target, options,
 * refuse_under): the tree or a new tmpfs on the target's descriptor, then its flags set
 * through the tree's own descriptor. */
static void mount_inside(const struct op *op, bool bind)
{
    bool directory = !bind || I(op, 3) != 0, readonly = bind && I(op, 2) != 0;
    struct walk w = {.target = S(op, 0), .refuse_under = S(op, bind ? 4 : 2)};
    resolve_target(&w, directory);
    int target = w.fds[w.depth];
    struct stat st;
    CHECK(fstat(target, &st), "", w.path);
    if (S_ISDIR(st.st_mode) != directory) {
        char detail[PATH_BUF + 64];
        snprintf(detail, sizeof detail, directory ? "is not a directory, and what is mounted there is one (%s)" : "is a directory, and what is mounted there is a file (%s)", w.path);
        fail_with(detail, w.path, EXIT_SETUP_FAILED);
    }
    int tree = bind ? FD(op, 1) : new_tmpfs(S(op, 1), w.path);
    attach(tree, target, w.path);
    if (bind) {
        /* nosuid and nodev on every mount of the tree; read-only all of it, or writable only its
         * own mount: a read-only mount of the host's below the source stays so (as docker keeps it). */
        set_attr(tree, SBD_MOUNT_ATTR_NOSUID | SBD_MOUNT_ATTR_NODEV | (readonly ? SBD_MOUNT_ATTR_RDONLY : 0), 0, true, w.path);
        if (!readonly)
            set_attr(tree, 0, SBD_MOUNT_ATTR_RDONLY, false, w.path);
    }
    CHECK(close(tree), "", "");
    walk_up(&w, 0);
    close(w.fds[0]);
}

/* The covers read-only, each itself only (the binds on it keep their flags). */
static void seal_covers(void)
{
    for (int k = 0; k < ncovers; k++) {
        set_attr(covers[k], SBD_MOUNT_ATTR_RDONLY | SBD_MOUNT_ATTR_NOSUID | SBD_MOUNT_ATTR_NODEV, 0, false, "a folder made to hold mount points");
        close(covers[k]);
    }
    ncovers = 0;
}

/* ── init_exec: the command as pid 2, this process staying as the sandbox's init ──
 *
 * The last op (argv, environment). This process is made undumpable first (the command, forked
 * with its ids, may then neither ptrace it, read its memory nor take its descriptors, even while
 * it still holds the channel). Every signal is blocked, and stays so in this process:
 * the kernel gives the init of a pid namespace no signal whose disposition is SIG_DFL, not even
 * one sent from the parent namespace (only SIGKILL and SIGSTOP are forced), but a blocked one
 * waits, and sigwaitinfo takes it. The command is forked into a session and process group of
 * its own (setsid, as dumb-init's default) with the signal mask emptied, and executed as
 * execvp does, PATH read from its own environment. The status channel and a pipe are
 * close-on-exec: the pipe's EOF says the command executed or died trying; the child reports a
 * failure itself (SetupFailed on the channel, as any step: exit 127 when the command is not
 * found, 126 when it cannot be executed). Then this process gives up what it no longer needs
 * (the program's memory, every descriptor, the channel's close being the EOF that tells the
 * supervisor the command runs), and loops as dumb-init does: each signal goes to the command's process
 * group (SIGTSTP, SIGTTIN and SIGTTOU as SIGSTOP: no terminal is there to stop for), and every
 * child is reaped (orphans are reparented to the init of their namespace). When the command
 * ends, so does this process, with its exit code, or 128+n when signal n killed it; the kernel
 * then kills whatever is left in the namespace. (dumb-init sends SIGTERM to the group first and
 * exits at once: the SIGKILL that follows is the same end.)
 */

static uint8_t *program_data;
static struct op *program_ops;
static uint32_t program_count;

static void release_program(void)
{
    for (uint32_t k = 0; k < program_count; k++)
        for (int a = 0; a < program_ops[k].nargs; a++) {
            free(program_ops[k].args[a].strs);
            free(program_ops[k].args[a].ints);
        }
    free(program_ops);
    free(program_data);
    program_ops = NULL;
    program_data = NULL;
    malloc_trim(0);
}

static _Noreturn void init_exec(char **argv, char **envp)
{
    sigset_t all, none;
    sigfillset(&all);
    sigemptyset(&none);
    sigprocmask(SIG_SETMASK, &all, NULL);
    /* Not dumpable before the command exists: it has this process's ids (with userns: false and
     * user root, nothing else changes them), and a dumpable init would be open to it through
     * /proc/1/mem, /proc/1/fd and pidfd_getfd until the end of its set-up, its status channel
     * included. The command's own exec makes it dumpable again. */
    prctl(PR_SET_DUMPABLE, 0, 0, 0, 0);
    int executed[2];
    CHECK(pipe2(executed, O_CLOEXEC), "", "");
    pid_t command = fork();
    CHECK(command, "fork: ", "");
    if (command == 0) {
        close(executed[0]);
        if (setsid() < 0)
            fail_errno("setsid: ", errno, "");
        sigprocmask(SIG_SETMASK, &none, NULL);
        environ = envp;
        execvp(argv[0], argv);
        int error = errno;
        fail_errno_with("", error, "", error == ENOENT ? EXIT_SETUP_FAILED : EXIT_UNEXPECTED);
    }
    close(executed[1]);
    char byte;
    while (read(executed[0], &byte, 1) < 0 && errno == EINTR)
        continue;
    release_program();
    if (syscall(SYS_close_range, 0, ~0U, 0) < 0)
        for (int fd = 0; fd < 1 << 20; fd++)
            close(fd);
    for (;;) {
        siginfo_t info;
        int sig = sigwaitinfo(&all, &info);
        if (sig < 0)
            continue;
        if (sig != SIGCHLD) {
            kill(-command, sig == SIGTSTP || sig == SIGTTIN || sig == SIGTTOU ? SIGSTOP : sig);
            continue;
        }
        int status;
        for (pid_t dead; (dead = waitpid(-1, &status, WNOHANG)) > 0;)
            if (dead == command)
                _exit(WIFSIGNALED(status) ? 128 + WTERMSIG(status) : WEXITSTATUS(status));
    }
}

/* ── one op ── */

static long run(const struct op *op)
{
    long r = 0;
    switch ((enum call)op->call) {
    case C_RESET_SIGNALS: reset_signals(); break;
    case C_WRITE: CHECK(write(FD(op, 0), op->args[1].bytes, op->args[1].n), "", ""); break;
    case C_CLOSE: CHECK(close(FD(op, 0)), "", ""); break;
    case C_SETNS: CHECK(setns(FD(op, 0), (int)I(op, 1)), "setns: ", ""); break;
    case C_UNSHARE: CHECK(unshare((int)I(op, 0)), "unshare: ", ""); break;
    case C_SETSID: CHECK(setsid(), "", ""); break;
    case C_SETHOSTNAME: CHECK(sethostname(S(op, 0), strlen(S(op, 0))), "", ""); break;
    case C_LOOPBACK_UP: loopback_up(); break;
    case C_PRCTL: CHECK(prctl((int)I(op, 0), (unsigned long)I(op, 1), 0, 0, 0), "prctl: ", ""); break;
    case C_SETGROUPS: {
        gid_t groups[64];
        uint32_t n = op->args[0].n < 64 ? op->args[0].n : 64;
        for (uint32_t k = 0; k < n; k++)
            groups[k] = (gid_t)op->args[0].ints[k];
        CHECK(setgroups(n, groups), "", "");
        break;
    }
    case C_SETRESGID: CHECK(setresgid((gid_t)I(op, 0), (gid_t)I(op, 1), (gid_t)I(op, 2)), "", ""); break;
    case C_SETRESUID: CHECK(setresuid((uid_t)I(op, 0), (uid_t)I(op, 1), (uid_t)I(op, 2)), "", ""); break;
    case C_SETGID: CHECK(setgid((gid_t)I(op, 0)), "", ""); break;
    case C_SETUID: CHECK(setuid((uid_t)I(op, 0)), "", ""); break;
    case C_DROP_BOUNDING_SET: drop_bounding_set(&op->args[0]); break;
    case C_KEEP_ONLY_CAPABILITIES: keep_only_capabilities(&op->args[0]); break;
    case C_INSTALL_SECCOMP: {
        struct sock_fprog fprog = filter_of(&op->args[0]);
        CHECK(prctl(PR_SET_SECCOMP, SECCOMP_MODE_FILTER, &fprog, 0, 0), "prctl(PR_SET_SECCOMP): ", "");
        free(fprog.filter); /* the kernel has its copy: nothing of the heap is kept by the init */
        break;
    }
    case C_INSTALL_SECCOMP_LISTENER: {
        struct sock_fprog fprog = filter_of(&op->args[0]);
        r = syscall(SYS_seccomp, SECCOMP_SET_MODE_FILTER, SECCOMP_FILTER_FLAG_NEW_LISTENER, &fprog);
        CHECK(r, "seccomp(SECCOMP_FILTER_FLAG_NEW_LISTENER): ", "");
        free(fprog.filter);
        break;
    }
    case C_OPEN: r = open(S(op, 0), (int)I(op, 1)); CHECK(r, "", S(op, 0)); break;
    case C_DUP_ABOVE: r = fcntl(FD(op, 0), F_DUPFD_CLOEXEC, (int)I(op, 1)); CHECK(r, "", ""); break;
    case C_DUP2: CHECK(dup2(FD(op, 0), (int)I(op, 1)), "", ""); break;
    case C_CLOSE_OTHERS: close_others((int)I(op, 0), FD(op, 1)); break;
    case C_MOUNT: CHECK(mount(S(op, 0), S(op, 1), S(op, 2), (unsigned long)I(op, 3), S(op, 4)), "mount: ", S(op, 1)); break;
    case C_UMOUNT2: CHECK(umount2(S(op, 0), (int)I(op, 1)), "umount2: ", S(op, 0)); break;
    case C_MOUNT_SETATTR: {
        struct mount_attr_arg attr = {(uint64_t)I(op, 1), (uint64_t)I(op, 2), 0, 0};
        long result = syscall(SYS_mount_setattr, AT_FDCWD, S(op, 0), I(op, 3) ? AT_RECURSIVE : 0, &attr, sizeof attr);
        CHECK(result, "mount_setattr: ", S(op, 0));
        break;
    }
    case C_MOVE_MOUNT:
        CHECK(syscall(SYS_move_mount, FD(op, 0), "", AT_FDCWD, S(op, 1), SBD_MOVE_MOUNT_F_EMPTY_PATH), "move_mount: ", S(op, 1));
        break;
    case C_PIVOT_ROOT: CHECK(syscall(SYS_pivot_root, S(op, 0), S(op, 1)), "pivot_root: ", S(op, 0)); break;
    case C_CHDIR: CHECK(chdir(S(op, 0)), "", S(op, 0)); break;
    case C_MKDIR: CHECK(mkdir(S(op, 0), (mode_t)I(op, 1)), "", S(op, 0)); break;
    case C_MAKEDIRS: makedirs(S(op, 0), (mode_t)I(op, 1)); break;
    case C_CREATE_FILE: {
        int fd = open(S(op, 0), O_CREAT | O_WRONLY | O_CLOEXEC, 0644);
        CHECK(fd, "", S(op, 0));
        close(fd);
        break;
    }
    case C_SYMLINK: CHECK(symlink(S(op, 0), S(op, 1)), "", S(op, 0)); break; /* os.symlink's error names its target */
    case C_RMDIR: CHECK(rmdir(S(op, 0)), "", S(op, 0)); break;
    case C_FAIL: {
        char detail[PATH_BUF * 2];
        snprintf(detail, sizeof detail, *S(op, 2) ? "%s (%s)" : "%s", S(op, 1), S(op, 2));
        fail_with(detail, S(op, 2), EXIT_SETUP_FAILED);
    }
    case C_BIND_INSIDE: mount_inside(op, true); break;
    case C_TMPFS_INSIDE: mount_inside(op, false); break;
    case C_SEAL_COVERS: seal_covers(); break;
    case C_REPORT_EXECUTING: report_executing(-1); break;
    case C_REPORT_EXECUTING_WITH: report_executing(FD(op, 0)); break;
    case C_INIT_EXEC:
        if (op->args[0].tag != 'S' || op->args[1].tag != 'S' || op->args[0].n == 0)
            malformed();
        init_exec(op->args[0].strs, op->args[1].strs);
    case C_COUNT: malformed();
    }
    return r;
}

/* ── the program's walk, in the sandbox's init ── */

static _Noreturn void interpret(int program_fd, int sysfs)
{
    size_t length;
    uint8_t *data = program_data = read_all(program_fd, &length);
    close(program_fd);
    struct reader r = {data, data + length};
    if (memcmp(take(&r, 4), "SBD1", 4) != 0)
        malformed();
    uint32_t count = (uint32_t)take_le(&r, 4);
    int lowest = (int32_t)take_le(&r, 4);
    if (count > length)
        malformed();
    struct op *ops = program_ops = calloc((size_t)count + 1, sizeof *ops);
    if (!ops)
        _exit(EXIT_UNEXPECTED);
    for (uint32_t k = 0; k < count; k++)
        read_op(&r, &ops[k]);
    program_count = count;
    int moved = fcntl(channel, F_DUPFD_CLOEXEC, lowest); /* clear of the service's fds 3.. */
    if (moved < 0)
        fail_errno("", errno, "");
    close(channel);
    channel = moved;
    for (int k = 0; k < MAX_REGISTERS; k++)
        registers[k] = -1;
    registers[0] = channel;
    registers[1] = sysfs;
    for (uint32_t k = 0; k < count; k++) {
        current = &ops[k];
        step = ops[k].step;
        bool go = true;
        for (int g = 0; g < ops[k].nguards && go; g++)
            go = holds(&ops[k].guards[g]);
        if (!go)
            continue;
        long result = run(&ops[k]);
        if (ops[k].into >= 0)
            registers[ops[k].into] = (int)result;
        if (ops[k].mark >= 0)
            marks |= 1ull << ops[k].mark;
    }
    fail_with("the set-up program ended without init_exec", "", EXIT_UNEXPECTED);
}

/* ── spawn: the clone of the sandbox's init, by a process of the host's side ──
 *
 *     sbd-setup serve SOCKET
 *     sbd-setup spawn REPLY PROGRAM CHANNEL CGROUP INTO_CGROUP NETNS SYSFS UID GID COUNT TREES
 *
 * The fork server starts `serve` once, with vfork semantics (posix_spawn: no copy of its heap),
 * from its sealed copy of this file, and sends it one request per launch on SOCKET (`serve`,
 * below: the arguments of `spawn` and the launch's descriptors by SCM_RIGHTS); `spawn` does
 * the same for one launch given on the command line (scripts/bench_setup.py). This process, the
 * host's root in the fork server's namespaces, does what needs the host's side of the sandbox
 * (`spawn_one`): in a user namespace it joins the service's network namespace NETNS (-1: none)
 * for the clone and makes the sysfs there (SYSFS 1); clone3 of the init with CLONE_PARENT (so
 * that the init is the fork server's child, which reaps it), CLONE_NEWPID, CLONE_PIDFD, born in
 * CGROUP (INTO_CGROUP 1; 0: it joins it itself; -1 with 0: none, for scripts/bench) and, with
 * UID >= 0, CLONE_NEWUSER, cloned as the block's last ids; then it writes the maps "0 UID COUNT"
 * and "0 GID COUNT", idmaps the detached TREES (comma-separated fds, or -) through the init's
 * user namespace, and replies "P<pid>" with the pidfd (SCM_RIGHTS), or "E<errno> <what>" (what:
 * setns, sysfs, clone3, uid_map, gid_map, userns, idmap K for the Kth tree, request, fds), before
 * it lets the init go. The init, a copy of this small process, waits to be let go (it runs no
 * step before its launch's reply is on its way: an init whose spawner died first exits), becomes
 * root of its user namespace and walks the program (interpret) on CHANNEL.
 */

#define SPAWN_ARGC 13
#define SBD_FSCONFIG_CMD_CREATE 6
#define SBD_MOUNT_ATTR_NOEXEC 0x8
#define SBD_MOUNT_ATTR_IDMAP 0x100000
#define MAX_PASSED 1024 /* a request's descriptors */
#define MAX_TREES 256
#define FDS_PER_MESSAGE 250
#ifndef CLONE_INTO_CGROUP
#define CLONE_INTO_CGROUP 0x200000000ULL
#endif

struct sbd_clone_args {
    uint64_t flags, pidfd, child_tid, parent_tid, exit_signal, stack, stack_size, tls, set_tid, set_tid_size, cgroup;
};

/* One launch. The spawner uses the descriptors as it holds them; the init gets each of `passed`
 * at its number in the fork server (`target`: the numbers the program names) and nothing else
 * of the spawner's. With npassed 0 (`spawn`) every descriptor is where it was inherited. */
struct spawn_request {
    int program, channel, cgroup; /* the init's numbers */
    int cgroup_here, netns_here;  /* the spawner's */
    bool into_cgroup, want_sysfs;
    long uid, gid, count;
    int ntrees, trees[MAX_TREES]; /* the spawner's */
    int npassed, passed[MAX_PASSED], target[MAX_PASSED];
};

/* Why a launch failed: an errno and what failed ("E<errno> <what>"). */
struct failure {
    int error;
    char what[32];
};

static int reply = -1;        /* where the replies go: `spawn`'s REPLY, `serve`'s SOCKET */
static int home_netns = -1;   /* `serve`: its own network namespace, joined again after each clone */
static rlim_t home_nofile;    /* `serve`: the soft RLIMIT_NOFILE it was started with, the init's */

static bool failed(struct failure *f, int error, const char *what)
{
    f->error = error ? error : EIO;
    snprintf(f->what, sizeof f->what, "%s", what);
    return false;
}

static void send_failure(const struct failure *f)
{
    char text[64];
    int n = snprintf(text, sizeof text, "E%d %s", f->error, f->what);
    if (send(reply, text, (size_t)n, MSG_NOSIGNAL) < 0) {
        /* the fork server reads EOF instead: it says so */
    }
}

static bool send_pid(pid_t pid, int pidfd)
{
    char text[32];
    int n = snprintf(text, sizeof text, "P%d", (int)pid);
    return send_with_fd(reply, text, (size_t)n, pidfd) >= 0;
}

/* A read-only sysfs of the network namespace this process is in, detached (linux.detached_mount). */
static int detached_sysfs(void)
{
    int fs = (int)syscall(SYS_fsopen, "sysfs", 0);
    if (fs < 0)
        return -1;
    long mnt = -1;
    if (syscall(SYS_fsconfig, fs, SBD_FSCONFIG_CMD_CREATE, NULL, NULL, 0) == 0)
        mnt = syscall(SYS_fsmount, fs, 0, SBD_MOUNT_ATTR_RDONLY | SBD_MOUNT_ATTR_NOSUID | SBD_MOUNT_ATTR_NODEV | SBD_MOUNT_ATTR_NOEXEC);
    int error = errno;
    close(fs);
    errno = error;
    return (int)mnt;
}

/* The host's pid of the init: this process's /proc is the host's, and a pidfd's fdinfo tells
 * the pid as the /proc it is read through numbers it (detached.host_pid). */
static long host_pid(int pidfd)
{
    char path[64], text[4096];
    snprintf(path, sizeof path, "/proc/self/fdinfo/%d", pidfd);
    int fd = open(path, O_RDONLY | O_CLOEXEC);
    if (fd < 0)
        return -1;
    ssize_t n = read(fd, text, sizeof text - 1);
    close(fd);
    if (n < 0)
        return -1;
    text[n] = 0;
    char *line = strstr(text, "\nPid:");
    return line ? strtol(line + 5, NULL, 10) : -1;
}

static bool write_map(long pid, const char *kind, long first, long count, struct failure *f)
{
    char path[64], map[64];
    snprintf(path, sizeof path, "/proc/%ld/%s", pid, kind);
    int n = snprintf(map, sizeof map, "0 %ld %ld\n", first, count);
    int fd = open(path, O_WRONLY | O_CLOEXEC);
    bool written = fd >= 0 && write(fd, map, (size_t)n) == n;
    int error = errno;
    if (fd >= 0)
        close(fd);
    return written || failed(f, error, kind);
}

/* The maps, then the trees that keep the host's ids idmapped through the init's user namespace. */
static bool set_up_userns(long pid, const struct spawn_request *rq, struct failure *f)
{
    if (!write_map(pid, "uid_map", rq->uid, rq->count, f) || !write_map(pid, "gid_map", rq->gid, rq->count, f))
        return false;
    if (rq->ntrees == 0)
        return true;
    char path[64];
    snprintf(path, sizeof path, "/proc/%ld/ns/user", pid);
    int userns = open(path, O_RDONLY | O_CLOEXEC);
    if (userns < 0)
        return failed(f, errno, "userns");
    bool done = true;
    for (int k = 0; k < rq->ntrees && done; k++) {
        struct mount_attr_arg attr = {SBD_MOUNT_ATTR_IDMAP, 0, 0, (uint64_t)userns};
        if (syscall(SYS_mount_setattr, rq->trees[k], "", AT_EMPTY_PATH | AT_RECURSIVE, &attr, sizeof attr) < 0) {
            char what[32];
            snprintf(what, sizeof what, "idmap %d", k);
            done = failed(f, errno, what);
        }
    }
    close(userns);
    return done;
}

/* In the init, first (`serve`): each passed descriptor at its number in the fork server, not
 * close-on-exec (as the fork server's inheritable ones crossed the exec of `spawn`); the
 * release socket and the sysfs at the lowest numbers left; every other descriptor of the
 * spawner's closed (its socket, its home network namespace, the release socket pair's other end), and
 * RLIMIT_NOFILE as it was started with. Each is first copied above every number in play, so that
 * no move overwrites a descriptor still to be moved. A failure is reported on the channel. */
static void place_descriptors(const struct spawn_request *rq, int *release, int *sysfs)
{
    int channel_here = -1, high = 3;
    for (int k = 0; k < rq->npassed; k++) {
        if (rq->target[k] == rq->channel)
            channel_here = rq->passed[k];
        high = rq->passed[k] >= high ? rq->passed[k] + 1 : high;
        high = rq->target[k] >= high ? rq->target[k] + 1 : high;
    }
    int own[] = {*release, *sysfs, reply, home_netns};
    for (size_t k = 0; k < sizeof own / sizeof *own; k++)
        high = own[k] >= high ? own[k] + 1 : high;
    channel = channel_here;
    step = "place the sandbox's descriptors";
    int moved[MAX_PASSED];
    for (int k = 0; k < rq->npassed; k++)
        if ((moved[k] = fcntl(rq->passed[k], F_DUPFD_CLOEXEC, high)) < 0)
            fail_errno("", errno, "");
    int release_moved = fcntl(*release, F_DUPFD_CLOEXEC, high);
    int sysfs_moved = *sysfs >= 0 ? fcntl(*sysfs, F_DUPFD, high) : -1; /* not close-on-exec, as fsmount made it */
    if (release_moved < 0 || (*sysfs >= 0 && sysfs_moved < 0))
        fail_errno("", errno, "");
    for (int k = 0; k < rq->npassed; k++)
        if (rq->target[k] == rq->channel)
            channel = moved[k];
    if (syscall(SYS_close_range, 3, high - 1, 0) < 0)
        fail_errno("close_range: ", errno, "");
    for (int k = 0; k < rq->npassed; k++)
        if (dup2(moved[k], rq->target[k]) < 0)
            fail_errno("", errno, "");
    channel = rq->channel;
    if ((*release = fcntl(release_moved, F_DUPFD_CLOEXEC, 3)) < 0 || (sysfs_moved >= 0 && (*sysfs = fcntl(sysfs_moved, F_DUPFD, 3)) < 0))
        fail_errno("", errno, "");
    if (syscall(SYS_close_range, high, ~0U, 0) < 0)
        fail_errno("close_range: ", errno, "");
    struct rlimit limit;
    if (getrlimit(RLIMIT_NOFILE, &limit) < 0 || (limit.rlim_cur = home_nofile, setrlimit(RLIMIT_NOFILE, &limit) < 0))
        fail_errno("setrlimit: ", errno, "");
    reply = home_netns = -1;
}

/* In the init: wait to be let go, join the cgroup if it was not born in it, become root of the
 * user namespace, walk the program. */
static _Noreturn void init_child(const struct spawn_request *rq, int release, bool userns, int sysfs)
{
    char go = 0;
    if (rq->npassed)
        place_descriptors(rq, &release, &sysfs);
    channel = rq->channel;
    if (reply >= 0)
        close(reply);
    if (read(release, &go, 1) != 1)
        _exit(EXIT_SETUP_FAILED); /* the spawner could not set it up; the fork server says why */
    close(release);
    if (!rq->into_cgroup && rq->cgroup >= 0) {
        step = "join the cgroup";
        int procs = openat(rq->cgroup, "cgroup.procs", O_WRONLY | O_CLOEXEC);
        if (procs < 0 || write(procs, "0", 1) != 1)
            fail_errno("", errno, "cgroup.procs");
        close(procs);
    }
    if (rq->cgroup >= 0)
        close(rq->cgroup);
    if (userns) {
        step = "become root of the user namespace";
        if (setgroups(0, NULL) < 0 || setresgid(0, 0, 0) < 0 || setresuid(0, 0, 0) < 0)
            fail_errno("", errno, "");
    }
    interpret(rq->program, sysfs);
}

/* Cloned as the block's last ids, with root's capabilities (forkserver.py says why); back to
 * root's ids after, which brings back the effective capabilities (a spawner that cannot go
 * back exits: it serves no other launch with other ids). */
static pid_t clone_init(struct sbd_clone_args *args, const struct spawn_request *rq)
{
    struct __user_cap_header_struct header = {_LINUX_CAPABILITY_VERSION_3, 0};
    struct __user_cap_data_struct caps[2];
    bool userns = rq->uid >= 0;
    pid_t pid = -1;
    int error = 0;
    if (userns) {
        if (syscall(SYS_capget, &header, caps) < 0)
            return -1;
        for (int word = 0; word < 2; word++)
            caps[word].effective = caps[word].permitted;
        if (setresgid(-1, (gid_t)(rq->gid + rq->count - 1), -1) < 0 || setresuid(-1, (uid_t)(rq->uid + rq->count - 1), -1) < 0 || syscall(SYS_capset, &header, caps) < 0)
            error = errno;
    }
    if (!error) {
        pid = (pid_t)syscall(SYS_clone3, args, sizeof *args);
        error = errno;
    }
    if (pid != 0 && userns && (setresuid(-1, 0, -1) < 0 || setresgid(-1, 0, -1) < 0))
        _exit(EXIT_UNEXPECTED);
    errno = error;
    return pid;
}

/* One launch, up to the init's pid: true with the pid, its pidfd and the release socket's end
 * (written once the reply is sent), or false with what failed. The spawner is as before after
 * it (its network namespace, its ids); the caller closes the request's descriptors. */
static bool spawn_one(const struct spawn_request *rq, pid_t *pid, int *pidfd, int *release_out, struct failure *f)
{
    bool userns = rq->uid >= 0;
    if (rq->netns_here >= 0 && setns(rq->netns_here, CLONE_NEWNET) < 0)
        return failed(f, errno, "setns");
    int sysfs = -1, release[2] = {-1, -1};
    bool ok = true;
    if (rq->want_sysfs && (sysfs = detached_sysfs()) < 0)
        ok = failed(f, errno, "sysfs");
    /* A socket pair, not a pipe: letting go an init that died already is no SIGPIPE. */
    if (ok && socketpair(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0, release) < 0)
        ok = failed(f, errno, "clone3");
    *pidfd = -1;
    *pid = -1;
    if (ok) {
        struct sbd_clone_args args = {
            .flags = CLONE_PARENT | CLONE_NEWPID | CLONE_PIDFD | (rq->into_cgroup ? CLONE_INTO_CGROUP : 0) | (userns ? CLONE_NEWUSER : 0),
            .pidfd = (uint64_t)(uintptr_t)pidfd,
            .exit_signal = 0, /* CLONE_PARENT: the kernel gives it this process's own (SIGCHLD) */
            .cgroup = rq->into_cgroup ? (uint64_t)rq->cgroup_here : 0,
        };
        *pid = clone_init(&args, rq);
        if (*pid == 0) {
            close(release[1]);
            init_child(rq, release[0], userns, sysfs);
        }
        if (*pid < 0)
            ok = failed(f, errno, "clone3");
    }
    if (rq->netns_here >= 0 && home_netns >= 0 && setns(home_netns, CLONE_NEWNET) < 0)
        _exit(EXIT_UNEXPECTED); /* no other launch in this one's network namespace */
    if (sysfs >= 0)
        close(sysfs);
    if (release[0] >= 0)
        close(release[0]);
    if (ok && userns) {
        long host = host_pid(*pidfd);
        ok = host < 0 ? failed(f, errno, "uid_map") : set_up_userns(host, rq, f);
    }
    if (!ok) {
        if (release[1] >= 0)
            close(release[1]); /* the init, if there is one, reads EOF and exits */
        if (*pidfd >= 0)
            close(*pidfd);
        return false;
    }
    *release_out = release[1];
    return true;
}

/* The reply, then the init let go (the socket pair's other end is what it waits on). */
static bool launched(pid_t pid, int pidfd, int release)
{
    bool sent = send_pid(pid, pidfd);
    if (sent && send(release, "1", 1, MSG_NOSIGNAL) != 1) {
        /* the init is gone already (killed with its cgroup): the fork server reaps it */
    }
    close(release);
    close(pidfd);
    return sent;
}

static bool parse_trees(const char *text, struct spawn_request *rq)
{
    rq->ntrees = 0;
    if (strcmp(text, "-") == 0)
        return true;
    for (const char *p = text; *p;) {
        char *end;
        long tree = strtol(p, &end, 10);
        if (end == p || tree < 0 || rq->ntrees == MAX_TREES || (*end && *end != ','))
            return false;
        rq->trees[rq->ntrees++] = (int)tree;
        p = *end == ',' ? end + 1 : end;
    }
    return true;
}

static _Noreturn void spawn(char **argv)
{
    static struct spawn_request rq;
    reply = atoi(argv[2]);
    rq.program = atoi(argv[3]);
    rq.channel = atoi(argv[4]);
    rq.cgroup = rq.cgroup_here = atoi(argv[5]);
    rq.into_cgroup = atoi(argv[6]) != 0;
    rq.netns_here = atoi(argv[7]);
    rq.want_sysfs = atoi(argv[8]) != 0;
    rq.uid = atol(argv[9]);
    rq.gid = atol(argv[10]);
    rq.count = atol(argv[11]);
    struct failure f = {0};
    pid_t pid;
    int pidfd, release;
    if (!parse_trees(argv[12], &rq))
        failed(&f, EINVAL, "request");
    else if (spawn_one(&rq, &pid, &pidfd, &release, &f))
        _exit(launched(pid, pidfd, release) ? 0 : EXIT_SETUP_FAILED);
    send_failure(&f);
    _exit(EXIT_SETUP_FAILED);
}

/* A request's text: "PROGRAM CHANNEL CGROUP INTO_CGROUP NETNS SYSFS UID GID COUNT TREES N
 * TARGET..." (spawn's arguments, every descriptor named by its number in the fork server,
 * -1 for none; N descriptors come with it, TARGET each one's number there, in their order). */
static bool parse_request(char *text, const int *received, int nreceived, struct spawn_request *rq)
{
    char *words[16 + MAX_PASSED], *save = NULL;
    int n = 0;
    for (char *word = strtok_r(text, " ", &save); word && n < (int)(sizeof words / sizeof *words); word = strtok_r(NULL, " ", &save))
        words[n++] = word;
    if (n < 11)
        return false;
    long numbers[11];
    for (int k = 0; k < 11; k++) {
        char *end;
        numbers[k] = k == 9 ? 0 : strtol(words[k], &end, 10);
        if (k != 9 && (*end || end == words[k]))
            return false;
    }
    rq->npassed = (int)numbers[10];
    if (rq->npassed != nreceived || rq->npassed < 1 || n != 11 + rq->npassed)
        return false;
    for (int k = 0; k < rq->npassed; k++) {
        char *end;
        rq->target[k] = (int)strtol(words[11 + k], &end, 10);
        rq->passed[k] = received[k];
        if (*end || end == words[11 + k] || rq->target[k] < 0)
            return false;
        for (int j = 0; j < k; j++)
            if (rq->target[j] == rq->target[k])
                return false;
    }
    rq->program = (int)numbers[0];
    rq->channel = (int)numbers[1];
    rq->cgroup = (int)numbers[2];
    rq->into_cgroup = numbers[3] != 0;
    rq->want_sysfs = numbers[5] != 0;
    rq->uid = numbers[6];
    rq->gid = numbers[7];
    rq->count = numbers[8];
    /* What the spawner itself uses, by the number it received it at. */
    int named[3] = {(int)numbers[2], (int)numbers[4], -1}, here[3] = {-1, -1, -1};
    for (int k = 0; k < rq->npassed; k++)
        for (int j = 0; j < 2; j++)
            if (named[j] >= 0 && rq->target[k] == named[j])
                here[j] = rq->passed[k];
    if ((named[0] >= 0 && here[0] < 0) || (named[1] >= 0 && here[1] < 0))
        return false;
    bool program_named = false, channel_named = false;
    for (int k = 0; k < rq->npassed; k++) {
        program_named |= rq->target[k] == rq->program;
        channel_named |= rq->target[k] == rq->channel;
    }
    if (!program_named || !channel_named)
        return false;
    rq->cgroup_here = here[0];
    rq->netns_here = here[1];
    if (!parse_trees(words[9], rq))
        return false;
    for (int t = 0; t < rq->ntrees; t++) {
        int found = -1;
        for (int k = 0; k < rq->npassed; k++)
            if (rq->target[k] == rq->trees[t])
                found = rq->passed[k];
        if (found < 0)
            return false;
        rq->trees[t] = found;
    }
    return true;
}

/* One message of a request: its text (NUL-terminated) and the descriptors beside it, appended
 * to `fds` (close-on-exec: none crosses an exec of this process's by accident). */
static ssize_t receive(char *text, size_t size, int *fds, int *nfds, bool *truncated)
{
    union {
        char buffer[CMSG_SPACE(sizeof(int) * FDS_PER_MESSAGE)];
        struct cmsghdr align;
    } control;
    struct iovec iov = {text, size - 1};
    struct msghdr msg = {.msg_iov = &iov, .msg_iovlen = 1, .msg_control = control.buffer, .msg_controllen = sizeof control.buffer};
    ssize_t n;
    do
        n = recvmsg(reply, &msg, MSG_CMSG_CLOEXEC);
    while (n < 0 && errno == EINTR);
    if (n < 0)
        return n;
    text[n] = 0;
    *truncated = (msg.msg_flags & (MSG_TRUNC | MSG_CTRUNC)) != 0;
    for (struct cmsghdr *c = CMSG_FIRSTHDR(&msg); c; c = CMSG_NXTHDR(&msg, c)) {
        if (c->cmsg_level != SOL_SOCKET || c->cmsg_type != SCM_RIGHTS)
            continue;
        int count = (int)((c->cmsg_len - CMSG_LEN(0)) / sizeof(int));
        for (int k = 0; k < count; k++) {
            int fd;
            memcpy(&fd, CMSG_DATA(c) + k * sizeof(int), sizeof fd);
            if (*nfds < MAX_PASSED)
                fds[(*nfds)++] = fd;
            else {
                close(fd);
                *truncated = true;
            }
        }
    }
    return n;
}

/* A descriptor of this process's own, moved clear of 0, 1 and 2 (which the init keeps as the
 * fork server's): the init closes all of them but those. */
static int clear_of_stdio(int fd)
{
    if (fd > 2)
        return fd;
    int moved = fcntl(fd, F_DUPFD_CLOEXEC, 3);
    if (moved < 0)
        _exit(EXIT_UNEXPECTED);
    close(fd);
    return moved;
}

/* sbd-setup serve SOCKET: one launch per request on SOCKET (parse_request; a request's
 * descriptors may come in several messages of FDS_PER_MESSAGE, the next ones' text "+"), one
 * reply each, in order; it exits at EOF. Between two launches it holds nothing of either: every
 * descriptor received is closed once its launch is replied to, its network namespace and ids
 * are its own again, and it keeps no other state of a launch's. */
static _Noreturn void serve(char **argv)
{
    static struct spawn_request rq;
    static char text[16 * (16 + MAX_PASSED)];
    static int fds[MAX_PASSED];
    prctl(PR_SET_PDEATHSIG, SIGKILL);
    reply = clear_of_stdio(atoi(argv[2]));
    if (fcntl(reply, F_SETFD, FD_CLOEXEC) < 0 || (home_netns = open("/proc/self/ns/net", O_RDONLY | O_CLOEXEC)) < 0)
        _exit(EXIT_UNEXPECTED);
    home_netns = clear_of_stdio(home_netns);
    /* Room above the fork server's numbers for place_descriptors; the init gets its own back. */
    struct rlimit limit;
    if (getrlimit(RLIMIT_NOFILE, &limit) < 0)
        _exit(EXIT_UNEXPECTED);
    home_nofile = limit.rlim_cur;
    limit.rlim_cur = limit.rlim_max;
    setrlimit(RLIMIT_NOFILE, &limit);
    for (;;) {
        int nfds = 0;
        bool truncated = false;
        ssize_t n = receive(text, sizeof text, fds, &nfds, &truncated);
        if (n <= 0)
            _exit(n == 0 ? 0 : EXIT_UNEXPECTED);
        if (strcmp(text, "+") == 0) { /* the rest of a request cut short, replied to already */
            for (int k = 0; k < nfds; k++)
                close(fds[k]);
            continue;
        }
        struct failure f = {0};
        char *end;
        long wanted = -1;
        char *words = strrchr(text, ' ') ? text : NULL;
        /* N, the eleventh word: how many descriptors to wait for */
        if (words) {
            const char *p = text;
            for (int k = 0; k < 10 && p; k++)
                p = strchr(p, ' ') ? strchr(p, ' ') + 1 : NULL;
            if (p)
                wanted = strtol(p, &end, 10);
        }
        while (!truncated && wanted > nfds && wanted <= MAX_PASSED) {
            char more[8];
            int before = nfds;
            if (receive(more, sizeof more, fds, &nfds, &truncated) <= 0)
                _exit(EXIT_UNEXPECTED);
            if (strcmp(more, "+") != 0 || nfds == before)
                truncated = true;
        }
        pid_t pid;
        int pidfd, release;
        bool sent = true;
        if (truncated)
            failed(&f, EMSGSIZE, "fds");
        else if (!parse_request(text, fds, nfds, &rq))
            failed(&f, EINVAL, "request");
        else if (spawn_one(&rq, &pid, &pidfd, &release, &f))
            sent = launched(pid, pidfd, release);
        if (f.error) /* one reply to each request, whatever happened */
            send_failure(&f);
        for (int k = 0; k < nfds; k++)
            close(fds[k]);
        if (!sent)
            _exit(EXIT_UNEXPECTED);
    }
}


/* sbd-setup userns READY DONE: a user namespace of its own, held while the fork server writes
 * its maps and opens it (detached.storage_userns): "1" on READY once it exists, exit at EOF on DONE. */
static _Noreturn void hold_userns(char **argv)
{
    char end;
    if (unshare(CLONE_NEWUSER) < 0)
        _exit(EXIT_SETUP_FAILED);
    if (write(atoi(argv[2]), "1", 1) != 1)
        _exit(EXIT_UNEXPECTED);
    while (read(atoi(argv[3]), &end, 1) > 0)
        continue;
    _exit(0);
}

int main(int argc, char **argv)
{
    if (argc == 4 && strcmp(argv[1], "userns") == 0)
        hold_userns(argv);
    if (argc == SPAWN_ARGC && strcmp(argv[1], "spawn") == 0)
        spawn(argv);
    if (argc == 3 && strcmp(argv[1], "serve") == 0)
        serve(argv);
    if (argc != 4) {
        fprintf(stderr, "usage: sbd-setup PROGRAM_FD CHANNEL_FD SYSFS_FD, or sbd-setup spawn ... (run by sandboxd's fork server)\n");
        return EXIT_UNEXPECTED;
    }
    channel = atoi(argv[2]);
    interpret(atoi(argv[1]), atoi(argv[3]));
}
