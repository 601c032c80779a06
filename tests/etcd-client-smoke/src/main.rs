// Smoke test of the etcd-client crate against Debian's etcd 3.4 (sg issue #15, point 1).
use etcd_client::*;

#[tokio::main]
async fn main() {
    let ep = std::env::args().nth(1).unwrap_or("127.0.0.1:23790".into());
    let mut c = match Client::connect([ep.as_str()], None).await {
        Ok(c) => c,
        Err(e) => {
            println!("connect: FAIL {e}");
            return;
        }
    };
    let r = c.status().await;
    println!(
        "status: {}",
        r.map(|s| format!("ok, server {}", s.version()))
            .unwrap_or_else(|e| format!("FAIL {e}"))
    );
    let r = c.put("/smoke/a", "1", None).await;
    println!(
        "put: {}",
        r.map(|r| format!("ok, revision {}", r.header().unwrap().revision()))
            .unwrap_or_else(|e| format!("FAIL {e}"))
    );
    let r = c
        .get(
            "/smoke/",
            Some(GetOptions::new().with_prefix().with_limit(1)),
        )
        .await;
    println!(
        "range with prefix and limit: {}",
        r.map(|r| format!("ok, {} kvs, more {}", r.kvs().len(), r.more()))
            .unwrap_or_else(|e| format!("FAIL {e}"))
    );
    let rev = c.get("/smoke/a", None).await.unwrap().kvs()[0].mod_revision();
    let txn = Txn::new()
        .when([Compare::mod_revision("/smoke/a", CompareOp::Equal, rev)])
        .and_then([
            TxnOp::put("/smoke/a", "2", None),
            TxnOp::delete("/smoke/b", None),
        ]);
    let r = c.txn(txn).await;
    println!(
        "guarded txn: {}",
        r.map(|r| format!("ok, succeeded {}", r.succeeded()))
            .unwrap_or_else(|e| format!("FAIL {e}"))
    );
    let (mut w, mut s) = match c
        .watch(
            "/smoke/",
            Some(WatchOptions::new().with_prefix().with_start_revision(rev)),
        )
        .await
    {
        Ok(x) => x,
        Err(e) => {
            println!("watch: FAIL {e}");
            return;
        }
    };
    let got = tokio::time::timeout(std::time::Duration::from_secs(3), async {
        let mut events = 0;
        while let Ok(Some(m)) = s.message().await {
            events += m.events().len();
            if events >= 2 {
                break;
            }
        }
        events
    })
    .await;
    println!(
        "watch from a revision: {}",
        got.map(|n| format!("ok, {n} events"))
            .unwrap_or_else(|_| "FAIL timeout".into())
    );
    let _ = w.cancel().await;
    let head = c
        .get("/smoke/a", None)
        .await
        .unwrap()
        .header()
        .unwrap()
        .revision();
    let r = c
        .compact(head, Some(CompactionOptions::new().with_physical()))
        .await;
    println!(
        "compaction: {}",
        r.map(|_| "ok".to_string())
            .unwrap_or_else(|e| format!("FAIL {e}"))
    );
    let r = c
        .watch(
            "/smoke/",
            Some(WatchOptions::new().with_prefix().with_start_revision(1)),
        )
        .await;
    match r {
        Ok((_, mut s)) => {
            let m = tokio::time::timeout(std::time::Duration::from_secs(3), s.message()).await;
            println!(
                "watch from a compacted revision: {}",
                match m {
                    Ok(Ok(Some(m))) => format!(
                        "ok, compact_revision {} canceled {}",
                        m.compact_revision(),
                        m.canceled()
                    ),
                    Ok(Ok(None)) => "stream ended".into(),
                    Ok(Err(e)) => format!("error {e}"),
                    Err(_) => "FAIL timeout".into(),
                }
            );
        }
        Err(e) => println!("watch from a compacted revision: FAIL {e}"),
    }
    let r = c.lease_grant(10, None).await;
    println!(
        "lease: {}",
        r.map(|_| "ok".to_string())
            .unwrap_or_else(|e| format!("FAIL {e}"))
    );
}
