//! `#[textpoke::traced]`: the sites it leaves are found by the sites layer
//! with the right names and kinds, and patching them into calls of a
//! counting trampoline counts every entry and exit exactly, from many
//! threads, without changing what the functions compute — also when a panic
//! unwinds through one.
//!
//! Every test takes one lock: a test that patches the sites would otherwise
//! change the bytes another test checks, or the counts it expects.

use std::collections::{BTreeMap, BTreeSet};
use std::fmt::Display;
use std::hint::black_box;
use std::path::Path;
#[cfg(target_arch = "x86_64")]
use std::path::PathBuf;
#[cfg(target_arch = "x86_64")]
use std::process::Command;
#[cfg(target_arch = "x86_64")]
use std::sync::atomic::{AtomicU64, Ordering};
#[cfg(target_arch = "x86_64")]
use std::sync::OnceLock;
use std::sync::{Mutex, MutexGuard};

#[cfg(target_arch = "x86_64")]
use textpoke::arch::{encode_call, NOP5};
use textpoke::sites::{
    scan_object, MarkedFunction, MarkedPoint, NopForm, RecordSource, Site, SiteKind, SiteTable, SkipReason,
};
#[cfg(target_arch = "x86_64")]
use textpoke::{Batch, Poke};

/// What a marked site holds: a 5-byte NOP (aarch64: one `nop`).
#[cfg(target_arch = "x86_64")]
const SITE_NOP: &[u8] = &NOP5;
#[cfg(target_arch = "aarch64")]
const SITE_NOP: &[u8] = &textpoke::arch::SITE_NOP;

mod common;

fn serial() -> MutexGuard<'static, ()> {
    static LOCK: Mutex<()> = Mutex::new(());
    LOCK.lock().unwrap_or_else(|e| e.into_inner())
}

// ---------------------------------------------------------------------------
// The traced functions, and untraced twins computing the same thing.

#[textpoke::traced]
#[inline(never)]
fn add(a: u64, b: u64) -> u64 {
    a.wrapping_mul(31) ^ b
}

fn add_plain(a: u64, b: u64) -> u64 {
    a.wrapping_mul(31) ^ b
}

/// Ten floating-point arguments (two on the stack) among integers.
#[textpoke::traced]
#[inline(never)]
#[allow(clippy::too_many_arguments)]
fn floats(a: f64, b: f32, c: u8, d: f64, e: i64, f: f32, g: f64, h: f64, i: f64, j: f64, k: f32, l: f64) -> f64 {
    a * 1.5 + b as f64 - c as f64 * d + e as f64 / 3.0 + f as f64 * g - h + i * j / (k as f64 + 0.25) + l.sqrt()
}

#[allow(clippy::too_many_arguments)]
fn floats_plain(a: f64, b: f32, c: u8, d: f64, e: i64, f: f32, g: f64, h: f64, i: f64, j: f64, k: f32, l: f64) -> f64 {
    a * 1.5 + b as f64 - c as f64 * d + e as f64 / 3.0 + f as f64 * g - h + i * j / (k as f64 + 0.25) + l.sqrt()
}

/// Eleven integer arguments (five on the stack), a return value in memory.
#[textpoke::traced]
#[inline(never)]
#[allow(clippy::too_many_arguments)]
fn many(
    a: u64,
    b: i32,
    c: u8,
    d: u16,
    e: i64,
    f: u64,
    g: i128,
    h: u32,
    i: usize,
    j: i8,
    k: u64,
) -> (u64, i128, [u32; 3]) {
    let s = a ^ (b as u64) ^ (c as u64) << 8 ^ (d as u64) << 16 ^ (e as u64) ^ f.rotate_left(7);
    (s.wrapping_add(i as u64), g.wrapping_mul(h as i128) - j as i128, [h, c as u32 + d as u32, k as u32])
}

#[allow(clippy::too_many_arguments)]
fn many_plain(
    a: u64,
    b: i32,
    c: u8,
    d: u16,
    e: i64,
    f: u64,
    g: i128,
    h: u32,
    i: usize,
    j: i8,
    k: u64,
) -> (u64, i128, [u32; 3]) {
    let s = a ^ (b as u64) ^ (c as u64) << 8 ^ (d as u64) << 16 ^ (e as u64) ^ f.rotate_left(7);
    (s.wrapping_add(i as u64), g.wrapping_mul(h as i128) - j as i128, [h, c as u32 + d as u32, k as u32])
}

/// Each monomorphization is a site pair.
#[textpoke::traced]
#[inline(never)]
fn show<T: Display>(value: T) -> String {
    format!("<{value}>")
}

/// Inlined into its callers: each caller holds a copy of both sites.
#[textpoke::traced]
#[inline(always)]
fn triple(x: u64) -> u64 {
    x.wrapping_mul(3).wrapping_add(1)
}

