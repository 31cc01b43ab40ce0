//! What the kernel says, through bpftool: which programs are attached to a cgroup, and how
//! many entries their maps hold.

use std::{path::Path, process::Command};

use serde_json::Value;

fn bpftool_json(args: &[&str]) -> Value {
    let out = Command::new("bpftool")
        .arg("--json")
        .args(args)
        .output()
        .expect("bpftool is missing: `cargo xtask test` installs it");
    assert!(
        out.status.success(),
        "bpftool {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    // Nothing attached: bpftool prints nothing at all.
    if out.stdout.iter().all(u8::is_ascii_whitespace) {
        return Value::Array(Vec::new());
    }
    serde_json::from_slice(&out.stdout).expect("bpftool printed JSON")
}

/// Names of the programs attached to `cgroup` (this cgroup only, not inherited ones).
pub fn attached_programs(cgroup: &Path) -> Vec<String> {
    let path = cgroup.to_string_lossy();
    let progs = bpftool_json(&["cgroup", "show", &path]);
    progs
        .as_array()
        .map(|list| {
            list.iter()
                .filter_map(|p| p["name"].as_str().map(str::to_owned))
                .collect()
        })
        .unwrap_or_default()
}

/// Entries in the map called `name` used by the programs attached to `cgroup`.
pub fn map_entries(cgroup: &Path, name: &str) -> usize {
    let path = cgroup.to_string_lossy();
    let progs = bpftool_json(&["cgroup", "show", &path]);
    for prog in progs.as_array().into_iter().flatten() {
        let info = bpftool_json(&["prog", "show", "id", &prog["id"].to_string()]);
        for id in info["map_ids"].as_array().into_iter().flatten() {
            let id = id.to_string();
            if bpftool_json(&["map", "show", "id", &id])["name"] == name {
                return bpftool_json(&["map", "dump", "id", &id])
                    .as_array()
                    .map_or(0, Vec::len);
            }
        }
    }
    panic!("no program attached to {path} uses a map named {name}");
}
