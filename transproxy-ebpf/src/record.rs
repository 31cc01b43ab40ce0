//! The record of a redirected socket, kept with the socket (`ORIGINAL_DST`).

use core::ptr;

use aya_ebpf::{
    bindings::{BPF_SK_STORAGE_GET_F_CREATE, bpf_sock},
    helpers::{
        bpf_get_current_cgroup_id, bpf_get_current_comm, bpf_get_current_pid_tgid,
        bpf_get_current_uid_gid, generated::bpf_sk_storage_get,
    },
};
use transproxy_common::{Endpoint, Redirect};

/// The record of a redirect to `listener` of a connect to `dst`, made by the current task.
#[inline(always)]
pub(crate) fn new(dst: Endpoint, listener: Endpoint) -> Redirect {
    Redirect {
        dst,
        listener,
        pid: (bpf_get_current_pid_tgid() >> 32) as u32,
        uid: bpf_get_current_uid_gid() as u32,
        // SAFETY: the helper has no preconditions.
        cgroup: unsafe { bpf_get_current_cgroup_id() },
        comm: bpf_get_current_comm().unwrap_or([0; 16]),
    }
}

use crate::maps::ORIGINAL_DST;

/// The record of socket `sk`, if it was redirected.
#[inline(always)]
pub(crate) fn get(sk: *mut bpf_sock) -> Option<Redirect> {
    if sk.is_null() {
        return None;
    }
    // SAFETY: `sk` is the context's socket; without the create flag the helper only looks up.
    let found = unsafe {
        bpf_sk_storage_get(
            ptr::from_ref(&ORIGINAL_DST).cast_mut().cast(),
            sk.cast(),
            ptr::null_mut(),
            0,
        )
    }
    .cast::<Redirect>();
    // SAFETY: a non-null result points at the socket's storage, copied out at once.
    (!found.is_null()).then(|| unsafe { *found })
}

/// Stores `redirect` with socket `sk` (replacing an earlier one). Returns whether it was stored.
#[inline(always)]
pub(crate) fn set(sk: *mut bpf_sock, redirect: &Redirect) -> bool {
    if sk.is_null() {
        return false;
    }
    // SAFETY: `sk` is the context's socket; the helper copies `redirect` into new storage, or
    // returns the existing storage, which is overwritten.
    let slot = unsafe {
        bpf_sk_storage_get(
            ptr::from_ref(&ORIGINAL_DST).cast_mut().cast(),
            sk.cast(),
            ptr::from_ref(redirect).cast_mut().cast(),
            BPF_SK_STORAGE_GET_F_CREATE.into(),
        )
    }
    .cast::<Redirect>();
    if slot.is_null() {
        return false;
    }
    // SAFETY: `slot` points at this socket's storage, sized for a `Redirect`.
    unsafe { *slot = *redirect };
    true
}
