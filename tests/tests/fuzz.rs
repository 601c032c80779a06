//! A slice of the differential fuzz campaign (`cargo xtask fuzz` runs a million frames):
//! random and mutated frames in stateful conversations through XDP, TC ingress and TC
//! egress agree with the reference model of SPEC §1–§2 (`sg_tests::fuzz`). Reproduce a
//! failure with SG_SEED=<seed>, or `cargo xtask fuzz --seed <seed>`.

use sg_tests::privileges::require_root;

#[test]
fn random_and_mutated_frames_agree_with_the_reference_model() {
    if !require_root("random_and_mutated_frames_agree_with_the_reference_model") {
        return;
    }
    let seed = sg_tests::seed();
    eprintln!("fuzz: seed {seed} (SG_SEED={seed} reproduces)");
    let r = sg_tests::fuzz::campaign(40_000, seed);
    eprintln!("fuzz: {r:?}");
    assert_eq!(r.frames, 40_000);
    // Both verdicts are exercised, and so are the mutations.
    assert!(
        r.passed > 5_000 && r.dropped > 5_000 && r.mutated > 5_000,
        "{r:?}"
    );
}
