//! etcd as the state source (SPEC §8): the key layout, a small synchronous client of
//! etcd's v3 JSON gateway (range, transactions, watch), and the combined state.
//!
//! Why the gateway, not the `etcd-client` crate: etcd-client is async (tokio and tonic)
//! and needs `protoc` to build, while everything else in the agent is synchronous and
//! event-driven on one loop. etcd serves the same v3 API as JSON over HTTP on its client
//! port (grpc-gateway, in 3.4 under `/v3/`): range, txn and a streaming watch are all the
//! agent and `publish` need, on blocking sockets in one thread. No second runtime, no
//! build-time tool, and it works with Debian's etcd 3.4 (etcd-client is tested upstream
//! against 3.5–3.7).

#![forbid(unsafe_code)]

use std::{
    collections::BTreeMap,
    io::{BufRead, BufReader, Read, Write},
    net::{TcpStream, ToSocketAddrs},
    time::Duration,
};

use crate::model::{NetworkInterface, State};

/// The default key prefix.
pub const DEFAULT_PREFIX: &str = "/sg/";

/// The three kinds of object, in the order that keeps references whole when written
/// (prefix lists and groups before the interfaces that use them; deletions reversed).
pub const KINDS: [&str; 3] = ["prefix-lists", "security-groups", "network-interfaces"];

/// `<prefix>v1/<kind>/<id>`.
pub fn key(prefix: &str, kind: &str, id: &str) -> String {
    format!("{prefix}v1/{kind}/{id}")
}

/// The kind and id of a key under `prefix`, if it is one of the layout's.
pub fn parse_key<'a>(prefix: &str, key: &'a str) -> Option<(&'a str, &'a str)> {
    let rest = key.strip_prefix(prefix)?.strip_prefix("v1/")?;
    let (kind, id) = rest.split_once('/')?;
    (KINDS.contains(&kind) && !id.is_empty()).then_some((kind, id))
}

/// One object per key, each value its AWS JSON item in canonical form (sorted keys, no
/// insignificant white space: equal objects are equal bytes).
pub fn objects(prefix: &str, state: &State) -> BTreeMap<String, String> {
    use crate::source::aws::{group_json, interface_json, prefix_list_json};
    let mut out = BTreeMap::new();
    for p in &state.prefix_lists {
        out.insert(
            key(prefix, KINDS[0], &p.id),
            prefix_list_json(p).to_string(),
        );
    }
    for g in &state.security_groups {
        out.insert(key(prefix, KINDS[1], &g.id), group_json(g).to_string());
    }
    for n in &state.network_interfaces {
        out.insert(key(prefix, KINDS[2], &n.id), interface_json(n).to_string());
    }
    out
}

/// The AWS JSON document of the objects under `prefix` (key → value): what the agent
/// parses and validates with the same code as a file. Values that are not JSON are
/// reported by key.
pub fn document(prefix: &str, kvs: &BTreeMap<String, String>) -> Result<String, String> {
    let mut lists: BTreeMap<&str, Vec<serde_json::Value>> = BTreeMap::new();
    let mut errors = Vec::new();
    for (k, v) in kvs {
        let Some((kind, _)) = parse_key(prefix, k) else {
            continue; // Not ours (another layout version, or a stray key).
        };
        match serde_json::from_str::<serde_json::Value>(v) {
            Ok(item) => lists.entry(kind).or_default().push(item),
            Err(e) => errors.push(format!("{k}: not JSON: {e}")),
        }
    }
    if !errors.is_empty() {
        return Err(errors.join("\n"));
    }
    let take = |kind: &str, lists: &mut BTreeMap<&str, Vec<serde_json::Value>>| {
        lists.remove(kind).unwrap_or_default()
    };
    Ok(serde_json::json!({
        "ManagedPrefixLists": take(KINDS[0], &mut lists),
        "SecurityGroups": take(KINDS[1], &mut lists),
        "NetworkInterfaces": take(KINDS[2], &mut lists),
    })
    .to_string())
}

/// What identifies the content under a prefix: the XOR of SHA-256(key NUL value) over
/// the layout's keys. Order-free, so a watch response updates it in the time of the keys
/// it changed, not of the whole prefix; equal content is an equal digest.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Digest([u8; 32]);

