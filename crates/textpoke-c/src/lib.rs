//! The C API of textpoke: the functions `include/textpoke.h` declares,
//! exported from a static library (`libtextpoke_c.a`) and a shared library
//! (`libtextpoke_c.so`).
//!
//! # Keys
//!
//! The header's macros define keys (`struct textpoke_static_key`, the layout
//! of [`textpoke::keys::StaticKey`]) and branch sites with the records of
//! [`textpoke::keys`]; these functions flip and list them through that
//! module, so C and Rust keys live in one registry and one batch can hold
//! both.
//!
//! # Errors
//!
//! Every function returns 0 or a negative `enum textpoke_status`, and keeps
//! the error's message in a thread-local buffer that
//! [`textpoke_last_error`] returns. A panic never crosses into C: it is
//! caught and reported as `TEXTPOKE_EINTERNAL`.

use std::cell::RefCell;
use std::ffi::{c_char, c_int, c_void, CStr, CString};
use std::panic::{catch_unwind, AssertUnwindSafe};

use textpoke::keys::{self, KeyError, StaticKey, Update};

pub const TEXTPOKE_OK: c_int = 0;
pub const TEXTPOKE_EMISUSE: c_int = -1;
pub const TEXTPOKE_ENOTFOUND: c_int = -2;
pub const TEXTPOKE_EAMBIGUOUS: c_int = -3;
pub const TEXTPOKE_EPATCH: c_int = -4;
pub const TEXTPOKE_EAGAIN: c_int = -5;
pub const TEXTPOKE_EBROKEN: c_int = -6;
pub const TEXTPOKE_EINVAL: c_int = -7;
pub const TEXTPOKE_EINTERNAL: c_int = -8;

thread_local! {
    static LAST_ERROR: RefCell<CString> = RefCell::new(CString::default());
}

fn set_error(msg: &str) {
    let c = CString::new(msg.replace('\0', "\\0")).expect("NULs replaced");
    LAST_ERROR.with(|e| *e.borrow_mut() = c);
}

/// The status of a key error.
pub fn status_of(e: &KeyError) -> c_int {
    match e {
        KeyError::Underflow { .. }
        | KeyError::Overflow { .. }
        | KeyError::Shared { .. }
        | KeyError::Duplicate { .. } => TEXTPOKE_EMISUSE,
        KeyError::NotFound { .. } | KeyError::Unregistered { .. } => TEXTPOKE_ENOTFOUND,
        KeyError::Ambiguous { .. } => TEXTPOKE_EAMBIGUOUS,
        KeyError::Patch { .. } => TEXTPOKE_EPATCH,
        KeyError::Unsettled { .. } => TEXTPOKE_EAGAIN,
        KeyError::BadObject { .. } | KeyError::Poisoned { .. } => TEXTPOKE_EBROKEN,
        _ => TEXTPOKE_EINTERNAL,
    }
}

/// Runs `f`, turning its error or a panic into a status and a message.
fn guarded(f: impl FnOnce() -> Result<c_int, (c_int, String)>) -> c_int {
    match catch_unwind(AssertUnwindSafe(f)) {
        Ok(Ok(n)) => {
            set_error("");
            n
        }
        Ok(Err((status, msg))) => {
            set_error(&msg);
            status
        }
        Err(p) => {
            let what = p
                .downcast_ref::<&str>()
                .map(|s| s.to_string())
                .or_else(|| p.downcast_ref::<String>().cloned())
                .unwrap_or_else(|| "unknown panic".into());
            set_error(&format!("internal error in textpoke: {what}"));
            TEXTPOKE_EINTERNAL
        }
    }
}

fn key_op(key: *mut StaticKey, op: impl FnOnce(&StaticKey) -> Result<(), KeyError>) -> c_int {
    guarded(|| {
        if key.is_null() {
            return Err((TEXTPOKE_EINVAL, "NULL key".into()));
        }
        // SAFETY: the header's macros pass `&k->key` of a key defined with
        // TEXTPOKE_DEFINE_STATIC_KEY_*, which has this layout (repr(C)); the
        // caller's object is loaded while it calls.
        let key = unsafe { &*key };
        op(key).map(|()| TEXTPOKE_OK).map_err(|e| (status_of(&e), e.to_string()))
    })
}

