//! Listening sockets in an SO_REUSEPORT group, one per worker thread, so the kernel spreads
//! new connections across the workers. Used by the daemon and by the benchmark's fast proxy.

use std::net::{SocketAddr, TcpListener as StdListener};

/// `count` listening sockets on `addr` in one SO_REUSEPORT group, one per worker. A plain bind
/// comes first, so an address another process already uses is refused (with SO_REUSEPORT alone,
/// another root process on the same port would silently share our connections), and a port 0
/// becomes the one the kernel picked.
pub fn bind_group(addr: SocketAddr, count: usize) -> std::io::Result<Vec<StdListener>> {
    bind_group_with(addr, count, false)
}

/// [`bind_group`], with IP_TRANSPARENT (and IPV6_TRANSPARENT) when `transparent`: gateway
/// mode's listeners take connections addressed to other hosts, which tc assigned to them, and
/// must answer from those addresses.
pub fn bind_group_with(
    addr: SocketAddr,
    count: usize,
    transparent: bool,
) -> std::io::Result<Vec<StdListener>> {
    let addr = StdListener::bind(addr)?.local_addr()?;
    (0..count.max(1)).map(|_| bind(addr, transparent)).collect()
}

/// A listening socket in a reuse-port group, non-blocking for tokio, with as long a listen queue
/// as the kernel allows (`net.core.somaxconn` caps it): with a short queue, handshakes that
/// overflow complete by SYN cookie on the client side only, and a client that waits for the
/// server to speak first is then lost without either end noticing. Accepted sockets inherit its TCP_NODELAY: tunnelled bytes are never held back
/// for Nagle, at no syscall per connection.
fn bind(addr: SocketAddr, transparent: bool) -> std::io::Result<StdListener> {
    let socket = socket2::Socket::new(
        socket2::Domain::for_address(addr),
        socket2::Type::STREAM,
        None,
    )?;
    socket.set_reuse_address(true)?;
    socket.set_reuse_port(true)?;
    socket.set_tcp_nodelay(true)?;
    if addr.is_ipv6() {
        socket.set_only_v6(true)?;
        if transparent {
            socket.set_ip_transparent_v6(true)?;
        }
    } else if transparent {
        socket.set_ip_transparent_v4(true)?;
    }
    socket.bind(&addr.into())?;
    socket.listen(i32::MAX)?;
    socket.set_nonblocking(true)?;
    Ok(socket.into())
}
