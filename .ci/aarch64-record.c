/* The program .ci/aarch64 records with the aarch64 `textpoke record`
 * (issue 13): eight threads through a known call tree, so that the
 * report's call counts are exact numbers. Built with
 * aarch64-linux-gnu-gcc -fpatchable-function-entry=2.
 *
 * Per thread: work 1, top 1, mid ROUNDS, leaf 2 * ROUNDS, fib 177
 * (fib(10) calls fib 177 times). The sums are printed and checked so
 * that the calls cannot be optimised away unnoticed. */
#include <pthread.h>
#include <stdio.h>

#define THREADS 8
#define ROUNDS 50

__attribute__((noipa)) long leaf(long x) { return x + 1; }

__attribute__((noipa)) long mid(long x) { return leaf(x) + leaf(x + 1); }

__attribute__((noipa)) long top(long n)
{
	long s = 0;
	for (long i = 0; i < n; i++)
		s += mid(i);
	return s;
}

__attribute__((noipa)) long fib(long n) { return n < 2 ? n : fib(n - 1) + fib(n - 2); }

static long results[THREADS];

__attribute__((noipa)) void *work(void *arg)
{
	long i = (long)arg;
	results[i] = top(ROUNDS) + fib(10);
	return NULL;
}

int main(void)
{
	pthread_t t[THREADS];
	for (long i = 0; i < THREADS; i++)
		if (pthread_create(&t[i], NULL, work, (void *)i) != 0)
			return 2;
	for (int i = 0; i < THREADS; i++)
		pthread_join(t[i], NULL);
	/* top(50) = sum of 2i + 3 for i < 50 = 2600; fib(10) = 55. */
	for (int i = 0; i < THREADS; i++)
		if (results[i] != 2600 + 55) {
			printf("thread %d: %ld\n", i, results[i]);
			return 1;
		}
	printf("ok %d threads\n", THREADS);
	return 0;
}
