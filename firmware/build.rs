//! Adds embedded-test's linker script to the test binaries only.
fn main() {
    println!("cargo::rustc-link-arg-tests=-Tembedded-test.x");
}
