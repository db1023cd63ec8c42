//! Authorisation: which agent (by certificate identity) may write which targets. Rules come from
//! `--allow NAME=GLOB` with GLOB = `TYPE:PATHGLOB` (e.g. `file:esx01/*`, `rbd:volumes/**`),
//! matched against the canonical target name: the type literally, the path as a glob where `*`
//! does not cross `/` and `**` does. No rule for an agent means the agent is unknown to this
//! sink and is refused at connect.

use globset::{GlobBuilder, GlobMatcher};

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum AuthError {
    #[error("bad --allow rule {rule:?}: {reason} (expected NAME=GLOB, e.g. esx01='file:esx01/*')")]
    BadRule { rule: String, reason: String },
    #[error("agent {agent:?} is not known to this sink (no --allow rule names it); allow it on the sink, e.g. --allow '{agent}=file:{agent}/*'")]
    UnknownAgent { agent: String },
    #[error("agent {agent:?} may not write {target} (its --allow rules: {globs})")]
    NotAllowed { agent: String, target: String, globs: String },
}

#[derive(Debug, Clone)]
struct Rule {
    agent: String,
    glob: String,
    scheme: String,
    matcher: GlobMatcher,
}

/// The set of `--allow` rules.
#[derive(Debug, Clone, Default)]
pub struct Authorizer {
    rules: Vec<Rule>,
}

impl Authorizer {
    pub fn parse<S: AsRef<str>>(rules: &[S]) -> Result<Self, AuthError> {
        let mut out = Vec::new();
        for rule in rules {
            let rule = rule.as_ref();
            let bad =
                |reason: &str| AuthError::BadRule { rule: rule.to_string(), reason: reason.to_string() };
            let (agent, glob) = rule.split_once('=').ok_or_else(|| bad("missing '='"))?;
            let (agent, glob) = (agent.trim(), glob.trim());
            if agent.is_empty() || glob.is_empty() {
                return Err(bad("empty agent name or glob"));
            }
            let (scheme, path) = glob
                .split_once(':')
                .ok_or_else(|| bad("the glob must name the target type, e.g. file:esx01/*"))?;
            let matcher = GlobBuilder::new(path)
                .literal_separator(true)
                .build()
                .map_err(|e| bad(&e.to_string()))?
                .compile_matcher();
            out.push(Rule {
                agent: agent.to_string(),
                glob: glob.to_string(),
                scheme: scheme.to_string(),
                matcher,
            });
        }
        Ok(Authorizer { rules: out })
    }

    /// Whether any rule names `agent`.
    pub fn knows(&self, agent: &str) -> Result<(), AuthError> {
        if self.rules.iter().any(|r| r.agent == agent) {
            Ok(())
        } else {
            Err(AuthError::UnknownAgent { agent: agent.to_string() })
        }
    }

    /// Whether `agent` may write `target` (a canonical target name).
    pub fn check(&self, agent: &str, target: &str) -> Result<(), AuthError> {
        self.knows(agent)?;
        let mine: Vec<&Rule> = self.rules.iter().filter(|r| r.agent == agent).collect();
        let (scheme, path) = target.split_once(':').unwrap_or(("", target));
        if mine.iter().any(|r| r.scheme == scheme && r.matcher.is_match(path)) {
            return Ok(());
        }
        Err(AuthError::NotAllowed {
            agent: agent.to_string(),
            target: target.to_string(),
            globs: mine.iter().map(|r| r.glob.as_str()).collect::<Vec<_>>().join(", "),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn globs_are_per_agent_and_do_not_cross_slashes() {
        let a = Authorizer::parse(&["esx01=file:esx01/*", "esx02=file:shared/**", "esx01=rbd:volumes/*"])
            .unwrap();
        assert!(a.check("esx01", "file:esx01/vm1").is_ok());
        assert!(a.check("esx01", "rbd:volumes/volume-1").is_ok());
        assert!(matches!(a.check("esx01", "file:esx01/a/b"), Err(AuthError::NotAllowed { .. })));
        assert!(matches!(a.check("esx01", "file:esx02/vm1"), Err(AuthError::NotAllowed { .. })));
        assert!(a.check("esx02", "file:shared/a/b/c").is_ok());
        assert!(a.check("esx02", "rbd:shared/a").is_err());
        let all = Authorizer::parse(&["lab=file:**"]).unwrap();
        assert!(all.check("lab", "file:a/b/c").is_ok());
        assert!(all.check("lab", "file:top").is_ok());
        assert!(all.check("lab", "rbd:pool/img").is_err());
        let err = a.check("esx03", "file:esx01/vm1").unwrap_err();
        assert!(matches!(err, AuthError::UnknownAgent { .. }));
        // The hint is a rule the sink accepts, as written (shell quotes removed).
        let text = err.to_string();
        let hint = text
            .rsplit("--allow ")
            .next()
            .filter(|_| text.contains("--allow "))
            .unwrap_or_else(|| panic!("no hint in {text:?}"));
        let rule: String =
            hint.split_whitespace().next().unwrap_or("").chars().filter(|c| *c != '\'').collect();
        let hinted = Authorizer::parse(&[rule.as_str()]).unwrap_or_else(|e| panic!("hint {rule:?}: {e}"));
        assert!(hinted.check("esx03", "file:esx03/vm1").is_ok(), "{rule}");
        let err = a.check("esx01", "file:other").unwrap_err().to_string();
        assert!(err.contains("file:esx01/*, rbd:volumes/*"), "{err}");
    }

    #[test]
    fn bad_rules_are_refused() {
        for bad in ["noequals", "=file:x", "a=", "a=file:[x", "a=esx01/*"] {
            assert!(matches!(Authorizer::parse(&[bad]), Err(AuthError::BadRule { .. })), "{bad}");
        }
    }
}
