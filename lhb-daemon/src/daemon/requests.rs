//! The control socket's requests: status, expose, unexpose, reload. Each runs in the
//! daemon loop, so the rule set and the applied state are only touched there.

use anyhow::bail;

use super::Daemon;
use crate::{
    api::control,
    model::config,
    model::persist,
    model::rule::{self, Origin},
};

/// The answer to an expose/unexpose, and whether the reconciliation after it failed.
fn changed(r: anyhow::Result<(String, bool)>) -> (control::Response, Option<bool>) {
    match r {
        Ok((msg, failed)) => (
            control::Response {
                ok: true,
                message: Some(msg),
                ..Default::default()
            },
            Some(failed),
        ),
        Err(e) => (control::Response::error(format!("{e:#}")), None),
    }
}

/// The control socket's requests.
impl Daemon {
    /// The answer, and for changes whether the reconciliation that followed failed.
    pub(super) async fn request(
        &mut self,
        req: control::Request,
    ) -> (control::Response, Option<bool>) {
        use control::{Request, Response};
        match req {
            Request::Status => (
                Response {
                    ok: true,
                    status: Some(self.status()),
                    ..Default::default()
                },
                None,
            ),
            Request::Expose {
                spec,
                iface,
                service,
                persist,
            } => changed(self.expose(&spec, iface, service, persist).await),
            Request::Unexpose {
                spec,
                iface,
                persist,
            } => changed(self.unexpose(&spec, iface, persist).await),
            Request::Reload => {
                self.reconcile_events += 1;
                let r = match self.reload() {
                    Ok(n) => {
                        let failed = self.reconcile().await;
                        // STATUS= loses the reload error even when nothing else changed.
                        self.notifier.status(&self.summary());
                        Ok((
                            format!(
                                "config reloaded from {}: {n} rule(s); {}",
                                self.config_path.display(),
                                self.summary()
                            ),
                            failed,
                        ))
                    }
                    Err(e) => Err(e.context(format!(
                        "config reload from {} failed; the {} running rule(s) are kept",
                        self.config_path.display(),
                        self.rules.len()
                    ))),
                };
                changed(r)
            }
        }
    }

    async fn expose(
        &mut self,
        spec: &str,
        iface: bool,
        service: Option<String>,
        persist: bool,
    ) -> anyhow::Result<(String, bool)> {
        let mut rule = rule::parse_spec_for(spec, iface)?;
        rule.given = format!("lhb expose {spec}");
        if let Some(s) = service {
            rule.service = s;
        }
        let key = rule.key();
        // A label's rule gives way to an administrator's rule for the same port.
        if let Some(a) = self.rules.get(&key)
            && a.origin != Origin::Label
        {
            bail!(
                "{key} is already exposed ({}, from the {}); `lhb unexpose` it first to change it",
                a.rule,
                a.origin
            );
        }
        let saved = self.rules.save();
        if persist {
            persist::add(&self.config_path, &rule)?;
            self.rules.set_file(config::load(&self.config_path)?.rules);
            self.rules.unremove(&key);
        } else {
            self.rules.add_runtime(rule.clone());
        }
        if let Err(e) = self.recombine() {
            self.rules.restore(saved);
            return Err(e);
        }
        let failed = self.reconcile().await;
        let where_ = if persist {
            format!("added to {}", self.config_path.display())
        } else {
            "until lhb restarts; --persist keeps it".to_string()
        };
        Ok((
            format!("exposed {rule} ({where_}): {}", self.state_of(&key)),
            failed,
        ))
    }

    async fn unexpose(
        &mut self,
        spec: &str,
        iface: bool,
        persist: bool,
    ) -> anyhow::Result<(String, bool)> {
        let key = rule::parse_spec_for(spec, iface)?.key();
        let Some(active) = self.rules.get(&key).cloned() else {
            bail!(
                "no rule {key} is exposed (`lhb status` lists them{})",
                if iface {
                    ""
                } else {
                    "; a bridge interface needs --iface"
                }
            );
        };
        let origin = active.origin;
        if origin == Origin::Label {
            bail!(
                "{key} comes from the {} label of network {}: remove the label (or the network), or its entry from label_allow and `lhb reload`",
                crate::model::labels::LABEL,
                key.source.name()
            );
        }
        let saved = self.rules.save();
        if persist {
            if !self.rules.in_file(&key) {
                bail!(
                    "{key} is not in {} (it comes from the {origin}); without --persist it is removed until lhb restarts",
                    self.config_path.display()
                );
            }
            persist::remove(&self.config_path, &key.source, key.port)?;
            self.rules.set_file(config::load(&self.config_path)?.rules);
        }
        self.rules.remove(&key);
        if let Err(e) = self.recombine() {
            self.rules.restore(saved);
            return Err(e);
        }
        let failed = self.reconcile().await;
        let note = match (persist, origin) {
            (true, _) => format!("; removed from {}", self.config_path.display()),
            (false, Origin::Runtime) => String::new(),
            (false, o) => format!(
                " until lhb restarts (it comes from the {o}; --persist removes it from the config file)"
            ),
        };
        Ok((format!("unexposed {}{note}", active.rule), failed))
    }
}
