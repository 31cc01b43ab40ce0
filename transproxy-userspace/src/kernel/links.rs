//! The kernel's list of cgroup links, to find transproxy's programs attached to any cgroup,
//! by a daemon that answers or not (for `transproxy status`).
//!
//! aya lists links but does not show a cgroup link's cgroup, so the three `bpf()` commands are
//! made here: next link id, link fd by id, link info.

use std::{
    collections::HashSet,
    os::fd::{AsRawFd as _, FromRawFd as _, OwnedFd},
};

use transproxy_common::names;

/// `BPF_OBJ_GET_INFO_BY_FD`, `BPF_LINK_GET_FD_BY_ID`, `BPF_LINK_GET_NEXT_ID` from
/// `<linux/bpf.h>`.
const BPF_OBJ_GET_INFO_BY_FD: libc::c_long = 15;
const BPF_LINK_GET_FD_BY_ID: libc::c_long = 30;
const BPF_LINK_GET_NEXT_ID: libc::c_long = 31;
/// `BPF_LINK_TYPE_CGROUP`.
const BPF_LINK_TYPE_CGROUP: u32 = 3;

/// The `bpf_attr` member of the `*_GET_NEXT_ID` and `*_GET_FD_BY_ID` commands.
#[repr(C)]
#[derive(Default)]
struct IdAttr {
    /// `start_id`, or `link_id` for `GET_FD_BY_ID`.
    id: u32,
    next_id: u32,
    open_flags: u32,
}

/// The `bpf_attr` member of `BPF_OBJ_GET_INFO_BY_FD`.
#[repr(C)]
struct InfoAttr {
    bpf_fd: u32,
    info_len: u32,
    info: u64,
}

/// `struct bpf_link_info`, as far as a cgroup link's part goes; the rest of the union is
/// left zeroed, as the kernel wants of what it does not fill.
#[repr(C)]
struct LinkInfo {
    type_: u32,
    id: u32,
    prog_id: u32,
    _pad: u32,
    cgroup_id: u64,
    attach_type: u32,
    _rest: [u32; 25],
}

/// One `bpf()` call with `attr`.
fn bpf<T>(cmd: libc::c_long, attr: &mut T) -> libc::c_long {
    // SAFETY: `attr` is the `bpf_attr` member `cmd` reads and writes, of its exact layout, and
    // lives for the call; the kernel checks the size passed.
    unsafe {
        libc::syscall(
            libc::SYS_bpf,
            cmd,
            std::ptr::from_mut(attr),
            std::mem::size_of::<T>(),
        )
    }
}

/// The ids of the cgroups (their directories' inode numbers) where a transproxy `connect4`
/// program is attached. A program counts as transproxy's when it is named `connect4` and uses
/// a map named `LISTENERS`.
pub(crate) fn transproxy_cgroups() -> Vec<u64> {
    let listeners_maps: HashSet<u32> = aya::maps::loaded_maps()
        .filter_map(Result::ok)
        .filter(|map| map.name_as_str() == Some(names::LISTENERS))
        .map(|map| map.id())
        .collect();
    let programs: HashSet<u32> = aya::programs::loaded_programs()
        .filter_map(Result::ok)
        .filter(|program| program.name_as_str() == Some("connect4"))
        .filter(|program| {
            program
                .map_ids()
                .ok()
                .flatten()
                .is_some_and(|ids| ids.iter().any(|id| listeners_maps.contains(id)))
        })
        .map(|program| program.id())
        .collect();
    let mut cgroups = Vec::new();
    let mut attr = IdAttr::default();
    // Bounded: link ids only grow, and a machine has a few thousand links at most.
    for _ in 0..1_000_000 {
        if bpf(BPF_LINK_GET_NEXT_ID, &mut attr) != 0 {
            break;
        }
        let id = attr.next_id;
        attr.id = id;
        if let Some(info) = link_info(id)
            && info.type_ == BPF_LINK_TYPE_CGROUP
            && programs.contains(&info.prog_id)
        {
            cgroups.push(info.cgroup_id);
        }
    }
    cgroups.sort_unstable();
    cgroups.dedup();
    cgroups
}

/// The info of link `id`, if it still exists.
fn link_info(id: u32) -> Option<LinkInfo> {
    let mut attr = IdAttr {
        id,
        ..IdAttr::default()
    };
    let fd = bpf(BPF_LINK_GET_FD_BY_ID, &mut attr);
    if fd < 0 {
        return None;
    }
    // SAFETY: the kernel just returned this descriptor; nothing else owns it.
    let fd = unsafe { OwnedFd::from_raw_fd(fd as i32) };
    // SAFETY: all-zero is a valid `LinkInfo` (plain integers).
    let mut info: LinkInfo = unsafe { std::mem::zeroed() };
    let mut attr = InfoAttr {
        bpf_fd: fd.as_raw_fd() as u32,
        info_len: std::mem::size_of::<LinkInfo>() as u32,
        info: std::ptr::from_mut(&mut info) as u64,
    };
    (bpf(BPF_OBJ_GET_INFO_BY_FD, &mut attr) == 0).then_some(info)
}