impl Digest {
    pub fn of(prefix: &str, kvs: &BTreeMap<String, String>) -> Digest {
        let mut d = Digest::default();
        for (k, v) in kvs {
            d.toggle(prefix, k, v);
        }
        d
    }

    /// Adds a key's value to the digest, or takes it out (XOR is its own inverse).
    pub fn toggle(&mut self, prefix: &str, key: &str, value: &str) {
        use sha2::{Digest as _, Sha256};
        if parse_key(prefix, key).is_none() {
            return;
        }
        let mut h = Sha256::new();
        h.update(key.as_bytes());
        h.update([0]);
        h.update(value.as_bytes());
        for (a, b) in self.0.iter_mut().zip(h.finalize()) {
            *a ^= b;
        }
    }

    pub fn hex(&self) -> String {
        self.0.iter().map(|b| format!("{b:02x}")).collect()
    }
}

/// The network interfaces a watch response replaced: the ones now in the state, and the
/// ones it no longer holds.
#[derive(Debug, Default)]
pub struct InterfaceDelta {
    pub added: Vec<NetworkInterface>,
    pub removed: Vec<NetworkInterface>,
}

/// The incremental path of a watch response (SPEC §8): when it changed network
/// interfaces only, and every new one is valid in `state` (the state of `kvs`, which is
/// still the content before the response), applies them to `state` at the place a full
/// decode would put them (key order). None, with `state` untouched, when the response
/// needs the full path: another kind of object changed, a key changed twice, a value
/// is not one valid interface, or ids, MAC or private addresses would be shared. The
/// full path then reports what is wrong.
pub fn apply_interfaces(
    prefix: &str,
    kvs: &BTreeMap<String, String>,
    state: &mut State,
    changes: &[(String, Option<String>)],
) -> Option<InterfaceDelta> {
    let one = |v: &str| {
        let mut items = super::aws::parse_interfaces(v)?;
        (items.len() == 1).then(|| items.pop()).flatten()
    };
    let mut delta = InterfaceDelta::default();
    let mut keys = std::collections::BTreeSet::new();
    for (k, new) in changes {
        match parse_key(prefix, k) {
            None => continue,
            Some((kind, _)) if kind != KINDS[2] => return None,
            Some(_) => {}
        }
        if !keys.insert(k.as_str()) {
            return None;
        }
        if let Some(old) = kvs.get(k) {
            delta.removed.push(one(old)?);
        }
        if let Some(new) = new {
            delta.added.push(one(new)?);
        }
    }
    // Where the replaced interfaces are (each exactly once).
    let mut gone = Vec::with_capacity(delta.removed.len());
    for r in &delta.removed {
        let at = state.network_interfaces.iter().position(|n| n == r)?;
        if gone.contains(&at) {
            return None;
        }
        gone.push(at);
    }
    if !state.check_interfaces_of(&delta.added).is_empty() {
        return None;
    }
    // Ids, MACs and private addresses stay unique (SPEC §3).
    let mut ids = std::collections::HashSet::new();
    let mut macs = std::collections::HashSet::new();
    let mut addresses = std::collections::HashSet::new();
    for n in &delta.added {
        let fresh = ids.insert(n.id.as_str())
            && n.mac.as_deref().is_none_or(|m| macs.insert(m))
            && n.addresses().all(|a| addresses.insert(a));
        if !fresh {
            return None;
        }
    }
    let clash = state
        .network_interfaces
        .iter()
        .enumerate()
        .filter(|(i, _)| !gone.contains(i))
        .any(|(_, n)| {
            ids.contains(n.id.as_str())
                || n.mac.as_deref().is_some_and(|m| macs.contains(m))
                || n.addresses().any(|a| addresses.contains(&a))
        });
    if clash {
        return None;
    }
    gone.sort_unstable();
    for at in gone.into_iter().rev() {
        state.network_interfaces.remove(at);
    }
    for n in &delta.added {
        let at = state.network_interfaces.partition_point(|m| m.id < n.id);
        state.network_interfaces.insert(at, n.clone());
    }
    Some(delta)
}