#[inline(never)]
fn triple_caller_a(x: u64) -> u64 {
    triple(x) ^ 0xa
}

#[inline(never)]
fn triple_caller_b(x: u64) -> u64 {
    triple(x.rotate_left(1)) ^ 0xb
}

/// A leaf function with a buffer in memory, live across the sites of the
/// inlined `triple`. Were the sites `nostack`, the compiler could keep the
/// buffer in the red zone, where the site's call and the trampoline write:
/// with `options(nostack)` added to `__traced_site!`, the release build of
/// this test puts it at `-0x50(%rsp)` and the patched run fails here.
#[inline(never)]
fn red_zone_user(x: u64) -> u64 {
    let mut buf = [0u64; 12];
    for (i, b) in buf.iter_mut().enumerate() {
        *b = x.wrapping_add(i as u64);
    }
    black_box(&mut buf);
    let t = triple(x);
    black_box(&mut buf);
    buf.iter().fold(t, |a, b| a.wrapping_mul(3) ^ b)
}

fn red_zone_plain(x: u64) -> u64 {
    (0..12).fold(x.wrapping_mul(3).wrapping_add(1), |a, i| a.wrapping_mul(3) ^ x.wrapping_add(i))
}

/// Panics for 13: the exit site runs while unwinding.
#[textpoke::traced]
#[inline(never)]
fn checked(x: u64) -> u64 {
    if black_box(x) == 13 {
        panic!("unlucky {x}");
    }
    x + 1
}

struct Meter {
    total: u64,
}

impl Meter {
    /// The attribute on a method: named `module::method`.
    #[textpoke::traced]
    #[inline(never)]
    fn bump(&mut self, by: u64) -> u64 {
        self.total += by;
        self.total
    }
}

trait Area {
    fn area(&self) -> f64;

    /// A trait's default method.
    #[textpoke::traced]
    #[inline(never)]
    fn double_area(&self) -> f64 {
        self.area() * 2.0
    }
}

struct Rect(f64, f64);

/// The attribute on `impl` blocks: `module::Type::method` and
/// `module::<Type as Trait>::method`.
#[textpoke::traced]
impl Rect {
    #[inline(never)]
    fn scaled(&self, k: f64) -> Rect {
        Rect(self.0 * k, self.1 * k)
    }

    #[traced(skip)]
    #[allow(dead_code)]
    fn untraced(&self) -> f64 {
        self.0
    }
}

#[textpoke::traced]
impl Area for Rect {
    #[inline(never)]
    fn area(&self) -> f64 {
        self.0 * self.1
    }
}

/// The expected name of every traced function, and whether it may be
/// inlined (then its sites are in its callers).
const FUNCTIONS: &[(&str, bool)] = &[
    ("traced::add", false),
    ("traced::floats", false),
    ("traced::many", false),
    ("traced::show", false),
    ("traced::triple", true),
    ("traced::checked", false),
    ("traced::bump", false),
    ("traced::Rect::scaled", false),
    ("traced::<Rect as Area>::area", false),
    ("traced::double_area", false),
];

/// Call every traced function once (with inputs depending on `i`), checking
/// each result against its untraced twin. Returns how many times each
/// function was called.
fn call_all(i: u64, meter: &mut Meter) -> BTreeMap<&'static str, u64> {
    let x = black_box(i);
    assert_eq!(add(x, x + 7), add_plain(x, x + 7));

    let f = x as f64 * 0.37;
    let got = floats(f, 2.5, 3, f + 1.0, -(x as i64), 0.75, 1.0 / (f + 1.0), 8.0, f * f, 0.5, 1.25, f + 4.0);
    let want = floats_plain(f, 2.5, 3, f + 1.0, -(x as i64), 0.75, 1.0 / (f + 1.0), 8.0, f * f, 0.5, 1.25, f + 4.0);
    assert_eq!(got.to_bits(), want.to_bits(), "floats({i})");

    let got = many(x, -5, 7, 9000, -(x as i64) * 3, !x, -(x as i128) << 70, 77, 1 << 40, -3, u64::MAX - x);
    let want = many_plain(x, -5, 7, 9000, -(x as i64) * 3, !x, -(x as i128) << 70, 77, 1 << 40, -3, u64::MAX - x);
    assert_eq!(got, want, "many({i})");

    assert_eq!(show(x), format!("<{x}>"));
    assert_eq!(show("s"), "<s>");

    assert_eq!(triple_caller_a(x), (x * 3 + 1) ^ 0xa);
    assert_eq!(triple_caller_b(x), (x.rotate_left(1).wrapping_mul(3) + 1) ^ 0xb);
    assert_eq!(red_zone_user(x), red_zone_plain(x), "red_zone_user({i})");

    assert_eq!(checked(x % 13 + 14), x % 13 + 15);

    let before = meter.total;
    assert_eq!(meter.bump(x), before + x);

    let r = Rect(f, 2.0).scaled(black_box(3.0));
    assert_eq!((r.0, r.1), (f * 3.0, 6.0));
    assert_eq!(r.area().to_bits(), (f * 3.0 * 6.0).to_bits());
    assert_eq!(r.double_area().to_bits(), (f * 3.0 * 6.0 * 2.0).to_bits());

    BTreeMap::from([
        ("traced::add", 1),
        ("traced::floats", 1),
        ("traced::many", 1),
        ("traced::show", 2),
        ("traced::triple", 3),
        ("traced::checked", 1),
        ("traced::bump", 1),
        ("traced::Rect::scaled", 1),
        ("traced::<Rect as Area>::area", 2),
        ("traced::double_area", 1),
    ])
}

