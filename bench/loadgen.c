/*
 * loadgen: the benchmark's backends and load generator, in one program.
 *
 * Built at run time by bench/build.py (cc -O2) and run inside the benchmark's
 * network namespace.  One thread, one epoll loop, non-blocking sockets: on a
 * small machine the load generator and the backend have to leave the CPU to
 * the proxy, so neither spends a cycle it does not need.
 *
 *   loadgen serve MODE --port P
 *       A backend on 127.0.0.1:P and [::1]:P.  MODE is one of
 *         echo    send back every byte
 *         sink    read and discard
 *         source  write without end (and discard what arrives)
 *         rr      read a request up to '\n', answer RESPONSE_SIZE bytes, close
 *         hold    accept and keep (read and discard)
 *         udp-echo  UDP: send every datagram back to where it came from
 *       Prints "live N" on stdout whenever the number of open connections
 *       changed (at most every 50 ms), so the harness can count what a proxy
 *       really relayed (TCP modes only).
 *
 *   loadgen MODE --connect HOST:PORT [options]
 *       A client.  MODE is one of
 *         upload    send bulk data for --duration, then half-close and wait
 *                   until everything was read (the backend closes at EOF)
 *         download  read bulk data for --duration
 *         pingpong  "PING\r\n" to an echo backend, one in flight per connection
 *         stream    "PING\r\n" pipelined, up to --window in flight per connection
 *         connrate  --conns clients each loop over: connect, header + request,
 *                   read the response to EOF, close; latency per connection
 *         idle      open --conns connections, report, hold them until stdin
 *                   closes (or --duration runs out)
 *         idle-active  the same, but each connection first sends "PING\r\n" to an
 *                   echo backend and is counted opened once the echo is back
 *                   (checked); then it stays open and quiet
 *         udp       --conns UDP flows (one socket, so one source port, each) to
 *                   a udp-echo backend, up to --window datagrams in flight per
 *                   flow; with --proxy v2 each datagram starts with a PROXY v2
 *                   DGRAM header naming the flow's fake client.  Every reply
 *                   must be a datagram that flow sent (no header); one not
 *                   echoed within UDP_TIMEOUT counts as lost and its slot is
 *                   reused.  After --duration, UDP_GRACE seconds for the rest.
 *         udp-idle  open --conns UDP flows as udp does, one datagram each; report
 *                   how many were echoed ("opened"), then hold the sockets until
 *                   stdin closes (or --duration runs out)
 *       Options: --conns N, --duration SECONDS, --proxy none|v1|v2 (the PROXY
 *       header to send first), --addr-offset K (first client address), --dest-port P
 *       (destination port written in the header), --window N.
 *       Prints one JSON object on stdout at the end (idle: also one when all
 *       connections were attempted).  Every client loop ends at --duration or at a count
 *       (MAX_CONNECTIONS, MAX_MESSAGES, MAX_BYTES), whichever comes first.
 *
 * Fake client addresses in headers come from the documentation range
 * 198.51.100.0/24 (RFC 5737): connection k uses 198.51.100.(1 + k / 64000 % 254)
 * and port 1024 + k % 64000, so that no address:port pair repeats in a run
 * (the proxy binds its upstream socket to it).  A UDP flow k takes address k.
 */
#define _GNU_SOURCE
#include <arpa/inet.h>
#include <errno.h>
#include <fcntl.h>
#include <getopt.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <signal.h>
#include <stdarg.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/epoll.h>
#include <sys/resource.h>
#include <sys/socket.h>
#include <sys/uio.h>
#include <time.h>
#include <unistd.h>

#define BULK_CHUNK (256 * 1024)
#define MESSAGE "PING\r\n"
#define MESSAGE_SIZE 6
#define PATTERN_SIZE (MESSAGE_SIZE * 11000) /* whole messages, > any window we use */
#define REQUEST "HELLO\r\n"
#define RESPONSE_SIZE 64
#define MAX_EVENTS 256
#define MAX_SAMPLES (4 * 1024 * 1024)
#define CONNECTING_AT_ONCE 64 /* idle mode: connects in flight */
#define DRAIN_SECONDS 10.0    /* upload: time allowed for the data to reach the backend */
/* Every loop is bounded in count as well as in time: a client stops at whichever comes first.
 * Connections stop before fake client addresses would repeat (254 hosts x 64000 ports). */
#define MAX_CONNECTIONS (254ULL * 64000ULL)
#define MAX_MESSAGES (1ULL << 40)
#define MAX_BYTES (1ULL << 50)
/* UDP */
#define UDP_PAYLOAD 64          /* bytes of payload per datagram */
#define UDP_HEADER 28           /* PROXY v2, DGRAM over IPv4 */
#define UDP_MAX_WINDOW 1024
#define UDP_MAX_FLOWS 4096
#define UDP_BATCH 64            /* datagrams per recvmmsg/sendmmsg */
#define UDP_TIMEOUT 1.0         /* seconds before an unanswered datagram counts as lost */
#define UDP_GRACE 1.0           /* seconds after --duration for the last replies */
#define UDP_BUFFER (4 << 20)    /* socket buffers (SO_RCVBUFFORCE/SO_SNDBUFFORCE as root) */

static char bulk[BULK_CHUNK];
static char pattern[PATTERN_SIZE];

static void die(const char *fmt, ...) {
    va_list ap;
    va_start(ap, fmt);
    fputs("loadgen: ", stderr);
    vfprintf(stderr, fmt, ap);
    fputc('\n', stderr);
    va_end(ap);
    exit(2);
}

static double now(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (double)ts.tv_sec + (double)ts.tv_nsec / 1e9;
}

static void raise_nofile(void) {
    struct rlimit lim = {1 << 20, 1 << 20};
    if (setrlimit(RLIMIT_NOFILE, &lim) != 0) { /* not root: take the hard limit */
        getrlimit(RLIMIT_NOFILE, &lim);
        lim.rlim_cur = lim.rlim_max;
        setrlimit(RLIMIT_NOFILE, &lim);
    }
}

static void set_nodelay(int fd) {
    int one = 1;
    setsockopt(fd, IPPROTO_TCP, TCP_NODELAY, &one, sizeof one);
}

