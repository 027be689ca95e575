/*
 * textpoke.h: static keys (jump labels) for C, flipped safely while other
 * threads run through their branches.
 *
 *     #include <textpoke.h>
 *
 *     TEXTPOKE_DEFINE_STATIC_KEY_FALSE(tracing);
 *
 *     void handle(struct request *r) {
 *         if (textpoke_static_branch_unlikely(&tracing))
 *             trace(r);                   // one NOP while disabled
 *         ...
 *     }
 *
 *     textpoke_static_key_enable(&tracing);   // patches every branch on it
 *
 * Each branch is an `asm goto` holding one instruction. On x86-64, 5 bytes:
 * the NOP 0f 1f 44 00 00 (fall through) or `jmp rel32` to the branch body,
 * flipped with the breakpoint protocol. On aarch64, one word: `nop` or
 * `b label` (the kernel's arm64 jump_label), swapped whole, as the Arm ARM
 * allows for B and NOP while other cores run them. A record
 * of it (site, label and key, as offsets relative to the record) goes in the
 * retained note section `.note.textpoke`, which the linker puts in a PT_NOTE
 * segment; the textpoke library finds the records of the executable and of
 * every shared library, including ones loaded later with dlopen, and patches
 * all the sites of a key in one batch. The
 * layout compiled in follows the key's default: nothing is patched at start.
 * The record format and struct layout are those of the Rust macros, so Rust
 * and C keys are listed and flipped alike.
 *
 * Requirements: GNU C (gcc >= 8 or clang >= 9: asm goto, statement
 * expressions, __builtin_types_compatible_p), x86-64 or aarch64 ELF, binutils >= 2.36 or
 * LLVM >= 13 (the `R` section flag). The key and branch macros are C only;
 * C++ gets the functions.
 *
 * Linking: link the program with -ltextpoke_c (the shared library), or with
 * libtextpoke_c.a and -lpthread -ldl -lm -lrt -lgcc_s (then add -rdynamic if
 * libraries loaded later with dlopen call the textpoke_* functions, so that
 * they find the program's copy). A shared library that uses keys needs no
 * textpoke library of its own: it resolves textpoke_* from the process.
 *
 * Keys are per object (executable or shared library): the macros give them
 * hidden visibility, and a branch must be in the same object as its key.
 * Declare a key defined in another file of the same object with
 * TEXTPOKE_DECLARE_STATIC_KEY_FALSE/TRUE; reach a key of another object by
 * name (textpoke_key_set_by_name).
 *
 * Branches may run anywhere, including in signal handlers. The functions
 * below take locks and allocate: do not call them from signal handlers, nor
 * from ELF constructors or destructors while another thread may flip keys.
 */
#ifndef TEXTPOKE_H
#define TEXTPOKE_H

#include <stddef.h>
#include <stdint.h>

/* A static key. Same layout as Rust's textpoke::keys::StaticKey. */
struct textpoke_static_key {
    int32_t enabled;   /* reference count; -1 while being enabled. Only textpoke writes it. */
    uint32_t flags;    /* TEXTPOKE_KEY_DEFAULT_TRUE */
    const char *name;  /* NUL-terminated, in the same object */
};

#define TEXTPOKE_KEY_DEFAULT_TRUE 1u

/* The two kinds of key; the branch macros know the default from the type. */
struct textpoke_static_key_true {
    struct textpoke_static_key key;
};
struct textpoke_static_key_false {
    struct textpoke_static_key key;
};

#ifndef __cplusplus /* the macros rely on __builtin_types_compatible_p */

/*
 * What differs between the two ISAs: the site instruction (TEXTPOKE__SITE,
 * its label `1`, the body's label operand `textpoke__yes`), how gas spells
 * the note type (`@` starts a comment in Arm assembly; TEXTPOKE__NOTE for
 * top-level asm, TEXTPOKE__NOTE_OP inside an asm with operands, where `%`
 * is doubled), and the constraint that gives the key's address as a
 * link-time constant (x86-64 "i"; aarch64 "S", a symbolic address, which
 * gcc and clang accept with -fPIC where "i" is refused).
 */
#if defined(__x86_64__)
#define TEXTPOKE__NOTE "@note"
#define TEXTPOKE__NOTE_OP "@note"
#define TEXTPOKE__KEY_ADDR "i"
#define TEXTPOKE__SITE                                                        \
    ".if %c[init]\n\t"                                                       \
    ".byte 0xe9\n\t"                                                         \
    ".long %l[textpoke__yes] - 1b - 5\n\t"                                   \
    ".else\n\t"                                                              \
    ".byte 0x0f, 0x1f, 0x44, 0x00, 0x00\n\t"                                 \
    ".endif\n\t"
