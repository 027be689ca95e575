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

/* ======================================================================
 * Live patching (issue 12): writing a patch object
 * ======================================================================
 *
 * A patch is a shared object (gcc -shared -fPIC -O2 patch.c -o patch.so)
 * whose records say what it replaces; `textpoke patch PID patch.so` (or
 * textpoke::live::object::load in-process) loads it, checks and resolves
 * them, and switches every thread to the replacements with the kernel's
 * consistency model.
 *
 *     #include <textpoke.h>
 *
 *     TEXTPOKE_LIVEPATCH_NAME("fix-1234");
 *     TEXTPOKE_LIVEPATCH_OBJECT("libfoo.so.1", "3f2a...");   // before the lines it applies to
 *     static int outer_v2(int x) { return x + 2; }
 *     TEXTPOKE_LIVEPATCH(outer, outer_v2);                 // target named as in its .symtab
 *     TEXTPOKE_LIVEPATCH_STATIC("parse.c", helper, helper_v2); // a static function, by file
 *     TEXTPOKE_LIVEPATCH_POS(helper, 2, helper_v2);        // ... or by position (1-based)
 *     TEXTPOKE_LIVEPATCH_SYMBOL(int *, counter_p, counter);  // int *counter_p = &target's counter
 *     TEXTPOKE_PRE_PATCH(my_pre);                          // int my_pre(void): non-zero cancels
 *
 * Rules:
 * - Replacements and callbacks are functions of the patch that are not
 *   exported (static, or hidden visibility): records reach them
 *   PC-relatively. A replacement has exactly the target's signature. In
 *   C++, define them with TEXTPOKE_LIVEPATCH_FUNCTION (extern "C", hidden):
 *   records name them by their unmangled names.
 * - TEXTPOKE_LIVEPATCH_OBJECT applies to the records after it in the same
 *   file (assembler state); without it, targets are in the main executable.
 *   Pass NULL (literally) as the object for the executable with a build-id.
 *   The object name is matched against the loaded objects' paths: the whole
 *   path, or its last components ("libfoo.so.1", "lib/libfoo.so.1").
 * - The build-id is the target's GNU build-id in hex (`readelf -n`,
 *   `file`); a different one is refused before anything is patched.
 * - Macros are used at file scope, each target at most once per patch.
 * - Requirements: GNU C (gcc or clang), GNU as or LLVM's integrated
 *   assembler, x86-64 or aarch64 ELF. Do not build patches with LTO.
 *
 * Shadow variables (the kernel's klp_shadow_*, same semantics): data
 * attached to an existing object `obj` under a number `id`:
 *     struct extra *e = textpoke_shadow_get_or_alloc(req, ID_EXTRA, sizeof *e, NULL, NULL);
 *     ... textpoke_shadow_free(req, ID_EXTRA, NULL);
 *     textpoke_shadow_free_all(ID_EXTRA, NULL);   // typically in the post-unpatch callback
 * get is lock-free and async-signal-safe; alloc, get_or_alloc and the frees
 * allocate or lock (not from signal handlers); ctor and dtor run under a
 * lock and must not call these functions. The functions reach the engine
 * through a slot of the patch (`textpoke__lp_api`, an LP_SYMBOL record of
 * kind API) that the loader fills before the pre-patch callback, so they
 * work wherever the engine lives (LD_PRELOADed agent, agent loaded with
 * dlopen(RTLD_LOCAL), the program itself) and the patch links against no
 * textpoke library. Before the slot is filled they return NULL / do
 * nothing: do not call them from the patch's ELF constructors.
 */
#ifndef TEXTPOKE_LIVEPATCH_H
#define TEXTPOKE_LIVEPATCH_H

#include <stddef.h>
#include <stdint.h>

