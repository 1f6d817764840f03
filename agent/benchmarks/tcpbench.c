/* tcpbench: a light TCP load generator and sink for the dataplane benchmark.
 *
 * Built by agent/benchmarks/dataplane.py at run time (gcc -O2), and run inside lab hosts.
 * A Python accept loop would measure Python; this measures the kernel's path.
 *
 *   tcpbench accept PORT SECONDS            accept and close at once, until SECONDS
 *   tcpbench sink PORT SECONDS              accept, read to EOF, close, until SECONDS
 *   tcpbench connect PORT SECONDS SLICES MAX INFLIGHT ADDR...
 *       SLICES slices of SECONDS, taking the addresses in turn (a, b, c, a, b, c, ...), so
 *       that whatever else loads the machine hits every address alike. In a slice: new
 *       connections with up to INFLIGHT handshakes at once (at most MAX), each closed
 *       with a reset (SO_LINGER 0: no TIME_WAIT, so ephemeral ports never run out); a
 *       handshake not done in 1 s counts as failed
 *   tcpbench stream PORT SECONDS SLICES ADDR...
 *       per slice, one connection written for SECONDS, then a wait (at most 5 s) for the
 *       sink to close it
 *
 * Servers print "ready" once listening; clients print one JSON object with a record per
 * slice. IPv4 only.
 */
#define _GNU_SOURCE
#include <arpa/inet.h>
#include <errno.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <poll.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/epoll.h>
#include <sys/socket.h>
#include <time.h>
#include <unistd.h>

#define CONNECT_TIMEOUT 1.0
#define DRAIN_TIMEOUT 5.0
#define MAX_INFLIGHT 1024
#define BUF_SIZE (256 * 1024)

static double now(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (double)ts.tv_sec + (double)ts.tv_nsec / 1e9;
}

static void die(const char *what) {
    perror(what);
    exit(2);
}

static struct sockaddr_in address(const char *ip, const char *port) {
    struct sockaddr_in sa;
    memset(&sa, 0, sizeof sa);
    sa.sin_family = AF_INET;
    sa.sin_port = htons((unsigned short)atoi(port));
    if (ip == NULL)
        sa.sin_addr.s_addr = htonl(INADDR_ANY);
    else if (inet_pton(AF_INET, ip, &sa.sin_addr) != 1) {
        fprintf(stderr, "not an IPv4 address: %s\n", ip);
        exit(2);
    }
    return sa;
}

static int listener(const char *port) {
    struct sockaddr_in sa = address(NULL, port);
    int one = 1;
    int fd = socket(AF_INET, SOCK_STREAM | SOCK_NONBLOCK, 0);
    if (fd < 0)
        die("socket");
    setsockopt(fd, SOL_SOCKET, SO_REUSEADDR, &one, sizeof one);
    if (bind(fd, (struct sockaddr *)&sa, sizeof sa) < 0)
        die("bind");
    if (listen(fd, 4096) < 0)
        die("listen");
    printf("ready\n");
    fflush(stdout);
    return fd;
}

static void reset_close(int fd) {
    struct linger lg = {1, 0};
    setsockopt(fd, SOL_SOCKET, SO_LINGER, &lg, sizeof lg);
    close(fd);
}

/* Servers: one connection at a time is enough, the kernel queues the handshakes. */
static int serve(int sink, const char *port, double seconds) {
    static char buf[BUF_SIZE];
    int fd = listener(port);
    double deadline = now() + seconds;
    while (now() < deadline) {
        struct pollfd p = {fd, POLLIN, 0};
        int left_ms = (int)((deadline - now()) * 1000) + 1;
        if (poll(&p, 1, left_ms > 100 ? 100 : left_ms) <= 0)
            continue;
        for (;;) {
            int c = accept4(fd, NULL, NULL, 0);
            if (c < 0)
                break;
            if (sink) {
                struct timeval tv = {1, 0};
                setsockopt(c, SOL_SOCKET, SO_RCVTIMEO, &tv, sizeof tv);
                while (now() < deadline && read(c, buf, sizeof buf) > 0)
                    ;
            }
            close(c);
        }
    }
    return 0;
}

struct slot {
    int fd;
    double started;
};

static int open_connection(struct sockaddr_in *sa, int ep, struct slot *s) {
    int fd = socket(AF_INET, SOCK_STREAM | SOCK_NONBLOCK, 0);
    if (fd < 0)
        return -1;
    if (connect(fd, (struct sockaddr *)sa, sizeof *sa) < 0 && errno != EINPROGRESS) {
        close(fd);
        return -1;
    }
    struct epoll_event ev = {.events = EPOLLOUT, .data.ptr = s};
    if (epoll_ctl(ep, EPOLL_CTL_ADD, fd, &ev) < 0)
        die("epoll_ctl");
    s->fd = fd;
    s->started = now();
    return 0;
}

/* One slice against one address: start connections for `seconds` (at most `max`), then
 * let the ones in flight finish, so every handshake counts for the slice it began in. */
