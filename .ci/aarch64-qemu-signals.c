/* What qemu-user does to a program's signals and threads, outside textpoke
 * (issue 13: why parking threads hung under qemu-aarch64).
 *
 *   aarch64-linux-gnu-gcc -O1 -o /tmp/qs .ci/aarch64-qemu-signals.c && qemu-aarch64 /tmp/qs
 *   gcc -O1 -o /tmp/qs-native .ci/aarch64-qemu-signals.c && /tmp/qs-native
 *
 * 1. Each real-time signal: a handler installed, the signal sent to this
 *    thread with rt_tgsigqueueinfo. Under qemu-aarch64 7.2 on x86-64,
 *    signals 63 and 64 (SIGRTMAX-1, SIGRTMAX) have no host signal:
 *    sigaction succeeds, sending fails with EINVAL, no handler runs.
 *    Natively every one is delivered.
 * 2. This single-threaded program lists /proc/self/task and signals each
 *    thread with SIGUSR1. Under qemu there is a second thread the program
 *    never created (qemu's call_rcu thread): its host mask blocks every
 *    asynchronous signal and it never runs the handler. Natively there is
 *    one thread. /proc/self/exe names the program; the kernel's own view,
 *    /proc/self/task/TID/exe, names qemu.
 *
 * Prints what it sees; exits 0 whatever it is (a diagnostic, not a test). */
#define _GNU_SOURCE
#include <dirent.h>
#include <errno.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/syscall.h>
#include <time.h>
#include <unistd.h>

static volatile sig_atomic_t got;
static void on_info(int s, siginfo_t *i, void *c) { (void)i; (void)c; got = s; }
static void on_usr1(int s) { (void)s; got = SIGUSR1; }

static long tid(void) { return syscall(SYS_gettid); }

static void realtime_signals(void) {
    printf("real-time signals %d..%d sent to this thread:\n", SIGRTMIN, SIGRTMAX);
    for (int s = SIGRTMIN; s <= SIGRTMAX; s++) {
        struct sigaction sa;
        memset(&sa, 0, sizeof sa);
        sa.sa_sigaction = on_info;
        sa.sa_flags = SA_SIGINFO;
        int a = sigaction(s, &sa, NULL);
        siginfo_t si;
        memset(&si, 0, sizeof si);
        si.si_signo = s;
        si.si_code = SI_QUEUE;
        si.si_pid = getpid();
        si.si_uid = getuid();
        got = 0;
        long r = syscall(SYS_rt_tgsigqueueinfo, getpid(), tid(), s, &si);
        int e = errno;
        if (r != 0 || got != s)
            printf("  signal %d: sigaction %d, rt_tgsigqueueinfo %ld (%s), handler ran: %s\n", s, a, r,
                   r ? strerror(e) : "ok", got == s ? "yes" : "no");
    }
    printf("  (every other one was delivered)\n");
}

static void show_link(const char *path) {
    char buf[256];
    ssize_t n = readlink(path, buf, sizeof buf - 1);
    buf[n > 0 ? n : 0] = 0;
    printf("%s -> %s\n", path, buf);
}

static void threads(void) {
    char path[64], line[256];
    signal(SIGUSR1, on_usr1);
    show_link("/proc/self/exe");
    snprintf(path, sizeof path, "/proc/self/task/%ld/exe", tid());
    show_link(path);
    DIR *d = opendir("/proc/self/task");
    struct dirent *e;
    while (d && (e = readdir(d))) {
        if (e->d_name[0] == '.')
            continue;
        long t = atol(e->d_name);
        char blk[64] = "?";
        snprintf(path, sizeof path, "/proc/self/task/%ld/status", t);
        FILE *f = fopen(path, "r");
        while (f && fgets(line, sizeof line, f))
            if (!strncmp(line, "SigBlk:", 7))
                sscanf(line + 7, "%63s", blk);
        if (f)
            fclose(f);
        got = 0;
        long r = syscall(SYS_tgkill, getpid(), t, SIGUSR1);
        for (int i = 0; i < 100 && !got; i++) {
            struct timespec ms10 = {0, 10000000};
            nanosleep(&ms10, NULL);
        }
        printf("thread %ld%s: host SigBlk %s, tgkill %ld, SIGUSR1 handled within 1 s: %s\n", t,
               t == tid() ? " (this one)" : "", blk, r, got ? "yes" : "no");
    }
    if (d)
        closedir(d);
}

int main(void) {
    realtime_signals();
    threads();
    return 0;
}