#ifdef __cplusplus
extern "C" {
#endif

#ifdef __cplusplus
#define TEXTPOKE__LP_ASSERT static_assert
#define TEXTPOKE__LP_C_BEGIN extern "C" {
#define TEXTPOKE__LP_C_END }
#define TEXTPOKE__LP_C extern "C"
#else
#define TEXTPOKE__LP_ASSERT _Static_assert
#define TEXTPOKE__LP_C_BEGIN
#define TEXTPOKE__LP_C_END
#define TEXTPOKE__LP_C
#endif

/* Marks a replacement or callback: not exported (hidden), kept, and with
 * an unmangled name in C++ (the records name functions by their assembler
 * name; in C, a plain `static` function works too):
 *     TEXTPOKE_LIVEPATCH_FUNCTION int outer_v2(int x) { ... }        */
#define TEXTPOKE_LIVEPATCH_FUNCTION TEXTPOKE__LP_C __attribute__((visibility("hidden"), used))
#define TEXTPOKE__LP_STR(x) #x
#define TEXTPOKE__LP_XSTR(x) TEXTPOKE__LP_STR(x)

/* A note header of type `ty` with `size` descriptor bytes; label 2 marks
 * the descriptor. Offsets are written `X - 2b - field offset`. */
#define TEXTPOKE__LP_HEAD(ty, size)                                           \
    ".pushsection .note.textpoke,\"aR\",%note\n\t"                            \
    ".balign 4\n\t"                                                           \
    ".long 9, " #size ", " #ty "\n\t"                                         \
    ".asciz \"textpoke\"\n\t"                                                 \
    ".balign 4\n"                                                             \
    "2:\n\t"
#define TEXTPOKE__LP_STRINGS ".popsection\n\t.pushsection .rodata.textpoke.lp,\"aMS\",%progbits,1\n"
/* The object field at descriptor offset `at`: the object set by the last
 * TEXTPOKE_LIVEPATCH_OBJECT of this file, or 0 (the main executable). */
#define TEXTPOKE__LP_OBJECT_FIELD(at)                                         \
    ".ifdef .Ltextpoke_lp_object\n\t"                                         \
    ".long .Ltextpoke_lp_object - 2b - " #at "\n\t"                           \
    ".else\n\t"                                                               \
    ".long 0\n\t"                                                             \
    ".endif\n\t"

#define TEXTPOKE__LP_CAT2(a, b) a##b
#define TEXTPOKE__LP_CAT(a, b) TEXTPOKE__LP_CAT2(a, b)
/* Keeps a static function the records name (the compiler would drop or
 * warn about a static function only an asm statement refers to), and
 * checks that `fn` is a function of this file. */
#define TEXTPOKE__LP_KEEP(fn)                                                 \
    static __typeof__(&(fn)) const TEXTPOKE__LP_CAT(textpoke__lp_keep_, __COUNTER__) \
        __attribute__((used)) = &(fn)

/* LP_FUNC (type 3): name, replacement, file (string or empty), sympos. */
#define TEXTPOKE__LP_FUNC(target, repl, file, sympos)                         \
    TEXTPOKE__LP_KEEP(repl);                                                  \
    __asm__(TEXTPOKE__LP_HEAD(3, 24)                                          \
            ".long 3f - 2b\n\t"                                               \
            ".long " #repl " - 2b - 4\n\t"                                    \
            ".ifnb " file "\n\t.long 4f - 2b - 8\n\t.else\n\t.long 0\n\t.endif\n\t" \
            ".long " #sympos "\n\t"                                           \
            TEXTPOKE__LP_OBJECT_FIELD(16)                                     \
            ".long 0\n\t"                                                     \
            TEXTPOKE__LP_STRINGS                                              \
            "3:\t.asciz \"" #target "\"\n\t"                                  \
            ".ifnb " file "\n4:\t.asciz \"" file "\"\n\t.endif\n\t"           \
            ".popsection")

/* Replace function `target` of the target object by `replacement`. */
#define TEXTPOKE_LIVEPATCH(target, replacement) TEXTPOKE__LP_FUNC(target, replacement, "", 0)
/* Replace the static function `target` of source file `file` ("parse.c",
 * as its STT_FILE symbol says, or its last path components). */
#define TEXTPOKE_LIVEPATCH_STATIC(file, target, replacement)                  \
    TEXTPOKE__LP_FUNC(target, replacement, file, 0)
/* Replace the `sympos`-th (1-based, symbol-table order) symbol `target`. */
#define TEXTPOKE_LIVEPATCH_POS(target, sympos, replacement)                   \
    TEXTPOKE__LP_FUNC(target, replacement, "", sympos)

/* LP_OBJECT (type 4), and sets the object of the records that follow.
 * `object` is a string literal, or NULL for the main executable; the
 * build-id a string literal of hex digits ("" = not checked). */
#define TEXTPOKE_LIVEPATCH_OBJECT(object, build_id)                           \
    __asm__(".ifc " #object ",NULL\n\t"                                       \
            TEXTPOKE__LP_HEAD(4, 12)                                          \
            ".long 0\n\t"                                                     \
            ".else\n\t"                                                       \
            ".pushsection .rodata.textpoke.lp,\"aMS\",%progbits,1\n"          \
            "5:\t.asciz " #object "\n\t"                                      \
            ".popsection\n\t"                                                 \
            ".set .Ltextpoke_lp_object, 5b\n\t"                               \
            TEXTPOKE__LP_HEAD(4, 12)                                          \
            ".long .Ltextpoke_lp_object - 2b\n\t"                             \
            ".endif\n\t"                                                      \
            ".ifnb " build_id "\n\t.long 3f - 2b - 4\n\t.else\n\t.long 0\n\t.endif\n\t" \
            ".long 0\n\t"                                                     \
            TEXTPOKE__LP_STRINGS                                              \
            ".ifnb " build_id "\n3:\t.asciz \"" build_id "\"\n\t.endif\n\t"   \
            ".popsection")

/* LP_PATCH (type 6): format version 1, flags, name. */
#define TEXTPOKE__LP_PATCH(flags, name)                                       \
    __asm__(TEXTPOKE__LP_HEAD(6, 16)                                          \
            ".long 1\n\t"                                                     \
            ".long " #flags "\n\t"                                            \
            ".ifnb " name "\n\t.long 3f - 2b - 8\n\t.else\n\t.long 0\n\t.endif\n\t" \
            ".long 0\n\t"                                                     \
            TEXTPOKE__LP_STRINGS                                              \
            ".ifnb " name "\n3:\t.asciz \"" name "\"\n\t.endif\n\t"           \
            ".popsection")

/* Atomic replace: on completion this patch replaces every earlier one. */
#define TEXTPOKE_LIVEPATCH_REPLACE() TEXTPOKE__LP_PATCH(1, "")
/* The patch's name (listings, reports); default: the file name. */
#define TEXTPOKE_LIVEPATCH_NAME(name) TEXTPOKE__LP_PATCH(0, name)

/* LP_CALLBACK (type 5). The static assertion checks the signature. */
#define TEXTPOKE__LP_CALLBACK(kind, fn, type)                                 \
    static type const textpoke__lp_cb_##kind##_##fn                           \
        __attribute__((used)) = fn;                                           \
    __asm__(TEXTPOKE__LP_HEAD(5, 8)                                           \
            ".long " #kind "\n\t"                                             \
            ".long " #fn " - 2b - 4\n\t"                                      \
            ".popsection")
typedef int (*textpoke_lp_pre_fn)(void);
typedef void (*textpoke_lp_post_fn)(void);
/* Before any site is redirected; non-zero cancels the patch. */
#define TEXTPOKE_PRE_PATCH(fn) TEXTPOKE__LP_CALLBACK(1, fn, textpoke_lp_pre_fn)
/* After every thread switched to the replacements. */
#define TEXTPOKE_POST_PATCH(fn) TEXTPOKE__LP_CALLBACK(2, fn, textpoke_lp_post_fn)
/* Before a revert starts; non-zero cancels the revert. */
#define TEXTPOKE_PRE_UNPATCH(fn) TEXTPOKE__LP_CALLBACK(3, fn, textpoke_lp_pre_fn)
/* After every thread switched back. */
#define TEXTPOKE_POST_UNPATCH(fn) TEXTPOKE__LP_CALLBACK(4, fn, textpoke_lp_post_fn)

/* LP_SYMBOL (type 7) of kind SYMBOL: defines `type slot` (a pointer-sized
 * variable of the patch) that receives the address of the target's
 * `target` (a variable or function) before the pre-patch callback: the
 * kernel's .klp.sym relocations. */
#define TEXTPOKE__LP_SYMBOL(type, slot, target, file, sympos)                 \
    TEXTPOKE__LP_C_BEGIN                                                      \
    __attribute__((visibility("hidden"), used, aligned(8))) type slot;        \
    TEXTPOKE__LP_C_END                                                        \
    TEXTPOKE__LP_ASSERT(sizeof(type) == sizeof(void *), "a slot is pointer-sized"); \
    __asm__(TEXTPOKE__LP_HEAD(7, 24)                                          \
            ".long " #slot " - 2b\n\t"                                        \
            ".long 3f - 2b - 4\n\t"                                           \
            ".ifnb " file "\n\t.long 4f - 2b - 8\n\t.else\n\t.long 0\n\t.endif\n\t" \
            ".long " #sympos "\n\t"                                           \
            TEXTPOKE__LP_OBJECT_FIELD(16)                                     \
            ".long 1\n\t"                                                     \
            TEXTPOKE__LP_STRINGS                                              \
            "3:\t.asciz \"" #target "\"\n\t"                                  \
            ".ifnb " file "\n4:\t.asciz \"" file "\"\n\t.endif\n\t"           \
            ".popsection")
#define TEXTPOKE_LIVEPATCH_SYMBOL(type, slot, target) TEXTPOKE__LP_SYMBOL(type, slot, target, "", 0)
#define TEXTPOKE_LIVEPATCH_SYMBOL_STATIC(type, slot, file, target)            \
    TEXTPOKE__LP_SYMBOL(type, slot, target, file, 0)
#define TEXTPOKE_LIVEPATCH_SYMBOL_POS(type, slot, target, sympos)             \
    TEXTPOKE__LP_SYMBOL(type, slot, target, "", sympos)

/* ---- shadow variables ---- */

typedef int (*textpoke_shadow_ctor_t)(void *obj, void *shadow_data, void *ctor_data);
typedef void (*textpoke_shadow_dtor_t)(void *obj, void *shadow_data);

/* The engine's table (textpoke::live::shadow::Api); fields are appended
 * only, `size` says which exist. */
struct textpoke_lp_api {
    uint32_t version;
    uint32_t size;
    void *(*shadow_get)(void *obj, unsigned long id);
    void *(*shadow_alloc)(void *obj, unsigned long id, size_t size, textpoke_shadow_ctor_t ctor, void *ctor_data);
    void *(*shadow_get_or_alloc)(void *obj, unsigned long id, size_t size, textpoke_shadow_ctor_t ctor,
                                 void *ctor_data);
    void (*shadow_free)(void *obj, unsigned long id, textpoke_shadow_dtor_t dtor);
    void (*shadow_free_all)(unsigned long id, textpoke_shadow_dtor_t dtor);
};

/* The patch's API slot: one per patch (a COMDAT group shared by all its
 * files), with its LP_SYMBOL record of kind API, emitted by the first use
 * of a shadow function in a file. noipa: the asm is emitted exactly once
 * per file. */
#if defined(__clang__)
#define TEXTPOKE__LP_ONCE __attribute__((noinline, unused))
#else
#define TEXTPOKE__LP_ONCE __attribute__((noipa, unused))
#endif
extern const struct textpoke_lp_api *textpoke__lp_api __attribute__((visibility("hidden")));
static TEXTPOKE__LP_ONCE const struct textpoke_lp_api *textpoke__lp_api_table(void) {
    __asm__(".pushsection .data.textpoke__lp_api,\"awG\",%progbits,textpoke__lp_api,comdat\n\t"
            ".balign 8\n\t"
            ".globl textpoke__lp_api\n\t"
            ".hidden textpoke__lp_api\n\t"
            ".type textpoke__lp_api, %object\n\t"
            ".size textpoke__lp_api, 8\n"
            "textpoke__lp_api:\t.quad 0\n\t"
            ".popsection\n\t"
            ".pushsection .note.textpoke,\"aGR\",%note,textpoke__lp_api,comdat\n\t"
            ".balign 4\n\t"
            ".long 9, 24, 7\n\t"
            ".asciz \"textpoke\"\n\t"
            ".balign 4\n"
            "2:\t.long textpoke__lp_api - 2b\n\t"
            ".long 0, 0, 0, 0, 3\n\t"
            ".popsection");
    /* Acquire pairs with the loader's Release store of the table. */
    return __atomic_load_n(&textpoke__lp_api, __ATOMIC_ACQUIRE);
}

/* The data of <obj, id>, or NULL. Lock-free, async-signal-safe. */
static inline void *textpoke_shadow_get(void *obj, unsigned long id) {
    const struct textpoke_lp_api *a = textpoke__lp_api_table();
    return a ? a->shadow_get(obj, id) : NULL;
}
/* Creates <obj, id> with `size` zeroed bytes and runs ctor (if any) on
 * them; NULL if it exists already, if ctor returned non-zero, or if
 * memory ran out. */
static inline void *textpoke_shadow_alloc(void *obj, unsigned long id, size_t size, textpoke_shadow_ctor_t ctor,
                                          void *ctor_data) {
    const struct textpoke_lp_api *a = textpoke__lp_api_table();
    return a ? a->shadow_alloc(obj, id, size, ctor, ctor_data) : NULL;
}
/* The data of <obj, id>, created as by textpoke_shadow_alloc if missing;
 * of racing calls exactly one runs ctor. */
static inline void *textpoke_shadow_get_or_alloc(void *obj, unsigned long id, size_t size,
                                                 textpoke_shadow_ctor_t ctor, void *ctor_data) {
    const struct textpoke_lp_api *a = textpoke__lp_api_table();
    return a ? a->shadow_get_or_alloc(obj, id, size, ctor, ctor_data) : NULL;
}
/* Removes <obj, id>, running dtor (if any) on its data first. */
static inline void textpoke_shadow_free(void *obj, unsigned long id, textpoke_shadow_dtor_t dtor) {
    const struct textpoke_lp_api *a = textpoke__lp_api_table();
    if (a)
        a->shadow_free(obj, id, dtor);
}
/* Removes every shadow variable with this id, as textpoke_shadow_free. */
static inline void textpoke_shadow_free_all(unsigned long id, textpoke_shadow_dtor_t dtor) {
    const struct textpoke_lp_api *a = textpoke__lp_api_table();
    if (a)
        a->shadow_free_all(id, dtor);
}

#ifdef __cplusplus
}
#endif

#endif /* TEXTPOKE_LIVEPATCH_H */
