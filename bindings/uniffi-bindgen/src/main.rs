//! `uniffi-bindgen`, pinned in the workspace: generates the Python and
//! Kotlin sources from the built library (library mode), so the generator
//! and the scaffolding are always the same UniFFI version.
//!
//! ```text
//! cargo run -p uniffi-bindgen -- generate --library target/debug/libfleet_bindings.so \
//!     --language kotlin --out-dir bindings/kotlin/target/generated
//! ```

fn main() {
    uniffi::uniffi_bindgen_main()
}