static int parse_address(const char *text, struct sockaddr_storage *out, socklen_t *len) {
    char host[128];
    const char *colon = strrchr(text, ':');
    if (!colon || (size_t)(colon - text) >= sizeof host) return -1;
    memcpy(host, text, (size_t)(colon - text));
    host[colon - text] = '\0';
    int port = atoi(colon + 1);
    memset(out, 0, sizeof *out);
    char *h = host;
    if (h[0] == '[') { /* [::1]:port */
        h++;
        h[strlen(h) - 1] = '\0';
    }
    struct sockaddr_in *v4 = (struct sockaddr_in *)out;
    struct sockaddr_in6 *v6 = (struct sockaddr_in6 *)out;
    if (inet_pton(AF_INET, h, &v4->sin_addr) == 1) {
        v4->sin_family = AF_INET;
        v4->sin_port = htons((uint16_t)port);
        *len = sizeof *v4;
        return 0;
    }
    if (inet_pton(AF_INET6, h, &v6->sin6_addr) == 1) {
        v6->sin6_family = AF_INET6;
        v6->sin6_port = htons((uint16_t)port);
        *len = sizeof *v6;
        return 0;
    }
    return -1;
}

/* ------------------------------------------------------------------ server */

enum serve_mode { S_ECHO, S_SINK, S_SOURCE, S_RR, S_HOLD, S_UDP_ECHO };

struct sconn {
    int fd;
    char *pending; /* echo: bytes the client has not taken yet */
    size_t pending_len, pending_off;
};

static long live_connections;

static int listen_on(int family, int port) {
    int fd = socket(family, SOCK_STREAM | SOCK_NONBLOCK | SOCK_CLOEXEC, 0);
    if (fd < 0) die("socket: %s", strerror(errno));
    int one = 1;
    setsockopt(fd, SOL_SOCKET, SO_REUSEADDR, &one, sizeof one);
    struct sockaddr_storage ss;
    socklen_t len;
    char address[32];
    snprintf(address, sizeof address, family == AF_INET ? "127.0.0.1:%d" : "[::1]:%d", port);
    parse_address(address, &ss, &len);
    if (family == AF_INET6) setsockopt(fd, IPPROTO_IPV6, IPV6_V6ONLY, &one, sizeof one);
    if (bind(fd, (struct sockaddr *)&ss, len) != 0) die("bind %s: %s", address, strerror(errno));
    if (listen(fd, 4096) != 0) die("listen: %s", strerror(errno));
    return fd;
}

static void sclose(int ep, struct sconn *c) {
    epoll_ctl(ep, EPOLL_CTL_DEL, c->fd, NULL);
    close(c->fd);
    free(c->pending);
    free(c);
    live_connections--;
}

/* Echo what arrived; keep the rest when the client's window is full. */
static int echo_out(int ep, struct sconn *c, const char *data, size_t len) {
    size_t off = 0;
    while (off < len) {
        ssize_t n = send(c->fd, data + off, len - off, MSG_NOSIGNAL);
        if (n < 0) {
            if (errno != EAGAIN) return -1;
            size_t rest = len - off;
            char *copy = malloc(rest);
            if (!copy) return -1;
            memcpy(copy, data + off, rest);
            free(c->pending);
            c->pending = copy;
            c->pending_len = rest;
            c->pending_off = 0;
            struct epoll_event ev = {.events = EPOLLOUT, .data.ptr = c};
            epoll_ctl(ep, EPOLL_CTL_MOD, c->fd, &ev); /* stop reading until flushed */
            return 0;
        }
        off += (size_t)n;
    }
    return 0;
}

static void serve_event(int ep, enum serve_mode mode, struct sconn *c, uint32_t events) {
    static char buf[BULK_CHUNK];
    if (mode == S_ECHO && c->pending && (events & (EPOLLOUT | EPOLLERR | EPOLLHUP))) {
        char *p = c->pending;
        size_t off = c->pending_off, len = c->pending_len;
        c->pending = NULL;
        if (echo_out(ep, c, p + off, len - off) != 0) {
            free(p);
            sclose(ep, c);
            return;
        }
        free(p);
        if (!c->pending) {
            struct epoll_event ev = {.events = EPOLLIN, .data.ptr = c};
            epoll_ctl(ep, EPOLL_CTL_MOD, c->fd, &ev);
        }
        return;
    }
    if (mode == S_SOURCE && (events & EPOLLOUT)) {
        for (int i = 0; i < 64; i++) {
            ssize_t n = send(c->fd, bulk, sizeof bulk, MSG_NOSIGNAL);
            if (n < 0) {
                if (errno == EAGAIN) break;
                sclose(ep, c);
                return;
            }
        }
    }
    if (events & (EPOLLIN | EPOLLERR | EPOLLHUP)) {
        ssize_t n = recv(c->fd, buf, sizeof buf, 0);
        if (n == 0 || (n < 0 && errno != EAGAIN)) {
            sclose(ep, c);
            return;
        }
        if (n < 0) return;
        if (mode == S_ECHO) {
            if (echo_out(ep, c, buf, (size_t)n) != 0) sclose(ep, c);
        } else if (mode == S_RR && memchr(buf, '\n', (size_t)n)) {
            char response[RESPONSE_SIZE];
            memset(response, 'r', sizeof response);
            response[RESPONSE_SIZE - 1] = '\n';
            send(c->fd, response, sizeof response, MSG_NOSIGNAL);
            sclose(ep, c); /* the request was read to its end: a plain FIN, no reset */
        }
    }
}

