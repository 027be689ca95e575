//! `#[textpoke::traced]`: entry and exit sites for textpoke's function
//! tracer, on stable Rust.
//!
//! Use it through the `textpoke` crate, which re-exports it:
//!
//! ```ignore
//! #[textpoke::traced]
//! fn parse(input: &str) -> Result<Ast, Error> { ... }
//!
//! #[textpoke::traced]            // every method of the block
//! impl Parser {
//!     fn next(&mut self) -> Token { ... }
//!     #[traced(skip)]
//!     fn peek(&self) -> &Token { ... }
//!     #[traced(name = "parser::expr")]
//!     fn expr(&mut self) -> Expr { ... }
//! }
//! ```
//!
//! # What it does
//!
//! The function's body is made to start with an **entry site**, and a drop
//! guard is created whose `Drop` runs an **exit site**, so that every call
//! executes one entry site and, when it returns *or a panic unwinds through
//! it*, one exit site. A site is a 5-byte NOP (`0f 1f 44 00 00`) that the
//! tracer turns into a `call` of a trampoline while the program runs
//! (aarch64: one `nop`, swapped with a `b` to a stub that saves what it
//! uses): disabled, a traced function costs the two NOPs.
//!
//! ```ignore
//! fn f(args) -> R {
//!     let __textpoke_exit = {
//!         static FUNCTION: textpoke::sites::MarkedFunction =
//!             MarkedFunction::__new(concat!(module_path!(), "::f"));
//!         struct Exit;
//!         impl Drop for Exit {
//!             #[inline(always)]
//!             fn drop(&mut self) { textpoke::__traced_site!(1, FUNCTION) } // exit site
//!         }
//!         textpoke::__traced_site!(0, FUNCTION);                          // entry site
//!         Exit
//!     };
//!     body
//! }
//! ```
//!
//! The items are hidden in a block, so nothing the attribute adds can clash
//! with a name of the body.
//!
//! # Record layout
//!
//! Each site leaves one 12-byte record in the section `textpoke_sites`
//! (`.pushsection textpoke_sites,"aR",@progbits`: allocated, read-only,
//! `SHF_GNU_RETAIN` so that `--gc-sections` keeps it; 4-byte aligned):
//!
//! ```text
//!  offset size
//!   0     i32   site      address of the NOP (5 bytes; aarch64: 4) - address of this field
//!   4     i32   function  address of the MarkedFunction static - address of this field
//!   8     u8    kind      0 = entry, 1 = exit
//!   9     u8    version   1
//!  10     u16   reserved  0
//! ```
//!
//! Both offsets are resolved by the static linker: no dynamic relocation, in
//! a PIE or a shared library alike. The descriptor (`#[repr(C)]`: `u32`
//! magic `"TPfn"`, `u32` version 1, name pointer, name length) holds the
//! function's name. `textpoke::sites::marked` documents the format and
//! reads it back; the `asm!` block is `textpoke::__traced_site!`.
//!
//! # Names
//!
//! - a function: `module_path!()::name`;
//! - a method, with the attribute on the method: also
//!   `module_path!()::name` (an attribute on a method cannot see its
//!   `impl`); put the attribute on the `impl` block to get
//!   `module_path!()::Type::name`, or `module_path!()::<Type as Trait>::name`
//!   for a trait impl;
//! - `#[traced(name = "...")]` gives the name exactly.
//!
//! # Inlining
//!
//! The attribute does not change inlining: a traced function without an
//! `#[inline]` attribute is inlined or not as the compiler decides, as it
//! would be untraced. An inlined copy carries a copy of both sites (the
//! `asm!` uses a numeric local label, so copies assemble), recorded with the
//! same descriptor: the tracer sees every call either way. Write
//! `#[inline(never)]` to have exactly one site pair per function (per
//! monomorphization for a generic function).
//!
//! # Refused
//!
//! `const fn` (its body may run at compile time), `async fn` (its body runs
//! in polls of a future, not in a call: trace a function it calls), naked
//! functions, and functions without a body.
//!
//! # Options
//!
//! `#[traced(name = "...", crate = path)]`: the name to record; the path of
//! the textpoke crate if it is not `::textpoke`. Inside a traced `impl`
//! block, `#[traced(skip)]` leaves a method untraced and
//! `#[traced(name = "...")]` names one.