impl InterfaceDelta {
    /// How many interfaces of `state` (after the delta) hold each address of the
    /// interfaces it replaced or added: what the incremental compile needs to know.
    pub fn holders(&self, state: &State) -> std::collections::HashMap<std::net::IpAddr, usize> {
        let mut holders: std::collections::HashMap<_, usize> = self
            .added
            .iter()
            .chain(&self.removed)
            .flat_map(|n| n.addresses())
            .map(|a| (a, 0))
            .collect();
        for n in &state.network_interfaces {
            for a in n.addresses() {
                if let Some(count) = holders.get_mut(&a) {
                    *count += 1;
                }
            }
        }
        holders
    }
}

#[derive(Debug, thiserror::Error)]
pub enum EtcdError {
    #[error("etcd {endpoint}: {what}")]
    Io { endpoint: String, what: String },
    #[error("etcd: {0}")]
    Protocol(String),
    /// The watch's revision was compacted away: list again.
    #[error("etcd: revision {0} was compacted")]
    Compacted(i64),
}

/// A key's value and the revision that last changed it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Kv {
    pub value: String,
    pub mod_revision: i64,
}

/// What one watch response changed: the revision, and each key's new value (None:
/// deleted).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Changes {
    pub revision: i64,
    pub changes: Vec<(String, Option<String>)>,
}

/// One operation of a transaction.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Op {
    Put { key: String, value: String },
    Delete { key: String },
}

impl Op {
    pub fn key(&self) -> &str {
        match self {
            Op::Put { key, .. } | Op::Delete { key } => key,
        }
    }

    /// Bytes the operation adds to a request, roughly (keys and values base64-encoded).
    pub fn size(&self) -> usize {
        match self {
            Op::Put { key, value } => (key.len() + value.len()) * 4 / 3 + 64,
            Op::Delete { key } => key.len() * 4 / 3 + 64,
        }
    }
}

/// How a client authenticates: TLS with a client certificate (`https://` endpoints),
/// and an etcd user for its role. Through the JSON gateway etcd ignores the
/// certificate's common name (the gateway's own connection is what etcd sees), so the
/// role comes from the user's token (`/v3/auth/authenticate`); the certificate is what
/// lets the connection in (`--client-cert-auth`).
#[derive(Clone, Debug, Default)]
pub struct Security {
    pub ca: Option<std::path::PathBuf>,
    pub cert: Option<std::path::PathBuf>,
    pub key: Option<std::path::PathBuf>,
    pub user: Option<String>,
    pub password_file: Option<std::path::PathBuf>,
}

/// A client of etcd's v3 JSON gateway; endpoints are tried in turn.
#[derive(Clone)]
pub struct Client {
    endpoints: Vec<String>,
    timeout: Duration,
    tls: Option<std::sync::Arc<rustls::ClientConfig>>,
    user: Option<(String, String)>,
    token: std::sync::Arc<std::sync::Mutex<Option<String>>>,
}

impl std::fmt::Debug for Client {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Client")
            .field("endpoints", &self.endpoints)
            .field("tls", &self.tls.is_some())
            .field("user", &self.user.as_ref().map(|(u, _)| u))
            .finish()
    }
}

/// A connection: plain, or TLS.
enum Conn {
    Plain(TcpStream),
    Tls(Box<rustls::StreamOwned<rustls::ClientConnection, TcpStream>>),
}

impl Read for Conn {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        match self {
            Conn::Plain(s) => s.read(buf),
            Conn::Tls(s) => s.read(buf),
        }
    }
}

impl Write for Conn {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        match self {
            Conn::Plain(s) => s.write(buf),
            Conn::Tls(s) => s.write(buf),
        }
    }

    fn flush(&mut self) -> std::io::Result<()> {
        match self {
            Conn::Plain(s) => s.flush(),
            Conn::Tls(s) => s.flush(),
        }
    }
}

