//! End-to-end tests: the real binary, the real SmolLM2, real HTTP.

mod api;
mod backends;
mod bench;
mod console;
mod deploy;
mod drain;
mod errors;
mod fleet;
mod harness;
mod hostile;
mod hub;
mod ledger;
mod neuron;
mod openai_sdk;
mod ops;
mod overload;
mod probes;
mod schema;
mod structured;
mod tenants;
