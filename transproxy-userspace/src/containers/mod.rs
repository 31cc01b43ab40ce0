//! Containers: the other network namespaces of the daemon's cgroup tree, each served by a
//! listener of its own, all accepted by the one daemon.
//!
//! A container (podman, Docker, a Kubernetes pod) has its own network namespace: its
//! `127.0.0.1` is not the host's, and the programs only redirect to a listener found in the
//! connecting socket's own namespace ([`crate::kernel`]). So for every namespace where
//! processes of the tree live, the daemon opens a listener inside it (through the
//! `opener`, the one process that keeps the privilege to enter namespaces), registers it with
//! the programs under the namespace's cookie, and hands it to a worker like its own. Tunnels
//! still leave from the daemon's namespace, so the proxy the host reaches serves every
//! container, even one with no network at all.
//!
//! A namespace is found three ways, the first that comes:
//! * a runtime's hook says so before the container's process runs (`transproxy oci-hook`,
//!   `transproxy cni`, through the control socket): no connect is ever missed;
//! * a connect finds no listener in its namespace: the programs report it ([`UNSERVED`]), the
//!   connect itself follows the kill switch (direct, or refused), and the next is tunnelled;
//! * the scan of the tree every second.
//!
//! The scan also closes listeners: a namespace with no process of the tree left is dropped (a
//! held listener would keep a dead container's namespace alive).
//!
//! [`UNSERVED`]: transproxy_common::names::UNSERVED

pub mod hook_input;
#[cfg(feature = "ebpf")]
pub mod hooks;
#[cfg(feature = "ebpf")]
mod namespaces;
#[cfg(feature = "ebpf")]
pub mod opener;
#[cfg(feature = "ebpf")]
pub(crate) mod runtime;
#[cfg(feature = "ebpf")]
mod upstreams;

#[cfg(feature = "ebpf")]
pub(crate) use namespaces::{NamespaceStatus, Namespaces};
#[cfg(feature = "ebpf")]
pub(crate) use opener::Target;
#[cfg(feature = "ebpf")]
pub(crate) use upstreams::ContainerUpstreams;