/// The TLS configuration of `--etcd-ca/--etcd-cert/--etcd-key`.
fn tls_config(sec: &Security) -> Result<rustls::ClientConfig, String> {
    use rustls_pki_types::{pem::PemObject, CertificateDer, PrivateKeyDer};
    let ca = sec
        .ca
        .as_ref()
        .ok_or("https:// endpoints need --etcd-ca (the CA that signed etcd's certificate)")?;
    let mut roots = rustls::RootCertStore::empty();
    for c in
        CertificateDer::pem_file_iter(ca).map_err(|e| format!("--etcd-ca {}: {e}", ca.display()))?
    {
        let c = c.map_err(|e| format!("--etcd-ca {}: {e}", ca.display()))?;
        roots
            .add(c)
            .map_err(|e| format!("--etcd-ca {}: {e}", ca.display()))?;
    }
    let builder = rustls::ClientConfig::builder_with_provider(std::sync::Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .map_err(|e| e.to_string())?
    .with_root_certificates(roots);
    match (&sec.cert, &sec.key) {
        (Some(cert), Some(key)) => {
            let certs: Vec<CertificateDer<'static>> = CertificateDer::pem_file_iter(cert)
                .map_err(|e| format!("--etcd-cert {}: {e}", cert.display()))?
                .collect::<Result<_, _>>()
                .map_err(|e| format!("--etcd-cert {}: {e}", cert.display()))?;
            let key = PrivateKeyDer::from_pem_file(key)
                .map_err(|e| format!("--etcd-key {}: {e}", key.display()))?;
            builder
                .with_client_auth_cert(certs, key)
                .map_err(|e| format!("--etcd-cert/--etcd-key: {e}"))
        }
        (None, None) => Ok(builder.with_no_client_auth()),
        _ => Err("--etcd-cert and --etcd-key go together".into()),
    }
}

fn b64(bytes: &[u8]) -> String {
    const T: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
    let mut out = String::with_capacity(bytes.len().div_ceil(3) * 4);
    for chunk in bytes.chunks(3) {
        let n = chunk.len();
        let v = (chunk[0] as u32) << 16
            | (*chunk.get(1).unwrap_or(&0) as u32) << 8
            | *chunk.get(2).unwrap_or(&0) as u32;
        for i in 0..4 {
            if i <= n {
                out.push(T[(v >> (18 - 6 * i) & 63) as usize] as char);
            } else {
                out.push('=');
            }
        }
    }
    out
}

fn unb64(text: &str) -> Result<Vec<u8>, EtcdError> {
    let val = |c: u8| -> Result<u32, EtcdError> {
        Ok(match c {
            b'A'..=b'Z' => c - b'A',
            b'a'..=b'z' => c - b'a' + 26,
            b'0'..=b'9' => c - b'0' + 52,
            b'+' | b'-' => 62,
            b'/' | b'_' => 63,
            _ => return Err(EtcdError::Protocol(format!("bad base64 {text:?}"))),
        } as u32)
    };
    let bytes: Vec<u8> = text.bytes().filter(|b| *b != b'=').collect();
    let mut out = Vec::with_capacity(bytes.len() * 3 / 4);
    for chunk in bytes.chunks(4) {
        let mut v = 0u32;
        for (i, c) in chunk.iter().enumerate() {
            v |= val(*c)? << (18 - 6 * i);
        }
        for i in 0..chunk.len().saturating_sub(1) {
            out.push((v >> (16 - 8 * i)) as u8);
        }
    }
    Ok(out)
}

fn string_of(v: &serde_json::Value) -> Result<String, EtcdError> {
    let bytes = unb64(v.as_str().unwrap_or(""))?;
    String::from_utf8(bytes).map_err(|_| EtcdError::Protocol("a key or value is not UTF-8".into()))
}

/// etcd writes int64 fields as JSON strings.
fn int_of(v: &serde_json::Value) -> i64 {
    match v {
        serde_json::Value::String(s) => s.parse().unwrap_or(0),
        serde_json::Value::Number(n) => n.as_i64().unwrap_or(0),
        _ => 0,
    }
}

/// The first key after every key that starts with `prefix` (etcd's range end).
fn prefix_end(prefix: &str) -> Vec<u8> {
    let mut end = prefix.as_bytes().to_vec();
    while let Some(last) = end.pop() {
        if last < 0xff {
            end.push(last + 1);
            return end;
        }
    }
    vec![0]
}

/// An open HTTP response: status and a reader of its (possibly chunked) body.
struct Response {
    status: u16,
    body: Box<dyn BufRead + Send>,
}

/// A reader of an HTTP/1.1 chunked body.
struct Chunked<R> {
    inner: R,
    left: usize,
    done: bool,
}

impl<R: BufRead> Read for Chunked<R> {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        if self.done {
            return Ok(0);
        }
        if self.left == 0 {
            let mut line = String::new();
            if self.inner.read_line(&mut line)? == 0 {
                return Ok(0);
            }
            if line.trim().is_empty() {
                line.clear();
                self.inner.read_line(&mut line)?;
            }
            let size = usize::from_str_radix(line.trim().split(';').next().unwrap_or(""), 16)
                .map_err(|_| std::io::Error::other(format!("bad chunk size {line:?}")))?;
            if size == 0 {
                self.done = true;
                return Ok(0);
            }
            self.left = size;
        }
        let want = buf.len().min(self.left);
        let n = self.inner.read(&mut buf[..want])?;
        self.left -= n;
        Ok(n)
    }
}