// ---------------------------------------------------------------------------
// Finding the sites.

fn marked(site: &Site) -> (MarkedPoint, usize) {
    match site.kind {
        SiteKind::Marked(m) => (m.point, m.descriptor),
        other => panic!("not a marked site: {other:?}"),
    }
}

/// The marked sites of this test binary, by function name.
fn marked_sites() -> BTreeMap<String, Vec<Site>> {
    let mut table = SiteTable::new();
    table.rescan();
    let main = table.objects().main().expect("main executable").id;
    let scanned = match table.object_sites(main) {
        Some(Ok(s)) => s,
        other => panic!("scan of the test binary failed: {other:?}"),
    };
    let skipped: Vec<_> = scanned.skipped.iter().filter(|s| s.section == "textpoke_sites").collect();
    assert!(skipped.is_empty(), "skipped marked sites: {skipped:#?}");
    let report = scanned.sections.iter().find(|r| r.section == "textpoke_sites").expect("textpoke_sites section");
    assert!(report.from_memory);
    assert_eq!(report.cross_checked, report.records);
    let mut out: BTreeMap<String, Vec<Site>> = BTreeMap::new();
    for site in scanned.sites.iter().filter(|s| matches!(s.kind, SiteKind::Marked(_))) {
        out.entry(site.function.clone()).or_default().push(site.clone());
    }
    assert_eq!(report.records, out.values().map(Vec::len).sum::<usize>());
    // The records need no relocation: the file alone gives the same sites.
    let obj = table.objects().main().unwrap();
    let from_file = scan_object(obj, RecordSource::File).expect("file-only scan");
    let marked_only = |sites: &[Site]| -> Vec<Site> {
        sites.iter().filter(|s| matches!(s.kind, SiteKind::Marked(_))).cloned().collect()
    };
    assert_eq!(marked_only(&from_file.sites), marked_only(&scanned.sites));
    let file_report = from_file.sections.iter().find(|r| r.section == "textpoke_sites").unwrap();
    assert!(!file_report.from_memory);
    out
}

fn bytes_at(addr: usize, len: usize) -> Vec<u8> {
    // SAFETY: the addresses are sites in this binary's code.
    (0..len).map(|i| unsafe { ((addr + i) as *const u8).read_volatile() }).collect()
}