#elif defined(__aarch64__)
#define TEXTPOKE__NOTE "%note"
#define TEXTPOKE__NOTE_OP "%%note"
#define TEXTPOKE__KEY_ADDR "S"
#define TEXTPOKE__SITE                                                        \
    ".if %c[init]\n\t"                                                       \
    "b %l[textpoke__yes]\n\t"                                                \
    ".else\n\t"                                                              \
    "nop\n\t"                                                                \
    ".endif\n\t"
#else
#error "textpoke.h: static keys support x86-64 and aarch64"
#endif

/* The key's record (note type 2): the offset from the record to the key. */
#define TEXTPOKE__KEY_RECORD(name)                                            \
    __asm__(".pushsection .note.textpoke,\"aR\"," TEXTPOKE__NOTE "\n\t"       \
            ".balign 4\n\t"                                                   \
            ".long 9, 8, 2\n\t"                                               \
            ".asciz \"textpoke\"\n\t"                                         \
            ".balign 4\n"                                                     \
            "2:\t.long " #name " - 2b\n\t"                                    \
            ".long 0\n\t"                                                     \
            ".popsection")

/* Defines a key disabled by default, at file scope. */
#define TEXTPOKE_DEFINE_STATIC_KEY_FALSE(name)                                \
    __attribute__((visibility("hidden"), used, aligned(8)))                   \
    struct textpoke_static_key_false name = {{0, 0, #name}};                  \
    TEXTPOKE__KEY_RECORD(name)

/* Defines a key enabled by default (reference count 1), at file scope. */
#define TEXTPOKE_DEFINE_STATIC_KEY_TRUE(name)                                 \
    __attribute__((visibility("hidden"), used, aligned(8)))                   \
    struct textpoke_static_key_true name = {{1, TEXTPOKE_KEY_DEFAULT_TRUE, #name}}; \
    TEXTPOKE__KEY_RECORD(name)

/* Declares a key defined in another file of the same executable or library. */
#define TEXTPOKE_DECLARE_STATIC_KEY_FALSE(name)                               \
    extern __attribute__((visibility("hidden"))) struct textpoke_static_key_false name
#define TEXTPOKE_DECLARE_STATIC_KEY_TRUE(name)                                \
    extern __attribute__((visibility("hidden"))) struct textpoke_static_key_true name

#define TEXTPOKE__IS_TRUE_KEY(k)                                              \
    __builtin_types_compatible_p(__typeof__(*(k)), struct textpoke_static_key_true)
#define TEXTPOKE__IS_FALSE_KEY(k)                                             \
    __builtin_types_compatible_p(__typeof__(*(k)), struct textpoke_static_key_false)

/*
 * The branch site. `jumped` is 1 when the site executed a JMP (aarch64: a
 * B). A site is a JMP exactly when (key enabled) != likely, so the branch
 * value is jumped != likely; the form compiled in is the one for the key's
 * default. Record (note type 1): site, label, key, flags (bit 0 likely,
 * bit 1 compiled in as a JMP). The `?` flag puts the record in the
 * function's section group, if any, so a discarded COMDAT copy discards
 * its record.
 */
#define TEXTPOKE__BRANCH(k, likely)                                           \
    ({                                                                        \
        __label__ textpoke__yes;                                              \
        int textpoke__jumped = 0;                                             \
        _Static_assert(TEXTPOKE__IS_TRUE_KEY(k) || TEXTPOKE__IS_FALSE_KEY(k), \
                       "textpoke_static_branch_*() takes &key, a key defined " \
                       "with TEXTPOKE_DEFINE_STATIC_KEY_FALSE/TRUE");         \
        __asm__ goto("1:\n\t"                                                 \
                     TEXTPOKE__SITE                                           \
                     ".pushsection .note.textpoke,\"a?R\"," TEXTPOKE__NOTE_OP "\n\t" \
                     ".balign 4\n\t"                                          \
                     ".long 9, 16, 1\n\t"                                     \
                     ".asciz \"textpoke\"\n\t"                                \
                     ".balign 4\n"                                            \
                     "2:\t.long 1b - 2b\n\t"                                  \
                     ".long %l[textpoke__yes] - 2b - 4\n\t"                   \
                     ".long %c[key] - 2b - 8\n\t"                             \
                     ".long %c[flags]\n\t"                                    \
                     ".popsection"                                            \
                     :                                                        \
                     : [key] TEXTPOKE__KEY_ADDR(&(k)->key),                   \
                       [init] "i"(TEXTPOKE__IS_TRUE_KEY(k) != (likely)),      \
                       [flags] "i"((likely) | ((TEXTPOKE__IS_TRUE_KEY(k) != (likely)) << 1)) \
                     :                                                        \
                     : textpoke__yes);                                        \
        if (0) {                                                              \
        textpoke__yes:                                                        \
            textpoke__jumped = 1;                                             \
        }                                                                     \
        textpoke__jumped != (likely);                                         \
    })

/* 1 while the key is enabled; expected not to be: one NOP when disabled. */
#define textpoke_static_branch_unlikely(k) __builtin_expect(TEXTPOKE__BRANCH(k, 0), 0)
/* 1 while the key is enabled; expected to be. */
#define textpoke_static_branch_likely(k) __builtin_expect(TEXTPOKE__BRANCH(k, 1), 1)

#endif /* !__cplusplus */

#ifdef __cplusplus
extern "C" {
#endif

/* Return values: 0 on success, or one of these; textpoke_last_error() then
 * describes the error (naming the key). */
enum textpoke_status {
    TEXTPOKE_OK = 0,
    TEXTPOKE_EMISUSE = -1,    /* dec below zero, disable while inc() references hold the key, overflow */
    TEXTPOKE_ENOTFOUND = -2,  /* no such key (by name), or the key is not recorded in any loaded object */
    TEXTPOKE_EAMBIGUOUS = -3, /* several loaded objects define a key of that name */
    TEXTPOKE_EPATCH = -4,     /* patching refused or failed: a site is not what the records say, ... */
    TEXTPOKE_EAGAIN = -5,     /* libraries kept being loaded or unloaded; try again */
    TEXTPOKE_EBROKEN = -6,    /* the key's records are malformed, or an earlier flip failed part-way */
    TEXTPOKE_EINVAL = -7,     /* a NULL pointer or a name that is not UTF-8 */
    TEXTPOKE_EINTERNAL = -8   /* a bug in textpoke (a panic, caught) */
};

/* Enable (count 0 -> 1; no-op if enabled) or disable (1 -> 0; no-op if
 * disabled; refused if inc() references hold the key) a key. Every branch
 * on the key is patched in one batch before these return. */
int textpoke_key_enable(struct textpoke_static_key *key);
int textpoke_key_disable(struct textpoke_static_key *key);
/* Take or drop a reference (static_key_slow_inc/dec): the first enables,
 * the last disables; dec below zero is refused (TEXTPOKE_EMISUSE). */
int textpoke_key_inc(struct textpoke_static_key *key);
int textpoke_key_dec(struct textpoke_static_key *key);
/* Enable (enabled != 0) or disable the key of this exact name in whichever
 * loaded object defines it. */
int textpoke_key_set_by_name(const char *name, int enabled);

#define textpoke_static_key_enable(k) textpoke_key_enable(&(k)->key)
#define textpoke_static_key_disable(k) textpoke_key_disable(&(k)->key)
#define textpoke_static_key_inc(k) textpoke_key_inc(&(k)->key)
#define textpoke_static_key_dec(k) textpoke_key_dec(&(k)->key)
/* The key's state and reference count (no patching, no lock). */
#define textpoke_static_key_enabled(k) (__atomic_load_n(&(k)->key.enabled, __ATOMIC_ACQUIRE) > 0)
#define textpoke_static_key_count(k)                                          \
    ({ int32_t textpoke__n = __atomic_load_n(&(k)->key.enabled, __ATOMIC_ACQUIRE); \
       textpoke__n > 0 ? textpoke__n : 0; })

/* One key of the process, as textpoke_keys_foreach() reports it. The
 * strings are valid during the callback only. */
struct textpoke_key_info {
    const char *name;
    const char *object;   /* path of the executable or library defining it */
    uintptr_t addr;       /* the key's address */
    int enabled;
    int32_t count;        /* reference count */
    int default_enabled;
    size_t sites;         /* number of branch sites */
    const char *problem;  /* why the key cannot be flipped, or NULL */
};

/* Calls fn for every key of every loaded object (sorted by object and
 * name) until fn returns nonzero. Returns the number of keys visited, or a
 * negative textpoke_status. */
int textpoke_keys_foreach(int (*fn)(const struct textpoke_key_info *info, void *arg), void *arg);

/* The message of the last error in this thread ("" if none); valid until
 * the next textpoke call in this thread. */
const char *textpoke_last_error(void);

#ifdef __cplusplus
}
#endif

#endif /* TEXTPOKE_H */
