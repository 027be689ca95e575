//! The `livepatch!` macro (exported at the crate root): a Rust patch's
//! records, the same `.note.textpoke` notes as the C header's macros
//! (format in `live::notes`), emitted by `global_asm!` with `sym` operands.
//!
//! Every record is PC-relative (`.long X - 2b - 4*i`: the field's own
//! address subtracted); strings go to a mergeable read-only section; an
//! optional string is emitted between `.ifnb`/`.endif`, its field being 0
//! otherwise. Labels are numeric (2 to 5) and never 0 or 1: in Intel
//! syntax `0b`/`1b` read as binary numbers.

/// Declares what a Rust patch (a `cdylib`) replaces: the records
/// `textpoke patch` and [`live::object::load`](crate::live::object::load)
/// read.
///
/// ```ignore
/// textpoke::livepatch! {
///     name = "fix-1234",                  // optional: the patch's name
///     replace = true,                     // optional: atomic replace
///     object = "libfoo.so.1",             // optional, for the items after it; default: the executable
///     build_id = "3f2a…",                 // optional: the current object's GNU build-id (refused if different)
///     api = LP,                           // optional: `static LP: ApiSlot` (shadow variables)
///     symbol COUNTER = "counter",         // `static COUNTER: SymbolSlot`: the target's address
///     symbol CACHE = "cache" in "parse.c",
///     "outer" => outer_v2,                // target symbol (as in the target's .symtab) => replacement
///     "helper" in "parse.c" => helper_v2, // a local symbol, by its STT_FILE
///     "helper" @ 2 => helper_v2,          // or by position among same-named symbols (1-based)
///     pre_patch = pre, post_patch = post, pre_unpatch = pre_u, post_unpatch = post_u,
/// }
/// ```
///
/// Items are separated by commas, in any order, except that `object =`
/// applies to the items after it. Replacements and callbacks must be
/// functions of the patch that are **not exported** (no `#[no_mangle]`):
/// the records reach them PC-relatively, which a preemptible symbol of a
/// shared object does not allow (the link fails with "relocation
/// R_X86_64_PC32 cannot be used against symbol"). A replacement has exactly
/// the target's signature; pre-callbacks are
/// `extern "C" fn() -> c_int` (non-zero cancels), post-callbacks
/// `extern "C" fn()`. A target with the Rust ABI (a Rust-mangled name) is
/// accepted only if the patch and the target were built by the same rustc
/// (the loader compares the two files' `.comment`); `extern "C"` targets
/// are not checked. Use the slot statics only after the patch was loaded
/// (from the pre-patch callback on): before, they are empty.
#[macro_export]
macro_rules! livepatch {
    ($($body:tt)*) => {
        $crate::__lp_patch!($crate::live::notes::PATCH_RUST, []);
        $crate::__lp_items! { [] $($body)* }
    };
}

