/*
 * sbd-activate: socket activation inside a Kubernetes pod, for `sandboxd export kubernetes`.
 *
 * It binds the sockets a sandboxd spec gives a service, puts them on descriptors 3, 4, ... in
 * order, sets LISTEN_FDS, LISTEN_PID (its own pid: exec keeps it) and LISTEN_FDNAMES, and execs
 * the program, so a program written for sd_listen_fds(3) runs in the pod unchanged. With
 * --accept it stays, accepts, and forks the program once per connection with the connected
 * socket as descriptor 3 (LISTEN_FDS=1, LISTEN_FDNAMES=connection), as systemd's Accept=yes does,
 * at most MAX at a time.
 *
 *   sbd-activate --install PATH            copy this program to PATH (the init container's job)
 *   sbd-activate [--accept MAX] (--listen ADDRESS [--name N] [--backlog B] [--mode M] [--reuseport])...
 *                -- PROGRAM [ARG]...
 *
 * ADDRESS is sandboxd's form: tcp:HOST:PORT, udp:HOST:PORT ([v6] in brackets), unix:/path,
 * unix:@abstract, unix-dgram:/path, unix-seqpacket:/path. Each failure is one line on stderr
 * naming the address and exit status 111. Static and without name look-ups (no getaddrinfo),
 * so that it runs in any image: gcc -static -Os -o sbd-activate activator.c
 */
#define _GNU_SOURCE
#include <arpa/inet.h>
#include <errno.h>
#include <fcntl.h>
#include <netinet/in.h>
#include <signal.h>
#include <stddef.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <sys/un.h>
#include <sys/wait.h>
#include <unistd.h>

#define MAX_SOCKETS 64

struct listen_spec {
    const char *address, *name;
    int backlog, mode, reuseport;
};

static void die(const char *what, const char *detail) {
    fprintf(stderr, "sbd-activate: %s %s: %s\n", what, detail, strerror(errno));
    exit(111);
}

static int install(const char *path) {
    char buf[65536];
    int in = open("/proc/self/exe", O_RDONLY | O_CLOEXEC), out;
    ssize_t n;
    if (in < 0) die("cannot read", "/proc/self/exe");
    out = open(path, O_WRONLY | O_CREAT | O_TRUNC | O_CLOEXEC, 0555);
    if (out < 0) die("cannot write", path);
    while ((n = read(in, buf, sizeof buf)) > 0)
        if (write(out, buf, (size_t)n) != n) die("cannot write", path);
    if (n < 0 || close(out) < 0) die("cannot copy to", path);
    return 0;
}

static int inet_socket(const char *family, char *rest, const char *address) {
    int type = strcmp(family, "udp") == 0 ? SOCK_DGRAM : SOCK_STREAM, fd, one = 1;
    char *colon = strrchr(rest, ':'), *host = rest;
    struct sockaddr_storage ss;
    socklen_t len;
    memset(&ss, 0, sizeof ss);
    if (!colon) { errno = EINVAL; die("bad address", address); }
    *colon = '\0';
    if (*host == '[') { host++; host[strlen(host) - 1] = '\0'; }
    if (strchr(host, ':')) {
        struct sockaddr_in6 *a = (struct sockaddr_in6 *)&ss;
        a->sin6_family = AF_INET6, a->sin6_port = htons((uint16_t)atoi(colon + 1)), len = sizeof *a;
        if (inet_pton(AF_INET6, host, &a->sin6_addr) != 1) { errno = EINVAL; die("bad address", address); }
    } else {
        struct sockaddr_in *a = (struct sockaddr_in *)&ss;
        a->sin_family = AF_INET, a->sin_port = htons((uint16_t)atoi(colon + 1)), len = sizeof *a;
        if (inet_pton(AF_INET, host, &a->sin_addr) != 1) { errno = EINVAL; die("bad address", address); }
    }
    fd = socket(ss.ss_family, type, 0);
    if (fd < 0) die("cannot make a socket for", address);
    setsockopt(fd, SOL_SOCKET, SO_REUSEADDR, &one, sizeof one);
    if (bind(fd, (struct sockaddr *)&ss, len) < 0) die("cannot bind", address);
    return fd;
}

static int unix_socket(const char *family, const char *path, const char *address, int mode) {
    int type = strcmp(family, "unix-dgram") == 0 ? SOCK_DGRAM : strcmp(family, "unix-seqpacket") == 0 ? SOCK_SEQPACKET : SOCK_STREAM;
    struct sockaddr_un a = {.sun_family = AF_UNIX};
    socklen_t len = (socklen_t)(offsetof(struct sockaddr_un, sun_path) + strlen(path));
    int fd = socket(AF_UNIX, type, 0);
    if (fd < 0) die("cannot make a socket for", address);
    if (strlen(path) >= sizeof a.sun_path) { errno = ENAMETOOLONG; die("bad address", address); }
    memcpy(a.sun_path, path, strlen(path));
    if (path[0] == '@') a.sun_path[0] = '\0';
    else unlink(path), len++;
    if (bind(fd, (struct sockaddr *)&a, len) < 0) die("cannot bind", address);
    if (path[0] != '@' && chmod(path, (mode_t)mode) < 0) die("cannot chmod", path);
    return fd;
}