/// Enables a key (count 0 → 1); see textpoke.h.
///
/// # Safety
///
/// `key` is NULL or points to a key defined with the header's macros, in an
/// object that stays loaded during the call.
#[no_mangle]
pub unsafe extern "C" fn textpoke_key_enable(key: *mut StaticKey) -> c_int {
    key_op(key, StaticKey::enable)
}

/// Disables a key (count 1 → 0); see textpoke.h.
///
/// # Safety
///
/// As [`textpoke_key_enable`].
#[no_mangle]
pub unsafe extern "C" fn textpoke_key_disable(key: *mut StaticKey) -> c_int {
    key_op(key, StaticKey::disable)
}

/// Takes a reference on a key; see textpoke.h.
///
/// # Safety
///
/// As [`textpoke_key_enable`].
#[no_mangle]
pub unsafe extern "C" fn textpoke_key_inc(key: *mut StaticKey) -> c_int {
    key_op(key, StaticKey::inc)
}

/// Drops a reference on a key; see textpoke.h.
///
/// # Safety
///
/// As [`textpoke_key_enable`].
#[no_mangle]
pub unsafe extern "C" fn textpoke_key_dec(key: *mut StaticKey) -> c_int {
    key_op(key, StaticKey::dec)
}

/// Enables or disables the key of this exact name; see textpoke.h.
///
/// # Safety
///
/// `name` is NULL or a NUL-terminated string.
#[no_mangle]
pub unsafe extern "C" fn textpoke_key_set_by_name(name: *const c_char, enabled: c_int) -> c_int {
    guarded(|| {
        if name.is_null() {
            return Err((TEXTPOKE_EINVAL, "NULL key name".into()));
        }
        // SAFETY: the caller passes a NUL-terminated string.
        let name = unsafe { CStr::from_ptr(name) };
        let name = name.to_str().map_err(|_| (TEXTPOKE_EINVAL, format!("key name {name:?} is not UTF-8")))?;
        Update::new()
            .set_named(name, enabled != 0)
            .commit()
            .map(|_| TEXTPOKE_OK)
            .map_err(|e| (status_of(&e), e.to_string()))
    })
}

/// `struct textpoke_key_info`.
#[repr(C)]
pub struct KeyInfoC {
    pub name: *const c_char,
    pub object: *const c_char,
    pub addr: usize,
    pub enabled: c_int,
    pub count: i32,
    pub default_enabled: c_int,
    pub sites: usize,
    pub problem: *const c_char,
}

/// Calls `f` for every key of the process; see textpoke.h.
///
/// # Safety
///
/// `f` is a valid function pointer (or NULL, then only counts); `arg` is
/// passed through.
#[no_mangle]
pub unsafe extern "C" fn textpoke_keys_foreach(
    f: Option<unsafe extern "C" fn(*const KeyInfoC, *mut c_void) -> c_int>,
    arg: *mut c_void,
) -> c_int {
    guarded(|| {
        let all = keys::list().map_err(|e| (status_of(&e), e.to_string()))?;
        let mut visited = 0;
        let c = |s: &str| CString::new(s.replace('\0', "\\0")).expect("NULs replaced");
        for k in &all {
            visited += 1;
            let Some(f) = f else { continue };
            let name = c(&k.name);
            let object = c(&k.object.to_string_lossy());
            let problem = k.problem.as_deref().map(c);
            let info = KeyInfoC {
                name: name.as_ptr(),
                object: object.as_ptr(),
                addr: k.addr,
                enabled: k.enabled as c_int,
                count: k.count,
                default_enabled: k.default_enabled as c_int,
                sites: k.sites,
                problem: problem.as_ref().map_or(std::ptr::null(), |p| p.as_ptr()),
            };
            // SAFETY: the caller's callback, with an info valid for the call.
            if unsafe { f(&info, arg) } != 0 {
                break;
            }
        }
        Ok(visited.min(c_int::MAX as usize) as c_int)
    })
}

/// The last error message of this thread; see textpoke.h.
#[no_mangle]
pub extern "C" fn textpoke_last_error() -> *const c_char {
    // The CString lives in the thread-local until the next call replaces it.
    LAST_ERROR.with(|e| e.borrow().as_ptr())
}
