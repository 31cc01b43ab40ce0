//! Access to `bpf_sock_addr.user_ip6`, shared by connect6 and getpeername6.

use core::ptr::{read_volatile, write_volatile};

use aya_ebpf::bindings::bpf_sock_addr;

/// Reads `user_ip6` one word at a time: the verifier only allows 4-byte accesses, and a
/// volatile access keeps the compiler from merging them.
#[inline(always)]
pub(crate) fn read_ip6(sa: *const bpf_sock_addr) -> [u32; 4] {
    // SAFETY: `sa` is the valid context; each read is an aligned 4-byte field access.
    unsafe {
        [
            read_volatile(&(*sa).user_ip6[0]),
            read_volatile(&(*sa).user_ip6[1]),
            read_volatile(&(*sa).user_ip6[2]),
            read_volatile(&(*sa).user_ip6[3]),
        ]
    }
}

/// Writes `user_ip6` one word at a time, for the same reason.
#[inline(always)]
pub(crate) fn write_ip6(sa: *mut bpf_sock_addr, ip: [u32; 4]) {
    // SAFETY: `sa` is the valid context; aligned 4-byte writes the verifier allows here.
    unsafe {
        write_volatile(&mut (*sa).user_ip6[0], ip[0]);
        write_volatile(&mut (*sa).user_ip6[1], ip[1]);
        write_volatile(&mut (*sa).user_ip6[2], ip[2]);
        write_volatile(&mut (*sa).user_ip6[3], ip[3]);
    }
}
