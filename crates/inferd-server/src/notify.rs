//! systemd's readiness protocol (`sd_notify`): with `Type=notify`, systemd
//! starts the units that depend on inferd, and counts its start-up as done,
//! only once inferd says `READY=1`, which it does when the model is loaded
//! and warm; `STOPPING=1` when it starts draining. Without `NOTIFY_SOCKET`
//! (not under systemd) nothing is sent.

use std::io;
use std::os::unix::ffi::OsStrExt;
use std::os::unix::net::UnixDatagram;

/// Sends `message` (newline-separated `KEY=value` lines) to systemd if it
/// asked for notifications; whether it was sent.
pub fn notify(message: &str) -> bool {
    let Some(socket) = std::env::var_os("NOTIFY_SOCKET") else { return false };
    match notify_to(socket.as_encoded_bytes(), message) {
        Ok(()) => true,
        Err(e) => {
            tracing::warn!(error = %e, "could not notify systemd");
            false
        }
    }
}

/// Sends `message` to the datagram socket at `socket`: a path, or an
/// abstract name when it starts with `@`.
pub fn notify_to(socket: &[u8], message: &str) -> io::Result<()> {
    let sock = UnixDatagram::unbound()?;
    match socket.strip_prefix(b"@") {
        Some(name) => {
            use std::os::linux::net::SocketAddrExt;
            let addr = std::os::unix::net::SocketAddr::from_abstract_name(name)?;
            sock.send_to_addr(message.as_bytes(), &addr)?;
        }
        None => {
            let path = std::path::Path::new(std::ffi::OsStr::from_bytes(socket));
            sock.send_to(message.as_bytes(), path)?;
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn messages_reach_a_path_socket_and_an_abstract_one() {
        let dir = std::env::temp_dir().join(format!("inferd-notify-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("notify.sock");
        let listener = UnixDatagram::bind(&path).unwrap();
        notify_to(path.as_os_str().as_bytes(), "READY=1\nSTATUS=serving").unwrap();
        let mut buf = [0u8; 64];
        let n = listener.recv(&mut buf).unwrap();
        assert_eq!(&buf[..n], b"READY=1\nSTATUS=serving");

        use std::os::linux::net::SocketAddrExt;
        let name = format!("inferd-notify-test-{}", std::process::id());
        let addr = std::os::unix::net::SocketAddr::from_abstract_name(name.as_bytes()).unwrap();
        let abstract_listener = UnixDatagram::bind_addr(&addr).unwrap();
        notify_to(format!("@{name}").as_bytes(), "STOPPING=1").unwrap();
        let n = abstract_listener.recv(&mut buf).unwrap();
        assert_eq!(&buf[..n], b"STOPPING=1");
        assert!(notify_to(b"/nonexistent/socket", "READY=1").is_err());
    }
}