impl Client {
    /// `urls`: comma-separated `http://host:port` endpoints, without TLS or a user.
    pub fn new(urls: &str) -> Result<Client, String> {
        Client::with_security(urls, &Security::default())
    }

    /// `urls`: comma-separated `http://host:port` or `https://host:port` endpoints (all
    /// of one scheme); `https` needs the CA, and etcd's `--client-cert-auth` a client
    /// certificate and key.
    pub fn with_security(urls: &str, sec: &Security) -> Result<Client, String> {
        let mut endpoints = Vec::new();
        let mut https = None;
        for u in urls.split(',').map(str::trim).filter(|u| !u.is_empty()) {
            let (secure, hostport) = match (u.strip_prefix("http://"), u.strip_prefix("https://")) {
                (Some(h), _) => (false, h),
                (_, Some(h)) => (true, h),
                _ => {
                    return Err(format!(
                        "--etcd {u}: use http://HOST:PORT or https://HOST:PORT"
                    ))
                }
            };
            if https.is_some_and(|h| h != secure) {
                return Err("--etcd: endpoints are all http:// or all https://".into());
            }
            https = Some(secure);
            endpoints.push(hostport.trim_end_matches('/').to_string());
        }
        if endpoints.is_empty() {
            return Err("--etcd: no endpoint".into());
        }
        let tls = if https == Some(true) {
            Some(std::sync::Arc::new(tls_config(sec)?))
        } else {
            if sec.ca.is_some() || sec.cert.is_some() {
                return Err("--etcd-ca/--etcd-cert/--etcd-key need https:// endpoints".into());
            }
            None
        };
        let user = match (&sec.user, &sec.password_file) {
            (Some(u), Some(f)) => {
                let password = std::fs::read_to_string(f)
                    .map_err(|e| format!("--etcd-password-file {}: {e}", f.display()))?;
                Some((
                    u.clone(),
                    password.trim_end_matches(['\n', '\r']).to_string(),
                ))
            }
            (None, None) => None,
            _ => return Err("--etcd-user and --etcd-password-file go together".into()),
        };
        Ok(Client {
            endpoints,
            timeout: Duration::from_secs(5),
            tls,
            user,
            token: Default::default(),
        })
    }

    pub fn endpoints(&self) -> Vec<String> {
        let scheme = if self.tls.is_some() { "https" } else { "http" };
        self.endpoints
            .iter()
            .map(|e| format!("{scheme}://{e}"))
            .collect()
    }

    fn connect_tcp(&self, endpoint: &str) -> Result<TcpStream, EtcdError> {
        let io = |what: String| EtcdError::Io {
            endpoint: endpoint.to_string(),
            what,
        };
        let addr = endpoint
            .to_socket_addrs()
            .map_err(|e| io(e.to_string()))?
            .next()
            .ok_or_else(|| io("no address".into()))?;
        let s = TcpStream::connect_timeout(&addr, self.timeout).map_err(|e| io(e.to_string()))?;
        let _ = s.set_nodelay(true);
        Ok(s)
    }