static void serve(enum serve_mode mode, int port) {
    int ep = epoll_create1(EPOLL_CLOEXEC);
    int listeners[2] = {listen_on(AF_INET, port), listen_on(AF_INET6, port)};
    for (int i = 0; i < 2; i++) {
        struct epoll_event ev = {.events = EPOLLIN, .data.ptr = NULL};
        ev.data.u64 = (uint64_t)i; /* 0 and 1 mark the listeners; connections are pointers */
        epoll_ctl(ep, EPOLL_CTL_ADD, listeners[i], &ev);
    }
    printf("ready\n");
    fflush(stdout);
    long printed = -1;
    double next_print = 0;
    struct epoll_event events[MAX_EVENTS];
    for (;;) {
        int n = epoll_wait(ep, events, MAX_EVENTS, 50);
        if (n < 0 && errno != EINTR) die("epoll_wait: %s", strerror(errno));
        for (int i = 0; i < n; i++) {
            if (events[i].data.u64 < 2) {
                int lfd = listeners[events[i].data.u64];
                for (;;) {
                    int fd = accept4(lfd, NULL, NULL, SOCK_NONBLOCK | SOCK_CLOEXEC);
                    if (fd < 0) break;
                    set_nodelay(fd);
                    struct sconn *c = calloc(1, sizeof *c);
                    if (!c) die("out of memory");
                    c->fd = fd;
                    struct epoll_event ev = {.events = EPOLLIN, .data.ptr = c};
                    if (mode == S_SOURCE) ev.events |= EPOLLOUT;
                    epoll_ctl(ep, EPOLL_CTL_ADD, fd, &ev);
                    live_connections++;
                }
                continue;
            }
            serve_event(ep, mode, events[i].data.ptr, events[i].events);
        }
        double t = now();
        if (live_connections != printed && t >= next_print) {
            printf("live %ld\n", live_connections);
            fflush(stdout);
            printed = live_connections;
            next_print = t + 0.05;
        }
    }
}

static void big_buffers(int fd) {
    int size = UDP_BUFFER;
    if (setsockopt(fd, SOL_SOCKET, SO_RCVBUFFORCE, &size, sizeof size) != 0)
        setsockopt(fd, SOL_SOCKET, SO_RCVBUF, &size, sizeof size);
    if (setsockopt(fd, SOL_SOCKET, SO_SNDBUFFORCE, &size, sizeof size) != 0)
        setsockopt(fd, SOL_SOCKET, SO_SNDBUF, &size, sizeof size);
}

/* udp-echo: every datagram goes back to its sender, in batches; a full send buffer drops
 * what does not fit (it is UDP: the client counts it as lost). */
static void serve_udp(int port) {
    int ep = epoll_create1(EPOLL_CLOEXEC);
    int fds[2];
    for (int i = 0; i < 2; i++) {
        int family = i == 0 ? AF_INET : AF_INET6;
        int fd = socket(family, SOCK_DGRAM | SOCK_NONBLOCK | SOCK_CLOEXEC, 0);
        if (fd < 0) die("socket: %s", strerror(errno));
        int one = 1;
        if (family == AF_INET6) setsockopt(fd, IPPROTO_IPV6, IPV6_V6ONLY, &one, sizeof one);
        big_buffers(fd);
        struct sockaddr_storage ss;
        socklen_t len;
        char address[32];
        snprintf(address, sizeof address, i == 0 ? "127.0.0.1:%d" : "[::1]:%d", port);
        parse_address(address, &ss, &len);
        if (bind(fd, (struct sockaddr *)&ss, len) != 0)
            die("bind udp %s: %s", address, strerror(errno));
        struct epoll_event ev = {.events = EPOLLIN, .data.u32 = (uint32_t)i};
        epoll_ctl(ep, EPOLL_CTL_ADD, fd, &ev);
        fds[i] = fd;
    }
    printf("ready\n");
    fflush(stdout);
    static char bufs[UDP_BATCH][65536];
    static struct sockaddr_storage from[UDP_BATCH];
    static struct iovec iov[UDP_BATCH];
    static struct mmsghdr msgs[UDP_BATCH];
    struct epoll_event events[2];
    for (;;) {
        int n = epoll_wait(ep, events, 2, 1000);
        if (n < 0 && errno != EINTR) die("epoll_wait: %s", strerror(errno));
        for (int e = 0; e < n; e++) {
            int fd = fds[events[e].data.u32];
            for (;;) {
                for (int i = 0; i < UDP_BATCH; i++) {
                    iov[i] = (struct iovec){.iov_base = bufs[i], .iov_len = sizeof bufs[i]};
                    msgs[i].msg_hdr = (struct msghdr){.msg_name = &from[i],
                                                      .msg_namelen = sizeof from[i],
                                                      .msg_iov = &iov[i],
                                                      .msg_iovlen = 1};
                }
                int got = recvmmsg(fd, msgs, UDP_BATCH, MSG_DONTWAIT, NULL);
                if (got <= 0) break;
                for (int i = 0; i < got; i++) iov[i].iov_len = msgs[i].msg_len;
                int off = 0;
                while (off < got) {
                    int sent = sendmmsg(fd, msgs + off, (unsigned)(got - off), MSG_DONTWAIT);
                    if (sent <= 0) {
                        if (sent == 0 || errno == EAGAIN) break; /* full: drop the rest */
                        if (errno != EINTR) off++;               /* skip the one that failed */
                        continue;
                    }
                    off += sent;
                }
                if (got < UDP_BATCH) break;
            }
        }
    }
}

/* ------------------------------------------------------------------ client */

enum client_mode {
    C_UPLOAD,
    C_DOWNLOAD,
    C_PINGPONG,
    C_STREAM,
    C_CONNRATE,
    C_IDLE,
    C_UDP,
    C_UDP_IDLE,
    C_IDLE_ACTIVE
};

struct options {
    enum client_mode mode;
    struct sockaddr_storage target;
    socklen_t target_len;
    int conns, window, proxy, dest_port; /* proxy: 0 none, 1 v1, 2 v2 */
    double duration;
    uint64_t addr_offset;
};

struct cconn {
    int fd;
    int connected, done;
    uint64_t sent, received;
    double started; /* connect (connrate) or message sent (pingpong) */
};

struct results {
    uint64_t bytes, messages, connections, errors, opened, failed, alive, mismatches;
    uint64_t sent, received, late, timeouts; /* udp: datagrams */
    uint32_t *samples; /* microseconds */
    size_t nsamples;
    uint64_t next_addr;
};

static struct options opt;
static struct results res;

static void sample(double seconds) {
    if (res.nsamples < MAX_SAMPLES) res.samples[res.nsamples++] = (uint32_t)(seconds * 1e6 + 0.5);
}

