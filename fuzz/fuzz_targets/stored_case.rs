#![no_main]
//! See `fieldcase_fuzz::stored_case` for what this target checks.

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| fieldcase_fuzz::stored_case(data));
