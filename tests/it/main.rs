//! Integration tests: the real server, the real PostgreSQL (a throwaway cluster started by the tests
//! themselves), a real HTTP client.

mod support;

mod assigned_times;
mod auth;
mod bad_input;
mod cli;
mod cursor;
mod edge_http;
mod fair_share;
mod faults;
mod groups;
mod http_errors;
mod operations;
mod push_pull;
mod realtime;
mod records;
mod snapshot;
mod storage;
mod tls_outbound;
