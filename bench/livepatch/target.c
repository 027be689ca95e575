/* Benchmark target for `textpoke patch` (BENCHMARKS.md, "Live patching"):
 * 8 threads (or argv[1]) busy calling work(), none ever inside cold(), the function
 * the patch replaces. Build: see run.sh. */
#define _GNU_SOURCE
#include <pthread.h>
#include <stdio.h>
#include <stdlib.h>
#include <unistd.h>

static volatile long sink;

__attribute__((noipa)) long work(long x) { return x * 3 + 1; }
__attribute__((noipa)) long cold(long x) { return x + 1; }

static void *busy(void *a) {
    (void)a;
    for (long i = 0;; i++) sink += work(i);
    return 0;
}

int main(int argc, char **argv) {
    pthread_t t;
    int n = argc > 1 ? atoi(argv[1]) : 8;
    for (int i = 0; i < n; i++) pthread_create(&t, 0, busy, 0);
    printf("%d\n", getpid());
    fflush(stdout);
    for (;;) {
        sleep(1);
        sink += cold(1);
    }
}
