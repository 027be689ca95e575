//! The key and branch macros (exported at the crate root). The assembly
//! they emit is described in the `keys` module: the site, and one
//! `.note.textpoke` record per site and per key.

/// Defines a static key that is disabled by default: a
/// `static NAME: textpoke::keys::StaticKeyFalse`, recorded so that
/// [`keys::list`](crate::keys::list) and every flip find it.
///
/// ```
/// textpoke::define_static_key_false!(
///     /// Extra checks on the request path.
///     pub CHECKS
/// );
/// assert!(!CHECKS.is_enabled());
/// assert_eq!(CHECKS.name(), "rust_out::CHECKS");
/// ```
///
/// The name is `module_path!()::NAME`. Define keys at module level (or in
/// a function body); their sites may be in any crate linked into the same
/// executable or library.
#[macro_export]
macro_rules! define_static_key_false {
    ($(#[$attr:meta])* $vis:vis $name:ident) => {
        $crate::__define_static_key!($(#[$attr])* $vis $name, StaticKeyFalse);
    };
}

/// Defines a static key that is enabled by default (count 1): a
/// `static NAME: textpoke::keys::StaticKeyTrue`. See
/// [`define_static_key_false!`].
#[macro_export]
macro_rules! define_static_key_true {
    ($(#[$attr:meta])* $vis:vis $name:ident) => {
        $crate::__define_static_key!($(#[$attr])* $vis $name, StaticKeyTrue);
    };
}

#[doc(hidden)]
#[macro_export]
macro_rules! __define_static_key {
    ($(#[$attr:meta])* $vis:vis $name:ident, $ty:ident) => {
        $(#[$attr])*
        $vis static $name: $crate::keys::$ty = $crate::keys::$ty::__new($crate::keys::__private::name(
            ::core::concat!(::core::module_path!(), "::", ::core::stringify!($name), "\0"),
        ));

        // The key's record (type 2; see the keys module docs). Emitted by an
        // `asm!` in a function kept by a `#[used]` static rather than by
        // `global_asm!`, so that keys can be defined in function bodies too.
        const _: () = {
            #[used]
            static RECORD: fn() = record;
            fn record() {
                // SAFETY: the block emits data into `.note.textpoke` and no
                // instruction; the function is never called.
                unsafe {
                    ::core::arch::asm!(
                        ".pushsection .note.textpoke,\"aR\",@note",
                        ".balign 4",
                        ".long 9, 8, 2",
                        ".asciz \"textpoke\"",
                        ".balign 4",
                        // Not `0:`: in Intel syntax `0b` reads as a binary number.
                        "2:",
                        ".long {key} - 2b",
                        ".long 0",
                        ".popsection",
                        key = sym $name,
                        options(nomem, nostack, preserves_flags),
                    )
                }
            }
        };
    };
}

/// A branch that is expected not to be taken: `true` while the key is
/// enabled. When the key is disabled it costs one 5-byte NOP.
///
/// ```
/// textpoke::define_static_key_false!(SLOW);
/// fn f(x: u64) -> u64 {
///     if textpoke::static_branch_unlikely!(SLOW) { x * 2 } else { x }
/// }
/// assert_eq!(f(3), 3);
/// SLOW.inc()?;
/// assert_eq!(f(3), 6);
/// SLOW.dec()?;
/// assert_eq!(f(3), 3);
/// # Ok::<(), textpoke::keys::KeyError>(())
/// ```
///
/// The argument is a path to a static defined by [`define_static_key_false!`]
/// or [`define_static_key_true!`]; anything else does not compile.
#[macro_export]
macro_rules! static_branch_unlikely {
    ($key:path) => {
        $crate::__static_branch!($key, false)
    };
}

/// A branch that is expected to be taken: `true` while the key is enabled.
/// When the key is enabled its site is a NOP and the branch's body
/// follows it; when disabled, the site jumps around the body.
#[macro_export]
macro_rules! static_branch_likely {
    ($key:path) => {
        $crate::__static_branch!($key, true)
    };
}

#[doc(hidden)]
#[macro_export]
macro_rules! __static_branch {
    ($key:path, $likely:literal) => {{
        let jumped: bool = 'textpoke_site: {
            // SAFETY: the block executes one 5-byte NOP or `jmp {yes}`, reads
            // and writes no register, no memory and no flags, and never uses
            // the stack (the keys layer only ever patches it to the other of
            // the two, and its trap handler emulates exactly that); the
            // record in `.note.textpoke` describes this site, its label and
            // its key, at offsets the linker resolves.
            #[cfg(target_arch = "x86_64")]
            unsafe {
                ::core::arch::asm!(
                    "2:",
                    ".if {init}",
                    ".byte 0xe9",
                    ".long {yes} - 2b - 5",
                    ".else",
                    ".byte 0x0f, 0x1f, 0x44, 0x00, 0x00",
                    ".endif",
                    ".pushsection .note.textpoke,\"a?R\",@note",
                    ".balign 4",
                    ".long 9, 16, 1",
                    ".asciz \"textpoke\"",
                    ".balign 4",
                    "3:",
                    ".long 2b - 3b",
                    ".long {yes} - 3b - 4",
                    ".long {key} - 3b - 8",
                    ".long {flags}",
                    ".popsection",
                    init = const $crate::keys::__private::site_init_jmp(&$key, $likely),
                    flags = const $crate::keys::__private::site_flags(&$key, $likely),
                    key = sym $key,
                    yes = label { break 'textpoke_site true },
                    options(readonly, nostack, preserves_flags),
                );
            }
            // SAFETY (aarch64: the kernel's arm64 jump_label): one `nop` or
            // `b {yes}`, swapped only with each other (Arm ARM: concurrent
            // modification of B and NOP is allowed, so no trap is needed);
            // reads and writes no register, no memory and no flags, never
            // uses the stack; the record as above.
            #[cfg(target_arch = "aarch64")]
            unsafe {
                ::core::arch::asm!(
                    "2:",
                    ".if {init}",
                    "b {yes}",
                    ".else",
                    "nop",
                    ".endif",
                    ".pushsection .note.textpoke,\"a?R\",%note",
                    ".balign 4",
                    ".long 9, 16, 1",
                    ".asciz \"textpoke\"",
                    ".balign 4",
                    "3:",
                    ".long 2b - 3b",
                    ".long {yes} - 3b - 4",
                    ".long {key} - 3b - 8",
                    ".long {flags}",
                    ".popsection",
                    init = const $crate::keys::__private::site_init_jmp(&$key, $likely),
                    flags = const $crate::keys::__private::site_flags(&$key, $likely),
                    key = sym $key,
                    yes = label { break 'textpoke_site true },
                    options(readonly, nostack, preserves_flags),
                );
            }
            false
        };
        jumped != $likely
    }};
}