#[doc(hidden)]
#[macro_export]
macro_rules! __lp_items {
    ([$($obj:literal)?]) => {};
    ([$($obj:literal)?] , $($rest:tt)*) => { $crate::__lp_items! { [$($obj)?] $($rest)* } };
    ([$($obj:literal)?] object = $o:literal $(, $($rest:tt)*)?) => {
        $crate::__lp_items! { [$o] $($($rest)*)? }
    };
    ([$($obj:literal)?] build_id = $b:literal $(, $($rest:tt)*)?) => {
        $crate::__lp_object!([$($obj)?] $b);
        $crate::__lp_items! { [$($obj)?] $($($rest)*)? }
    };
    ([$($obj:literal)?] replace = true $(, $($rest:tt)*)?) => {
        $crate::__lp_patch!($crate::live::notes::PATCH_RUST | $crate::live::notes::PATCH_REPLACE, []);
        $crate::__lp_items! { [$($obj)?] $($($rest)*)? }
    };
    ([$($obj:literal)?] replace = false $(, $($rest:tt)*)?) => {
        $crate::__lp_items! { [$($obj)?] $($($rest)*)? }
    };
    ([$($obj:literal)?] name = $n:literal $(, $($rest:tt)*)?) => {
        $crate::__lp_patch!($crate::live::notes::PATCH_RUST, [$n]);
        $crate::__lp_items! { [$($obj)?] $($($rest)*)? }
    };
    ([$($obj:literal)?] api = $vis:vis $slot:ident $(, $($rest:tt)*)?) => {
        $vis static $slot: $crate::live::shadow::ApiSlot = $crate::live::shadow::ApiSlot::new();
        $crate::__lp_symbol!($slot, 3, [], [], 0, []);
        $crate::__lp_items! { [$($obj)?] $($($rest)*)? }
    };
    ([$($obj:literal)?] symbol $vis:vis $slot:ident = $t:literal $(in $file:literal)? $(@ $pos:literal)?
        $(, $($rest:tt)*)?) => {
        $vis static $slot: $crate::live::shadow::SymbolSlot = $crate::live::shadow::SymbolSlot::new();
        $crate::__lp_symbol!($slot, 1, [$t], [$($file)?], 0 $(+ $pos)?, [$($obj)?]);
        $crate::__lp_items! { [$($obj)?] $($($rest)*)? }
    };
    ([$($obj:literal)?] pre_patch = $f:path $(, $($rest:tt)*)?) => {
        $crate::__lp_callback!(1, $f, $crate::live::PreCallback);
        $crate::__lp_items! { [$($obj)?] $($($rest)*)? }
    };
    ([$($obj:literal)?] post_patch = $f:path $(, $($rest:tt)*)?) => {
        $crate::__lp_callback!(2, $f, $crate::live::PostCallback);
        $crate::__lp_items! { [$($obj)?] $($($rest)*)? }
    };
    ([$($obj:literal)?] pre_unpatch = $f:path $(, $($rest:tt)*)?) => {
        $crate::__lp_callback!(3, $f, $crate::live::PreCallback);
        $crate::__lp_items! { [$($obj)?] $($($rest)*)? }
    };
    ([$($obj:literal)?] post_unpatch = $f:path $(, $($rest:tt)*)?) => {
        $crate::__lp_callback!(4, $f, $crate::live::PostCallback);
        $crate::__lp_items! { [$($obj)?] $($($rest)*)? }
    };
    ([$($obj:literal)?] $t:literal $(in $file:literal)? $(@ $pos:literal)? => $repl:path $(, $($rest:tt)*)?) => {
        $crate::__lp_func!($t, $repl, [$($file)?], 0 $(+ $pos)?, [$($obj)?]);
        $crate::__lp_items! { [$($obj)?] $($($rest)*)? }
    };
}

/// The header of a textpoke note of type `$ty` with `$size` descriptor
/// bytes, then label 2 at the descriptor.
#[doc(hidden)]
#[macro_export]
macro_rules! __lp_note_head {
    ($ty:literal, $size:literal) => {
        concat!(
            ".pushsection .note.textpoke,\"aR\",%note\n",
            ".balign 4\n",
            ".long 9, ",
            $size,
            ", ",
            $ty,
            "\n",
            ".asciz \"textpoke\"\n",
            ".balign 4\n",
            "2:\n"
        )
    };
}

/// An optional string field at descriptor offset `$at` pointing to label
/// `$label` (emitted by `__lp_opt_string`), or 0.
#[doc(hidden)]
#[macro_export]
macro_rules! __lp_opt_field {
    ($label:literal, $at:literal, [$($s:literal)?]) => {
        concat!(".ifnb ", $($s,)? "\n.long ", $label, "f - 2b - ", $at, "\n.else\n.long 0\n.endif\n")
    };
}

/// The optional string at label `$label`, in the string section.
#[doc(hidden)]
#[macro_export]
macro_rules! __lp_opt_string {
    ($label:literal, [$($s:literal)?]) => {
        concat!(".ifnb ", $($s,)? "\n", $label, ":\n.asciz \"", $($s,)? "\"\n.endif\n")
    };
}