#[test]
fn sites_are_found_with_names_and_kinds() {
    let _serial = serial();
    let mut meter = Meter { total: 0 };
    call_all(1, &mut meter);
    let sites = marked_sites();
    if std::env::var_os("TEXTPOKE_TEST_VERBOSE").is_some() {
        for (name, list) in &sites {
            for s in list {
                let (point, desc) = marked(s);
                let sym = textpoke::sites::demangle(&s.raw_symbol);
                eprintln!("{name:32} {point:?}\t{:#x} desc {desc:#x} in {sym}+{:#x}", s.nop_addr, s.nop_addr - s.entry);
            }
        }
    }
    let names: BTreeSet<&str> = sites.keys().map(String::as_str).collect();
    let expected: BTreeSet<&str> = FUNCTIONS.iter().map(|f| f.0).collect();
    assert_eq!(names, expected, "{sites:#?}");

    for &(name, may_inline) in FUNCTIONS {
        let list = &sites[name];
        let descriptors: BTreeSet<usize> = list.iter().map(|s| marked(s).1).collect();
        assert_eq!(descriptors.len(), 1, "{name}: one descriptor for all its sites: {list:#?}");
        // The descriptor is a static of this binary: read it as one.
        let desc = *descriptors.first().unwrap();
        // SAFETY: the sites layer checked that a MarkedFunction (magic,
        // version) lies there, in this (loaded) executable.
        let desc = unsafe { &*(desc as *const MarkedFunction) };
        assert_eq!(desc.name(), name);

        let entries: Vec<&Site> = list.iter().filter(|s| marked(s).0 == MarkedPoint::Entry).collect();
        let exits: Vec<&Site> = list.iter().filter(|s| marked(s).0 == MarkedPoint::Exit).collect();
        assert!(!entries.is_empty() && !exits.is_empty(), "{name}: {list:#?}");
        for s in list {
            assert_eq!(s.nop_form, NopForm::Single);
            assert_eq!(s.nop_len as usize, SITE_NOP.len());
            assert_eq!(bytes_at(s.nop_addr, SITE_NOP.len()), SITE_NOP);
            assert!(!s.raw_symbol.is_empty(), "{name}: no symbol contains {:#x}", s.nop_addr);
            assert!(s.entry <= s.nop_addr, "{s:#?}");
        }
        // Each entry site is in a distinct machine function (a
        // monomorphization or a caller it was inlined into).
        let containing: BTreeSet<usize> = entries.iter().map(|s| s.entry).collect();
        assert_eq!(containing.len(), entries.len(), "{name}: {entries:#?}");
        if !may_inline {
            let demangled: Vec<String> = entries.iter().map(|s| textpoke::sites::demangle(&s.raw_symbol)).collect();
            let last = name.rsplit("::").next().unwrap();
            for d in &demangled {
                assert!(d.ends_with(last), "{name}: entry site in {d}");
            }
        }
    }

    // Generic: one site pair per monomorphization (String and &str).
    let show_entries: Vec<&Site> = sites["traced::show"].iter().filter(|s| marked(s).0 == MarkedPoint::Entry).collect();
    assert_eq!(show_entries.len(), 2, "{show_entries:#?}");
    // Non-generic, not inlined: exactly one entry site.
    for name in ["traced::add", "traced::floats", "traced::many", "traced::checked", "traced::bump"] {
        let n = sites[name].iter().filter(|s| marked(s).0 == MarkedPoint::Entry).count();
        assert_eq!(n, 1, "{name}");
    }
    // Inlined (when optimising): a copy in each caller.
    let triple: Vec<String> = sites["traced::triple"]
        .iter()
        .filter(|s| marked(s).0 == MarkedPoint::Entry)
        .map(|s| textpoke::sites::demangle(&s.raw_symbol))
        .collect();
    if cfg!(debug_assertions) {
        assert!(!triple.is_empty());
    } else {
        assert!(triple.iter().any(|s| s.ends_with("triple_caller_a")), "{triple:?}");
        assert!(triple.iter().any(|s| s.ends_with("triple_caller_b")), "{triple:?}");
        assert!(triple.iter().any(|s| s.ends_with("red_zone_user")), "{triple:?}");
    }
}

/// Check that the `textpoke_sites` section of the ELF file at `path` is
/// allocated, read-only, made of whole records, and that no dynamic
/// relocation applies to it (its records are PC-relative). Returns the
/// number of records.
fn check_section_position_independent(path: &Path) -> usize {
    use object::read::elf::{ElfFile64, FileHeader, Rela, SectionHeader};
    use object::{Object, ObjectSection};
    let data = std::fs::read(path).unwrap();
    let file = ElfFile64::<object::Endianness>::parse(&*data).unwrap();
    let endian = file.endian();
    let sec = file.section_by_name("textpoke_sites").expect("a textpoke_sites section");
    let (start, size) = (sec.address(), sec.size());
    assert!(size > 0 && size % 12 == 0, "{}: size {size}", path.display());
    let flags = match sec.flags() {
        object::SectionFlags::Elf { sh_flags } => sh_flags,
        other => panic!("{other:?}"),
    };
    assert_ne!(flags & u64::from(object::elf::SHF_ALLOC), 0);
    assert_eq!(flags & u64::from(object::elf::SHF_WRITE), 0, "{}: read-only", path.display());
    let sections = file.elf_header().sections(endian, &*data).unwrap();
    let mut relocs = 0;
    for sh in sections.iter() {
        if let Some((relas, _)) = sh.rela(endian, &*data).unwrap() {
            for r in relas {
                let off = r.r_offset(endian);
                assert!(!(start..start + size).contains(&off), "dynamic relocation at {off:#x} in textpoke_sites");
                relocs += 1;
            }
        }
    }
    assert!(relocs > 0, "{}: position-independent objects have relocations elsewhere", path.display());
    (size / 12) as usize
}

#[test]
fn section_is_position_independent() {
    let _serial = serial();
    let records = check_section_position_independent(Path::new("/proc/self/exe"));
    assert_eq!(records, marked_sites().values().map(Vec::len).sum::<usize>());
}