static int open_socket(const struct listen_spec *spec) {
    char copy[512];
    char *colon;
    int fd;
    snprintf(copy, sizeof copy, "%s", spec->address);
    colon = strchr(copy, ':');
    if (!colon) { errno = EINVAL; die("bad address", spec->address); }
    *colon = '\0';
    if (strncmp(copy, "unix", 4) == 0) fd = unix_socket(copy, colon + 1, spec->address, spec->mode);
    else fd = inet_socket(copy, colon + 1, spec->address);
    if (spec->reuseport) {
        int one = 1;
        if (setsockopt(fd, SOL_SOCKET, SO_REUSEPORT, &one, sizeof one) < 0) die("cannot set SO_REUSEPORT on", spec->address);
    }
    int type = 0;
    socklen_t tlen = sizeof type;
    getsockopt(fd, SOL_SOCKET, SO_TYPE, &type, &tlen);
    if (type != SOCK_DGRAM && listen(fd, spec->backlog) < 0) die("cannot listen on", spec->address);
    return fd;
}

static void exec_with(int count, const char *names, char **argv) {
    char value[32];
    snprintf(value, sizeof value, "%d", count);
    setenv("LISTEN_FDS", value, 1);
    snprintf(value, sizeof value, "%d", (int)getpid());
    setenv("LISTEN_PID", value, 1);
    setenv("LISTEN_FDNAMES", names, 1);
    execvp(argv[0], argv);
    die("cannot run", argv[0]);
}

/* Move the descriptors to 3, 4, ... in order, through high numbers so that none is overwritten. */
static void place(int *fds, int count) {
    for (int i = 0; i < count; i++) {
        int high = fcntl(fds[i], F_DUPFD, 1000);
        if (high < 0) die("cannot move", "a socket");
        close(fds[i]);
        fds[i] = high;
    }
    for (int i = 0; i < count; i++) {
        if (dup2(fds[i], 3 + i) < 0) die("cannot move", "a socket");
        close(fds[i]);
    }
}

static _Noreturn void serve(int listener, int max, char **argv) {
    int running = 0;
    signal(SIGPIPE, SIG_IGN);
    for (;;) {
        while (running > 0 && waitpid(-1, NULL, running >= max ? 0 : WNOHANG) > 0) running--;
        int conn = accept4(listener, NULL, NULL, SOCK_CLOEXEC);
        if (conn < 0) {
            if (errno == EINTR || errno == ECONNABORTED) continue;
            die("cannot accept on", "descriptor 3");
        }
        pid_t pid = fork();
        if (pid == 0) {
            if (dup2(conn, 3) < 0) die("cannot move", "a connection");
            exec_with(1, "connection", argv);
        }
        close(conn);
        if (pid > 0) running++;
    }
}

int main(int argc, char **argv) {
    struct listen_spec specs[MAX_SOCKETS];
    int count = 0, accept_max = 0, fds[MAX_SOCKETS], i;
    char names[MAX_SOCKETS * 256] = "";
    if (argc == 3 && strcmp(argv[1], "--install") == 0) return install(argv[2]);
    for (i = 1; i < argc && strcmp(argv[i], "--") != 0; i++) {
        const char *arg = argv[i], *value = i + 1 < argc ? argv[i + 1] : NULL;
        if (strcmp(arg, "--reuseport") == 0 && count) { specs[count - 1].reuseport = 1; continue; }
        if (!value) break;
        if (strcmp(arg, "--listen") == 0 && count < MAX_SOCKETS)
            specs[count++] = (struct listen_spec){value, "unknown", SOMAXCONN, 0666, 0};
        else if (strcmp(arg, "--name") == 0 && count) specs[count - 1].name = value;
        else if (strcmp(arg, "--backlog") == 0 && count) specs[count - 1].backlog = atoi(value);
        else if (strcmp(arg, "--mode") == 0 && count) specs[count - 1].mode = (int)strtol(value, NULL, 8);
        else if (strcmp(arg, "--accept") == 0) accept_max = atoi(value);
        else break;
        i++;
    }
    if (i >= argc - 1 || strcmp(argv[i], "--") != 0 || count == 0 || (accept_max && count != 1)) {
        fprintf(stderr, "usage: sbd-activate [--accept MAX] (--listen ADDRESS [--name N] [--backlog B] [--mode M] [--reuseport])... -- PROGRAM [ARG]...\n");
        return 2;
    }
    for (int s = 0; s < count; s++) {
        fds[s] = open_socket(&specs[s]);
        if (s) strcat(names, ":");
        strncat(names, specs[s].name, 255);
    }
    place(fds, count);
    if (accept_max) serve(3, accept_max, argv + i + 1);
    exec_with(count, names, argv + i + 1);
    return 111;
}
