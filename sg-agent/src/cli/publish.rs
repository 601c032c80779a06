//! `sg-agent publish --etcd URLS --state FILE` (SPEC §8): validate, read the prefix,
//! write only what differs in transactions guarded by each key's revision, ordered so no
//! reference dangles; `--merge`, `--prune`, `--dry-run`; a concurrent publisher's write
//! is detected (the guard fails) and the plan is made again from what etcd now holds.

#![forbid(unsafe_code)]

use std::{collections::BTreeMap, path::PathBuf, process::ExitCode};

use clap::Args;

use super::EXIT_USAGE;
use crate::{
    model::State,
    source::{
        self,
        etcd::{self, Client, Op, KINDS},
    },
};

#[derive(Args, Debug)]
pub struct PublishArgs {
    /// etcd endpoints, comma-separated (http://HOST:PORT).
    #[arg(long, value_name = "URLS")]
    pub etcd: String,
    /// The state file to publish (native TOML or AWS JSON).
    #[arg(long)]
    pub state: PathBuf,
    /// Key prefix.
    #[arg(long, default_value = etcd::DEFAULT_PREFIX)]
    pub etcd_prefix: String,
    /// Upsert the file's objects and delete nothing (the file may reference groups and
    /// prefix lists already in etcd; the merged state is what is validated).
    #[arg(long, conflicts_with = "prune")]
    pub merge: bool,
    /// Delete the objects the file no longer has (refused without it).
    #[arg(long)]
    pub prune: bool,
    /// Print what would be written and deleted; write nothing.
    #[arg(long)]
    pub dry_run: bool,
    #[command(flatten)]
    pub security: EtcdSecurityArgs,
}

/// TLS and the etcd user, for `run --etcd` and `publish`.
#[derive(Args, Debug, Clone, Default)]
pub struct EtcdSecurityArgs {
    /// CA certificate (PEM) that signed etcd's certificate (https:// endpoints).
    #[arg(long, value_name = "FILE")]
    pub etcd_ca: Option<PathBuf>,
    /// Client certificate (PEM) for etcd's --client-cert-auth.
    #[arg(long, value_name = "FILE", requires = "etcd_key")]
    pub etcd_cert: Option<PathBuf>,
    /// The client certificate's private key (PEM).
    #[arg(long, value_name = "FILE", requires = "etcd_cert")]
    pub etcd_key: Option<PathBuf>,
    /// etcd user whose role applies (agents: a read-only role on the prefix).
    #[arg(long, value_name = "NAME", requires = "etcd_password_file")]
    pub etcd_user: Option<String>,
    /// File holding the etcd user's password.
    #[arg(long, value_name = "FILE", requires = "etcd_user")]
    pub etcd_password_file: Option<PathBuf>,
}

impl EtcdSecurityArgs {
    pub fn security(&self) -> etcd::Security {
        etcd::Security {
            ca: self.etcd_ca.clone(),
            cert: self.etcd_cert.clone(),
            key: self.etcd_key.clone(),
            user: self.etcd_user.clone(),
            password_file: self.etcd_password_file.clone(),
        }
    }
}

/// etcd's default limits on one transaction: operations, and request bytes (1.5 MiB).
const MAX_OPS: usize = 128;
const MAX_BYTES: usize = 1536 * 1024;

/// The order of a key's kind (prefix lists, groups, interfaces).
fn rank(prefix: &str, key: &str) -> usize {
    etcd::parse_key(prefix, key)
        .and_then(|(kind, _)| KINDS.iter().position(|k| *k == kind))
        .unwrap_or(KINDS.len())
}

/// The operations that make `existing` equal `desired`: puts in reference order, then
/// deletions in the reverse order.
pub fn plan(
    prefix: &str,
    existing: &BTreeMap<String, String>,
    desired: &BTreeMap<String, String>,
    delete: bool,
) -> (Vec<Op>, Vec<Op>) {
    let mut puts: Vec<Op> = desired
        .iter()
        .filter(|(k, v)| existing.get(*k) != Some(*v))
        .map(|(k, v)| Op::Put {
            key: k.clone(),
            value: v.clone(),
        })
        .collect();
    puts.sort_by_key(|op| rank(prefix, op.key()));
    let mut deletes: Vec<Op> = if delete {
        existing
            .keys()
            .filter(|k| !desired.contains_key(*k) && etcd::parse_key(prefix, k).is_some())
            .map(|k| Op::Delete { key: k.clone() })
            .collect()
    } else {
        vec![]
    };
    deletes.sort_by_key(|op| std::cmp::Reverse(rank(prefix, op.key())));
    (puts, deletes)
}

