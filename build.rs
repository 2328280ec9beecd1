//! Link libtorch so that the binary runs without LD_LIBRARY_PATH and sees CUDA.
//!
//! torch-sys announces the libtorch directory as `DEP_TCH_LIBTORCH_LIB` (its `links` key is
//! `tch`). We add it as an rpath, and wrap the torch libraries in `--no-as-needed`: with the
//! Debian/Ubuntu default `--as-needed`, the linker drops libtorch_cuda (no symbol of it is
//! referenced directly) and CUDA then silently reads as unavailable.
fn main() {
    println!("cargo:rerun-if-env-changed=DEP_TCH_LIBTORCH_LIB");
    let Ok(lib_dir) = std::env::var("DEP_TCH_LIBTORCH_LIB") else {
        return;
    };
    println!("cargo:rustc-link-arg=-Wl,-rpath,{lib_dir}");
    println!("cargo:rustc-link-arg=-Wl,--no-as-needed");
    for lib in ["torch_cpu", "torch", "c10"] {
        println!("cargo:rustc-link-arg=-l{lib}");
    }
    if std::path::Path::new(&lib_dir).join("libtorch_cuda.so").exists() {
        println!("cargo:rustc-link-arg=-ltorch_cuda");
        println!("cargo:rustc-link-arg=-lc10_cuda");
    }
    println!("cargo:rustc-link-arg=-Wl,--as-needed");
    println!("cargo:rustc-link-search=native={lib_dir}");
}
