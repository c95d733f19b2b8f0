//! A request body, as a client sends it, through the server's parsing and
//! validation into sampling parameters: an error or parameters, never a panic.
#![no_main]

use inferd_server::fuzzing::check_request_body;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    check_request_body(data);
});
