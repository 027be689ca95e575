/* A two-file patch (with lp_patch_b.c), C or C++: both files use the shadow
 * functions, so both emit the API slot; the linker keeps one. */
#include <textpoke.h>

TEXTPOKE_LIVEPATCH_NAME("c-header-test");
TEXTPOKE_LIVEPATCH_OBJECT("liblp_c_target.so", "");
TEXTPOKE_LIVEPATCH_FUNCTION int target_v2(int x) { return x * 10; }
TEXTPOKE_LIVEPATCH(lp_c_target, target_v2);
TEXTPOKE_LIVEPATCH_SYMBOL(int *, value_p, lp_c_value);

int lp_b_store(void *obj, long v); /* lp_patch_b.c */

TEXTPOKE_LIVEPATCH_FUNCTION int pre(void) {
    long *p = (long *)textpoke_shadow_get(value_p, 99);
    if (p || !textpoke_shadow_alloc(value_p, 99, sizeof(long), NULL, NULL))
        return -1; /* must not exist yet; then created zeroed */
    if (textpoke_shadow_alloc(value_p, 99, sizeof(long), NULL, NULL))
        return -2; /* alloc refuses an existing variable */
    return lp_b_store(value_p, *value_p + 1);
}
TEXTPOKE_PRE_PATCH(pre);
TEXTPOKE_LIVEPATCH_FUNCTION void post(void) { textpoke_shadow_free_all(99, NULL); }
TEXTPOKE_POST_UNPATCH(post);