/// Splits operations into transactions within etcd's limits, keeping their order.
pub fn chunks(ops: Vec<Op>) -> Vec<Vec<Op>> {
    let mut out: Vec<Vec<Op>> = vec![];
    let mut bytes = 0;
    for op in ops {
        let size = op.size();
        match out.last_mut() {
            Some(last) if last.len() < MAX_OPS && bytes + size <= MAX_BYTES => {
                bytes += size;
                last.push(op);
            }
            _ => {
                bytes = size;
                out.push(vec![op]);
            }
        }
    }
    out
}

/// The state under the prefix now, unchecked (for merging into).
fn existing_state(prefix: &str, kvs: &BTreeMap<String, String>) -> Result<State, String> {
    let doc = etcd::document(prefix, kvs)?;
    source::parse_part(&doc).map_err(|problems| {
        problems
            .iter()
            .map(|p| format!("etcd {prefix}: {p}"))
            .collect::<Vec<_>>()
            .join("\n")
    })
}

/// `base` with `part`'s objects added or replacing those of the same id.
fn merged(mut base: State, part: State) -> State {
    for g in part.security_groups {
        base.security_groups.retain(|x| x.id != g.id);
        base.security_groups.push(g);
    }
    for p in part.prefix_lists {
        base.prefix_lists.retain(|x| x.id != p.id);
        base.prefix_lists.push(p);
    }
    for n in part.network_interfaces {
        base.network_interfaces.retain(|x| x.id != n.id);
        base.network_interfaces.push(n);
    }
    base
}

pub(super) fn publish(a: &PublishArgs) -> ExitCode {
    let client = match Client::with_security(&a.etcd, &a.security.security()) {
        Ok(c) => c,
        Err(e) => {
            eprintln!("sg-agent publish: {e}");
            return ExitCode::from(EXIT_USAGE);
        }
    };
    if !a.etcd_prefix.starts_with('/') || !a.etcd_prefix.ends_with('/') {
        eprintln!(
            "sg-agent publish: --etcd-prefix {:?}: starts and ends with /",
            a.etcd_prefix
        );
        return ExitCode::from(EXIT_USAGE);
    }
    let prefix = a.etcd_prefix.as_str();
    // The file: whole and valid, or (--merge) a part that must be valid once merged.
    let text = match std::fs::read_to_string(&a.state) {
        Ok(t) => t,
        Err(e) => {
            eprintln!("sg-agent publish: {}: {e}", a.state.display());
            return ExitCode::FAILURE;
        }
    };
    let file_state = if a.merge {
        source::parse_part(&text).map_err(|p| (a.state.clone(), p))
    } else {
        source::parse_str(&text).map_err(|p| (a.state.clone(), p))
    };
    let file_state = match file_state {
        Ok(s) => s,
        Err((file, problems)) => {
            eprintln!("{}", source::StateError { file, problems });
            eprintln!("sg-agent publish: the state is invalid; nothing was published");
            return ExitCode::FAILURE;
        }
    };
    for attempt in 0..5 {
        let (revision, existing) = match client.list(prefix, 1000) {
            Ok(x) => x,
            Err(e) => {
                eprintln!("sg-agent publish: reading {prefix}: {e}");
                return ExitCode::FAILURE;
            }
        };
        let values: BTreeMap<String, String> = existing
            .iter()
            .map(|(k, kv)| (k.clone(), kv.value.clone()))
            .collect();
        let desired_state = if a.merge {
            let base = match existing_state(prefix, &values) {
                Ok(s) => s,
                Err(e) => {
                    eprintln!("{e}\nsg-agent publish: what etcd holds cannot be merged into");
                    return ExitCode::FAILURE;
                }
            };
            match source::validate_whole(merged(base, file_state.clone())) {
                Ok(s) => s,
                Err(problems) => {
                    for p in &problems {
                        eprintln!("{}: merged with etcd {prefix}: {p}", a.state.display());
                    }
                    eprintln!(
                        "sg-agent publish: the merged state is invalid; nothing was published"
                    );
                    return ExitCode::FAILURE;
                }
            }
        } else {
            file_state.clone()
        };
        let desired = etcd::objects(prefix, &desired_state);
        let (puts, deletes) = plan(prefix, &values, &desired, !a.merge);
        if !deletes.is_empty() && !a.prune && !a.dry_run {
            eprintln!(
                "sg-agent publish: the file no longer has {} object(s) that etcd holds; refusing to delete them without --prune:",
                deletes.len()
            );
            for d in &deletes {
                eprintln!("  {}", d.key());
            }
            return ExitCode::FAILURE;
        }
        if a.dry_run {
            for op in puts.iter().chain(&deletes) {
                match op {
                    Op::Put { key, .. } if values.contains_key(key) => println!("update {key}"),
                    Op::Put { key, .. } => println!("create {key}"),
                    Op::Delete { key } => println!("delete {key}"),
                }
            }
            println!(
                "dry run: {} to write, {} to delete{}; nothing written (etcd at revision {revision})",
                puts.len(),
                deletes.len(),
                if !deletes.is_empty() && !a.prune { " (needs --prune)" } else { "" }
            );
            return ExitCode::SUCCESS;
        }
        if puts.is_empty() && deletes.is_empty() {
            println!("nothing to publish: {prefix} already holds this state (revision {revision})");
            return ExitCode::SUCCESS;
        }
        let expect: BTreeMap<String, i64> = existing
            .iter()
            .map(|(k, kv)| (k.clone(), kv.mod_revision))
            .collect();
        let (n_puts, n_deletes) = (puts.len(), deletes.len());
        let txns = chunks(puts.into_iter().chain(deletes).collect());
        let count = txns.len();
        let mut last = revision;
        let mut conflict = false;
        for (i, ops) in txns.into_iter().enumerate() {
            match client.txn(&ops, &expect) {
                Ok((true, rev)) => last = rev,
                Ok((false, _)) => {
                    eprintln!(
                        "sg-agent publish: a concurrent change to {prefix} (transaction {} of {count}); reading it again{}",
                        i + 1,
                        if attempt < 4 { " and making a new plan" } else { "" }
                    );
                    conflict = true;
                    break;
                }
                Err(e) => {
                    eprintln!(
                        "sg-agent publish: transaction {} of {count}: {e}; {} applied before it",
                        i + 1,
                        i
                    );
                    return ExitCode::FAILURE;
                }
            }
        }
        if !conflict {
            println!(
                "published {n_puts} object(s), deleted {n_deletes}, in {count} transaction(s); {prefix} is at revision {last}"
            );
            return ExitCode::SUCCESS;
        }
    }
    eprintln!("sg-agent publish: {prefix} kept changing under concurrent publishes; gave up (nothing overwritten)");
    ExitCode::FAILURE
}

