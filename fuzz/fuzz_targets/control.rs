//! What a local client can send: a control request (one bounded JSON line) and a
//! metrics request head. Never a panic; a line is returned only if it is within the
//! bound and ends the way the protocol says.
#![no_main]

use lhb_daemon::api::control::{self, MAX_CONTROL_REQUEST, Request};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let mut r = data;
    if let Ok(line) =
        futures::executor::block_on(control::read_line_bounded(&mut r, MAX_CONTROL_REQUEST))
    {
        assert!(line.len() <= MAX_CONTROL_REQUEST + 1 && line.ends_with('\n'));
        if let Ok(req) = serde_json::from_str::<Request>(&line) {
            // What was read round-trips: the daemon sees what the client meant.
            let again: Request =
                serde_json::from_str(&serde_json::to_string(&req).unwrap()).unwrap();
            assert_eq!(format!("{req:?}"), format!("{again:?}"));
        }
    }
    let mut r = data;
    if let Ok(request_line) = futures::executor::block_on(control::read_head(&mut r)) {
        assert!(!request_line.contains('\n'));
        assert!(data.len() - r.len() <= 8 * 1024 + 1);
    }
});
