/* The emulated cluster's switch: N TAP ports, a learning Ethernet switch between them, and per
 * egress port a one-way delay and a rate (the kernel here has no netem qdisc, so both live here).
 *
 * Usage: switch N    (creates TAP devices t0 .. tN-1 in the current network namespace)
 * stdout: "ready" once the TAPs exist; then one answer line per command.
 * stdin, one command per line:
 *   set PORT DELAY_NS RATE_BPS   frames leaving through PORT wait DELAY_NS after their last bit
 *                                left the wire; RATE_BPS 0 = no rate limit           -> "ok"
 *   stats                        -> "frames F drops D max_queue Q queued N late_ns_sum S late_ns_max M"
 *                                   (N frames waited in a queue; S, M: how late after their delivery time)
 * End of stdin ends the switch, and with it the TAPs: the cluster dies with its owner.
 *
 * Per port, one thread reads frames from its TAP and queues them on the destination port(s);
 * one thread writes each queued frame to its TAP at its delivery time. A frame's delivery time
 * is (the port's wire free + size / rate) + delay: serialisation, then propagation. A full
 * queue makes the reader wait (back-pressure), never drops. With no delay and no rate the
 * reader writes straight through when nothing is queued (one read + one write per hop).
 */
#define _GNU_SOURCE
#include <errno.h>
#include <fcntl.h>
#include <linux/if.h>
#include <linux/if_tun.h>
#include <pthread.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/ioctl.h>
#include <sys/prctl.h>
#include <time.h>
#include <unistd.h>

#define MAX_PORTS 16
#define FRAME_MAX 1600   /* MTU 1500 + Ethernet header; the TAPs carry no offloaded super-frames */
#define QUEUE_LEN 4096   /* frames per egress port: 6 MB, 49 ms of a 1 Gbit/s wire */
#define MAC_SLOTS 64

struct frame { uint64_t deliver_ns; uint16_t len; unsigned char data[FRAME_MAX]; };

struct port {
    int fd;
    pthread_mutex_t lock;
    pthread_cond_t queued, drained;
    struct frame *ring;
    unsigned head, count, max_count;
    uint64_t delay_ns, rate_bps, free_ns;  /* free_ns: when the wire finishes the last frame */
};

static struct port ports[MAX_PORTS];
static int n_ports;
static struct { unsigned char mac[6]; int port; } macs[MAC_SLOTS];
static int n_macs;
static pthread_mutex_t mac_lock = PTHREAD_MUTEX_INITIALIZER;
static uint64_t n_frames, n_drops;  /* atomic counters, for stats */
static uint64_t n_queued, late_sum_ns, late_max_ns;  /* frames sent from a queue: how late after their time */

static uint64_t now_ns(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (uint64_t)ts.tv_sec * 1000000000u + (uint64_t)ts.tv_nsec;
}

static void die(const char *what) { perror(what); exit(1); }

static int open_tap(const char *name) {
    int fd = open("/dev/net/tun", O_RDWR | O_CLOEXEC);
    if (fd < 0) die("open /dev/net/tun");
    struct ifreq ifr;
    memset(&ifr, 0, sizeof ifr);
    ifr.ifr_flags = IFF_TAP | IFF_NO_PI;
    snprintf(ifr.ifr_name, IFNAMSIZ, "%s", name);
    if (ioctl(fd, TUNSETIFF, &ifr) < 0) die("TUNSETIFF");
    return fd;
}

static void learn(const unsigned char *mac, int port) {
    if (mac[0] & 1) return;  /* a multicast source is bogus */
    pthread_mutex_lock(&mac_lock);
    int i;
    for (i = 0; i < n_macs && memcmp(macs[i].mac, mac, 6); i++) {}
    if (i == n_macs && n_macs < MAC_SLOTS) memcpy(macs[n_macs++].mac, mac, 6);
    if (i < n_macs) macs[i].port = port;
    pthread_mutex_unlock(&mac_lock);
}

static int lookup(const unsigned char *mac) {  /* -1: flood */
    if (mac[0] & 1) return -1;
    int port = -1;
    pthread_mutex_lock(&mac_lock);
    for (int i = 0; i < n_macs; i++)
        if (!memcmp(macs[i].mac, mac, 6)) { port = macs[i].port; break; }
    pthread_mutex_unlock(&mac_lock);
    return port;
}

static void transmit(struct port *p, const unsigned char *data, size_t len) {
    if (write(p->fd, data, len) < 0 && errno != EIO)  /* EIO: that host's link is not up yet */
        __atomic_add_fetch(&n_drops, 1, __ATOMIC_RELAXED);
    __atomic_add_fetch(&n_frames, 1, __ATOMIC_RELAXED);
}

