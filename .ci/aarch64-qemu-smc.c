/* qemu-user and code changed while other threads run it, outside textpoke
 * (issue 13): the reproducer behind the C keys skip in .ci/aarch64.
 *
 *   aarch64-linux-gnu-gcc -O2 -pthread -o /tmp/smc .ci/aarch64-qemu-smc.c
 *   qemu-aarch64 /tmp/smc 1000                  # stale calls (exit 1)
 *   qemu-aarch64 /tmp/smc 1000 indirect         # none: no chained jump
 *   qemu-aarch64 /tmp/smc 1000 caller-off-page  # none: the caller's TB stays valid
 *   qemu-aarch64 -d nochain /tmp/smc 1000       # none: qemu chains no TBs
 *   further words: no-mprotect (page rwx throughout), no-membarrier,
 *   membarrier-last (after the mprotect back to r-x).
 *
 * The layout of tests/c/keys_test.c: one 4 KiB text page holds both sites'
 * functions (site_a ~ s_work, site_b ~ s_likely) and the callers' loop
 * (~ worker); the flips are made from another page (textpoke's library).
 * Each flip is textpoke's swap strategy for a batch of two sites, syscall
 * for syscall as `qemu-aarch64 -strace` shows keys_test making them:
 * mprotect(page, rwx), then per site one aligned 32-bit store of `b +12`
 * or `nop` and __builtin___clear_cache (DC CVAU, DSB ISH, IC IVAU, DSB
 * ISH, ISB), then membarrier(PRIVATE_EXPEDITED_SYNC_CORE), then
 * mprotect(page, r-x). Four threads loop: read the phase (acquire), call
 * site_a, call site_b, read the phase again; a call made inside one steady
 * phase must return the phase's value on both sites. On Arm hardware none
 * may disagree (arch/aarch64.rs, rules 3 and 4): the phase was published
 * after the membarrier, whose context synchronisation event each caller's
 * core took before its first read of that phase, so every later fetch of
 * a site sees the new word.
 *
 * What qemu-aarch64 7.2 (Debian 1:7.2+dfsg-7+deb12u18, x86-64 host, 2
 * cores under a load of ~20) did, 1000 flips a run, 0.9e8 to 2.2e8 checked
 * calls a run: by default 7, 2, 3, 5, 2 and 3 stale calls in six runs
 * (exit 1; `membarrier-last`: 2, 4 and 0),
 * every one on site_a (the site the loop calls right after reading the
 * phase), never on site_b. keys_test's own stale calls are single calls
 * too: one in a steady phase of ~1.7e5 calls, the rest of that phase right
 * (a stale *translation* would be called all phase long). Three runs each
 * of `indirect` (site_a called through a pointer: `blr`), of
 * `caller-off-page` and of `-d nochain`: no stale call. (With check()
 * called out of line, on another page, none showed in three runs either:
 * the window depends on where the loop spends its time.) The cause, read
 * in qemu 7.2's accel/tcg/tb-maint.c: invalidating a TB (on the write
 * fault, or the mprotect to rwx, for every TB of the page) resets the
 * direct jumps *into* it (tb_jmp_unlink) but not its own jumps out of it
 * (tb_remove_from_jmp_list only takes it off the target's list). A caller
 * thread that was inside the loop's TB (its host thread preempted before
 * the load of the phase) when the page's TBs were invalidated resumes
 * after the flip, reads the new phase, and follows that TB's still-patched
 * jump into the old, invalidated TB of site_a, whose host code still
 * holds the old word: one stale call. When site_a's TB is invalidated
 * before the caller's, the caller's jump is reset first and nothing
 * happens, which is why it is rare. The guest cannot close the window:
 * membarrier passes through to the host kernel (the host's cores are
 * serialised, qemu's TB chains untouched), and an ISB ends its TB with a
 * chained jump too (target/arm/translate-a64.c: gen_goto_tb), so only
 * not chaining (an indirect call, or -d nochain) avoids it (with an ISB
 * after the phase read none showed in three runs: the stale path then
 * needs two TBs invalidated in that order). Nothing of textpoke's is
 * involved; the earlier version of this program had its callers' loop on
 * another page (their TB never invalidated), and never saw it.
 *
 * Prints the counts; exits 1 if any call disagreed (so natively, on Arm
 * hardware, it must exit 0). */
