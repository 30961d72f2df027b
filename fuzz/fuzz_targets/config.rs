//! The config file parser: any text gives rules or a `FILE:LINE: reason`, never a
//! panic, and every rule it accepts keeps the rules' invariants.
#![no_main]

use lhb_daemon::{model::config, model::rule};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|text: &str| {
    match config::parse("fuzz.toml", text) {
        Ok(cfg) => {
            for r in &cfg.rules {
                assert!(r.port != 0 && r.target.port() != 0, "{r}");
                assert!(r.target.ip().is_loopback(), "{r}");
                // A PROXY header exists only for TCP.
                assert!(!(r.proxy_protocol && r.protocol.udp()), "{r}");
                if let rule::Source::Interface(i) = &r.source {
                    assert!(rule::valid_ifname(i), "{i:?}");
                }
                // The line a rule came from is inside the file.
                let line: usize = r.given.rsplit(':').next().unwrap().parse().unwrap();
                assert!(
                    line >= 1 && line <= text.matches('\n').count() + 1,
                    "{}",
                    r.given
                );
            }
            rule::check_unique(&cfg.rules).expect("the parser refuses duplicates");
        }
        Err(e) => {
            let msg = e.to_string();
            assert!(msg.starts_with("fuzz.toml"), "{msg}");
        }
    }
});
