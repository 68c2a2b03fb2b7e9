#![no_main]
//! See `fieldcase_fuzz::session_ops` for what this target checks.

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| fieldcase_fuzz::session_ops(data));
