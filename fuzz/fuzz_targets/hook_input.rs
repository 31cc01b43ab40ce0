//! What a container runtime hands the hooks: an OCI container state (`transproxy oci-hook`) and
//! a CNI network configuration (`transproxy-cni`). Reading them must not panic; a pid read is
//! a process id, and an ADD's result is a JSON object.
#![no_main]

use libfuzzer_sys::fuzz_target;
use transproxy::containers::hook_input::{cni_result, oci_pid};

fuzz_target!(|data: &[u8]| {
    if let Ok(pid) = oci_pid(data) {
        assert!(pid > 0);
    }
    if let Ok(result) = cni_result(data) {
        assert!(result.is_object());
    }
});
