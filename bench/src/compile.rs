//! `bench compile`: the compiler at scale (parse, compile, diff, membership changes).

use serde_json::json;
use sg_agent::{
    compile::{
        compile, diff, membership_change, ChangedAddress, LocalInterface, Options, PlanIndex,
    },
    model::NetworkInterface,
    source::parse_str,
};

use crate::{report::*, scale, Mode};

pub(crate) fn bench_compile(mode: Mode) {
    let reps = if mode == Mode::Smoke { 1 } else { 3 };
    let scales: &[(u32, u32)] = match mode {
        Mode::Smoke => &[(10, 10), (1000, 1000)],
        _ => &[(10, 10), (1000, 1000), (10_000, 10_000), (100, 100_000)],
    };
    let locals = [LocalInterface {
        ifindex: 2,
        eni: "eni-srv".into(),
    }];
    let mut rows = String::new();
    let mut results = vec![];
    for &(rules, members) in scales {
        let text = scale::state_text(rules, members);
        let (state, parse_ms) = time(|| parse_str(&text).expect("bench state"));
        let mut times = vec![];
        let mut plan = None;
        for _ in 0..reps {
            let (p, ms) = time(|| compile(&state, &locals, &Options::default(), None));
            times.push(ms);
            plan = Some(p);
        }
        let plan = plan.unwrap();
        let s = stat(times);
        let ports: usize = plan.rulesets.values().map(|r| r.ports.len()).sum();
        rows += &format!(
            "| {rules} | {members} | {:.1} | {:.1} ({:.1}–{:.1}) | {} | {} | {ports} |\n",
            parse_ms,
            s.median,
            s.min,
            s.max,
            plan.prefixes.len(),
            plan.rulesets.len()
        );
        results.push(json!({ "rules": rules, "members": members, "parse_ms": parse_ms, "compile_ms": stat_json(s, "ms"),
            "prefixes": plan.prefixes.len(), "rulesets": plan.rulesets.len(), "port_entries": ports }));
    }
    // One member joins a 10k-member group.
    let members = if mode == Mode::Smoke { 1000 } else { 10_000 };
    let state = parse_str(&scale::state_text(100, members)).unwrap();
    let old = compile(&state, &locals, &Options::default(), None);
    let mut joined = state.clone();
    joined.network_interfaces.push(NetworkInterface {
        id: "eni-new".into(),
        mac: None,
        ipv4: vec![scale::member_v4(members + 1)],
        ipv6: vec![scale::member_v6(members + 1)],
        groups: vec!["sg-members".into()],
        timeouts: Default::default(),
        audit: false,
        owner_id: None,
    });
    let (mut ctimes, mut dtimes, mut ops) = (vec![], vec![], 0);
    for _ in 0..reps.max(3) {
        let (new, c) = time(|| compile(&joined, &locals, &Options::default(), Some(&old)));
        let (d, dt) = time(|| diff(&old, &new));
        ctimes.push(c);
        dtimes.push(dt);
        ops = d.len();
    }
    // The agent's path for the same change: only the new member's addresses.
    let mut mtimes = vec![];
    let mut incremental_ops = 0;
    for _ in 0..reps.max(3) {
        let mut plan = old.clone();
        let mut index = PlanIndex::new(&plan);
        let new = joined.network_interfaces.last().unwrap();
        let changed: Vec<ChangedAddress> = new
            .addresses()
            .map(|addr| ChangedAddress {
                addr,
                groups: Some(new.groups.iter().map(String::as_str).collect()),
            })
            .collect();
        let (change, t) =
            time(|| membership_change(&joined, &mut plan, &mut index, &changed).unwrap());
        mtimes.push(t);
        incremental_ops = change.ops.len();
    }
    let m = stat(mtimes);
    let (c, d) = (stat(ctimes), stat(dtimes));
    let md = format!(
        "## Compiler (`cargo xtask bench compile`)\n\n\
         Pure user-space work, before any map is touched: parse + validate, compile (flatten\n\
         prefixes, share rulesets, split port ranges), plan size. Median of {reps} (min–max).\n\n\
         | rules | members | parse ms | compile ms | address entries | rulesets | port entries |\n\
         | ---: | ---: | ---: | ---: | ---: | ---: | ---: |\n{rows}\n\
         One member joins a {members}-member group: recompile {:.1} ms ({:.1}–{:.1}), diff {:.2} ms \
         ({:.2}–{:.2}), **{ops} map operations** (its IPv4 and IPv6 address; nothing else changes).\n\
         The agent's path for it (`membership_change`: only the member's addresses): {:.3} ms \
         ({:.3}–{:.3}), {incremental_ops} map operations.\n",
        c.median, c.min, c.max, d.median, d.min, d.max, m.median, m.min, m.max
    );
    publish(
        "compile",
        &md,
        json!({ "scales": results, "one_member_change": { "members": members,
        "compile_ms": stat_json(c, "ms"), "diff_ms": stat_json(d, "ms"), "ops": ops,
        "membership_change_ms": stat_json(m, "ms"), "membership_change_ops": incremental_ops } }),
    );
}
