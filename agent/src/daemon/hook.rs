//! Operator hooks of a cutover: a shell command (`sh -c`) run with `BLOCKSHIP_*` variables that
//! describe the group and its disks, within a time limit; a hook that fails or overruns fails
//! its step, with the end of what it printed on stderr in the message.

use std::process::Stdio;
use std::time::Duration;

use super::config::Group;

/// The variables a hook of group `g` sees in `phase`.
pub fn env(g: &Group, sink: &str, phase: &str, epoch: Option<u64>) -> Vec<(String, String)> {
    let kind =
        serde_json::to_value(g.kind).ok().and_then(|v| v.as_str().map(str::to_string)).unwrap_or_default();
    let mut v = vec![
        ("BLOCKSHIP_GROUP".to_string(), g.name.clone()),
        ("BLOCKSHIP_KIND".to_string(), kind),
        ("BLOCKSHIP_PHASE".to_string(), phase.to_string()),
        ("BLOCKSHIP_SINK".to_string(), sink.to_string()),
        ("BLOCKSHIP_DISK_COUNT".to_string(), g.section.disks.len().to_string()),
    ];
    if let Some(e) = epoch {
        v.push(("BLOCKSHIP_EPOCH".to_string(), e.to_string()));
    }
    let mut targets = Vec::new();
    for (i, d) in g.section.disks.iter().enumerate() {
        let source = d.source.clone().or_else(|| d.disk.clone()).unwrap_or_default();
        // The image or file name without its `rbd:` / `file:` scheme, as other tools want it.
        let image = d.target.split_once(':').map_or(d.target.as_str(), |(_, rest)| rest);
        v.push((format!("BLOCKSHIP_DISK_{i}_SOURCE"), source));
        v.push((format!("BLOCKSHIP_DISK_{i}_TARGET"), d.target.clone()));
        v.push((format!("BLOCKSHIP_DISK_{i}_IMAGE"), image.to_string()));
        targets.push(d.target.clone());
    }
    v.push(("BLOCKSHIP_TARGETS".to_string(), targets.join(" ")));
    v
}

/// Run `cmd` with `env`; Ok(the last line it printed) when it exits 0 within `timeout`.
pub async fn run(
    what: &str,
    cmd: &str,
    env: &[(String, String)],
    timeout: Duration,
) -> Result<String, String> {
    let child = tokio::process::Command::new("sh")
        .arg("-c")
        .arg(cmd)
        .envs(env.iter().map(|(k, v)| (k.as_str(), v.as_str())))
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .map_err(|e| format!("{what} hook `{cmd}`: cannot start sh: {e}"))?;
    let out = match tokio::time::timeout(timeout, child.wait_with_output()).await {
        Ok(r) => r.map_err(|e| format!("{what} hook `{cmd}`: {e}"))?,
        Err(_) => return Err(format!("{what} hook `{cmd}` did not finish within {timeout:?} (killed)")),
    };
    let last = |b: &[u8]| String::from_utf8_lossy(b).lines().last().unwrap_or("").trim().to_string();
    if !out.status.success() {
        return Err(format!("{what} hook `{cmd}` failed ({}): {}", out.status, last(&out.stderr)));
    }
    Ok(last(&out.stdout))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn a_hook_sees_its_variables_and_fails_clearly() {
        let env = vec![("BLOCKSHIP_GROUP".to_string(), "vm42".to_string())];
        let t = Duration::from_secs(5);
        assert_eq!(run("pre-freeze", "echo hello $BLOCKSHIP_GROUP", &env, t).await.unwrap(), "hello vm42");
        let e = run("pre-freeze", "echo nope >&2; exit 3", &env, t).await.unwrap_err();
        assert!(e.contains("exit status: 3") && e.contains("nope"), "{e}");
        let e = run("post-cutover", "sleep 5", &env, Duration::from_millis(200)).await.unwrap_err();
        assert!(e.contains("did not finish within"), "{e}");
    }
}