/// Records that are not sites are skipped, each with its reason: a C
/// library with hand-written records (`tests/fixtures/traced_bad.c`).
#[test]
fn bad_records_are_skipped_with_a_reason() {
    let src = std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/tests/fixtures/traced_bad.c")).unwrap();
    let so = common::compile_so("traced_bad", &src, &[]);
    let _serial = serial();
    let lib = common::Lib::open(&so);
    let mut table = SiteTable::new();
    table.rescan();
    let obj = table.objects().by_path(&so).expect("loaded").clone();
    let scanned = match table.object_sites(obj.id) {
        Some(Ok(s)) => s.clone(),
        other => panic!("scan failed: {other:?}"),
    };
    let f = lib.sym("tp_marked");
    // The two good records: entry and exit of "c::good", in tp_marked.
    let found: Vec<(String, MarkedPoint, String)> =
        scanned.sites.iter().map(|s| (s.function.clone(), marked(s).0, s.raw_symbol.clone())).collect();
    assert_eq!(
        found,
        [
            ("c::good".into(), MarkedPoint::Entry, "tp_marked".into()),
            ("c::good".into(), MarkedPoint::Exit, "tp_marked".into())
        ]
    );
    assert!(scanned.sites.iter().all(|s| s.entry == f));

    let mut reasons: Vec<String> = scanned
        .skipped
        .iter()
        .map(|s| {
            assert_eq!(s.section, "textpoke_sites");
            match &s.reason {
                SkipReason::BadRecord { what, .. } => format!("record: {what}"),
                SkipReason::BadDescriptor { what, .. } => format!("descriptor: {what}"),
                SkipReason::UnexpectedBytes { found, .. } => format!("bytes: {found:02x?} in {}", s.function),
                SkipReason::NotInCode { .. } => format!("not in code: {}", s.function),
                other => format!("{other:?}"),
            }
        })
        .collect();
    reasons.sort();
    assert_eq!(
        reasons,
        [
            if cfg!(target_arch = "aarch64") {
                "bytes: [e0, 03, 00, aa] in c::good"
            } else {
                "bytes: [90, 90, 90, 90, 90] in c::good"
            },
            "descriptor: magic 0x6e665054 version 9, expected 0x6e665054 version 1",
            "descriptor: magic 0xdeadbeef version 1, expected 0x6e665054 version 1",
            "not in code: c::good",
            "record: version 1 kind 7, expected version 1 kind 0 or 1",
            "record: version 2 kind 0, expected version 1 kind 0 or 1",
        ],
        "{:#?}",
        scanned.skipped
    );
    // SAFETY: `tp_marked` is `int (int)`; its NOPs are harmless.
    let tp_marked: extern "C" fn(i32) -> i32 = unsafe { std::mem::transmute(f) };
    assert_eq!(tp_marked(41), 42);
}

// ---------------------------------------------------------------------------
// Patching the sites into calls of counting trampolines (x86-64 code;
// on aarch64 the tracer's own body stubs are tested by trace_marked.rs).

/// Executable memory within ±2 GiB of `near`, holding `code`.
#[cfg(target_arch = "x86_64")]
struct NearCode {
    addr: usize,
    len: usize,
}

#[cfg(target_arch = "x86_64")]
impl NearCode {
    fn new(near: usize, code: &[u8]) -> NearCode {
        let len = code.len().next_multiple_of(4096);
        // Below the executable (the heap follows it), then above.
        let mib = 1usize << 20;
        let candidates = (1..64)
            .map(|i| (near & !(mib - 1)).wrapping_sub(i * 16 * mib))
            .chain((1..64).map(|i| (near & !(mib - 1)) + 512 * mib + i * 16 * mib));
        for hint in candidates {
            // SAFETY: MAP_FIXED_NOREPLACE never replaces an existing mapping.
            let p = unsafe {
                libc::mmap(
                    hint as *mut libc::c_void,
                    len,
                    libc::PROT_READ | libc::PROT_WRITE,
                    libc::MAP_PRIVATE | libc::MAP_ANONYMOUS | libc::MAP_FIXED_NOREPLACE,
                    -1,
                    0,
                )
            };
            if p == libc::MAP_FAILED {
                continue;
            }
            let addr = p as usize;
            if addr.abs_diff(near) > (1 << 30) {
                // SAFETY: our mapping, unused.
                unsafe { libc::munmap(p, len) };
                continue;
            }
            // SAFETY: a fresh private RW mapping of `len >= code.len()` bytes,
            // made executable (and no longer writable) before any use.
            unsafe {
                std::ptr::copy_nonoverlapping(code.as_ptr(), addr as *mut u8, code.len());
                assert_eq!(libc::mprotect(p, len, libc::PROT_READ | libc::PROT_EXEC), 0);
            }
            return NearCode { addr, len };
        }
        panic!("no free address within ±1 GiB of {near:#x}");
    }
}

#[cfg(target_arch = "x86_64")]
impl Drop for NearCode {
    fn drop(&mut self) {
        // SAFETY: our mapping; every site calling into it was restored and
        // the threads that ran it are joined.
        unsafe { libc::munmap(self.addr as *mut libc::c_void, self.len) };
    }
}

/// Size of one trampoline in the code block.
#[cfg(target_arch = "x86_64")]
const TRAMPOLINE_LEN: usize = 128;

