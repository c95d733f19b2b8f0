//! inferd's HTTP server as a library: the binary (`main.rs`) wires these
//! modules together, and the fuzz targets in fuzz/ reach the parsing code
//! through [`fuzzing`]. Tenants, limits, metering, cost, the clock and
//! redaction live in inferd-gateway; they are re-exported here under their
//! old paths.

pub use inferd_gateway::{clock, cost, limits, meter, redact, tenants};

pub mod admission;
pub mod args;
pub mod auth;
pub mod chat;
pub mod conn;
pub mod console;
pub mod detok;
pub mod drain;
pub mod error;
pub mod fuzzing;
pub mod generate;
pub mod models_cmd;
pub mod notify;
pub mod openai;
pub mod recent;
pub mod request_id;
pub mod responses;
pub mod routes;
pub mod sse;
pub mod state;
pub mod structured;
pub mod telemetry;
pub mod tools;
pub mod usage;
pub mod validate;