#define _GNU_SOURCE
#include <linux/membarrier.h>
#include <pthread.h>
#include <sched.h>
#include <stdatomic.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <sys/syscall.h>
#include <time.h>
#include <unistd.h>

enum { OFF = 0, ON = 1, FLIPPING = 2 };
static const uint32_t NOP = 0xd503201f, B_PLUS_12 = 0x14000003;

/* The page: site_a (x+1, or x*3 when its first word is `b +12`), site_b
 * (0, or 1), then the callers' loops. */
__asm__(".section .text.smcpage,\"ax\",%progbits\n.balign 4096\n.globl smc_page\nsmc_page:\n"
        ".globl site_a\n.type site_a,%function\nsite_a:\n"
        "\tnop\n\tadd x0, x0, #1\n\tret\n\tadd x0, x0, x0, lsl #1\n\tret\n"
        ".globl site_b\n.type site_b,%function\nsite_b:\n"
        "\tnop\n\tmov w0, #0\n\tret\n\tmov w0, #1\n\tret\n.previous\n");
#define ON_PAGE __attribute__((section(".text.smcpage"), noinline))
extern char smc_page[];
long site_a(long x);
int site_b(void);
static long (*volatile site_a_ptr)(long) = site_a;

static _Atomic unsigned long phase;
static atomic_int stop;
static atomic_long checked, stale_a, stale_b;

static inline __attribute__((always_inline)) void check(unsigned long p1, long a, int b, unsigned long p2) {
    if (p1 != p2 || (p1 & 3) == FLIPPING) return;
    int on = (p1 & 3) == ON;
    if ((a == 3) != on) atomic_fetch_add(&stale_a, 1);
    if (b != on) atomic_fetch_add(&stale_b, 1);
    atomic_fetch_add_explicit(&checked, 1, memory_order_relaxed);
}

/* keys_test's worker: the phase, then direct calls (`bl`). */
ON_PAGE static void *caller(void *arg) {
    (void)arg;
    while (!atomic_load_explicit(&stop, memory_order_relaxed)) {
        unsigned long p1 = atomic_load_explicit(&phase, memory_order_acquire);
        long a = site_a(1);
        int b = site_b();
        check(p1, a, b, atomic_load_explicit(&phase, memory_order_acquire));
    }
    return NULL;
}

/* The same through a pointer (`blr`): qemu looks the TB up, no chaining. */
ON_PAGE static void *caller_indirect(void *arg) {
    (void)arg;
    while (!atomic_load_explicit(&stop, memory_order_relaxed)) {
        unsigned long p1 = atomic_load_explicit(&phase, memory_order_acquire);
        long a = site_a_ptr(1);
        int b = site_b();
        check(p1, a, b, atomic_load_explicit(&phase, memory_order_acquire));
    }
    return NULL;
}

/* The same loop outside the page (the earlier version's layout). */
static __attribute__((noinline)) void *caller_off_page(void *arg) {
    (void)arg;
    while (!atomic_load_explicit(&stop, memory_order_relaxed)) {
        unsigned long p1 = atomic_load_explicit(&phase, memory_order_acquire);
        long a = site_a(1);
        int b = site_b();
        check(p1, a, b, atomic_load_explicit(&phase, memory_order_acquire));
    }
    return NULL;
}

static int use_mprotect = 1, use_membarrier = 1, membarrier_last;