    /// A connection to `endpoint` with the read timeout `read` (None: none, a watch).
    fn connect(&self, endpoint: &str, read: Option<Duration>) -> Result<Conn, EtcdError> {
        let io = |what: String| EtcdError::Io {
            endpoint: endpoint.to_string(),
            what,
        };
        let s = self.connect_tcp(endpoint)?;
        s.set_read_timeout(read).map_err(|e| io(e.to_string()))?;
        s.set_write_timeout(Some(self.timeout))
            .map_err(|e| io(e.to_string()))?;
        let Some(tls) = &self.tls else {
            return Ok(Conn::Plain(s));
        };
        let host = endpoint.rsplit_once(':').map_or(endpoint, |(h, _)| h);
        let host = host.trim_start_matches('[').trim_end_matches(']');
        let name = rustls_pki_types::ServerName::try_from(host.to_string())
            .map_err(|e| io(format!("server name {host}: {e}")))?;
        let conn = rustls::ClientConnection::new(tls.clone(), name)
            .map_err(|e| io(format!("TLS: {e}")))?;
        Ok(Conn::Tls(Box::new(rustls::StreamOwned::new(conn, s))))
    }

    /// The user's token, authenticating first when there is none.
    fn token(&self, renew: bool) -> Result<Option<String>, EtcdError> {
        let Some((name, password)) = &self.user else {
            return Ok(None);
        };
        let mut token = self.token.lock().unwrap_or_else(|p| p.into_inner());
        if renew || token.is_none() {
            let body = serde_json::json!({ "name": name, "password": password });
            let mut r = self.post_raw("/v3/auth/authenticate", &body, false, None)?;
            let mut text = String::new();
            r.body
                .read_to_string(&mut text)
                .map_err(|e| EtcdError::Protocol(format!("authenticating: {e}")))?;
            let v: serde_json::Value = serde_json::from_str(&text).unwrap_or_default();
            let t = v["token"].as_str().ok_or_else(|| {
                EtcdError::Protocol(format!(
                    "authenticating as {name}: {}",
                    v["message"]
                        .as_str()
                        .or(v["error"].as_str())
                        .unwrap_or(&text)
                ))
            })?;
            *token = Some(t.to_string());
        }
        Ok(token.clone())
    }

    /// POSTs `body` to `path`, with the user's token when there is a user.
    fn post(
        &self,
        path: &str,
        body: &serde_json::Value,
        stream: bool,
    ) -> Result<Response, EtcdError> {
        let token = self.token(false)?;
        self.post_raw(path, body, stream, token.as_deref())
    }

    /// POSTs `body` to `path` on the first endpoint that answers. `stream`: no read
    /// timeout (a watch).
    fn post_raw(
        &self,
        path: &str,
        body: &serde_json::Value,
        stream: bool,
        token: Option<&str>,
    ) -> Result<Response, EtcdError> {
        let body = body.to_string();
        let mut last = None;
        for endpoint in &self.endpoints {
            let attempt = || -> Result<Response, EtcdError> {
                let io = |e: std::io::Error| EtcdError::Io {
                    endpoint: endpoint.clone(),
                    what: e.to_string(),
                };
                let mut s =
                    self.connect(endpoint, if stream { None } else { Some(self.timeout) })?;
                let auth = token
                    .map(|t| format!("Authorization: {t}\r\n"))
                    .unwrap_or_default();
                write!(
                    s,
                    "POST {path} HTTP/1.1\r\nHost: {endpoint}\r\nContent-Type: application/json\r\n{auth}Content-Length: {}\r\nConnection: close\r\n\r\n{body}",
                    body.len()
                )
                .map_err(io)?;
                s.flush().map_err(io)?;
                let mut reader = BufReader::new(s);
                let mut line = String::new();
                reader.read_line(&mut line).map_err(io)?;
                let status: u16 = line
                    .split_whitespace()
                    .nth(1)
                    .and_then(|c| c.parse().ok())
                    .ok_or_else(|| EtcdError::Protocol(format!("bad status line {line:?}")))?;
                let (mut chunked, mut length) = (false, None);
                loop {
                    line.clear();
                    reader.read_line(&mut line).map_err(io)?;
                    let l = line.trim();
                    if l.is_empty() {
                        break;
                    }
                    let lower = l.to_ascii_lowercase();
                    if lower.starts_with("transfer-encoding:") && lower.contains("chunked") {
                        chunked = true;
                    }
                    if let Some(v) = lower.strip_prefix("content-length:") {
                        length = v.trim().parse::<u64>().ok();
                    }
                }
                let body: Box<dyn BufRead + Send> = if chunked {
                    Box::new(BufReader::new(Chunked {
                        inner: reader,
                        left: 0,
                        done: false,
                    }))
                } else if let Some(n) = length {
                    Box::new(BufReader::new(reader.take(n)))
                } else {
                    Box::new(reader)
                };
                Ok(Response { status, body })
            };
            match attempt() {
                Ok(r) => return Ok(r),
                Err(e) => last = Some(e),
            }
        }
        Err(last.unwrap_or_else(|| EtcdError::Protocol("no endpoint".into())))
    }

