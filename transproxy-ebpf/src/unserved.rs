//! Telling the daemon about a network namespace it does not serve yet.
//!
//! A container started after the daemon has its own namespace, and the daemon has no listener
//! in it until it learns of it. The connect that finds no listener there follows the kill
//! switch's choice (direct, or refused), and reports the namespace and its process, once per
//! namespace, so the daemon opens a listener there within milliseconds and the next connect is
//! tunnelled. (The OCI hook and the CNI plugin tell the daemon before the first connect.)

use aya_ebpf::{
    EbpfContext,
    bindings::BPF_NOEXIST,
    helpers::{bpf_get_current_pid_tgid, bpf_get_netns_cookie},
    programs::SockAddrContext,
};
use transproxy_common::Unserved;

use crate::maps::{UNSERVED, UNSERVED_SEEN};

/// Reports the connecting socket's namespace unless it was reported already.
#[inline(always)]
pub(crate) fn report(ctx: &SockAddrContext) {
    // SAFETY: the helper only reads the namespace of the socket behind the context.
    let netns = unsafe { bpf_get_netns_cookie(ctx.as_ptr()) };
    // The first connect of a namespace wins the insert; the others stop here.
    if UNSERVED_SEEN
        .insert(&netns, &1, u64::from(BPF_NOEXIST))
        .is_err()
    {
        return;
    }
    let event = Unserved {
        netns,
        pid: (bpf_get_current_pid_tgid() >> 32) as u32,
        _pad: 0,
    };
    // A full ring (the daemon gone, or far behind) drops the event; the daemon's periodic
    // scan of the cgroup tree finds the namespace anyway.
    if UNSERVED.output::<Unserved>(&event, 0).is_err() {
        let _ = UNSERVED_SEEN.remove(&netns);
    }
}
