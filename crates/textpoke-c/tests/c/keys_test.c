/* The C API of textpoke's static keys, exercised by a program built with
 * gcc or clang and linked against libtextpoke_c (static or shared); run by
 * crates/textpoke-c/tests/c_api.rs. argv[1]: path of libckeys.so.
 * Prints "ok" and exits 0 if every check passes. */
#define _GNU_SOURCE
#include <sched.h>
#include <time.h>
#include <dlfcn.h>
#include <pthread.h>
#include <stdatomic.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <textpoke.h>

#define CHECK(c)                                                              \
    do {                                                                      \
        if (!(c)) {                                                           \
            fprintf(stderr, "%s:%d: check failed: %s (last error: %s)\n",     \
                    __FILE__, __LINE__, #c, textpoke_last_error());           \
            exit(1);                                                          \
        }                                                                     \
    } while (0)

TEXTPOKE_DEFINE_STATIC_KEY_FALSE(k_false);
TEXTPOKE_DEFINE_STATIC_KEY_TRUE(k_true);
TEXTPOKE_DEFINE_STATIC_KEY_FALSE(k_counted);
TEXTPOKE_DEFINE_STATIC_KEY_FALSE(k_stress);
TEXTPOKE_DEFINE_STATIC_KEY_FALSE(k_nosites);

__attribute__((noinline)) int f_unlikely(void) { return textpoke_static_branch_unlikely(&k_false); }
__attribute__((noinline)) int f_likely(void) { return textpoke_static_branch_likely(&k_false); }
__attribute__((noinline)) int t_unlikely(void) { return textpoke_static_branch_unlikely(&k_true); }
__attribute__((noinline)) int t_likely(void) { return textpoke_static_branch_likely(&k_true); }
__attribute__((noinline)) int c_unlikely(void) { return textpoke_static_branch_unlikely(&k_counted); }

/* A branch in an if statement, with work on both sides. */
__attribute__((noinline)) long s_work(long x) {
    if (textpoke_static_branch_unlikely(&k_stress))
        return x * 3;
    return x + 1;
}
__attribute__((noinline)) int s_likely(void) { return textpoke_static_branch_likely(&k_stress); }

struct found { const char *name; int seen; int enabled; int count; size_t sites; char object[512]; };

static int find_cb(const struct textpoke_key_info *info, void *arg) {
    struct found *f = arg;
    if (strcmp(info->name, f->name) == 0) {
        f->seen++;
        f->enabled = info->enabled;
        f->count = info->count;
        f->sites = info->sites;
        snprintf(f->object, sizeof f->object, "%s", info->object);
        if (info->problem) {
            fprintf(stderr, "key %s: %s\n", info->name, info->problem);
            exit(1);
        }
    }
    return 0;
}

static struct found find(const char *name) {
    struct found f = { .name = name };
    CHECK(textpoke_keys_foreach(find_cb, &f) > 0);
    return f;
}

/* ---- threads: a branch is taken only if the key was enabled at some moment
 * between two reads of the phase; steady phases are exact. */
enum { OFF = 0, ON = 1, FLIPPING = 2 };
static _Atomic unsigned long phase;
static atomic_int stop;
static atomic_long violations, steady_on, steady_off;

static void *worker(void *arg) {
    (void)arg;
    while (!atomic_load_explicit(&stop, memory_order_relaxed)) {
        unsigned long p1 = atomic_load_explicit(&phase, memory_order_acquire);
        int taken = s_work(1) == 3;
        int likely = s_likely();
        unsigned long p2 = atomic_load_explicit(&phase, memory_order_acquire);
        if (p1 == p2 && (p1 & 3) == ON) {
            if (!taken || !likely) atomic_fetch_add(&violations, 1);
            else atomic_fetch_add_explicit(&steady_on, 1, memory_order_relaxed);
        } else if (p1 == p2 && (p1 & 3) == OFF) {
            if (taken || likely) atomic_fetch_add(&violations, 1);
            else atomic_fetch_add_explicit(&steady_off, 1, memory_order_relaxed);
        }
    }
    return NULL;
}

int main(int argc, char **argv) {
    CHECK(argc == 2);

    /* Defaults: nothing patched. */
    CHECK(f_unlikely() == 0 && f_likely() == 0 && t_unlikely() == 1 && t_likely() == 1);
    CHECK(!textpoke_static_key_enabled(&k_false) && textpoke_static_key_enabled(&k_true));
    CHECK(textpoke_static_key_count(&k_true) == 1);

    /* Listing. */
    struct found f = find("k_false");
    CHECK(f.seen == 1 && f.enabled == 0 && f.count == 0 && f.sites == 2);
    f = find("k_true");
    CHECK(f.seen == 1 && f.enabled == 1 && f.count == 1 && f.sites == 2);
    f = find("k_nosites");
    CHECK(f.seen == 1 && f.sites == 0);

    /* Flips. */
    CHECK(textpoke_static_key_enable(&k_false) == TEXTPOKE_OK);
    CHECK(f_unlikely() == 1 && f_likely() == 1);
    CHECK(textpoke_static_key_disable(&k_true) == TEXTPOKE_OK);
    CHECK(t_unlikely() == 0 && t_likely() == 0);
    CHECK(textpoke_key_set_by_name("k_true", 1) == TEXTPOKE_OK);
    CHECK(t_unlikely() == 1 && t_likely() == 1);
    CHECK(textpoke_static_key_disable(&k_false) == TEXTPOKE_OK);
    CHECK(f_unlikely() == 0 && f_likely() == 0);

    /* Reference counts, and bad use naming the key. */
    CHECK(textpoke_static_key_inc(&k_counted) == TEXTPOKE_OK);
    CHECK(textpoke_static_key_inc(&k_counted) == TEXTPOKE_OK);
    CHECK(c_unlikely() == 1 && textpoke_static_key_count(&k_counted) == 2);
    CHECK(textpoke_static_key_disable(&k_counted) == TEXTPOKE_EMISUSE);
    CHECK(strstr(textpoke_last_error(), "k_counted") != NULL);
    CHECK(textpoke_static_key_dec(&k_counted) == TEXTPOKE_OK);
    CHECK(c_unlikely() == 1);
    CHECK(textpoke_static_key_dec(&k_counted) == TEXTPOKE_OK);
    CHECK(c_unlikely() == 0);
    CHECK(textpoke_static_key_dec(&k_counted) == TEXTPOKE_EMISUSE);
    CHECK(strstr(textpoke_last_error(), "k_counted") != NULL);
    CHECK(strstr(textpoke_last_error(), "dec()") != NULL);
    CHECK(c_unlikely() == 0 && textpoke_static_key_count(&k_counted) == 0);
    CHECK(textpoke_key_set_by_name("no_such_key", 1) == TEXTPOKE_ENOTFOUND);
    CHECK(strstr(textpoke_last_error(), "no_such_key") != NULL);
    CHECK(textpoke_key_enable(NULL) == TEXTPOKE_EINVAL);

    /* Flips while 4 threads run through the branches. */
    enum { THREADS = 4, FLIPS = 1000 };
    pthread_t th[THREADS];
    for (int i = 0; i < THREADS; i++) CHECK(pthread_create(&th[i], NULL, worker, NULL) == 0);
    unsigned long epoch = 1;
    for (int i = 0; i < FLIPS; i++) {
        int on = !textpoke_static_key_enabled(&k_stress);
        atomic_store_explicit(&phase, epoch++ << 2 | FLIPPING, memory_order_release);
        CHECK((on ? textpoke_static_key_enable(&k_stress) : textpoke_static_key_disable(&k_stress)) == TEXTPOKE_OK);
        long seen = atomic_load(on ? &steady_on : &steady_off);
        atomic_store_explicit(&phase, epoch++ << 2 | (on ? ON : OFF), memory_order_release);
        /* Hold the steady phase until a worker has checked a call in it (a
         * scheduler can keep them off the CPU for a while); bounded. */
        struct timespec t0, t;
        clock_gettime(CLOCK_MONOTONIC, &t0);
        while (atomic_load(on ? &steady_on : &steady_off) == seen) {
            clock_gettime(CLOCK_MONOTONIC, &t);
            if (t.tv_sec - t0.tv_sec > 2) break;
            sched_yield();
        }
    }
    atomic_store(&stop, 1);
    for (int i = 0; i < THREADS; i++) pthread_join(th[i], NULL);
    printf("threads: %ld checked on, %ld checked off, %ld violations\n",
           atomic_load(&steady_on), atomic_load(&steady_off), atomic_load(&violations));
    CHECK(atomic_load(&violations) == 0);
    CHECK(atomic_load(&steady_on) > 0 && atomic_load(&steady_off) > 0);

    /* A library with keys, loaded later. */
    void *h = dlopen(argv[1], RTLD_NOW);
    if (!h) { fprintf(stderr, "dlopen: %s\n", dlerror()); return 1; }
    int (*lib_branch)(void) = (int (*)(void))dlsym(h, "lib_branch");
    int (*lib_likely)(void) = (int (*)(void))dlsym(h, "lib_likely");
    int (*lib_set)(int) = (int (*)(int))dlsym(h, "lib_set");
    CHECK(lib_branch && lib_likely && lib_set);
    CHECK(lib_branch() == 0 && lib_likely() == 1);
    f = find("lib_key");
    CHECK(f.seen == 1 && f.sites == 1 && strstr(f.object, "libckeys") != NULL);
    CHECK(textpoke_key_set_by_name("lib_key", 1) == TEXTPOKE_OK);
    CHECK(lib_branch() == 1);
    CHECK(textpoke_key_set_by_name("lib_true", 0) == TEXTPOKE_OK);
    CHECK(lib_likely() == 0);
    CHECK(lib_set(0) == TEXTPOKE_OK); /* the library flips its own key */
    CHECK(lib_branch() == 0);
    CHECK(lib_set(1) == TEXTPOKE_OK);
    CHECK(lib_branch() == 1 && find("lib_key").count == 1);
    CHECK(dlclose(h) == 0);
    /* Unloaded: forgotten. */
    CHECK(find("lib_key").seen == 0);
    CHECK(textpoke_key_set_by_name("lib_key", 0) == TEXTPOKE_ENOTFOUND);
    /* Loaded again: its defaults. */
    h = dlopen(argv[1], RTLD_NOW);
    CHECK(h != NULL);
    lib_branch = (int (*)(void))dlsym(h, "lib_branch");
    CHECK(lib_branch() == 0 && find("lib_key").count == 0);
    CHECK(textpoke_key_set_by_name("lib_key", 1) == TEXTPOKE_OK);
    CHECK(lib_branch() == 1);
    CHECK(dlclose(h) == 0);

    /* Our own keys still flip. */
    CHECK(textpoke_static_key_enable(&k_false) == TEXTPOKE_OK && f_unlikely() == 1);
    CHECK(textpoke_static_key_disable(&k_false) == TEXTPOKE_OK && f_unlikely() == 0);
    printf("ok\n");
    return 0;
}
