//! Test-only check that every `#[repr(C)]` struct the bindings declare matches the C headers
//! it was copied from. The bindings are written by hand (no bindgen, see the crate doc), so a
//! wrong field would silently corrupt memory librbd writes into; here a small C program is
//! compiled against Debian's `librbd-dev` headers and prints `sizeof`, `_Alignof`, and every
//! field's `offsetof` and size, which are compared with what Rust computes for the same struct.
//! The same program names every function the bindings resolve (so each must be declared by the
//! headers) and prints the headers' librbd version, which must pass the version check: the
//! layouts are checked against a release the bindings accept.

use std::process::Command;

use crate::api::{check_version, ImageInfo, SnapInfo, SYMBOLS};
use crate::testing::{cc, unavailable, Scratch};

/// Size of the value a raw pointer points to, without reading it (works on uninitialised
/// memory, which is how field sizes are taken below).
fn pointee_size<T>(_: *const T) -> usize {
    std::mem::size_of::<T>()
}

macro_rules! layouts {
    ($($rust:ident = $c:literal { $($field:ident),* $(,)? })*) => {
        /// Every size, alignment, field offset and field size, named as the C program prints
        /// them.
        fn rust_layout() -> Vec<(String, usize)> {
            let mut out = Vec::new();
            $(
                // Exhaustive destructuring: adding a field to the Rust struct without listing
                // it here does not compile.
                let _exhaustive = |v: $rust| {
                    let $rust { $($field: _),* } = v;
                };
                out.push((format!("sizeof({})", $c), std::mem::size_of::<$rust>()));
                out.push((format!("alignof({})", $c), std::mem::align_of::<$rust>()));
                $(
                    let name = stringify!($field);
                    out.push((format!("offsetof({}, {name})", $c), std::mem::offset_of!($rust, $field)));
                    let value = std::mem::MaybeUninit::<$rust>::uninit();
                    // SAFETY: only the field's address is taken; nothing is read.
                    let size = pointee_size(unsafe { &raw const (*value.as_ptr()).$field });
                    out.push((format!("sizeof({}.{name})", $c), size));
                )*
            )*
            out
        }

        /// A C program printing the same names with the values the headers give.
        fn c_program() -> String {
            let mut src = String::from(
                "#include <stddef.h>\n#include <stdio.h>\n#include <rbd/librbd.h>\n\nint main(void) {\n",
            );
            $(
                src += &format!("  printf(\"sizeof({0}) %zu\\n\", sizeof({0}));\n", $c);
                src += &format!("  printf(\"alignof({0}) %zu\\n\", (size_t)_Alignof({0}));\n", $c);
                $(
                    src += &format!(
                        "  printf(\"offsetof({0}, {1}) %zu\\n\", offsetof({0}, {1}));\n",
                        $c,
                        stringify!($field)
                    );
                    src += &format!(
                        "  printf(\"sizeof({0}.{1}) %zu\\n\", sizeof((({0} *)0)->{1}));\n",
                        $c,
                        stringify!($field)
                    );
                )*
            )*
            // Naming each function (in an unevaluated operand: nothing to link) does not
            // compile unless the headers declare it.
            for name in SYMBOLS {
                src += &format!("  (void)sizeof(__typeof__(&{name}));\n");
            }
            src += "  printf(\"LIBRBD_VERSION %d.%d.%d\\n\",\n";
            src += "         LIBRBD_VER_MAJOR, LIBRBD_VER_MINOR, LIBRBD_VER_EXTRA);\n";
            src + "  return 0;\n}\n"
        }
    };
}

layouts! {
    ImageInfo = "rbd_image_info_t" {
        size, obj_size, num_objs, order, block_name_prefix, parent_pool, parent_name,
    }
    SnapInfo = "rbd_snap_info_t" { id, size, name }
}

#[test]
fn struct_layouts_match_the_librbd_headers() {
    let scratch = Scratch::new("layout");
    let dir = scratch.path();
    std::fs::write(dir.join("header.c"), "#include <rbd/librbd.h>\n").unwrap();
    match cc(dir, &["-E", "-o", "/dev/null", "header.c"]) {
        Err(e) => return unavailable(&format!("cannot run the C compiler `cc` ({e})")),
        Ok(Some(stderr)) => {
            let error = stderr.lines().find(|l| l.contains("error")).unwrap_or(stderr.trim());
            return unavailable(&format!("the librbd headers are missing ({error})"));
        }
        Ok(None) => {}
    }
    std::fs::write(dir.join("layout.c"), c_program()).unwrap();
    if let Some(stderr) = cc(dir, &["-std=gnu11", "-o", "layout", "layout.c"]).unwrap() {
        panic!("the layout program does not compile against rbd/librbd.h:\n{stderr}\n{}", c_program());
    }
    let out = Command::new(dir.join("layout")).output().unwrap();
    assert!(out.status.success(), "the layout program failed: {out:?}");
    let stdout = String::from_utf8(out.stdout).unwrap();
    let (layout, version) = stdout.rsplit_once("LIBRBD_VERSION ").unwrap();
    let version: Vec<i32> = version.trim().split('.').map(|n| n.parse().unwrap()).collect();
    if let Err(e) = check_version((version[0], version[1], version[2])) {
        panic!("the librbd headers are from a release the bindings refuse: {e}");
    }
    let c: std::collections::HashMap<&str, usize> = layout
        .lines()
        .map(|l| {
            let (name, value) = l.rsplit_once(' ').unwrap();
            (name, value.parse().unwrap())
        })
        .collect();

    let rust = rust_layout();
    let mismatches: Vec<String> = rust
        .iter()
        .filter(|(name, value)| c.get(name.as_str()) != Some(value))
        .map(|(name, value)| match c.get(name.as_str()) {
            Some(c) => format!("{name}: Rust {value}, C {c}"),
            None => format!("{name}: Rust {value}, not printed by the C program"),
        })
        .collect();
    assert!(mismatches.is_empty(), "struct layouts differ from rbd/librbd.h:\n{}", mismatches.join("\n"));
    assert_eq!(c.len(), rust.len(), "the C program printed other values than Rust computed:\n{stdout}");
    eprintln!(
        "checked {} sizes, alignments and offsets and {} function declarations against rbd/librbd.h {}",
        rust.len(),
        SYMBOLS.len(),
        version.iter().map(i32::to_string).collect::<Vec<_>>().join(".")
    );
}
