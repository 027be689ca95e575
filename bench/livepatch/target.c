/* Benchmark target for `textpoke patch` (BENCHMARKS.md, "Live patching"):
 * 8 threads busy calling work(), none ever inside cold(), the function
 * the patch replaces. Build: see run.sh. */
#define _GNU_SOURCE
#include <pthread.h>
#include <stdio.h>
#include <unistd.h>

static volatile long sink;

__attribute__((noipa)) long work(long x) { return x * 3 + 1; }
__attribute__((noipa)) long cold(long x) { return x + 1; }

static void *busy(void *a) {
    (void)a;
    for (long i = 0;; i++) sink += work(i);
    return 0;
}

int main(void) {
    pthread_t t;
    for (int i = 0; i < 8; i++) pthread_create(&t, 0, busy, 0);
    printf("%d\n", getpid());
    fflush(stdout);
    for (;;) {
        sleep(1);
        sink += cold(1);
    }
}
