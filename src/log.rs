//! Structured logs: one JSON object per line on stdout.
//!
//! Deliberately tiny. Callers pass only what is safe to log: never tokens, never record contents.

use std::io::Write;
use std::sync::atomic::{AtomicU8, Ordering};

#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum Level {
    Error = 0,
    Warn = 1,
    Info = 2,
    Debug = 3,
}

impl Level {
    fn as_str(self) -> &'static str {
        match self {
            Level::Error => "error",
            Level::Warn => "warn",
            Level::Info => "info",
            Level::Debug => "debug",
        }
    }
}

impl std::str::FromStr for Level {
    type Err = ();
    fn from_str(s: &str) -> Result<Level, ()> {
        match s.to_ascii_lowercase().as_str() {
            "error" => Ok(Level::Error),
            "warn" | "warning" => Ok(Level::Warn),
            "info" => Ok(Level::Info),
            "debug" | "trace" => Ok(Level::Debug),
            _ => Err(()),
        }
    }
}

static MAX_LEVEL: AtomicU8 = AtomicU8::new(Level::Info as u8);

pub fn set_level(level: Level) {
    MAX_LEVEL.store(level as u8, Ordering::Relaxed);
}

pub(crate) fn enabled(level: Level) -> bool {
    level as u8 <= MAX_LEVEL.load(Ordering::Relaxed)
}

/// Writes one log line: `{"ts":…,"level":…,"msg":…, …fields}`.
pub(crate) fn event(level: Level, message: &str, fields: &[(&str, serde_json::Value)]) {
    if !enabled(level) {
        return;
    }
    let mut line = serde_json::Map::new();
    line.insert(
        "ts".into(),
        crate::clock::format_cursor(crate::clock::now_micros()).into(),
    );
    line.insert("level".into(), level.as_str().into());
    line.insert("msg".into(), message.into());
    for (key, value) in fields {
        line.insert((*key).into(), value.clone());
    }
    let mut text = serde_json::Value::Object(line).to_string();
    text.push('\n');
    // A closed stdout must not take the server down.
    let _ = std::io::stdout().lock().write_all(text.as_bytes());
}

pub fn info(message: &str, fields: &[(&str, serde_json::Value)]) {
    event(Level::Info, message, fields)
}

pub(crate) fn warn(message: &str, fields: &[(&str, serde_json::Value)]) {
    event(Level::Warn, message, fields)
}

pub fn error(message: &str, fields: &[(&str, serde_json::Value)]) {
    event(Level::Error, message, fields)
}

pub(crate) fn debug(message: &str, fields: &[(&str, serde_json::Value)]) {
    event(Level::Debug, message, fields)
}