/* The PROXY header for the next fake client (none in direct mode). */
static size_t build_header(char *out) {
    if (!opt.proxy) return 0;
    uint64_t k = res.next_addr++;
    unsigned host = 1 + (unsigned)(k / 64000 % 254), port = 1024 + (unsigned)(k % 64000);
    if (opt.proxy == 1)
        return (size_t)sprintf(out, "PROXY TCP4 198.51.100.%u 127.0.0.1 %u %d\r\n", host, port,
                               opt.dest_port);
    static const unsigned char sig[12] = {0x0d, 0x0a, 0x0d, 0x0a, 0x00, 0x0d,
                                          0x0a, 0x51, 0x55, 0x49, 0x54, 0x0a};
    unsigned char *p = (unsigned char *)out;
    memcpy(p, sig, 12);
    p[12] = 0x21; /* version 2, PROXY */
    p[13] = 0x11; /* TCP over IPv4 */
    p[14] = 0;
    p[15] = 12;
    unsigned char addr[12] = {198, 51, 100, (unsigned char)host, 127, 0, 0, 1,
                              (unsigned char)(port >> 8), (unsigned char)port,
                              (unsigned char)(opt.dest_port >> 8), (unsigned char)opt.dest_port};
    memcpy(p + 16, addr, 12);
    return 28;
}

/* Start a non-blocking connect into the caller's slot; returns 0 or -1. */
static int open_conn(int ep, struct cconn *c) {
    int fd = socket(opt.target.ss_family, SOCK_STREAM | SOCK_NONBLOCK | SOCK_CLOEXEC, 0);
    if (fd < 0) return -1;
    set_nodelay(fd);
    if (connect(fd, (struct sockaddr *)&opt.target, opt.target_len) != 0 && errno != EINPROGRESS) {
        close(fd);
        return -1;
    }
    *c = (struct cconn){.fd = fd, .started = now()};
    struct epoll_event ev = {.events = EPOLLOUT, .data.ptr = c};
    epoll_ctl(ep, EPOLL_CTL_ADD, fd, &ev);
    return 0;
}

static void close_conn(int ep, struct cconn *c) {
    if (c->fd < 0) return;
    epoll_ctl(ep, EPOLL_CTL_DEL, c->fd, NULL);
    close(c->fd);
    c->fd = -1;
    c->done = 1;
}

static void want(int ep, struct cconn *c, uint32_t events) {
    struct epoll_event ev = {.events = events, .data.ptr = c};
    epoll_ctl(ep, EPOLL_CTL_MOD, c->fd, &ev);
}

/* Echoed bytes must be the message pattern, wherever a read happens to split it. */
static void check_echo(const char *data, size_t len, uint64_t offset) {
    if (memcmp(data, pattern + offset % MESSAGE_SIZE, len) != 0) res.mismatches++;
}

/* stream: top the window up; ask for EPOLLOUT only while the socket is full. */
static int stream_fill(int ep, struct cconn *c) {
    uint64_t limit = (uint64_t)opt.window * MESSAGE_SIZE;
    uint64_t outstanding = c->sent - c->received;
    if (outstanding >= limit) return 0;
    size_t off = c->sent % MESSAGE_SIZE;
    ssize_t n = send(c->fd, pattern + off, limit - outstanding, MSG_NOSIGNAL);
    if (n < 0) {
        if (errno != EAGAIN) return -1;
        want(ep, c, EPOLLIN | EPOLLOUT);
        return 0;
    }
    c->sent += (uint64_t)n;
    want(ep, c, c->sent - c->received < limit ? EPOLLIN | EPOLLOUT : EPOLLIN);
    return 0;
}

/* Send the header plus what the mode says first; returns 0 or -1. */
static int on_connected(int ep, struct cconn *c) {
    int err = 0;
    socklen_t len = sizeof err;
    getsockopt(c->fd, SOL_SOCKET, SO_ERROR, &err, &len);
    if (err) return -1;
    char first[256];
    size_t n = build_header(first);
    if (opt.mode == C_PINGPONG || opt.mode == C_IDLE_ACTIVE) { /* it rides with the header */
        memcpy(first + n, MESSAGE, MESSAGE_SIZE);
        n += MESSAGE_SIZE;
        c->sent = MESSAGE_SIZE;
        c->started = now();
    } else if (opt.mode == C_CONNRATE) {
        memcpy(first + n, REQUEST, strlen(REQUEST));
        n += strlen(REQUEST);
    }
    if (n && send(c->fd, first, n, MSG_NOSIGNAL) != (ssize_t)n) return -1;
    c->connected = 1;
    switch (opt.mode) {
    case C_UPLOAD: want(ep, c, EPOLLOUT); break;
    case C_STREAM: return stream_fill(ep, c);
    default: want(ep, c, EPOLLIN); break;
    }
    return 0;
}

/* One event on a client connection; returns -1 when the connection failed. */
static int client_event(int ep, struct cconn *c, uint32_t events, int counting) {
    static char buf[BULK_CHUNK];
    if (!c->connected) return (events & (EPOLLOUT | EPOLLERR | EPOLLHUP)) ? on_connected(ep, c) : 0;
    if (opt.mode == C_UPLOAD && (events & EPOLLOUT)) {
        ssize_t n = send(c->fd, bulk, sizeof bulk, MSG_NOSIGNAL);
        if (n < 0 && errno != EAGAIN) return -1;
        if (n > 0) res.bytes += (uint64_t)n;
        return 0;
    }
    if (opt.mode == C_STREAM && (events & EPOLLOUT) && !(events & EPOLLIN))
        return stream_fill(ep, c);
    if (!(events & (EPOLLIN | EPOLLERR | EPOLLHUP))) return 0;
    ssize_t n = recv(c->fd, buf, sizeof buf, 0);
    if (n < 0) return errno == EAGAIN ? 0 : -1;
    if (n == 0) { /* end of stream */
        if (opt.mode == C_CONNRATE) {
            sample(now() - c->started);
            res.connections++;
            close_conn(ep, c);
            return 0;
        }
        if (opt.mode == C_UPLOAD) { /* the backend has read everything */
            close_conn(ep, c);
            return 0;
        }
        return -1;
    }
    switch (opt.mode) {
    case C_DOWNLOAD:
        if (counting) res.bytes += (uint64_t)n;
        break;
    case C_PINGPONG:
        check_echo(buf, (size_t)n, c->received);
        c->received += (uint64_t)n;
        if (c->received == c->sent) { /* the reply is complete: count it, send the next */
            double t = now();
            if (counting) {
                res.messages++;
                sample(t - c->started);
            }
            c->started = t;
            if (send(c->fd, MESSAGE, MESSAGE_SIZE, MSG_NOSIGNAL) != MESSAGE_SIZE) return -1;
            c->sent += MESSAGE_SIZE;
        }
        break;
    case C_STREAM: {
        uint64_t before = c->received / MESSAGE_SIZE;
        check_echo(buf, (size_t)n, c->received);
        c->received += (uint64_t)n;
        if (counting) res.messages += c->received / MESSAGE_SIZE - before;
        return stream_fill(ep, c);
    }
    case C_IDLE_ACTIVE: /* the one echo: whole, and nothing more */
        if (c->received + (uint64_t)n > c->sent) {
            res.mismatches++;
            break;
        }
        check_echo(buf, (size_t)n, c->received);
        c->received += (uint64_t)n;
        break;
    default: break; /* connrate reads the response to EOF; idle discards */
    }
    return 0;
}