use proc_macro::TokenStream;
use proc_macro2::{Span, TokenStream as TokenStream2};
use quote::{quote, quote_spanned, ToTokens};
use syn::ext::IdentExt;
use syn::parse::Parser;
use syn::spanned::Spanned;
use syn::{Attribute, Block, Error, ImplItem, Item, ItemImpl, LitStr, Path, Signature};

/// Marks a function (or every method of an `impl` block) for textpoke's
/// function tracer: an entry site at the start of the body and an exit site
/// run by a drop guard. See the crate docs.
#[proc_macro_attribute]
pub fn traced(attr: TokenStream, item: TokenStream) -> TokenStream {
    match expand(attr.into(), item.into()) {
        Ok(tokens) => tokens.into(),
        Err(e) => e.to_compile_error().into(),
    }
}

/// Options given in `#[traced(...)]`.
#[derive(Default)]
struct Options {
    name: Option<LitStr>,
    krate: Option<Path>,
    skip: Option<Span>,
}

impl Options {
    fn parse(tokens: TokenStream2) -> syn::Result<Options> {
        let mut opts = Options::default();
        let parser = syn::meta::parser(|meta| {
            if meta.path.is_ident("name") {
                opts.name = Some(meta.value()?.parse()?);
            } else if meta.path.is_ident("crate") {
                opts.krate = Some(meta.value()?.parse()?);
            } else if meta.path.is_ident("skip") {
                opts.skip = Some(meta.path.span());
            } else {
                return Err(meta.error("unknown option: expected `name = \"...\"`, `crate = path` or `skip`"));
            }
            Ok(())
        });
        parser.parse2(tokens)?;
        Ok(opts)
    }
}

