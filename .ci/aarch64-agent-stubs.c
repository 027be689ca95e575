/* The agent's naked aarch64 stubs, run under qemu-aarch64 with the agent
 * preloaded (.ci/aarch64): dlopen (the real one must get the caller's
 * arguments and return address) and execl with more arguments than the
 * seven registers x1-x7 hold (the rest come from the stack). The exec'd
 * program is the host's echo (qemu-user execs it natively), so the
 * arguments it prints are what the agent's execl passed on. */
#include <dlfcn.h>
#include <stdio.h>
#include <unistd.h>

__attribute__((noipa)) int traced(int x) { return x + 1; }

int main(void)
{
	void *m = dlopen("libm.so.6", RTLD_NOW);
	double (*cos_)(double) = m ? (double (*)(double))dlsym(m, "cos") : NULL;
	if (!cos_ || cos_(0.0) != 1.0) {
		printf("dlopen through the agent failed: %s\n", dlerror());
		return 1;
	}
	printf("dlopen ok %d\n", traced(1));
	fflush(stdout);
	execl("/bin/echo", "echo", "a1", "a2", "a3", "a4", "a5", "a6", "a7", "a8", "a9", (char *)NULL);
	perror("execl");
	return 1;
}