/// A trampoline that increments the `u64` at `counter` and preserves every
/// register (it clobbers the flags, which the site allows). It also writes
/// over the whole red zone of the site's function (the 128 bytes below the
/// site's stack pointer: the call and the `push` take the first 16, sixteen
/// stores the rest), as any callee may: had the compiler kept live data
/// there across the site, the results would be wrong.
#[cfg(target_arch = "x86_64")]
fn counting_trampoline(counter: *const AtomicU64) -> [u8; TRAMPOLINE_LEN] {
    let mut code = Vec::with_capacity(TRAMPOLINE_LEN);
    code.push(0x50); // push rax
    code.extend([0x48, 0xb8]); // mov rax, imm64
    code.extend((counter as u64).to_le_bytes());
    code.extend([0xf0, 0x48, 0xff, 0x00]); // lock inc qword [rax]
    for i in 1..=16u8 {
        code.extend([0x48, 0x89, 0x44, 0x24, (i * 8).wrapping_neg()]); // mov [rsp-8*i], rax
    }
    code.push(0x58); // pop rax
    code.push(0xc3); // ret
    assert!(code.len() <= TRAMPOLINE_LEN);
    code.resize(TRAMPOLINE_LEN, 0xcc);
    code.try_into().unwrap()
}

/// Entry and exit counters of one function.
#[cfg(target_arch = "x86_64")]
#[derive(Default)]
struct Counters {
    entry: AtomicU64,
    exit: AtomicU64,
}

#[cfg(target_arch = "x86_64")]
impl Counters {
    fn get(&self) -> (u64, u64) {
        (self.entry.load(Ordering::SeqCst), self.exit.load(Ordering::SeqCst))
    }
}

/// Every marked site of this binary patched to call the trampoline of its
/// function and kind.
#[cfg(target_arch = "x86_64")]
struct Tracing {
    counters: BTreeMap<String, &'static Counters>,
    pokes: Vec<(usize, [u8; 5])>,
    _code: NearCode,
}

#[cfg(target_arch = "x86_64")]
impl Tracing {
    fn enable() -> Tracing {
        let sites = marked_sites();
        let near = sites.values().flatten().map(|s| s.nop_addr).min().unwrap();
        let counters: BTreeMap<String, &'static Counters> =
            sites.keys().map(|name| (name.clone(), &*Box::leak(Box::default()))).collect();
        let mut code = Vec::new();
        let mut trampoline = BTreeMap::new();
        for (name, c) in &counters {
            for (point, counter) in [(MarkedPoint::Entry, &c.entry), (MarkedPoint::Exit, &c.exit)] {
                trampoline.insert((name.clone(), point), code.len());
                code.extend(counting_trampoline(counter));
            }
        }
        let block = NearCode::new(near, &code);
        let mut batch = Batch::new();
        let mut pokes = Vec::new();
        for (name, list) in &sites {
            for s in list {
                let target = block.addr + trampoline[&(name.clone(), marked(s).0)];
                let call = encode_call(s.nop_addr, target).expect("trampoline within ±2 GiB");
                batch.push(Poke::new(s.nop_addr, NOP5, call).named(format!("{name} {:?}", marked(s).0)));
                pokes.push((s.nop_addr, call));
            }
        }
        batch.commit().expect("enable");
        Tracing { counters, pokes, _code: block }
    }

    fn counts(&self) -> BTreeMap<String, (u64, u64)> {
        self.counters.iter().map(|(n, c)| (n.clone(), c.get())).collect()
    }

    fn disable(self) -> BTreeMap<String, &'static Counters> {
        let batch: Batch = self.pokes.iter().map(|&(addr, call)| Poke::new(addr, call, NOP5)).collect();
        batch.commit().expect("disable");
        for &(addr, _) in &self.pokes {
            assert_eq!(bytes_at(addr, 5), NOP5);
        }
        // The trampolines are unmapped on drop: no thread is in one (the
        // callers are joined) and every site is a NOP again.
        self.counters
    }
}

#[cfg(target_arch = "x86_64")]
fn run_threads(threads: usize, iterations: u64) -> BTreeMap<&'static str, u64> {
    let per_thread: Vec<BTreeMap<&'static str, u64>> = std::thread::scope(|s| {
        let handles: Vec<_> = (0..threads)
            .map(|t| {
                s.spawn(move || {
                    let mut meter = Meter { total: 0 };
                    let mut calls: BTreeMap<&'static str, u64> = BTreeMap::new();
                    for i in 0..iterations {
                        for (name, n) in call_all(t as u64 * 1_000_003 + i, &mut meter) {
                            *calls.entry(name).or_default() += n;
                        }
                    }
                    calls
                })
            })
            .collect();
        handles.into_iter().map(|h| h.join().unwrap()).collect()
    });
    let mut total = BTreeMap::new();
    for m in per_thread {
        for (name, n) in m {
            *total.entry(name).or_default() += n;
        }
    }
    total
}

