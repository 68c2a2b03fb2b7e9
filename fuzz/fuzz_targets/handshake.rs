#![no_main]
//! See `fieldcase_fuzz::handshake` for what this target checks.

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| fieldcase_fuzz::handshake(data));