static void enqueue(struct port *p, const unsigned char *data, size_t len) {
    pthread_mutex_lock(&p->lock);
    uint64_t now = now_ns();
    uint64_t start = p->free_ns > now ? p->free_ns : now;
    p->free_ns = start + (p->rate_bps ? (uint64_t)len * 8u * 1000000000u / p->rate_bps : 0);
    uint64_t deliver = p->free_ns + p->delay_ns;
    if (p->count == 0 && deliver <= now) {
        transmit(p, data, len);
    } else {
        while (p->count == QUEUE_LEN) pthread_cond_wait(&p->drained, &p->lock);
        struct frame *f = &p->ring[(p->head + p->count) % QUEUE_LEN];
        f->deliver_ns = deliver;
        f->len = (uint16_t)len;
        memcpy(f->data, data, len);
        if (++p->count > p->max_count) p->max_count = p->count;
        pthread_cond_signal(&p->queued);
    }
    pthread_mutex_unlock(&p->lock);
}

static void *reader(void *arg) {
    int me = (int)(intptr_t)arg;
    unsigned char buf[65536];
    prctl(PR_SET_TIMERSLACK, 1);
    for (;;) {
        ssize_t len = read(ports[me].fd, buf, sizeof buf);
        if (len < 0) { if (errno == EINTR || errno == EAGAIN) continue; die("read tap"); }
        if (len < 14 || len > FRAME_MAX) continue;
        learn(buf + 6, me);
        int to = lookup(buf);
        for (int j = 0; j < n_ports; j++)
            if (j != me && (to < 0 || to == j)) enqueue(&ports[j], buf, (size_t)len);
    }
    return NULL;
}

static void *writer(void *arg) {
    struct port *p = &ports[(intptr_t)arg];
    prctl(PR_SET_TIMERSLACK, 1);  /* wake at the delivery time, not up to 50 us after it */
    pthread_mutex_lock(&p->lock);
    for (;;) {
        if (p->count == 0) { pthread_cond_wait(&p->queued, &p->lock); continue; }
        struct frame *f = &p->ring[p->head];
        if (f->deliver_ns > now_ns()) {
            struct timespec ts = {(time_t)(f->deliver_ns / 1000000000u), (long)(f->deliver_ns % 1000000000u)};
            pthread_cond_timedwait(&p->queued, &p->lock, &ts);
            continue;
        }
        uint64_t late = now_ns() - f->deliver_ns;
        transmit(p, f->data, f->len);  /* under the lock: a straight-through write cannot overtake it */
        __atomic_add_fetch(&n_queued, 1, __ATOMIC_RELAXED);
        __atomic_add_fetch(&late_sum_ns, late, __ATOMIC_RELAXED);
        for (uint64_t max = late_max_ns; late > max;)
            if (__atomic_compare_exchange_n(&late_max_ns, &max, late, 0, __ATOMIC_RELAXED, __ATOMIC_RELAXED)) break;
        p->head = (p->head + 1) % QUEUE_LEN;
        p->count--;
        pthread_cond_signal(&p->drained);
    }
    return NULL;
}

int main(int argc, char **argv) {
    n_ports = argc == 2 ? atoi(argv[1]) : 0;
    if (n_ports < 2 || n_ports > MAX_PORTS) { fprintf(stderr, "usage: switch N (2..%d)\n", MAX_PORTS); return 2; }
    /* No real-time priority: tried (SCHED_FIFO), it made delayed frames leave on time but the MPI
     * round trip 10x slower in the median on a loaded 2-core host (it preempts the polling ranks). */
    pthread_condattr_t mono;
    pthread_condattr_init(&mono);
    pthread_condattr_setclock(&mono, CLOCK_MONOTONIC);
    for (int i = 0; i < n_ports; i++) {
        char name[IFNAMSIZ];
        snprintf(name, sizeof name, "t%d", i);
        struct port *p = &ports[i];
        p->fd = open_tap(name);
        p->ring = malloc(sizeof(struct frame) * QUEUE_LEN);
        if (!p->ring) die("malloc");
        pthread_mutex_init(&p->lock, NULL);
        pthread_cond_init(&p->queued, &mono);
        pthread_cond_init(&p->drained, NULL);
    }
    for (int i = 0; i < n_ports; i++) {
        pthread_t t;
        if (pthread_create(&t, NULL, reader, (void *)(intptr_t)i) || pthread_create(&t, NULL, writer, (void *)(intptr_t)i))
            die("pthread_create");
    }
    printf("ready\n");
    fflush(stdout);
    char line[256];
    while (fgets(line, sizeof line, stdin)) {
        int port;
        unsigned long long delay, rate;
        if (sscanf(line, "set %d %llu %llu", &port, &delay, &rate) == 3 && port >= 0 && port < n_ports) {
            pthread_mutex_lock(&ports[port].lock);
            ports[port].delay_ns = delay;
            ports[port].rate_bps = rate;
            pthread_mutex_unlock(&ports[port].lock);
            printf("ok\n");
        } else if (!strncmp(line, "stats", 5)) {
            unsigned max_q = 0;
            for (int i = 0; i < n_ports; i++) if (ports[i].max_count > max_q) max_q = ports[i].max_count;
            printf("frames %llu drops %llu max_queue %u queued %llu late_ns_sum %llu late_ns_max %llu\n",
                   (unsigned long long)n_frames, (unsigned long long)n_drops, max_q, (unsigned long long)n_queued,
                   (unsigned long long)late_sum_ns, (unsigned long long)late_max_ns);
        } else {
            printf("error: unknown command\n");
        }
        fflush(stdout);
    }
    return 0;
}
