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
    /// With TLS: the certificates' directory (ca.crt, server.*, root.*, agent.*).
    tls: Option<PathBuf>,
}

impl Etcd {
    /// An etcd host on `lab`, started.
    pub fn start(lab: &mut Lab) -> Etcd {
        let host = lab.host("etcd", ETCD_MAC, &[&format!("{ETCD_ADDR}/16")]);
        let mut e = Etcd {
            host,
            dir: TempDir::new("etcd"),
            child: None,
            tls: None,
        };
        e.run();
        e
    }

    /// An etcd host serving TLS only, requiring client certificates signed by a CA the
    /// test makes (openssl): `ca.crt`, `server.*`, `etcdctl.*` (CN root) and sg's client
    /// certificates `root.*` (the publisher's) and `agent.*`, in `certs()`.
    pub fn start_tls(lab: &mut Lab) -> Etcd {
        let host = lab.host("etcd", ETCD_MAC, &[&format!("{ETCD_ADDR}/16")]);
        let dir = TempDir::new("etcd-tls");
        let certs = dir.path("certs");
        std::fs::create_dir_all(&certs).unwrap();
        let sh = |script: &str| {
            let out = std::process::Command::new("sh")
                .arg("-c")
                .arg(script)
                .current_dir(&certs)
                .output()
                .expect("openssl (the bootstrap installs it)");
            assert!(
                out.status.success(),
                "{script}: {}",
                String::from_utf8_lossy(&out.stderr)
            );
        };
        sh("openssl req -x509 -newkey ec -pkeyopt ec_paramgen_curve:P-256 -nodes -keyout ca.key -out ca.crt -days 2 -subj /CN=sg-test-ca");
        // etcdctl's certificate names its user by CN (gRPC); sg's clients talk to the JSON
        // gateway, which refuses a certificate with a CN (etcd 3.4): theirs have none.
        for (name, subject) in [
            ("server", "/CN=etcd"),
            ("etcdctl", "/CN=root"),
            ("root", "/O=sg-publisher"),
            ("agent", "/O=sg-agent"),
        ] {
            sh(&format!(
                "openssl req -newkey ec -pkeyopt ec_paramgen_curve:P-256 -nodes -keyout {name}.key -out {name}.csr -subj {subject} \
                 && printf 'subjectAltName=IP:{ETCD_ADDR},IP:127.0.0.1\nextendedKeyUsage=serverAuth,clientAuth\n' > {name}.ext \
                 && openssl x509 -req -in {name}.csr -CA ca.crt -CAkey ca.key -CAcreateserial -out {name}.crt -days 2 -extfile {name}.ext"
            ));
        }
        let mut e = Etcd {
            host,
            dir,
            child: None,
            tls: Some(certs),
        };
        e.run();
        e
    }

    /// The TLS certificates' directory.
    pub fn certs(&self) -> PathBuf {
        self.tls.clone().expect("a TLS etcd")
    }

    /// etcdctl on the etcd host, over loopback, as `root` by certificate.
    pub fn etcdctl(&self, args: &[&str]) -> std::process::Output {
        let certs = self.certs();
        self.host
            .cmd("etcdctl")
            .arg("--endpoints=https://127.0.0.1:2379")
            .arg(format!("--cacert={}", certs.join("ca.crt").display()))
            .arg(format!("--cert={}", certs.join("etcdctl.crt").display()))
            .arg(format!("--key={}", certs.join("etcdctl.key").display()))
            .args(args)
            .env("ETCDCTL_API", "3")
            .output()
            .expect("etcdctl (the bootstrap installs etcd-client)")
    }

    /// The client URL agents in the lab use.
    pub fn url(&self) -> String {
        let scheme = if self.tls.is_some() { "https" } else { "http" };
        format!("{scheme}://{ETCD_ADDR}:2379")
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
        let scheme = if self.tls.is_some() { "https" } else { "http" };
        let mut cmd = self.host.cmd("etcd");
        cmd.arg("--data-dir").arg(self.data()).args([
            "--name",
            "sg-test",
            "--listen-client-urls",
            &format!("{scheme}://{ETCD_ADDR}:2379,{scheme}://127.0.0.1:2379"),
            "--advertise-client-urls",
            &format!("{scheme}://{ETCD_ADDR}:2379"),
            "--listen-peer-urls",
            "http://127.0.0.1:2380",
            "--initial-advertise-peer-urls",
            "http://127.0.0.1:2380",
            "--initial-cluster",
            "sg-test=http://127.0.0.1:2380",
        ]);
        if let Some(certs) = &self.tls {
            cmd.arg(format!(
                "--cert-file={}",
                certs.join("server.crt").display()
            ))
            .arg(format!("--key-file={}", certs.join("server.key").display()))
            .arg(format!(
                "--trusted-ca-file={}",
                certs.join("ca.crt").display()
            ))
            .arg("--client-cert-auth");
        }
        let child = cmd
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .expect("etcd (the bootstrap installs Debian's etcd-server)");
        self.child = Some(child);
        let client = self.client_as("root", false);
        // It answers once a request gets an answer (with auth on, a refusal is one).
        wait_for("etcd to answer", Duration::from_secs(20), || {
            match self.host.ns.enter(|| client.list("/sg-probe/", 1)) {
                Err(sg_agent::source::etcd::EtcdError::Io { .. }) => None,
                _ => Some(()),
            }
        });
    }

    /// A client: with TLS, by the certificate of `cert` ("root" or "agent"), and as the
    /// etcd user of that name when `user` (after `auth enable`).
    pub fn client_as(&self, cert: &str, user: bool) -> sg_agent::source::etcd::Client {
        let security = match &self.tls {
            None => Default::default(),
            Some(certs) => sg_agent::source::etcd::Security {
                ca: Some(certs.join("ca.crt")),
                cert: Some(certs.join(format!("{cert}.crt"))),
                key: Some(certs.join(format!("{cert}.key"))),
                user: user.then(|| {
                    if cert == "agent" {
                        "sg-agent".into()
                    } else {
                        cert.into()
                    }
                }),
                password_file: user.then(|| certs.join(format!("{cert}.password"))),
            },
        };
        sg_agent::source::etcd::Client::with_security(&self.url(), &security).expect("client")
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

    /// The etcd process's pid, while it runs.
    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(|c| c.id())
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
