/* The workload `textpoke record` traces when it is given no program.
 *
 * Built by the textpoke-cli build script with -fpatchable-function-entry=5:
 * four threads, each working through items that recurse (fib, a tree walk),
 * loop over a leaf (checksum) and signal themselves; the handler calls a
 * traced function too. The result is printed so it can be checked. */
#include <pthread.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>

#define THREADS 4
#define ITEMS 20

static volatile long sink;
static volatile sig_atomic_t signals_seen;

__attribute__((noinline)) long checksum(long x)
{
	sink += x;
	return (x * 2654435761u) & 0xffff;
}

__attribute__((noinline)) long fib(int n)
{
	if (n < 2) {
		sink += n;
		return n;
	}
	return fib(n - 1) + fib(n - 2);
}

__attribute__((noinline)) long walk_tree(int depth, long label)
{
	if (depth == 0)
		return checksum(label);
	return walk_tree(depth - 1, label * 2) + walk_tree(depth - 1, label * 2 + 1);
}

__attribute__((noinline)) void note_signal(int sig)
{
	signals_seen += 1;
	sink += sig;
}

static void on_usr1(int sig)
{
	note_signal(sig);
}

__attribute__((noinline)) long work_item(int thread, int item)
{
	long s = fib(12) + walk_tree(4, thread * 100 + item);
	for (int i = 0; i < 16; i++)
		s += checksum(i + item);
	if (item % 5 == 4)
		pthread_kill(pthread_self(), SIGUSR1);
	return s;
}

__attribute__((noinline)) void *worker(void *arg)
{
	int thread = (int)(long)arg;
	long s = 0;
	for (int item = 0; item < ITEMS; item++)
		s += work_item(thread, item);
	return (void *)s;
}

int main(void)
{
	pthread_t threads[THREADS];
	struct sigaction sa = { .sa_handler = on_usr1 };
	sigemptyset(&sa.sa_mask);
	sigaction(SIGUSR1, &sa, NULL);
	for (long t = 0; t < THREADS; t++)
		pthread_create(&threads[t], NULL, worker, (void *)t);
	long total = 0;
	for (int t = 0; t < THREADS; t++) {
		void *r;
		pthread_join(threads[t], &r);
		total += (long)r;
	}
	printf("textpoke-demo: %d threads, %d items each, %d signals handled, result %ld\n", THREADS, ITEMS,
	       (int)signals_seen, total);
	return 0;
}
