//! Integration tests: the real server, the real PostgreSQL (a throwaway cluster started by the tests
//! themselves), a real HTTP client.

mod support;

mod cursor;
mod push_pull;
mod storage;
