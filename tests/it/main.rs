//! Integration tests: the real server, the real PostgreSQL (a throwaway cluster started by the tests
//! themselves), a real HTTP client.

mod support;

mod auth;
mod cli;
mod cursor;
mod http_errors;
mod push_pull;
mod realtime;
mod records;
mod storage;
