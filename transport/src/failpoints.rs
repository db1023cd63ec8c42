//! The `FAILPOINTS` check both daemons run at start, before arming their failpoints. The
//! variable names points in the `fail` crate's syntax (`name=actions;name=actions`); a name
//! this daemon does not declare is a typo that would otherwise leave a crash or corruption test
//! running an unarmed point and passing, and a set variable in a binary built without the
//! `failpoints` feature is refused for the same reason. Arming itself (`fail::FailScenario`)
//! stays in each daemon, behind its own feature.

/// Check `wanted` (the value of `FAILPOINTS`) against the points `known` to `daemon`. `built` says
/// whether this binary has failpoints compiled in; `feature` is the Cargo feature that adds them,
/// for the message.
pub fn check(
    wanted: &str,
    known: &[&[&str]],
    daemon: &str,
    feature: &str,
    built: bool,
) -> Result<(), String> {
    if wanted.trim().is_empty() {
        return Ok(());
    }
    if !built {
        return Err(format!(
            "FAILPOINTS is set, but this {daemon} was built without failpoints (cargo build --features {feature})"
        ));
    }
    for point in wanted.split(';').filter(|p| !p.trim().is_empty()) {
        let name = point.split('=').next().unwrap_or_default().trim();
        if !known.iter().any(|kind| kind.contains(&name)) {
            let all: Vec<&str> = known.iter().flat_map(|kind| kind.iter().copied()).collect();
            return Err(format!("FAILPOINTS names {name:?}, not a failpoint of this {daemon} ({all:?})"));
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::check;

    const CRASH: &[&str] = &["d::after-write", "d::after-flush"];
    const DELAY: &[&str] = &["d::slow"];

    #[test]
    fn names_are_checked_against_every_kind() {
        let ok = |w| check(w, &[CRASH, DELAY], "sink", "x/failpoints", true);
        assert_eq!(ok(""), Ok(()));
        assert_eq!(ok(" ; "), Ok(()));
        assert_eq!(ok("d::after-flush=2*off->return"), Ok(()));
        assert_eq!(ok("d::after-write=return;d::slow=return(300)"), Ok(()));
        let typo = ok("d::after-write=return;d::after-flsh=return").unwrap_err();
        assert!(typo.contains("\"d::after-flsh\", not a failpoint of this sink"), "{typo}");
        assert!(typo.contains("d::slow"), "the message lists every known point: {typo}");
    }

    #[test]
    fn a_build_without_failpoints_refuses_a_set_variable() {
        assert_eq!(check("", &[CRASH], "agent", "x/failpoints", false), Ok(()));
        let e = check("d::after-write=return", &[CRASH], "agent", "x/failpoints", false).unwrap_err();
        assert_eq!(e, "FAILPOINTS is set, but this agent was built without failpoints (cargo build --features x/failpoints)");
    }
}
