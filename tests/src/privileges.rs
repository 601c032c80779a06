//! What the real tests need from the host. In CI they must never skip.

/// Whether the tests run in CI, where missing privileges are failures.
pub fn in_ci() -> bool {
    std::env::var("CI").is_ok_and(|v| v == "true" || v == "1")
}

fn is_root() -> bool {
    // SAFETY: geteuid has no preconditions.
    unsafe { libc::geteuid() == 0 }
}

/// Returns true when the test can load BPF programs and build namespaces. Without them it
/// panics in CI, and elsewhere prints why and returns false (the caller returns early).
#[must_use]
pub fn require_root(test: &str) -> bool {
    if is_root() {
        return true;
    }
    let msg = format!("{test}: needs root (BPF programs and network namespaces)");
    if in_ci() {
        panic!("{msg}; CI=true, so this is a failure, not a skip");
    }
    eprintln!("SKIP {msg}");
    false
}