#[doc(hidden)]
#[macro_export]
macro_rules! __lp_strings_start {
    () => {
        ".popsection\n.pushsection .rodata.textpoke.lp,\"aMS\",%progbits,1\n"
    };
}

#[doc(hidden)]
#[macro_export]
macro_rules! __lp_patch {
    ($flags:expr, [$($name:literal)?]) => {
        ::core::arch::global_asm!(
            concat!(
                $crate::__lp_note_head!(6, 16),
                ".long 1\n",
                ".long {flags}\n",
                $crate::__lp_opt_field!(3, 8, [$($name)?]),
                ".long 0\n",
                $crate::__lp_strings_start!(),
                $crate::__lp_opt_string!(3, [$($name)?]),
                ".popsection\n"
            ),
            flags = const $flags,
        );
    };
}

#[doc(hidden)]
#[macro_export]
macro_rules! __lp_object {
    ([$($obj:literal)?] $build_id:literal) => {
        ::core::arch::global_asm!(concat!(
            $crate::__lp_note_head!(4, 12),
            $crate::__lp_opt_field!(5, 0, [$($obj)?]),
            ".long 3f - 2b - 4\n",
            ".long 0\n",
            $crate::__lp_strings_start!(),
            "3:\n.asciz \"",
            $build_id,
            "\"\n",
            $crate::__lp_opt_string!(5, [$($obj)?]),
            ".popsection\n"
        ));
    };
}

#[doc(hidden)]
#[macro_export]
macro_rules! __lp_func {
    ($t:literal, $repl:path, [$($file:literal)?], $pos:expr, [$($obj:literal)?]) => {
        ::core::arch::global_asm!(
            concat!(
                $crate::__lp_note_head!(3, 24),
                ".long 3f - 2b\n",
                ".long {repl} - 2b - 4\n",
                $crate::__lp_opt_field!(4, 8, [$($file)?]),
                ".long {pos}\n",
                $crate::__lp_opt_field!(5, 16, [$($obj)?]),
                ".long 0\n",
                $crate::__lp_strings_start!(),
                "3:\n.asciz \"",
                $t,
                "\"\n",
                $crate::__lp_opt_string!(4, [$($file)?]),
                $crate::__lp_opt_string!(5, [$($obj)?]),
                ".popsection\n"
            ),
            repl = sym $repl,
            pos = const $pos,
        );
    };
}

#[doc(hidden)]
#[macro_export]
macro_rules! __lp_symbol {
    ($slot:ident, $kind:literal, [$($t:literal)?], [$($file:literal)?], $pos:expr, [$($obj:literal)?]) => {
        ::core::arch::global_asm!(
            concat!(
                $crate::__lp_note_head!(7, 24),
                ".long {slot} - 2b\n",
                $crate::__lp_opt_field!(3, 4, [$($t)?]),
                $crate::__lp_opt_field!(4, 8, [$($file)?]),
                ".long {pos}\n",
                $crate::__lp_opt_field!(5, 16, [$($obj)?]),
                ".long ",
                $kind,
                "\n",
                $crate::__lp_strings_start!(),
                $crate::__lp_opt_string!(3, [$($t)?]),
                $crate::__lp_opt_string!(4, [$($file)?]),
                $crate::__lp_opt_string!(5, [$($obj)?]),
                ".popsection\n"
            ),
            slot = sym $slot,
            pos = const $pos,
        );
    };
}

#[doc(hidden)]
#[macro_export]
macro_rules! __lp_callback {
    ($kind:literal, $f:path, $ty:ty) => {
        const _: $ty = $f; // the callback's signature
        ::core::arch::global_asm!(
            concat!($crate::__lp_note_head!(5, 8), ".long ", $kind, "\n", ".long {f} - 2b - 4\n", ".popsection\n"),
            f = sym $f,
        );
    };
}