static int compare_u32(const void *a, const void *b) {
    uint32_t x = *(const uint32_t *)a, y = *(const uint32_t *)b;
    return (x > y) - (x < y);
}

static void print_results(double seconds) {
    double p50 = 0, p99 = 0, max = 0;
    if (res.nsamples) {
        qsort(res.samples, res.nsamples, sizeof *res.samples, compare_u32);
        p50 = res.samples[(res.nsamples - 1) * 50 / 100];
        p99 = res.samples[(res.nsamples - 1) * 99 / 100];
        max = res.samples[res.nsamples - 1];
    }
    printf("{\"seconds\": %.6f, \"bytes\": %llu, \"messages\": %llu, \"connections\": %llu, "
           "\"errors\": %llu, \"mismatches\": %llu, \"opened\": %llu, \"failed\": %llu, "
           "\"alive\": %llu, \"samples\": %zu, \"p50_us\": %.0f, \"p99_us\": %.0f, "
           "\"max_us\": %.0f, \"addresses_used\": %llu, \"datagrams\": %llu, \"sent\": %llu, "
           "\"received\": %llu, \"lost\": %llu, \"late\": %llu, \"timeouts\": %llu}\n",
           seconds, (unsigned long long)res.bytes, (unsigned long long)res.messages,
           (unsigned long long)res.connections, (unsigned long long)res.errors,
           (unsigned long long)res.mismatches, (unsigned long long)res.opened,
           (unsigned long long)res.failed, (unsigned long long)res.alive, res.nsamples, p50, p99,
           max, (unsigned long long)(res.next_addr - opt.addr_offset),
           (unsigned long long)(opt.mode == C_UDP ? res.messages : 0),
           (unsigned long long)res.sent, (unsigned long long)res.received,
           (unsigned long long)(res.sent > res.received ? res.sent - res.received : 0),
           (unsigned long long)res.late, (unsigned long long)res.timeouts);
    fflush(stdout);
}

/* Hold until stdin closes or `deadline`, passing every other event to `on_event`; returns
 * when the hold began.  stdin must be a pipe the harness closes; anything else (a file,
 * /dev/null) means "now". */
static double hold(int ep, double deadline, void (*on_event)(int, void *, uint32_t)) {
    struct epoll_event events[MAX_EVENTS];
    struct epoll_event ev = {.events = EPOLLIN, .data.ptr = NULL};
    int stop = epoll_ctl(ep, EPOLL_CTL_ADD, STDIN_FILENO, &ev) != 0;
    double start = now();
    while (!stop && now() < deadline) {
        int n = epoll_wait(ep, events, MAX_EVENTS, 100);
        for (int i = 0; i < n; i++) {
            if (events[i].data.ptr) on_event(ep, events[i].data.ptr, events[i].events);
            else stop = 1;
        }
    }
    return start;
}

static void idle_event(int ep, void *ptr, uint32_t events) {
    struct cconn *c = ptr;
    if (client_event(ep, c, events, 0) != 0) close_conn(ep, c);
}

/* idle: open everything, report, then hold until stdin closes or time runs out.  An
 * idle-active connection is pending until its echo is back, and only then opened. */
static void run_idle(int ep) {
    int active = opt.mode == C_IDLE_ACTIVE;
    struct cconn *conns = calloc((size_t)opt.conns, sizeof *conns);
    if (!conns) die("out of memory");
    int started = 0, pending = 0;
    struct epoll_event events[MAX_EVENTS];
    double deadline = now() + opt.duration;
    while ((started < opt.conns || pending) && now() < deadline) {
        while (started < opt.conns && pending < CONNECTING_AT_ONCE) {
            struct cconn *c = &conns[started++];
            if (open_conn(ep, c) != 0) {
                res.failed++;
                c->fd = -1;
                continue;
            }
            pending++;
        }
        int n = epoll_wait(ep, events, MAX_EVENTS, 100);
        for (int i = 0; i < n; i++) {
            struct cconn *c = events[i].data.ptr;
            if (c->connected) {
                int waiting = active && c->received < c->sent;
                if (client_event(ep, c, events[i].events, 0) != 0) {
                    close_conn(ep, c); /* the proxy closed it: over its limit */
                    if (waiting) {
                        pending--;
                        res.failed++;
                    }
                } else if (waiting && c->received == c->sent) {
                    pending--;
                    res.opened++;
                }
                continue;
            }
            if (on_connected(ep, c) != 0) {
                pending--;
                res.failed++;
                close_conn(ep, c);
            } else if (!active) {
                pending--;
                res.opened++;
            }
        }
    }
    printf("{\"event\": \"opened\", \"opened\": %llu, \"failed\": %llu}\n",
           (unsigned long long)res.opened, (unsigned long long)res.failed);
    fflush(stdout);
    double start = hold(ep, deadline, idle_event);
    for (int i = 0; i < started; i++) {
        if (conns[i].fd >= 0) res.alive++;
    }
    print_results(now() - start);
}

/* udp: one flow is one socket (one source port), with its own fake client in its header. */
struct uslot {
    uint64_t seq;
    double sent;
    int busy;
};

struct uflow {
    int fd;
    uint32_t id;
    uint64_t next_seq;
    unsigned char header[UDP_HEADER];
    size_t header_len;
    struct uslot *slots;
};

