//! Test support shared by this crate's tests, the benches and the server's
//! end-to-end tests: a real PostgreSQL (Debian's postgresql package) in a
//! temporary folder, on a loopback port, with a password.

use std::net::TcpListener;
use std::os::unix::fs::MetadataExt;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::{Duration, Instant};

/// The password of the `inferd` role of the test server.
const PASSWORD: &str = "ledger-test-secret";

/// A PostgreSQL server of its own, stopped and deleted when dropped.
#[derive(Debug)]
pub struct Postgres {
    child: Option<Child>,
    bin: PathBuf,
    dir: PathBuf,
    /// Who runs it: PostgreSQL refuses to run as root.
    user: Option<(u32, u32)>,
    pub port: u16,
    durable: bool,
}

/// The folder of `initdb` and `postgres`: on the PATH, or the newest of
/// Debian's /usr/lib/postgresql/<version>/bin.
fn bin_dir() -> PathBuf {
    if let Some(dir) = std::env::var_os("PATH")
        .iter()
        .flat_map(std::env::split_paths)
        .find(|d| d.join("initdb").exists() && d.join("postgres").exists())
    {
        return dir;
    }
    let mut versions: Vec<(u32, PathBuf)> = std::fs::read_dir("/usr/lib/postgresql")
        .into_iter()
        .flatten()
        .flatten()
        .filter_map(|e| Some((e.file_name().to_str()?.parse().ok()?, e.path().join("bin"))))
        .filter(|(_, bin)| bin.join("initdb").exists())
        .collect();
    versions.sort();
    versions
        .pop()
        .map(|(_, bin)| bin)
        .expect("PostgreSQL is installed (make test installs it: apt-get install postgresql)")
}

/// The uid and gid of `name` in /etc/passwd.
fn account(name: &str) -> Option<(u32, u32)> {
    let passwd = std::fs::read_to_string("/etc/passwd").ok()?;
    passwd.lines().find_map(|line| {
        let fields: Vec<&str> = line.split(':').collect();
        (fields.first() == Some(&name) && fields.len() > 3)
            .then(|| Some((fields[2].parse().ok()?, fields[3].parse().ok()?)))
            .flatten()
    })
}

impl Postgres {
    /// Creates a database cluster and starts it on a free port. Test
    /// servers skip fsync (nothing here survives a power cut anyway);
    /// [`Postgres::start_durable`] keeps the defaults, for measurements.
    pub fn start() -> Postgres {
        Self::create(false)
    }

    /// As [`Postgres::start`], with PostgreSQL's default durability.
    pub fn start_durable() -> Postgres {
        Self::create(true)
    }

    fn create(durable: bool) -> Postgres {
        static N: AtomicU32 = AtomicU32::new(0);
        let dir = std::env::temp_dir().join(format!(
            "inferd-pg-{}-{}",
            std::process::id(),
            N.fetch_add(1, Ordering::Relaxed)
        ));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).expect("a folder for the test database");
        let root = std::fs::metadata("/proc/self").map(|m| m.uid() == 0).unwrap_or(false);
        let user = root
            .then(|| account("postgres").or_else(|| account("nobody")).expect("a user to run PostgreSQL as"));
        let pwfile = dir.join("password");
        std::fs::write(&pwfile, PASSWORD).unwrap();
        let data = dir.join("data");
        std::fs::create_dir_all(&data).unwrap();
        if let Some((uid, gid)) = user {
            for p in [&dir, &pwfile, &data] {
                std::os::unix::fs::chown(p, Some(uid), Some(gid)).unwrap();
            }
        }
        let mut pg = Postgres { child: None, bin: bin_dir(), dir, user, port: 0, durable };
        let status = pg
            .command("initdb")
            .arg("-D")
            .arg(&data)
            .args([
                "-U",
                "inferd",
                "-E",
                "UTF8",
                "--no-sync",
                "--auth-local=trust",
                "--auth-host=scram-sha-256",
            ])
            .arg(format!("--pwfile={}", pwfile.display()))
            .stdout(Stdio::null())
            .status()
            .expect("initdb runs");
        assert!(status.success(), "initdb failed: {status}");
        pg.port = TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
        pg.resume();
        pg
    }

    fn command(&self, program: &str) -> Command {
        let mut cmd = Command::new(self.bin.join(program));
        if let Some((uid, gid)) = self.user {
            cmd.uid(uid).gid(gid);
        }
        cmd.current_dir(&self.dir);
        cmd
    }

    fn data(&self) -> PathBuf {
        self.dir.join("data")
    }

    /// Starts the server again (after [`Postgres::stop`]) on the same port
    /// and data, and waits until it accepts connections.
    pub fn resume(&mut self) {
        assert!(self.child.is_none(), "already running");
        let mut cmd = self.command("postgres");
        cmd.arg("-D").arg(self.data()).args([
            "-p",
            &self.port.to_string(),
            "-c",
            "listen_addresses=127.0.0.1",
        ]);
        cmd.arg("-c").arg(format!("unix_socket_directories={}", self.dir.display()));
        if !self.durable {
            cmd.args(["-c", "fsync=off", "-c", "full_page_writes=off", "-c", "synchronous_commit=off"]);
        }
        let log = std::fs::File::create(self.dir.join("server.log")).unwrap();
        if let Some((uid, gid)) = self.user {
            let _ = std::os::unix::fs::chown(self.dir.join("server.log"), Some(uid), Some(gid));
        }
        self.child = Some(cmd.stdout(Stdio::null()).stderr(log).spawn().expect("postgres runs"));
        let until = Instant::now() + Duration::from_secs(30);
        while !self.accepts_connections() {
            assert!(Instant::now() < until, "postgres did not start: {}", self.log());
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// postmaster.pid's last line says `ready` once connections are taken.
    fn accepts_connections(&self) -> bool {
        let pid = std::fs::read_to_string(self.data().join("postmaster.pid")).unwrap_or_default();
        pid.lines().nth(7).is_some_and(|status| status.trim() == "ready")
    }

    /// The server's log so far.
    pub fn log(&self) -> String {
        std::fs::read_to_string(self.dir.join("server.log")).unwrap_or_default()
    }

    /// A URL with the role's password.
    pub fn url(&self) -> String {
        format!("postgres://inferd:{PASSWORD}@127.0.0.1:{}/postgres", self.port)
    }

    /// Stops the server (fast shutdown: open connections are cut).
    pub fn stop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = Command::new("kill").args(["-INT", &child.id().to_string()]).status();
            if !wait_exit(&mut child, Duration::from_secs(30)) {
                let _ = child.kill();
                let _ = child.wait();
            }
        }
    }

    /// The data folder, for tests that look inside.
    pub fn dir(&self) -> &Path {
        &self.dir
    }
}

fn wait_exit(child: &mut Child, within: Duration) -> bool {
    let until = Instant::now() + within;
    while Instant::now() < until {
        if matches!(child.try_wait(), Ok(Some(_))) {
            return true;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    false
}

impl Drop for Postgres {
    fn drop(&mut self) {
        self.stop();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}
