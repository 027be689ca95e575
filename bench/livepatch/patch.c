/* The patch run.sh applies: cold() returns x + 2. */
#include <textpoke.h>

TEXTPOKE_LIVEPATCH_NAME("cold-v2");
TEXTPOKE_LIVEPATCH_OBJECT(NULL, BUILD_ID);

static long cold_v2(long x) { return x + 2; }
TEXTPOKE_LIVEPATCH(cold, cold_v2);