    fn call(&self, path: &str, body: serde_json::Value) -> Result<serde_json::Value, EtcdError> {
        match self.call_once(path, &body) {
            // Simple tokens expire: authenticate again, once.
            Err(EtcdError::Protocol(m))
                if self.user.is_some() && m.contains("invalid auth token") =>
            {
                self.token(true)?;
                self.call_once(path, &body)
            }
            r => r,
        }
    }

    fn call_once(
        &self,
        path: &str,
        body: &serde_json::Value,
    ) -> Result<serde_json::Value, EtcdError> {
        let mut r = self.post(path, body, false)?;
        let mut text = String::new();
        r.body
            .read_to_string(&mut text)
            .map_err(|e| EtcdError::Protocol(format!("{path}: {e}")))?;
        let v: serde_json::Value = serde_json::from_str(&text)
            .map_err(|e| EtcdError::Protocol(format!("{path}: {e}: {text}")))?;
        if r.status != 200 {
            return Err(EtcdError::Protocol(format!(
                "{path}: HTTP {}: {}",
                r.status,
                v["message"]
                    .as_str()
                    .or(v["error"].as_str())
                    .unwrap_or(&text)
            )));
        }
        Ok(v)
    }

    /// Every key under `prefix` at one revision, in pages of `page` keys; returns the
    /// revision and the keys.
    pub fn list(
        &self,
        prefix: &str,
        page: usize,
    ) -> Result<(i64, BTreeMap<String, Kv>), EtcdError> {
        let end = b64(&prefix_end(prefix));
        let mut from = b64(prefix.as_bytes());
        let mut revision = 0;
        let mut out = BTreeMap::new();
        loop {
            let mut req = serde_json::json!({ "key": from, "range_end": end, "limit": page });
            if revision > 0 {
                req["revision"] = revision.to_string().into();
            }
            let v = self.call("/v3/kv/range", req)?;
            if revision == 0 {
                revision = int_of(&v["header"]["revision"]);
            }
            let kvs = v["kvs"].as_array().cloned().unwrap_or_default();
            let mut last = None;
            for kv in &kvs {
                let k = string_of(&kv["key"])?;
                out.insert(
                    k.clone(),
                    Kv {
                        value: string_of(&kv["value"])?,
                        mod_revision: int_of(&kv["mod_revision"]),
                    },
                );
                last = Some(k);
            }
            match (v["more"].as_bool() == Some(true), last) {
                (true, Some(k)) => {
                    let mut next = k.into_bytes();
                    next.push(0);
                    from = b64(&next);
                }
                _ => return Ok((revision, out)),
            }
        }
    }

    /// One transaction: every key of `ops` must still have the revision given in
    /// `expect` (0: absent); returns whether it applied, and the revision after it.
    pub fn txn(
        &self,
        ops: &[Op],
        expect: &BTreeMap<String, i64>,
    ) -> Result<(bool, i64), EtcdError> {
        let compare: Vec<serde_json::Value> = ops
            .iter()
            .map(|op| {
                serde_json::json!({
                    "target": "MOD",
                    "key": b64(op.key().as_bytes()),
                    "mod_revision": expect.get(op.key()).copied().unwrap_or(0).to_string(),
                    "result": "EQUAL",
                })
            })
            .collect();
        let success: Vec<serde_json::Value> = ops
            .iter()
            .map(|op| match op {
                Op::Put { key, value } => serde_json::json!({
                    "request_put": { "key": b64(key.as_bytes()), "value": b64(value.as_bytes()) }
                }),
                Op::Delete { key } => serde_json::json!({
                    "request_delete_range": { "key": b64(key.as_bytes()) }
                }),
            })
            .collect();
        let v = self.call(
            "/v3/kv/txn",
            serde_json::json!({ "compare": compare, "success": success }),
        )?;
        Ok((
            v["succeeded"].as_bool() == Some(true),
            int_of(&v["header"]["revision"]),
        ))
    }

