//! The directory's policy: intervals, ages, windows, accepted reporters.

/// The directory's policy. All durations are in seconds.
#[derive(Debug, Clone, PartialEq)]
pub struct DirectoryConfig {
    /// Expected time between a node's heartbeats (default 10).
    pub heartbeat_interval: u64,
    /// How long a served view is valid (default 600).
    pub view_ttl: u64,
    /// Oldest accepted descriptor `published` at registration (default 600).
    pub max_descriptor_age: u64,
    /// Oldest accepted heartbeat timestamp (default 60).
    pub max_heartbeat_age: u64,
    /// Oldest accepted failure report timestamp (default 3600).
    pub max_report_age: u64,
    /// A node is listed in the view if it registered or heartbeat within
    /// this window (default 30, three intervals).
    pub live_window: u64,
    /// Failure reports count as *recent* for this long (default 86 400).
    pub failure_window: u64,
    /// If set, only these designer keys may report failures; if `None`,
    /// any key may (reports are still signed and deduplicated per
    /// reporter, node and step).
    pub accepted_reporters: Option<Vec<[u8; 32]>>,
}

impl Default for DirectoryConfig {
    fn default() -> Self {
        Self {
            heartbeat_interval: 10,
            view_ttl: 600,
            max_descriptor_age: 600,
            max_heartbeat_age: 60,
            max_report_age: 3600,
            live_window: 30,
            failure_window: 86_400,
            accepted_reporters: None,
        }
    }
}