fn expand(attr: TokenStream2, item: TokenStream2) -> syn::Result<TokenStream2> {
    let opts = Options::parse(attr)?;
    if let Some(span) = opts.skip {
        return Err(Error::new(span, "`skip` is for a method inside an `impl` block marked with #[traced]"));
    }
    let krate = opts.krate.clone().map(ToTokens::into_token_stream).unwrap_or_else(|| quote!(::textpoke));
    let item: Item = syn::parse2(item)?;
    match item {
        Item::Fn(mut f) => {
            let name = match &opts.name {
                Some(lit) => quote!(#lit),
                None => {
                    let ident = f.sig.ident.unraw().to_string();
                    quote!(::core::concat!(::core::module_path!(), "::", #ident))
                }
            };
            rewrite(&f.sig, &f.attrs, &mut f.block, name, &krate)?;
            Ok(f.into_token_stream())
        }
        Item::Impl(mut imp) => {
            if let Some(lit) = &opts.name {
                return Err(Error::new(lit.span(), "`name` is for one function; on an `impl` block name each method"));
            }
            rewrite_impl(&mut imp, &krate)?;
            Ok(imp.into_token_stream())
        }
        Item::Verbatim(tokens) => {
            Err(Error::new_spanned(tokens, "#[traced] needs a function with a body (or an `impl` block)"))
        }
        other => Err(Error::new_spanned(other, "#[traced] applies to a function with a body or to an `impl` block")),
    }
}

/// Trace every method of an `impl` block, taking per-method options from
/// `#[traced(...)]` attributes on the methods (which are removed).
fn rewrite_impl(imp: &mut ItemImpl, krate: &TokenStream2) -> syn::Result<()> {
    let self_ty = tokens_to_name(imp.self_ty.to_token_stream());
    let prefix = match &imp.trait_ {
        Some((bang, path, _)) => {
            let bang = if bang.is_some() { "!" } else { "" };
            format!("<{self_ty} as {bang}{}>::", tokens_to_name(path.to_token_stream()))
        }
        None => format!("{self_ty}::"),
    };
    let mut errors: Option<Error> = None;
    for item in &mut imp.items {
        let ImplItem::Fn(method) = item else {
            continue;
        };
        let mut opts = Options::default();
        let mut kept = Vec::with_capacity(method.attrs.len());
        for attr in method.attrs.drain(..) {
            if is_traced_attr(&attr) {
                let tokens = match &attr.meta {
                    syn::Meta::Path(_) => TokenStream2::new(),
                    syn::Meta::List(list) => list.tokens.clone(),
                    syn::Meta::NameValue(nv) => {
                        push_error(&mut errors, Error::new_spanned(nv, "expected #[traced] or #[traced(...)]"));
                        continue;
                    }
                };
                match Options::parse(tokens) {
                    Ok(o) => opts = o,
                    Err(e) => push_error(&mut errors, e),
                }
            } else {
                kept.push(attr);
            }
        }
        method.attrs = kept;
        if opts.skip.is_some() {
            continue;
        }
        if let Some(path) = &opts.krate {
            push_error(&mut errors, Error::new_spanned(path, "give `crate = ...` on the `impl` block"));
        }
        let name = match &opts.name {
            Some(lit) => quote!(#lit),
            None => {
                let full = format!("{prefix}{}", method.sig.ident.unraw());
                quote!(::core::concat!(::core::module_path!(), "::", #full))
            }
        };
        if let Err(e) = rewrite(&method.sig, &method.attrs, &mut method.block, name, krate) {
            push_error(&mut errors, e);
        }
    }
    match errors {
        Some(e) => Err(e),
        None => Ok(()),
    }
}

fn push_error(errors: &mut Option<Error>, e: Error) {
    match errors {
        Some(all) => all.combine(e),
        None => *errors = Some(e),
    }
}

/// Whether `attr` is `#[traced]`, `#[traced(...)]` or a path ending in
/// `traced` (`#[textpoke::traced]`).
fn is_traced_attr(attr: &Attribute) -> bool {
    attr.path().segments.last().is_some_and(|s| s.ident == "traced")
}

/// Refuse what cannot be traced.
fn check(sig: &Signature, attrs: &[Attribute]) -> syn::Result<()> {
    if let Some(c) = &sig.constness {
        return Err(Error::new(
            c.span(),
            "#[traced] cannot trace a `const fn`: its body may run at compile time, where there is no site to patch",
        ));
    }
    if let Some(a) = &sig.asyncness {
        return Err(Error::new(
            a.span(),
            "#[traced] does not support `async fn`: its body runs in polls of a future, not in one call; \
             trace the functions it calls, or a non-async function that returns the future",
        ));
    }
    for attr in attrs {
        let naked = attr.path().is_ident("naked")
            || (attr.path().is_ident("unsafe")
                && matches!(&attr.meta, syn::Meta::List(l) if l.tokens.to_string().trim() == "naked"));
        if naked {
            return Err(Error::new_spanned(attr, "#[traced] cannot trace a naked function: it has no Rust body"));
        }
    }
    Ok(())
}

/// Put the entry site and the exit guard at the start of `block`.
fn rewrite(
    sig: &Signature,
    attrs: &[Attribute],
    block: &mut Block,
    name: TokenStream2,
    krate: &TokenStream2,
) -> syn::Result<()> {
    check(sig, attrs)?;
    // Spans: the added code points at the function's name in messages; the
    // guard's binding is hygienic (mixed site), so the body cannot see it.
    let span = sig.ident.span();
    let guard = syn::Ident::new("__textpoke_exit", Span::mixed_site());
    // The added code is the attribute's, not the user's: no lint of theirs
    // should fire on it (`inline_always`, `missing_docs_in_private_items`...).
    let prologue: TokenStream2 = quote_spanned! {span=>
        #[allow(clippy::all, clippy::pedantic, clippy::nursery, clippy::restriction)]
        let #guard = {
            #[allow(clippy::all, clippy::pedantic, clippy::nursery, clippy::restriction)]
            static __TEXTPOKE_FUNCTION: #krate::sites::MarkedFunction = #krate::sites::MarkedFunction::__new(#name);
            #[allow(clippy::all, clippy::pedantic, clippy::nursery, clippy::restriction)]
            struct __TextpokeExit;
            #[allow(clippy::all, clippy::pedantic, clippy::nursery, clippy::restriction)]
            impl ::core::ops::Drop for __TextpokeExit {
                #[inline(always)]
                fn drop(&mut self) {
                    #krate::__traced_site!(1, __TEXTPOKE_FUNCTION);
                }
            }
            #krate::__traced_site!(0, __TEXTPOKE_FUNCTION);
            __TextpokeExit
        };
    };
    let stmt: syn::Stmt = syn::parse2(prologue)?;
    block.stmts.insert(0, stmt);
    Ok(())
}

/// Source tokens as a compact name: spaces kept only between two
/// identifier characters (`Vec < u8 >` → `Vec<u8>`, `& 'a str` → `&'a str`).
fn tokens_to_name(tokens: TokenStream2) -> String {
    let text = tokens.to_string();
    let mut out = String::with_capacity(text.len());
    let chars: Vec<char> = text.chars().collect();
    for (i, &c) in chars.iter().enumerate() {
        if c == ' ' {
            let prev = out.chars().last();
            let next = chars.get(i + 1).copied();
            let word = |c: Option<char>| c.is_some_and(|c| c.is_alphanumeric() || c == '_' || c == '\'');
            if word(prev) && word(next) {
                out.push(' ');
            }
            // `dyn Trait` after `&`: `& dyn X` → `&dyn X`, fine.
        } else {
            out.push(c);
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn expand_str(attr: &str, item: &str) -> Result<String, String> {
        expand(attr.parse().unwrap(), item.parse().unwrap()).map(|t| t.to_string()).map_err(|e| e.to_string())
    }

    #[test]
    fn names() {
        assert_eq!(tokens_to_name(quote!(Vec<u8>)), "Vec<u8>");
        assert_eq!(tokens_to_name(quote!(&'a str)), "&'a str");
        assert_eq!(tokens_to_name(quote!(std::fmt::Display)), "std::fmt::Display");
    }

    #[test]
    fn refusals() {
        assert!(expand_str("", "const fn f() {}").unwrap_err().contains("const fn"));
        assert!(expand_str("", "async fn f() {}").unwrap_err().contains("async fn"));
        assert!(expand_str("", "struct S;").unwrap_err().contains("applies to a function"));
        assert!(expand_str("skip", "fn f() {}").unwrap_err().contains("skip"));
        assert!(expand_str("bogus", "fn f() {}").unwrap_err().contains("unknown option"));
        assert!(expand_str("", "#[unsafe(naked)] extern \"C\" fn f() {}").unwrap_err().contains("naked"));
    }

    #[test]
    fn impl_block_names_and_options() {
        let out = expand_str(
            "",
            "impl<T> Stack<T> { fn push(&mut self) {} #[traced(skip)] fn peek(&self) {} \
             #[traced(name = \"pop!\")] fn pop(&mut self) {} const fn len(&self) -> usize { 0 } }",
        );
        let err = out.unwrap_err();
        assert!(err.contains("const fn"), "{err}");
        let out =
            expand_str("", "impl<T> Stack<T> { fn push(&mut self) {} #[traced(skip)] fn peek(&self) {} }").unwrap();
        assert!(out.contains("\"Stack<T>::push\""), "{out}");
        assert_eq!(out.matches("__traced_site").count(), 2, "{out}");
        let out = expand_str("", "impl fmt::Display for Foo { fn fmt(&self) {} }").unwrap();
        assert!(out.contains("\"<Foo as fmt::Display>::fmt\""), "{out}");
        let out = expand_str("", "fn area(&self) -> f64 { self.0 }").unwrap();
        assert!(out.contains("\"area\""), "{out}");
        let err = expand_str("", "trait T { fn f(&self) {} }").unwrap_err();
        assert!(err.contains("applies to a function"), "{err}");
        let err = expand_str("", "fn f(&self);").unwrap_err();
        assert!(err.contains("needs a function with a body"), "{err}");
        let out = expand_str("crate = my::tp", "fn r#type() {}").unwrap();
        assert!(out.contains("\"type\"") && out.contains("my :: tp :: __traced_site"), "{out}");
    }
}
