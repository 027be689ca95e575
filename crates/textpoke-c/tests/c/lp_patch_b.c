/* Second file of the two-file patch: reaches the same shadow variable. */
#include <textpoke.h>

__attribute__((visibility("hidden"))) int lp_b_store(void *obj, long v) {
    long *p = (long *)textpoke_shadow_get(obj, 99);
    if (!p)
        return -3;
    *p = v;
    return 0;
}
