// The floor under "server CPU per delivery" on a host: what the kernel alone charges a
// sender for one small TCP send per delivery, with nothing else (no WebSocket, no
// store, no acks, no io_uring). Used for issue 12's budget (README, "Fan-out on one
// pinned core"). A fan-out to members who get a few pushes per second each cannot
// coalesce: every delivery is its own segment, so no server can go below this figure
// on the same host and link.
//
//   cc -O2 -o /tmp/send_floor benches/send_floor.c
//   taskset -c 1 /tmp/send_floor recv 9301 &            # receiver: epoll, reads, discards
//   taskset -c 0 /tmp/send_floor send 9301 10000 100 50500 15
//       # 10,000 connections, bursts of 100 consecutive sockets (one group message),
//       # 50,500 sends/s in all, for 15 s; prints the sender's CPU per send.
//   SPIN=1 taskset -c 1 /tmp/send_floor recv 9301 &     # receiver that never sleeps
//
// On loopback the receiver's TCP work runs in the sender's softirq, as it does for
// imshard and the loadgen; on a real link it would be the client host's. The receiver's
// own figure (per message it read) is what a load generator pays at the least.
#define _GNU_SOURCE
#include <arpa/inet.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/epoll.h>
#include <sys/resource.h>
#include <sys/socket.h>
#include <time.h>
#include <unistd.h>

static double now(void) {
    struct timespec t;
    clock_gettime(CLOCK_MONOTONIC, &t);
    return t.tv_sec + t.tv_nsec / 1e9;
}

static double cpu(void) {
    struct rusage r;
    getrusage(RUSAGE_SELF, &r);
    return r.ru_utime.tv_sec + r.ru_utime.tv_usec / 1e6 + r.ru_stime.tv_sec +
           r.ru_stime.tv_usec / 1e6;
}

static int receive(struct sockaddr_in *a) {
    int l = socket(AF_INET, SOCK_STREAM, 0), one = 1;
    setsockopt(l, SOL_SOCKET, SO_REUSEADDR, &one, sizeof one);
    if (bind(l, (void *)a, sizeof *a) || listen(l, 4096)) {
        perror("bind/listen");
        return 1;
    }
    int ep = epoll_create1(0);
    struct epoll_event ev = {.events = EPOLLIN, .data.fd = l};
    epoll_ctl(ep, EPOLL_CTL_ADD, l, &ev);
    int spin = getenv("SPIN") && *getenv("SPIN");
    struct epoll_event evs[256];
    static char buf[65536];
    long bytes = 0;
    double c0 = cpu(), t0 = now(), last = now();
    for (;;) {
        int n = epoll_wait(ep, evs, 256, spin ? 0 : 5000);
        if (n <= 0) {
            if (!spin || now() - last > 5) break;
            continue;
        }
        last = now();
        for (int i = 0; i < n; i++) {
            int fd = evs[i].data.fd;
            if (fd == l) {
                int c = accept4(l, 0, 0, SOCK_NONBLOCK);
                struct epoll_event e = {.events = EPOLLIN, .data.fd = c};
                epoll_ctl(ep, EPOLL_CTL_ADD, c, &e);
                continue;
            }
            for (;;) {
                ssize_t r = read(fd, buf, sizeof buf);
                if (r > 0) {
                    bytes += r;
                    continue;
                }
                if (r == 0) close(fd);
                break;
            }
        }
    }
    // The receiver's CPU over its whole run (the sender's set-up and the 5 s idle end
    // add little: it sleeps then).
    double used = cpu() - c0;
    fprintf(stderr, "receiver: %ld bytes, cpu %.2f s over %.1f s, %.2f us per 160-byte message\n",
            bytes, used, now() - t0, bytes ? used / (bytes / 160.0) * 1e6 : 0.0);
    return 0;
}

static int send_all(struct sockaddr_in *a, int conns, int burst, double rate, double secs) {
    int *fds = malloc(conns * sizeof(int));
    for (int i = 0; i < conns; i++) {
        int one = 1;
        fds[i] = socket(AF_INET, SOCK_STREAM, 0);
        setsockopt(fds[i], IPPROTO_TCP, TCP_NODELAY, &one, sizeof one);
        if (connect(fds[i], (void *)a, sizeof *a)) {
            perror("connect");
            return 1;
        }
    }
    sleep(2);
    char msg[160];  // about a 150-byte push in its WebSocket frame
    memset(msg, 'm', sizeof msg);
    double per = burst / rate, t0 = now(), c0 = cpu(), due = t0;
    long sent = 0;
    int next = 0;
    while (now() - t0 < secs) {
        for (int i = 0; i < burst; i++) {
            if (send(fds[next], msg, sizeof msg, 0) != (ssize_t)sizeof msg) {
                perror("send");
                return 1;
            }
            next = (next + 1) % conns;
            sent++;
        }
        due += per;
        double w = due - now();
        if (w > 0) {
            struct timespec ts = {(time_t)w, (long)((w - (time_t)w) * 1e9)};
            nanosleep(&ts, 0);
        }
    }
    double c = cpu() - c0, t = now() - t0;
    printf("sender: %d connections, bursts of %d, %.0f/s offered: %.0f sends/s, "
           "%.2f us CPU per send (%.0f %% of a core)\n",
           conns, burst, rate, sent / t, c / sent * 1e6, c / t * 100);
    for (int i = 0; i < conns; i++) close(fds[i]);
    return 0;
}

int main(int argc, char **argv) {
    if (argc < 3 || (strcmp(argv[1], "recv") && argc < 7)) {
        fprintf(stderr, "usage: %s recv PORT | send PORT CONNS BURST RATE SECS\n", argv[0]);
        return 2;
    }
    struct sockaddr_in a = {.sin_family = AF_INET, .sin_port = htons(atoi(argv[2]))};
    inet_pton(AF_INET, "127.0.0.1", &a.sin_addr);
    if (!strcmp(argv[1], "recv")) return receive(&a);
    return send_all(&a, atoi(argv[3]), atoi(argv[4]), atof(argv[5]), atof(argv[6]));
}