#[cfg(test)]
mod tests {
    use super::*;

    fn map(items: &[(&str, &str)]) -> BTreeMap<String, String> {
        items
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect()
    }

    #[test]
    fn puts_keep_references_whole_and_deletions_go_the_other_way() {
        let existing = map(&[
            ("/sg/v1/network-interfaces/eni-old", "{}"),
            ("/sg/v1/security-groups/sg-old", "{}"),
            ("/sg/v1/prefix-lists/pl-old", "{}"),
            ("/sg/v1/security-groups/sg-same", "{\"a\":1}"),
        ]);
        let desired = map(&[
            ("/sg/v1/network-interfaces/eni-new", "{}"),
            ("/sg/v1/security-groups/sg-new", "{}"),
            ("/sg/v1/prefix-lists/pl-new", "{}"),
            ("/sg/v1/security-groups/sg-same", "{\"a\":1}"),
        ]);
        let (puts, deletes) = plan("/sg/", &existing, &desired, true);
        let keys = |ops: &[Op]| ops.iter().map(|o| o.key().to_string()).collect::<Vec<_>>();
        assert_eq!(
            keys(&puts),
            [
                "/sg/v1/prefix-lists/pl-new",
                "/sg/v1/security-groups/sg-new",
                "/sg/v1/network-interfaces/eni-new"
            ]
        );
        assert_eq!(
            keys(&deletes),
            [
                "/sg/v1/network-interfaces/eni-old",
                "/sg/v1/security-groups/sg-old",
                "/sg/v1/prefix-lists/pl-old"
            ]
        );
        let (_, none) = plan("/sg/", &existing, &desired, false);
        assert!(none.is_empty());
    }

    #[test]
    fn transactions_stay_within_etcds_limits() {
        let ops: Vec<Op> = (0..300)
            .map(|i| Op::Put {
                key: format!("/sg/v1/network-interfaces/eni-{i}"),
                value: "x".repeat(100),
            })
            .collect();
        let c = chunks(ops);
        assert_eq!(
            c.iter().map(|c| c.len()).collect::<Vec<_>>(),
            [128, 128, 44]
        );
        let big: Vec<Op> = (0..10)
            .map(|i| Op::Put {
                key: format!("k{i}"),
                value: "x".repeat(400 * 1024),
            })
            .collect();
        let c = chunks(big);
        assert!(
            c.len() >= 3
                && c.iter()
                    .all(|t| t.iter().map(Op::size).sum::<usize>() <= MAX_BYTES)
        );
    }
}
