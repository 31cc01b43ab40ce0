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
