//! What `lhb verify` and `lhb doctor` find, as data: the checks produce findings and
//! one renderer prints them, so a check that needs no network (the bridge triage, for
//! one) is unit-tested as a function, and both commands print alike.

use std::fmt::Write as _;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Level {
    /// verify: a must-succeed or must-fail check that held.
    Pass,
    /// doctor: a step that is fine.
    Ok,
    /// Worth knowing; not a failure.
    Note,
    /// A check that does not apply here, with why.
    Skip,
    Warn,
    Fail,
}

impl Level {
    fn tag(self) -> &'static str {
        match self {
            Level::Pass => "PASS",
            Level::Ok => "OK",
            Level::Note => "NOTE",
            Level::Skip => "SKIP",
            Level::Warn => "WARN",
            Level::Fail => "FAIL",
        }
    }
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Finding {
    pub level: Level,
    pub what: String,
    /// What to do about it.
    pub fix: Option<String>,
}

#[derive(Clone, Debug, PartialEq, Eq)]
enum Line {
    Heading(String),
    Finding(Finding),
}

/// Findings in the order they were made, under the headings (one per rule) they
/// belong to.
#[derive(Clone, Debug, Default)]
pub struct Findings {
    lines: Vec<Line>,
}

impl Findings {
    pub fn heading(&mut self, title: impl Into<String>) {
        self.lines.push(Line::Heading(title.into()));
    }

    pub fn add(&mut self, level: Level, what: impl Into<String>, fix: Option<String>) {
        self.lines.push(Line::Finding(Finding {
            level,
            what: what.into(),
            fix,
        }));
    }

    /// A must-succeed or must-fail check: PASS if `held`, else FAIL.
    pub fn check(&mut self, held: bool, what: impl Into<String>) {
        let level = if held { Level::Pass } else { Level::Fail };
        self.add(level, what, None);
    }

    pub fn count(&self, level: Level) -> usize {
        self.iter().filter(|f| f.level == level).count()
    }

    pub fn iter(&self) -> impl Iterator<Item = &Finding> {
        self.lines.iter().filter_map(|l| match l {
            Line::Finding(f) => Some(f),
            Line::Heading(_) => None,
        })
    }

    /// `TAG   what` per finding, its fix below it; headings as they are, a blank line
    /// before each heading but the first (`blank_between`, doctor's layout).
    pub fn render(&self, blank_between: bool) -> String {
        let mut s = String::new();
        for (i, l) in self.lines.iter().enumerate() {
            match l {
                Line::Heading(h) => {
                    if blank_between && i > 0 {
                        s.push('\n');
                    }
                    let _ = writeln!(s, "{h}");
                }
                Line::Finding(f) => {
                    let _ = writeln!(s, "{:<4}  {}", f.level.tag(), f.what);
                    if let Some(fix) = &f.fix {
                        let _ = writeln!(s, "      fix: {fix}");
                    }
                }
            }
        }
        s
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn findings_render_with_aligned_tags_and_fixes() {
        let mut f = Findings::default();
        f.heading("app:80 -> 127.0.0.1:80");
        f.add(Level::Ok, "Docker engine: reachable", None);
        f.add(
            Level::Fail,
            "bridge br-x: no such interface",
            Some("create it".into()),
        );
        f.heading("br0:81 -> 127.0.0.1:81");
        f.add(Level::Pass, "served", None);
        assert_eq!(
            f.render(true),
            "app:80 -> 127.0.0.1:80\nOK    Docker engine: reachable\nFAIL  bridge br-x: no such interface\n      fix: create it\n\nbr0:81 -> 127.0.0.1:81\nPASS  served\n"
        );
        assert_eq!(f.count(Level::Fail), 1);
        assert_eq!(f.count(Level::Pass), 1);
    }
}
