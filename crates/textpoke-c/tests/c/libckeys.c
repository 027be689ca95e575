/* A shared library with static keys, loaded with dlopen by keys_test.c. It
 * links no textpoke of its own: textpoke_* resolve from the process. */
#include <textpoke.h>

TEXTPOKE_DEFINE_STATIC_KEY_FALSE(lib_key);
TEXTPOKE_DEFINE_STATIC_KEY_TRUE(lib_true);

__attribute__((noinline)) int lib_branch(void) {
    return textpoke_static_branch_unlikely(&lib_key) ? 1 : 0;
}

__attribute__((noinline)) int lib_likely(void) {
    if (textpoke_static_branch_likely(&lib_true))
        return 1;
    return 0;
}

/* Flips the library's own key from inside the library. */
int lib_set(int on) {
    return on ? textpoke_static_key_enable(&lib_key) : textpoke_static_key_disable(&lib_key);
}
