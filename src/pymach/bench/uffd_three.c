/* The C baseline of pymach's pager-fault topology (bench/baselines.py, c_three_*).
 *
 * pymach's fault on a pager's object crosses three processes: the faulting task, machd
 * (it reads the task's userfaultfd and asks the pager), and the pager task (it writes
 * the data into the object's memfd and answers; machd then maps it). This program is
 * the same work with no Python: a "kernel" process reads the userfaultfd, sends each
 * fault's request (the aligned block of RUN bytes around it) to a "pager" process over
 * a SOCK_SEQPACKET socketpair; the pager pwrite()s that many bytes of 1 into the memfd
 * and answers; the kernel maps the block with one UFFDIO_CONTINUE (UFFDIO_WAKE if it
 * is mapped already). It is the naive handler of baselines.py split over the processes
 * pymach's fault crosses.
 *
 * Usage: uffd_three UFFD MEMFD BASE SIZE RUN CTL
 *   UFFD, MEMFD, CTL: inherited descriptors (the faulting process's userfaultfd, with
 *   the memfd registered for missing and minor faults at BASE; CTL a socket). SIZE and
 *   RUN are bytes. "r" is written to CTL once the kernel process is polling; both
 *   processes end when CTL is closed (or on any error, with a message on stderr and
 *   status 1: the userfaultfd closes, and the faults fill with zeros, which the
 *   benchmark's check of the bytes read catches).
 */
#define _GNU_SOURCE
#include <errno.h>
#include <linux/userfaultfd.h>
#include <poll.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/ioctl.h>
#include <sys/socket.h>
#include <sys/types.h>
#include <sys/wait.h>
#include <unistd.h>

struct request {
    uint64_t start, len; /* bytes of the memfd */
};

static void die(const char *what) {
    perror(what);
    _exit(1);
}

static uint64_t number(const char *s) {
    char *end;
    errno = 0;
    unsigned long long v = strtoull(s, &end, 0);
    if (errno || *s == '\0' || *end != '\0') {
        fprintf(stderr, "uffd_three: not a number: %s\n", s);
        _exit(2);
    }
    return (uint64_t)v;
}

/* The pager: answer each request by writing its bytes into the memfd. */
static void pager(int sock, int memfd, uint64_t run) {
    char *ones = malloc(run);
    struct request rq;
    if (!ones)
        die("malloc");
    memset(ones, 1, run);
    for (;;) {
        ssize_t n = recv(sock, &rq, sizeof rq, 0);
        if (n == 0)
            _exit(0);
        if (n != (ssize_t)sizeof rq || rq.len > run)
            die("pager recv");
        if (pwrite(memfd, ones, rq.len, (off_t)rq.start) != (ssize_t)rq.len)
            die("pwrite");
        if (send(sock, &rq, sizeof rq, 0) != (ssize_t)sizeof rq)
            die("pager send");
    }
}

/* The kernel's part of one fault: ask the pager for the block, then map it. */
static void resolve(int uffd, int sock, uint64_t base, uint64_t size, uint64_t run,
                    uint64_t address) {
    struct request rq;
    struct uffdio_continue cont;
    rq.start = (address - base) / run * run;
    rq.len = rq.start + run <= size ? run : size - rq.start;
    if (send(sock, &rq, sizeof rq, 0) != (ssize_t)sizeof rq)
        die("kernel send");
    if (recv(sock, &rq, sizeof rq, 0) != (ssize_t)sizeof rq)
        die("kernel recv");
    memset(&cont, 0, sizeof cont);
    cont.range.start = base + rq.start;
    cont.range.len = rq.len;
    if (ioctl(uffd, UFFDIO_CONTINUE, &cont) == 0)
        return;
    if (errno != EEXIST)
        die("UFFDIO_CONTINUE");
    if (ioctl(uffd, UFFDIO_WAKE, &cont.range) < 0)
        die("UFFDIO_WAKE");
}

/* The kernel: read many events per read; end when CTL closes. */
static void kernel(int uffd, int sock, int ctl, uint64_t base, uint64_t size,
                   uint64_t run) {
    struct pollfd p[2] = {{uffd, POLLIN, 0}, {ctl, POLLIN, 0}};
    struct uffd_msg msgs[64];
    if (write(ctl, "r", 1) != 1)
        die("ctl");
    for (;;) {
        if (poll(p, 2, -1) < 0) {
            if (errno == EINTR)
                continue;
            die("poll");
        }
        if (p[0].revents & POLLIN) {
            ssize_t n = read(uffd, msgs, sizeof msgs);
            if (n < 0 && errno != EAGAIN)
                die("read userfaultfd");
            for (ssize_t i = 0; n > 0 && i < n / (ssize_t)sizeof msgs[0]; i++)
                if (msgs[i].event == UFFD_EVENT_PAGEFAULT)
                    resolve(uffd, sock, base, size, run, msgs[i].arg.pagefault.address);
        }
        if (p[1].revents)
            return;
    }
}

int main(int argc, char **argv) {
    int sv[2], status = 0;
    if (argc != 7) {
        fprintf(stderr, "usage: uffd_three UFFD MEMFD BASE SIZE RUN CTL\n");
        return 2;
    }
    int uffd = (int)number(argv[1]), memfd = (int)number(argv[2]);
    uint64_t base = number(argv[3]), size = number(argv[4]), run = number(argv[5]);
    int ctl = (int)number(argv[6]);
    if (run == 0)
        return 2;
    if (socketpair(AF_UNIX, SOCK_SEQPACKET | SOCK_CLOEXEC, 0, sv) < 0)
        die("socketpair");
    pid_t pid = fork();
    if (pid < 0)
        die("fork");
    if (pid == 0) {
        close(uffd);
        close(ctl);
        close(sv[0]);
        pager(sv[1], memfd, run);
    }
    close(sv[1]);
    kernel(uffd, sv[0], ctl, base, size, run);
    close(sv[0]); /* the pager sees the end and exits */
    if (waitpid(pid, &status, 0) < 0 || !WIFEXITED(status) || WEXITSTATUS(status) != 0)
        return 1;
    return 0;
}