/* The payload of datagram `seq` of flow `id` in window slot `slot`: the three numbers, then
 * bytes that depend on them, so a reply can be checked against what was sent. */
static void udp_payload(unsigned char *out, uint32_t id, uint32_t slot, uint64_t seq) {
    memcpy(out, &id, 4);
    memcpy(out + 4, &slot, 4);
    memcpy(out + 8, &seq, 8);
    for (int j = 16; j < UDP_PAYLOAD; j++) out[j] = (unsigned char)(seq * 31 + id * 7 + (unsigned)j);
}

static size_t udp_header(unsigned char *p) {
    if (!opt.proxy) return 0;
    uint64_t k = res.next_addr++;
    unsigned host = 1 + (unsigned)(k / 64000 % 254), port = 1024 + (unsigned)(k % 64000);
    static const unsigned char sig[12] = {0x0d, 0x0a, 0x0d, 0x0a, 0x00, 0x0d,
                                          0x0a, 0x51, 0x55, 0x49, 0x54, 0x0a};
    memcpy(p, sig, 12);
    p[12] = 0x21; /* version 2, PROXY */
    p[13] = 0x12; /* DGRAM (UDP) over IPv4 */
    p[14] = 0;
    p[15] = 12;
    unsigned char addr[12] = {198, 51, 100, (unsigned char)host, 127, 0, 0, 1,
                              (unsigned char)(port >> 8), (unsigned char)port,
                              (unsigned char)(opt.dest_port >> 8), (unsigned char)opt.dest_port};
    memcpy(p + 16, addr, 12);
    return UDP_HEADER;
}

/* Send a new datagram from every free slot of the window (one sendmmsg). */
static void udp_top_up(struct uflow *f, double t) {
    static unsigned char data[UDP_MAX_WINDOW][UDP_PAYLOAD];
    static struct iovec iov[UDP_MAX_WINDOW][2];
    static struct mmsghdr msgs[UDP_MAX_WINDOW];
    static int slot_of[UDP_MAX_WINDOW];
    int count = 0;
    for (int i = 0; i < opt.window && res.sent + (uint64_t)count < MAX_MESSAGES; i++) {
        if (f->slots[i].busy) continue;
        uint64_t seq = f->next_seq + (uint64_t)count;
        udp_payload(data[count], f->id, (uint32_t)i, seq);
        iov[count][0] = (struct iovec){.iov_base = f->header, .iov_len = f->header_len};
        iov[count][1] = (struct iovec){.iov_base = data[count], .iov_len = UDP_PAYLOAD};
        msgs[count].msg_hdr = (struct msghdr){.msg_iov = f->header_len ? iov[count] : &iov[count][1],
                                              .msg_iovlen = f->header_len ? 2 : 1};
        slot_of[count++] = i;
    }
    int off = 0;
    while (off < count) {
        int n = sendmmsg(f->fd, msgs + off, (unsigned)(count - off), MSG_DONTWAIT);
        if (n <= 0) {
            if (n < 0 && errno != EAGAIN && errno != EINTR) res.errors++;
            break; /* the slots stay free: the next top-up tries again */
        }
        for (int j = off; j < off + n; j++) {
            f->slots[slot_of[j]] = (struct uslot){.seq = f->next_seq, .sent = t, .busy = 1};
            f->next_seq++;
            res.sent++;
        }
        off += n;
    }
}

/* Check one reply; returns 1 when it was a datagram this flow sent. */
static int udp_reply(struct uflow *f, const unsigned char *data, size_t len, double t, int counting) {
    uint32_t id, slot;
    uint64_t seq;
    unsigned char expected[UDP_PAYLOAD];
    if (len != UDP_PAYLOAD) return 0;
    memcpy(&id, data, 4);
    memcpy(&slot, data + 4, 4);
    memcpy(&seq, data + 8, 8);
    if (id != f->id || slot >= (uint32_t)opt.window || seq >= f->next_seq) return 0;
    udp_payload(expected, id, slot, seq);
    if (memcmp(expected, data, UDP_PAYLOAD) != 0) return 0;
    struct uslot *s = &f->slots[slot];
    if (s->busy && s->seq == seq) {
        if (counting) sample(t - s->sent);
        s->busy = 0;
    } else {
        res.late++; /* already counted as timed out; it arrived after all */
    }
    res.received++;
    if (counting) res.messages++;
    return 1;
}

