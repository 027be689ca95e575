/* A library whose textpoke records do not describe its code: textpoke must
 * refuse to flip its keys (naming them) and patch nothing. */
#include <textpoke.h>

TEXTPOKE_DEFINE_STATIC_KEY_FALSE(bad_key);

/* The site instruction (a NOP) and how gas spells the note type inside an
 * asm with operands (see textpoke.h). */
#if defined(__x86_64__)
#define BAD_NOP ".byte 0x0f, 0x1f, 0x44, 0x00, 0x00"
#else
#define BAD_NOP "nop"
#endif

/* A branch whose record claims it was compiled in as a JMP, while the site
 * is a NOP (an unlikely branch on a false key). */
__attribute__((noinline)) int bad_branch(void) {
    __asm__ goto("1:\n\t" BAD_NOP "\n\t"
                 ".pushsection .note.textpoke,\"a?R\"," TEXTPOKE__NOTE_OP "\n\t"
                 ".balign 4\n\t.long 9, 16, 1\n\t.asciz \"textpoke\"\n\t.balign 4\n"
                 "2:\t.long 1b - 2b\n\t.long %l[yes] - 2b - 4\n\t.long %c[key] - 2b - 8\n\t.long 2\n\t"
                 ".popsection"
                 : : [key] TEXTPOKE__KEY_ADDR(&bad_key.key) : : yes);
    return 0;
yes:
    return 1;
}

/* A record of a kind this textpoke does not know. */
__asm__(".pushsection .note.textpoke,\"aR\"," TEXTPOKE__NOTE "\n\t"
        ".balign 4\n\t.long 9, 4, 9\n\t.asciz \"textpoke\"\n\t.balign 4\n\t.long 0\n\t"
        ".popsection");
