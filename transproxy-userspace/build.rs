//! Builds the eBPF programs (nightly + bpf-linker, driven by aya-build) so that `cargo build`
//! yields one self-contained binary with the object embedded.

use anyhow::Context as _;
use aya_build::{Package, Toolchain};

fn main() -> anyhow::Result<()> {
    // Only the daemon embeds the programs; the parsers alone (fuzzing) need no eBPF toolchain.
    if std::env::var_os("CARGO_FEATURE_EBPF").is_none() {
        return Ok(());
    }
    // The shared map types are compiled into the eBPF object too.
    println!("cargo:rerun-if-changed=../transproxy-common");
    // aya-build passes every line its cargo prints on as a build warning: without this, every
    // build shows some 60 lines of "Compiling ..." from the eBPF crate. Errors still show.
    // SAFETY: the build script is single-threaded here; the variable is read by the cargo it
    // spawns.
    unsafe { std::env::set_var("CARGO_TERM_QUIET", "true") };
    aya_build::build_ebpf(
        [Package {
            name: "transproxy-ebpf",
            root_dir: "../transproxy-ebpf",
            ..Default::default()
        }],
        Toolchain::default(),
    )
    .context(
        "building the eBPF programs needs the nightly toolchain with rust-src and bpf-linker; \
         `cargo xtask build` installs both",
    )
}