static void run_udp(int ep) {
    if (opt.proxy == 1) die("udp: --proxy none or v2 (a v1 header has no datagram transport)");
    if (opt.conns > UDP_MAX_FLOWS || opt.window > UDP_MAX_WINDOW)
        die("udp: at most %d flows and a window of %d", UDP_MAX_FLOWS, UDP_MAX_WINDOW);
    struct uflow *flows = calloc((size_t)opt.conns, sizeof *flows);
    if (!flows) die("out of memory");
    for (int i = 0; i < opt.conns; i++) {
        struct uflow *f = &flows[i];
        f->fd = socket(opt.target.ss_family, SOCK_DGRAM | SOCK_NONBLOCK | SOCK_CLOEXEC, 0);
        if (f->fd < 0) die("socket: %s", strerror(errno));
        big_buffers(f->fd);
        if (connect(f->fd, (struct sockaddr *)&opt.target, opt.target_len) != 0)
            die("connect udp: %s", strerror(errno));
        f->id = (uint32_t)i;
        f->header_len = udp_header(f->header);
        f->slots = calloc((size_t)opt.window, sizeof *f->slots);
        if (!f->slots) die("out of memory");
        struct epoll_event ev = {.events = EPOLLIN, .data.ptr = f};
        epoll_ctl(ep, EPOLL_CTL_ADD, f->fd, &ev);
    }
    static unsigned char bufs[UDP_BATCH][2048];
    static struct iovec iov[UDP_BATCH];
    static struct mmsghdr msgs[UDP_BATCH];
    struct epoll_event events[MAX_EVENTS];
    double start = now(), end = start + opt.duration, t = start, next_scan = start;
    for (int i = 0; i < opt.conns; i++) udp_top_up(&flows[i], t);
    for (;;) {
        int outstanding = 0;
        if (t >= end) { /* grace: only waiting for what is still in flight */
            for (int i = 0; i < opt.conns && !outstanding; i++)
                for (int j = 0; j < opt.window; j++) outstanding |= flows[i].slots[j].busy;
            if (!outstanding || t >= end + UDP_GRACE) break;
        }
        int n = epoll_wait(ep, events, MAX_EVENTS, 20);
        t = now();
        int counting = t < end;
        for (int e = 0; e < n; e++) {
            struct uflow *f = events[e].data.ptr;
            for (;;) {
                for (int i = 0; i < UDP_BATCH; i++) {
                    iov[i] = (struct iovec){.iov_base = bufs[i], .iov_len = sizeof bufs[i]};
                    msgs[i].msg_hdr = (struct msghdr){.msg_iov = &iov[i], .msg_iovlen = 1};
                }
                int got = recvmmsg(f->fd, msgs, UDP_BATCH, MSG_DONTWAIT, NULL);
                if (got < 0) {
                    if (errno != EAGAIN && errno != EINTR) res.errors++; /* e.g. ECONNREFUSED */
                    break;
                }
                for (int i = 0; i < got; i++) {
                    if (!udp_reply(f, bufs[i], msgs[i].msg_len, t, counting)) res.mismatches++;
                }
                if (got < UDP_BATCH) break;
            }
            if (counting) udp_top_up(f, t);
        }
        if (t >= next_scan) { /* unanswered for UDP_TIMEOUT: lost; its slot is free again */
            next_scan = t + 0.05;
            for (int i = 0; i < opt.conns; i++) {
                for (int j = 0; j < opt.window; j++) {
                    struct uslot *s = &flows[i].slots[j];
                    if (s->busy && t - s->sent > UDP_TIMEOUT) {
                        s->busy = 0;
                        res.timeouts++;
                    }
                }
                if (t < end) udp_top_up(&flows[i], t);
            }
        }
        if (res.sent >= MAX_MESSAGES && end > t) end = t; /* the count bound: stop sending */
    }
    for (int i = 0; i < opt.conns; i++) close(flows[i].fd);
    print_results(end - start);
}

static void udp_idle_event(int ep, void *ptr, uint32_t events) {
    (void)ep;
    (void)events;
    struct uflow *f = ptr;
    unsigned char buf[2048];
    while (recv(f->fd, buf, sizeof buf, MSG_DONTWAIT) >= 0) {} /* a late echo: drop it */
}

/* udp-idle: every flow sends one datagram and waits for its echo; then all are held open,
 * silent, until stdin closes: what a proxy keeps per open flow. */
static void run_udp_idle(int ep) {
    if (opt.conns > UDP_MAX_FLOWS) die("udp-idle: at most %d flows", UDP_MAX_FLOWS);
    struct uflow *flows = calloc((size_t)opt.conns, sizeof *flows);
    if (!flows) die("out of memory");
    unsigned char *echoed = calloc((size_t)opt.conns, 1);
    if (!echoed) die("out of memory");
    double deadline = now() + opt.duration;
    for (int i = 0; i < opt.conns; i++) {
        struct uflow *f = &flows[i];
        f->fd = socket(opt.target.ss_family, SOCK_DGRAM | SOCK_NONBLOCK | SOCK_CLOEXEC, 0);
        if (f->fd < 0) die("socket: %s", strerror(errno));
        if (connect(f->fd, (struct sockaddr *)&opt.target, opt.target_len) != 0)
            die("connect udp: %s", strerror(errno));
        f->id = (uint32_t)i;
        f->header_len = udp_header(f->header);
        struct epoll_event ev = {.events = EPOLLIN, .data.ptr = f};
        epoll_ctl(ep, EPOLL_CTL_ADD, f->fd, &ev);
    }
    /* send in rounds, again to the flows not echoed yet, until all are or time runs out */
    double next_round = 0;
    struct epoll_event events[MAX_EVENTS];
    while (res.opened < (uint64_t)opt.conns && now() < deadline) {
        if (now() >= next_round) {
            for (int i = 0; i < opt.conns; i++) {
                if (echoed[i]) continue;
                unsigned char data[UDP_HEADER + UDP_PAYLOAD];
                memcpy(data, flows[i].header, flows[i].header_len);
                udp_payload(data + flows[i].header_len, flows[i].id, 0, 0);
                if (send(flows[i].fd, data, flows[i].header_len + UDP_PAYLOAD, 0) < 0) res.errors++;
                else res.sent++;
            }
            next_round = now() + UDP_TIMEOUT;
        }
        int n = epoll_wait(ep, events, MAX_EVENTS, 50);
        for (int e = 0; e < n; e++) {
            struct uflow *f = events[e].data.ptr;
            unsigned char buf[2048];
            ssize_t got;
            while ((got = recv(f->fd, buf, sizeof buf, MSG_DONTWAIT)) >= 0) {
                unsigned char expected[UDP_PAYLOAD];
                udp_payload(expected, f->id, 0, 0);
                if (got != UDP_PAYLOAD || memcmp(buf, expected, UDP_PAYLOAD) != 0) {
                    res.mismatches++;
                } else if (!echoed[f->id]) {
                    echoed[f->id] = 1;
                    res.opened++;
                    res.received++;
                }
            }
        }
    }
    res.failed = (uint64_t)opt.conns - res.opened;
    printf("{\"event\": \"opened\", \"opened\": %llu, \"failed\": %llu}\n",
           (unsigned long long)res.opened, (unsigned long long)res.failed);
    fflush(stdout);
    double start = hold(ep, deadline, udp_idle_event);
    res.alive = res.opened;
    for (int i = 0; i < opt.conns; i++) close(flows[i].fd);
    print_results(now() - start);
}

