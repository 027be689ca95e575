/* Target of the live-patch header tests: one function, one variable. */
int lp_c_value = 5;
__attribute__((noinline)) int lp_c_target(int x) { return x + lp_c_value; }