#[cfg(target_arch = "x86_64")]
#[test]
fn patched_sites_count_every_entry_and_exit() {
    let _serial = serial();
    let tracing = Tracing::enable();
    assert!(tracing.counts().values().all(|&c| c == (0, 0)));

    // While patched, a rescan reports every site as skipped: its bytes are
    // the CALL, not the NOP.
    let mut table = SiteTable::new();
    table.rescan();
    let main = table.objects().main().unwrap().id;
    let scanned = table.object_sites(main).unwrap().unwrap();
    assert!(!scanned.sites.iter().any(|s| matches!(s.kind, SiteKind::Marked(_))));
    let calls: BTreeMap<usize, [u8; 5]> = tracing.pokes.iter().copied().collect();
    let skipped: Vec<_> = scanned.skipped.iter().filter(|s| s.section == "textpoke_sites").collect();
    assert_eq!(skipped.len(), calls.len());
    for s in skipped {
        match &s.reason {
            SkipReason::UnexpectedBytes { addr, found } => assert_eq!(found[..], calls[addr][..]),
            other => panic!("{other:?}"),
        }
    }

    let calls = run_threads(8, 2000);
    let counts = tracing.counts();
    for (name, &n) in &calls {
        assert_eq!(counts[*name], (n, n), "{name}: (entries, exits) after {n} calls");
    }
    assert_eq!(counts.len(), calls.len());

    // A panic unwinding through `checked` runs its exit site.
    let before = counts["traced::checked"];
    let hook = std::panic::take_hook();
    std::panic::set_hook(Box::new(|_| {}));
    let panics: usize = std::thread::scope(|s| {
        let handles: Vec<_> = (0..8)
            .map(|_| s.spawn(|| (0..100).filter(|_| std::panic::catch_unwind(|| checked(13)).is_err()).count()))
            .collect();
        handles.into_iter().map(|h| h.join().unwrap()).sum()
    });
    std::panic::set_hook(hook);
    assert_eq!(panics, 800);
    let after = tracing.counts()["traced::checked"];
    assert_eq!(after, (before.0 + 800, before.1 + 800), "every unwinding call ran its exit site");

    // Disabled: the counts stop.
    let counters = tracing.disable();
    let frozen: BTreeMap<String, (u64, u64)> = counters.iter().map(|(n, c)| (n.clone(), c.get())).collect();
    run_threads(2, 100);
    let _ = std::panic::catch_unwind(|| {
        let hook = std::panic::take_hook();
        std::panic::set_hook(Box::new(|_| {}));
        let r = std::panic::catch_unwind(|| checked(13));
        std::panic::set_hook(hook);
        r
    });
    let now: BTreeMap<String, (u64, u64)> = counters.iter().map(|(n, c)| (n.clone(), c.get())).collect();
    assert_eq!(now, frozen);
}

// ---------------------------------------------------------------------------
// A release build with LTO keeps the sites (x86-64: the fixture is built
// by the host's cargo for the host).

#[cfg(target_arch = "x86_64")]
const LTO_FIXTURE: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/fixtures/traced_lto");

/// Build `tests/fixtures/traced_lto` with `cargo build --release` and
/// `lto = true`, as a cdylib and a binary, once per test run (in
/// `CARGO_TARGET_TMPDIR`, so later runs are incremental). Returns the
/// directory holding the outputs.
#[cfg(target_arch = "x86_64")]
fn lto_fixture() -> &'static Path {
    static BUILT: OnceLock<PathBuf> = OnceLock::new();
    BUILT.get_or_init(|| {
        let dir = Path::new(env!("CARGO_TARGET_TMPDIR")).join("traced-lto");
        let src = dir.join("src");
        std::fs::create_dir_all(&src).unwrap();
        let textpoke = env!("CARGO_MANIFEST_DIR");
        let manifest = format!(
            r#"[package]
name = "traced_lto"
version = "0.0.0"
edition = "2021"
publish = false

[lib]
path = "src/lib.rs"
crate-type = ["cdylib", "rlib"]

[[bin]]
name = "traced_lto_main"
path = "src/main.rs"

[dependencies]
textpoke = {{ path = "{textpoke}" }}

[profile.release]
lto = true

[workspace]
"#
        );
        // Rewrite only what changed, so that cargo rebuilds only then.
        let write = |path: PathBuf, text: &str| {
            if std::fs::read_to_string(&path).ok().as_deref() != Some(text) {
                std::fs::write(&path, text).unwrap();
            }
        };
        write(dir.join("Cargo.toml"), &manifest);
        for f in ["lib.rs", "main.rs"] {
            write(src.join(f), &std::fs::read_to_string(Path::new(LTO_FIXTURE).join(f)).unwrap());
        }
        // The workspace's lock file: the same dependency versions, no
        // network needed.
        let lock = dir.join("Cargo.lock");
        if !lock.exists() {
            std::fs::copy(Path::new(textpoke).join("../../Cargo.lock"), &lock).unwrap();
        }
        let cargo = std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into());
        let out = Command::new(cargo)
            .args(["build", "--release", "--offline", "--manifest-path"])
            .arg(dir.join("Cargo.toml"))
            .arg("--target-dir")
            .arg(dir.join("target"))
            .output()
            .expect("run cargo");
        assert!(out.status.success(), "building the LTO fixture failed:\n{}", String::from_utf8_lossy(&out.stderr));
        dir.join("target/release")
    })
}