static void run_client(void) {
    int ep = epoll_create1(EPOLL_CLOEXEC);
    memset(bulk, 'b', sizeof bulk);
    for (size_t i = 0; i < PATTERN_SIZE; i++) pattern[i] = MESSAGE[i % MESSAGE_SIZE];
    res.next_addr = opt.addr_offset;
    if (opt.mode == C_CONNRATE || opt.mode == C_PINGPONG || opt.mode == C_UDP) {
        res.samples = malloc(MAX_SAMPLES * sizeof *res.samples);
        if (!res.samples) die("out of memory");
    }
    if (opt.mode == C_IDLE || opt.mode == C_IDLE_ACTIVE) {
        run_idle(ep);
        return;
    }
    if (opt.mode == C_UDP) {
        run_udp(ep);
        return;
    }
    if (opt.mode == C_UDP_IDLE) {
        run_udp_idle(ep);
        return;
    }
    struct cconn *conns = calloc((size_t)opt.conns, sizeof *conns);
    if (!conns) die("out of memory");
    double start = now(), end = start + opt.duration;
    for (int i = 0; i < opt.conns; i++) {
        if (open_conn(ep, &conns[i]) != 0) die("connect: %s", strerror(errno));
    }
    struct epoll_event events[MAX_EVENTS];
    double t = start;
    while (t < end && res.connections < MAX_CONNECTIONS && res.messages < MAX_MESSAGES &&
           res.bytes < MAX_BYTES) {
        int n = epoll_wait(ep, events, MAX_EVENTS, 20);
        t = now();
        for (int i = 0; i < n; i++) {
            struct cconn *c = events[i].data.ptr;
            if (c->fd < 0) continue;
            if (client_event(ep, c, events[i].events, t < end) != 0) {
                res.errors++;
                close_conn(ep, c);
            }
            if (c->fd < 0 && opt.mode != C_CONNRATE && opt.mode != C_UPLOAD) {
                die("a connection ended early (%s mode)", opt.mode == C_DOWNLOAD ? "download"
                                                                                 : "message");
            }
        }
        for (int i = 0; opt.mode == C_CONNRATE && t < end && i < opt.conns; i++) {
            if (conns[i].fd < 0 && open_conn(ep, &conns[i]) != 0) res.errors++; /* next one */
        }
    }
    double counted = t - start;
    if (opt.mode == C_UPLOAD) { /* deliver what was sent: half-close, wait for each EOF */
        for (int i = 0; i < opt.conns; i++) {
            if (conns[i].fd < 0) continue;
            shutdown(conns[i].fd, SHUT_WR);
            want(ep, &conns[i], EPOLLIN);
        }
        double drain_end = now() + DRAIN_SECONDS;
        int open = 1;
        while (open && now() < drain_end) {
            int n = epoll_wait(ep, events, MAX_EVENTS, 100);
            for (int i = 0; i < n; i++) {
                struct cconn *c = events[i].data.ptr;
                if (c->fd >= 0 && client_event(ep, c, events[i].events, 1) != 0) {
                    res.errors++;
                    close_conn(ep, c);
                }
            }
            open = 0;
            for (int i = 0; i < opt.conns; i++) open |= conns[i].fd >= 0;
        }
        if (open) res.errors++;
        counted = now() - start;
    }
    for (int i = 0; i < opt.conns; i++) close_conn(ep, &conns[i]);
    print_results(counted);
}

/* ------------------------------------------------------------------ main */

static int lookup(const char *name, const char *const *names, int count) {
    for (int i = 0; i < count; i++) {
        if (strcmp(name, names[i]) == 0) return i;
    }
    return -1;
}

int main(int argc, char **argv) {
    signal(SIGPIPE, SIG_IGN);
    raise_nofile();
    setvbuf(stdout, NULL, _IOLBF, 0);
    if (argc < 2) die("usage: loadgen serve MODE --port P | loadgen MODE --connect HOST:PORT ...");
    static const char *const serve_modes[] = {"echo", "sink", "source", "rr", "hold", "udp-echo"};
    static const char *const client_modes[] = {"upload",   "download", "pingpong", "stream",
                                               "connrate", "idle",     "udp",
                                               "udp-idle", "idle-active"};
    int serving = strcmp(argv[1], "serve") == 0;
    int mode = serving ? (argc > 2 ? lookup(argv[2], serve_modes, 6) : -1)
                       : lookup(argv[1], client_modes, 9);
    if (mode < 0) die("unknown mode");
    int first = serving ? 3 : 2;
    opt = (struct options){.conns = 1, .duration = 3.0, .window = 64, .dest_port = 0};
    int port = 0, have_target = 0;
    static const struct option longopts[] = {
        {"port", required_argument, NULL, 'p'},    {"connect", required_argument, NULL, 'c'},
        {"conns", required_argument, NULL, 'n'},   {"duration", required_argument, NULL, 'd'},
        {"proxy", required_argument, NULL, 'x'},   {"addr-offset", required_argument, NULL, 'a'},
        {"window", required_argument, NULL, 'w'},  {"dest-port", required_argument, NULL, 'D'},
        {NULL, 0, NULL, 0}};
    optind = first;
    for (int ch; (ch = getopt_long(argc, argv, "", longopts, NULL)) != -1;) {
        switch (ch) {
        case 'p': port = atoi(optarg); break;
        case 'c':
            if (parse_address(optarg, &opt.target, &opt.target_len) != 0)
                die("bad address %s", optarg);
            have_target = 1;
            break;
        case 'n': opt.conns = atoi(optarg); break;
        case 'd': opt.duration = atof(optarg); break;
        case 'x':
            opt.proxy = strcmp(optarg, "v1") == 0 ? 1 : strcmp(optarg, "v2") == 0 ? 2 : 0;
            if (!opt.proxy && strcmp(optarg, "none") != 0) die("--proxy: none, v1 or v2");
            break;
        case 'a': opt.addr_offset = strtoull(optarg, NULL, 10); break;
        case 'w': opt.window = atoi(optarg); break;
        case 'D': opt.dest_port = atoi(optarg); break;
        default: die("bad option");
        }
    }
    if (serving) {
        if (port <= 0 || port > 65535) die("serve needs --port");
        memset(bulk, 's', sizeof bulk);
        if (mode == S_UDP_ECHO) serve_udp(port);
        serve((enum serve_mode)mode, port);
        return 0;
    }
    if (!have_target) die("a client needs --connect HOST:PORT");
    if (opt.conns < 1 || opt.duration <= 0 || opt.window < 1 ||
        (size_t)opt.window * MESSAGE_SIZE > PATTERN_SIZE)
        die("--conns, --duration and --window must be positive (window at most %d)",
            PATTERN_SIZE / MESSAGE_SIZE);
    opt.mode = (enum client_mode)mode;
    run_client();
    return 0;
}
