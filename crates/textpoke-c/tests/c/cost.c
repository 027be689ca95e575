/* A disabled key's cost: cost_keyed's path while cost_key is off must be
 * cost_plain's plus one NOP (tests/c_api.rs reads the disassembly). */
#include <textpoke.h>

TEXTPOKE_DEFINE_STATIC_KEY_FALSE(cost_key);

int cost_slow(int);

int cost_keyed(int x) {
    if (textpoke_static_branch_unlikely(&cost_key))
        return cost_slow(x);
    return x * 3 + 1;
}

int cost_plain(int x) { return x * 3 + 1; }