static void connect_slice(int ep, struct sockaddr_in *sa, double seconds, long max,
                          int inflight, long *done, long *failed, double *elapsed) {
    static struct slot slots[MAX_INFLIGHT];
    static struct epoll_event events[MAX_INFLIGHT];
    long started = 0;
    int active = 0;
    double t0 = now(), stop = t0 + seconds;
    *done = *failed = 0;
    for (int i = 0; i < inflight; i++)
        slots[i].fd = -1;
    do {
        double t = now();
        for (int i = 0; i < inflight; i++) {
            if (slots[i].fd >= 0 && t - slots[i].started > CONNECT_TIMEOUT) {
                epoll_ctl(ep, EPOLL_CTL_DEL, slots[i].fd, NULL);
                close(slots[i].fd);
                slots[i].fd = -1;
                (*failed)++;
                active--;
            }
            if (slots[i].fd < 0 && started < max && t < stop) {
                started++;
                if (open_connection(sa, ep, &slots[i]) == 0)
                    active++;
                else
                    (*failed)++;
            }
        }
        int n = epoll_wait(ep, events, MAX_INFLIGHT, 10);
        for (int i = 0; i < n; i++) {
            struct slot *s = events[i].data.ptr;
            int err = 0;
            socklen_t len = sizeof err;
            getsockopt(s->fd, SOL_SOCKET, SO_ERROR, &err, &len);
            if (err == 0)
                (*done)++;
            else
                (*failed)++;
            epoll_ctl(ep, EPOLL_CTL_DEL, s->fd, NULL);
            reset_close(s->fd);
            s->fd = -1;
            active--;
        }
    } while (active > 0 || (now() < stop && started < max));
    *elapsed = now() - t0;
}

static int connect_loop(int naddr, char **addrs, const char *port, double seconds,
                        int slices, long max, int inflight) {
    struct sockaddr_in *sas = calloc((size_t)naddr, sizeof *sas);
    int ep = epoll_create1(0);
    if (ep < 0 || sas == NULL)
        die("epoll_create1");
    if (inflight < 1 || inflight > MAX_INFLIGHT)
        inflight = MAX_INFLIGHT;
    for (int a = 0; a < naddr; a++)
        sas[a] = address(addrs[a], port);
    printf("{\"slices\": [");
    for (int k = 0; k < slices; k++) {
        long done, failed;
        double elapsed;
        connect_slice(ep, &sas[k % naddr], seconds, max, inflight, &done, &failed, &elapsed);
        printf("%s\n  {\"target\": %d, \"connections\": %ld, \"failed\": %ld, "
               "\"seconds\": %.6f}", k ? "," : "", k % naddr, done, failed, elapsed);
    }
    printf("]}\n");
    return 0;
}

/* One connection per slice, written for `seconds`; the sink closes after reading it all,
 * so the time counts the bytes arrived, not only those queued. */
static int stream(int naddr, char **addrs, const char *port, double seconds, int slices) {
    static char buf[BUF_SIZE];
    memset(buf, 'x', sizeof buf);
    printf("{\"slices\": [");
    for (int k = 0; k < slices; k++) {
        struct sockaddr_in sa = address(addrs[k % naddr], port);
        int fd = socket(AF_INET, SOCK_STREAM, 0);
        if (fd < 0)
            die("socket");
        struct timeval tv = {1, 0};
        setsockopt(fd, SOL_SOCKET, SO_SNDTIMEO, &tv, sizeof tv);
        setsockopt(fd, SOL_SOCKET, SO_RCVTIMEO, &tv, sizeof tv);
        if (connect(fd, (struct sockaddr *)&sa, sizeof sa) < 0)
            die("connect");
        double t0 = now(), deadline = t0 + seconds;
        long long sent = 0;
        while (now() < deadline) {
            ssize_t w = write(fd, buf, sizeof buf);
            if (w < 0) {
                if (errno == EAGAIN || errno == EINTR)
                    continue;
                die("write");
            }
            sent += w;
        }
        shutdown(fd, SHUT_WR);
        double drain_deadline = now() + DRAIN_TIMEOUT;
        while (now() < drain_deadline && read(fd, buf, sizeof buf) > 0)
            ;
        double elapsed = now() - t0;
        close(fd);
        printf("%s\n  {\"target\": %d, \"bytes\": %lld, \"seconds\": %.6f}", k ? "," : "",
               k % naddr, sent, elapsed);
    }
    printf("]}\n");
    return 0;
}

int main(int argc, char **argv) {
    if (argc == 4 && strcmp(argv[1], "accept") == 0)
        return serve(0, argv[2], atof(argv[3]));
    if (argc == 4 && strcmp(argv[1], "sink") == 0)
        return serve(1, argv[2], atof(argv[3]));
    if (argc >= 8 && strcmp(argv[1], "connect") == 0)
        return connect_loop(argc - 7, argv + 7, argv[2], atof(argv[3]), atoi(argv[4]),
                            atol(argv[5]), atoi(argv[6]));
    if (argc >= 6 && strcmp(argv[1], "stream") == 0)
        return stream(argc - 5, argv + 5, argv[2], atof(argv[3]), atoi(argv[4]));
    fprintf(stderr, "usage: tcpbench accept|sink PORT SECONDS\n"
                    "       tcpbench connect PORT SECONDS SLICES MAX INFLIGHT ADDR...\n"
                    "       tcpbench stream PORT SECONDS SLICES ADDR...\n");
    return 2;
}
