//! inferd's HTTP server as a library: the binary (`main.rs`) wires these
//! modules together, and the fuzz targets in fuzz/ reach the parsing code
//! through [`fuzzing`].

pub mod admission;
pub mod args;
pub mod auth;
pub mod clock;
pub mod conn;
pub mod cost;
pub mod detok;
pub mod drain;
pub mod error;
pub mod fuzzing;
pub mod generate;
pub mod limits;
pub mod meter;
pub mod notify;
pub mod openai;
pub mod redact;
pub mod request_id;
pub mod responses;
pub mod routes;
pub mod sse;
pub mod state;
pub mod telemetry;
pub mod tenants;
pub mod usage;
pub mod validate;
