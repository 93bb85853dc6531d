// Relink when the linker script changes; cargo does not track `-T` inputs.
fn main() {
    println!("cargo:rerun-if-changed=layout.ld");
}
