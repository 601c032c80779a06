//! A real etcd for the fleet tests: Debian's `etcd` (3.4, installed by the bootstrap) in a
//! lab host of its own, listening on the lab address and on its loopback, with its data
//! directory in a temp dir; killed on drop. `kill` and `start` again keep the data.

use std::{
    path::PathBuf,
    process::{Child, Stdio},
    time::Duration,
};

use crate::{
    lab::{Host, Lab, TempDir},
    wait_for,
};

/// The lab address of the etcd host.
pub const ETCD_ADDR: &str = "198.18.250.1";
pub const ETCD_MAC: &str = "02:5e:00:00:fa:01";

pub struct Etcd {
    pub host: Host,
    dir: TempDir,
    child: Option<Child>,
}

impl Etcd {
    /// An etcd host on `lab`, started.
    pub fn start(lab: &mut Lab) -> Etcd {
        let host = lab.host("etcd", ETCD_MAC, &[&format!("{ETCD_ADDR}/16")]);
        let mut e = Etcd {
            host,
            dir: TempDir::new("etcd"),
            child: None,
        };
        e.run();
        e
    }

    /// The client URL agents in the lab use.
    pub fn url(&self) -> String {
        format!("http://{ETCD_ADDR}:2379")
    }

    fn data(&self) -> PathBuf {
        self.dir.path("data")
    }

    /// Starts etcd (again, on the same data) and waits until it answers.
    pub fn run(&mut self) {
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.dir.path("etcd.log"))
            .expect("etcd log");
        let child = self
            .host
            .cmd("etcd")
            .arg("--data-dir")
            .arg(self.data())
            .args([
                "--name",
                "sg-test",
                "--listen-client-urls",
                &format!("http://{ETCD_ADDR}:2379,http://127.0.0.1:2379"),
                "--advertise-client-urls",
                &format!("http://{ETCD_ADDR}:2379"),
                "--listen-peer-urls",
                "http://127.0.0.1:2380",
                "--initial-advertise-peer-urls",
                "http://127.0.0.1:2380",
                "--initial-cluster",
                "sg-test=http://127.0.0.1:2380",
            ])
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .expect("etcd (the bootstrap installs Debian's etcd-server)");
        self.child = Some(child);
        let client = sg_agent::source::etcd::Client::new(&self.url()).expect("url");
        wait_for("etcd to answer", Duration::from_secs(20), || {
            self.host.ns.enter(|| client.list("/sg-probe/", 1).ok())
        });
    }

    /// SIGKILL, as a crash would.
    pub fn kill(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// `sg-agent publish --etcd URL --state FILE EXTRA…`, run on the etcd host.
    pub fn publish(&self, file: &std::path::Path, extra: &[&str]) -> std::process::Output {
        self.host
            .cmd(crate::lab::agent_bin())
            .args(["publish", "--etcd", &self.url(), "--state"])
            .arg(file)
            .args(extra)
            .output()
            .expect("sg-agent publish")
    }

    pub fn log(&self) -> String {
        std::fs::read_to_string(self.dir.path("etcd.log")).unwrap_or_default()
    }
}

impl Drop for Etcd {
    fn drop(&mut self) {
        self.kill();
    }
}

/// The revision `publish` reports ("… revision N").
pub fn revision_of(o: &std::process::Output) -> i64 {
    let t = format!(
        "{}{}",
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    );
    t.rsplit("revision ")
        .next()
        .and_then(|r| r.trim().trim_end_matches(')').parse().ok())
        .unwrap_or_else(|| panic!("a revision in: {t}"))
}