/// The fixture's functions that are called, so that their sites must be
/// found in every build.
#[cfg(target_arch = "x86_64")]
const LTO_FUNCTIONS: [&str; 2] = ["traced_lto::lto_answer", "traced_lto::lto_helper"];
/// Never called: LTO may remove it with its sites; if not, it has both.
#[cfg(target_arch = "x86_64")]
const LTO_UNUSED: &str = "traced_lto::lto_unused";

#[cfg(target_arch = "x86_64")]
#[test]
fn lto_release_binary_keeps_its_sites() {
    let bin = lto_fixture().join("traced_lto_main");
    check_section_position_independent(&bin);
    let out = Command::new(&bin).output().unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let stdout = String::from_utf8(out.stdout).unwrap();
    assert!(!stdout.contains("skipped"), "{stdout}");
    let mut found: BTreeSet<(&str, &str)> = stdout
        .lines()
        .map(|l| {
            let f: Vec<&str> = l.split(' ').collect();
            assert_eq!((f[0], f[3]), ("site", "0f1f440000"), "{l}");
            (f[1], f[2])
        })
        .collect();
    let unused = [(LTO_UNUSED, "Entry"), (LTO_UNUSED, "Exit")];
    let unused_found = unused.iter().filter(|u| found.remove(*u)).count();
    assert!(unused_found == 0 || unused_found == 2, "{stdout}");
    let want: BTreeSet<(&str, &str)> =
        LTO_FUNCTIONS.iter().flat_map(|&name| [(name, "Entry"), (name, "Exit")]).collect();
    assert_eq!(found, want, "{stdout}");
}

#[cfg(target_arch = "x86_64")]
#[test]
fn lto_cdylib_sites_are_found_after_dlopen() {
    let so = lto_fixture().join("libtraced_lto.so");
    check_section_position_independent(&so);
    let _serial = serial();
    let c = std::ffi::CString::new(so.to_str().unwrap()).unwrap();
    // SAFETY: a valid path; the library has no initialiser of its own.
    let handle = unsafe { libc::dlopen(c.as_ptr(), libc::RTLD_NOW | libc::RTLD_LOCAL) };
    assert!(!handle.is_null(), "dlopen {} failed", so.display());
    let mut table = SiteTable::new();
    table.rescan();
    let obj = table.objects().by_path(&so).expect("the library is loaded").clone();
    let scanned = match table.object_sites(obj.id) {
        Some(Ok(s)) => s.clone(),
        other => panic!("scan failed: {other:?}"),
    };
    assert!(scanned.skipped.is_empty(), "{:#?}", scanned.skipped);
    let mut found = BTreeSet::new();
    for s in &scanned.sites {
        let (point, desc) = marked(s);
        assert_eq!(bytes_at(s.nop_addr, 5), NOP5);
        assert!(obj.segment_at(desc, MarkedFunction::SIZE).is_some(), "descriptor inside the library");
        found.insert((s.function.clone(), point));
    }
    let unused = [(LTO_UNUSED.to_owned(), MarkedPoint::Entry), (LTO_UNUSED.to_owned(), MarkedPoint::Exit)];
    let unused_found = unused.iter().filter(|u| found.remove(*u)).count();
    assert!(unused_found == 0 || unused_found == 2, "{found:?}");
    let want: BTreeSet<(String, MarkedPoint)> = LTO_FUNCTIONS
        .iter()
        .flat_map(|&name| [(name.to_owned(), MarkedPoint::Entry), (name.to_owned(), MarkedPoint::Exit)])
        .collect();
    assert_eq!(found, want);

    // The library works, its sites untouched.
    let sym = std::ffi::CString::new("lto_answer").unwrap();
    // SAFETY: a live handle; `lto_answer` is `extern "C" fn(u64) -> u64`.
    let answer: extern "C" fn(u64) -> u64 = unsafe { std::mem::transmute(libc::dlsym(handle, sym.as_ptr())) };
    assert_eq!(answer(black_box(5)), 52);

    // SAFETY: nothing of the library is used after this.
    assert_eq!(unsafe { libc::dlclose(handle) }, 0);
    table.rescan();
    assert!(table.objects().get(obj.id).is_none());
}