    /// Compacts the history up to `revision` (tests use it to force a relist).
    pub fn compact(&self, revision: i64) -> Result<(), EtcdError> {
        self.call(
            "/v3/kv/compaction",
            serde_json::json!({ "revision": revision.to_string(), "physical": true }),
        )
        .map(drop)
    }

    /// Watches `prefix` from `start_revision`; `on_changes` gets each response with
    /// events, in order, and returns false to stop. Returns when the stream ends (an
    /// error), or `Compacted` when the revision is gone.
    pub fn watch(
        &self,
        prefix: &str,
        start_revision: i64,
        mut on_changes: impl FnMut(Changes) -> bool,
    ) -> Result<(), EtcdError> {
        let req = serde_json::json!({
            "create_request": {
                "key": b64(prefix.as_bytes()),
                "range_end": b64(&prefix_end(prefix)),
                "start_revision": start_revision.to_string(),
            }
        });
        let mut r = self.post("/v3/watch", &req, true)?;
        if r.status != 200 {
            return Err(EtcdError::Protocol(format!("/v3/watch: HTTP {}", r.status)));
        }
        let mut line = String::new();
        loop {
            line.clear();
            let n = r
                .body
                .read_line(&mut line)
                .map_err(|e| EtcdError::Protocol(format!("watch stream: {e}")))?;
            if n == 0 {
                return Err(EtcdError::Protocol("the watch stream ended".into()));
            }
            if line.trim().is_empty() {
                continue;
            }
            let v: serde_json::Value = serde_json::from_str(line.trim())
                .map_err(|e| EtcdError::Protocol(format!("watch stream: {e}")))?;
            let result = &v["result"];
            if result.is_null() {
                if self.user.is_some() && line.contains("invalid auth token") {
                    // The next watch (the caller reconnects) authenticates again.
                    *self.token.lock().unwrap_or_else(|p| p.into_inner()) = None;
                }
                return Err(EtcdError::Protocol(format!("watch: {}", line.trim())));
            }
            let compact = int_of(&result["compact_revision"]);
            if compact > 0 {
                return Err(EtcdError::Compacted(compact));
            }
            if result["canceled"].as_bool() == Some(true) {
                return Err(EtcdError::Protocol(format!(
                    "watch canceled: {}",
                    line.trim()
                )));
            }
            let events = result["events"].as_array().cloned().unwrap_or_default();
            if events.is_empty() {
                continue;
            }
            let mut changes = Vec::new();
            for e in &events {
                let key = string_of(&e["kv"]["key"])?;
                if e["type"].as_str() == Some("DELETE") {
                    changes.push((key, None));
                } else {
                    changes.push((key, Some(string_of(&e["kv"]["value"])?)));
                }
            }
            let revision = int_of(&result["header"]["revision"]);
            if !on_changes(Changes { revision, changes }) {
                return Ok(());
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn base64_round_trips() {
        for s in [
            "",
            "f",
            "fo",
            "foo",
            "foob",
            "fooba",
            "foobar",
            "/sg/v1/network-interfaces/eni-1",
        ] {
            assert_eq!(unb64(&b64(s.as_bytes())).unwrap(), s.as_bytes());
        }
        assert_eq!(b64(b"foo"), "Zm9v");
        assert_eq!(b64(b"fo"), "Zm8=");
    }

    #[test]
    fn keys_follow_the_layout() {
        assert_eq!(
            key("/sg/", "security-groups", "sg-1"),
            "/sg/v1/security-groups/sg-1"
        );
        assert_eq!(
            parse_key("/sg/", "/sg/v1/network-interfaces/eni-1"),
            Some(("network-interfaces", "eni-1"))
        );
        assert_eq!(parse_key("/sg/", "/sg/v2/network-interfaces/eni-1"), None);
        assert_eq!(parse_key("/sg/", "/sg/v1/other/x"), None);
        assert_eq!(prefix_end("/sg/"), b"/sg0".to_vec());
    }
}
