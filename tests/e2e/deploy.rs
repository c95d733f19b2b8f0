//! What a deployment relies on: systemd hears READY=1 only once the model
//! is loaded and warm, and STOPPING=1 when draining starts.

use std::os::unix::net::UnixDatagram;
use std::time::Duration;

use crate::api::client;
use crate::harness::{Server, temp_dir};

#[tokio::test]
async fn systemd_hears_ready_when_serving_and_stopping_when_draining() {
    let dir = temp_dir("notify");
    let path = dir.join("notify.sock");
    let sock = UnixDatagram::bind(&path).unwrap();
    sock.set_read_timeout(Some(Duration::from_secs(60))).unwrap();
    let srv = Server::start_with_env(&["--drain-delay", "30"], &[("NOTIFY_SOCKET", path.to_str().unwrap())]);
    let mut buf = [0u8; 512];
    let n = sock.recv(&mut buf).expect("a notification");
    let ready = String::from_utf8_lossy(&buf[..n]).to_string();
    assert!(ready.starts_with("READY=1\n"), "{ready}");
    assert!(ready.contains("STATUS=serving smollm2-135m-instruct"), "{ready}");
    // By then the server answers requests.
    let status = client().get(srv.url("/ready")).send().await.unwrap().status();
    assert_eq!(status, 200);
    srv.signal(libc::SIGTERM);
    let n = sock.recv(&mut buf).expect("a second notification");
    assert_eq!(String::from_utf8_lossy(&buf[..n]), "STOPPING=1\nSTATUS=draining");
    assert_eq!(client().get(srv.url("/ready")).send().await.unwrap().status(), 503);
}