static void store_word(uint32_t *p, uint32_t w) {
    __atomic_store_n(p, w, __ATOMIC_RELAXED);
    __builtin___clear_cache((char *)p, (char *)(p + 1));
}

static void sync_cores(void) {
    if (use_membarrier) syscall(SYS_membarrier, MEMBARRIER_CMD_PRIVATE_EXPEDITED_SYNC_CORE, 0, 0);
}

/* One flip of the two-site batch (outside the page, as textpoke's code is). */
static __attribute__((noinline)) void flip(int on) {
    uint32_t *a = (uint32_t *)(void *)site_a, *b = (uint32_t *)(void *)site_b;
    if (use_mprotect) mprotect(smc_page, 4096, PROT_READ | PROT_WRITE | PROT_EXEC);
    store_word(a, on ? B_PLUS_12 : NOP);
    store_word(b, on ? B_PLUS_12 : NOP);
    if (!membarrier_last) sync_cores();
    if (use_mprotect) mprotect(smc_page, 4096, PROT_READ | PROT_EXEC);
    if (membarrier_last) sync_cores();
}

int main(int argc, char **argv) {
    int flips = argc > 1 ? atoi(argv[1]) : 1000;
    void *(*loop)(void *) = caller;
    for (int i = 2; i < argc; i++) {
        if (!strcmp(argv[i], "indirect")) loop = caller_indirect;
        else if (!strcmp(argv[i], "caller-off-page")) loop = caller_off_page;
        else if (!strcmp(argv[i], "no-mprotect")) use_mprotect = 0;
        else if (!strcmp(argv[i], "no-membarrier")) use_membarrier = 0;
        else if (!strcmp(argv[i], "membarrier-last")) membarrier_last = 1;
        else { fprintf(stderr, "unknown word %s\n", argv[i]); return 2; }
    }
    uintptr_t page = (uintptr_t)smc_page;
    if (((uintptr_t)site_b & ~4095ul) != page || ((uintptr_t)caller & ~4095ul) != page ||
        ((uintptr_t)caller_indirect & ~4095ul) != page || ((uintptr_t)flip & ~4095ul) == page) {
        fprintf(stderr, "layout: the sites and the callers' loops must share one page, the flip not\n");
        return 2;
    }
    if (use_membarrier &&
        syscall(SYS_membarrier, MEMBARRIER_CMD_REGISTER_PRIVATE_EXPEDITED_SYNC_CORE, 0, 0) != 0) {
        perror("membarrier register sync-core");
        return 2;
    }
    if (!use_mprotect) mprotect(smc_page, 4096, PROT_READ | PROT_WRITE | PROT_EXEC);
    enum { THREADS = 4 };
    pthread_t th[THREADS];
    for (int i = 0; i < THREADS; i++) pthread_create(&th[i], NULL, loop, NULL);
    unsigned long epoch = 1;
    for (int i = 0; i < flips; i++) {
        int on = i % 2 == 0;
        atomic_store_explicit(&phase, epoch++ << 2 | FLIPPING, memory_order_release);
        flip(on);
        long seen = atomic_load(&checked);
        atomic_store_explicit(&phase, epoch++ << 2 | (on ? ON : OFF), memory_order_release);
        /* Hold the steady phase until a caller checked a call in it; bounded. */
        struct timespec t0, t;
        clock_gettime(CLOCK_MONOTONIC, &t0);
        do {
            sched_yield();
            clock_gettime(CLOCK_MONOTONIC, &t);
        } while (atomic_load(&checked) == seen && t.tv_sec - t0.tv_sec <= 2);
    }
    atomic_store(&stop, 1);
    for (int i = 0; i < THREADS; i++) pthread_join(th[i], NULL);
    long a = atomic_load(&stale_a), b = atomic_load(&stale_b);
    printf("%d flips, %ld calls checked in steady phases, stale: %ld on site_a, %ld on site_b\n", flips,
           atomic_load(&checked), a, b);
    return a || b ? 1 : 0;
}
