use clap::Parser;

use super::*;

#[derive(Parser)]
struct Cli {
    #[command(flatten)]
    node: NodeArgs,
}

#[test]
fn the_flags_default_to_the_library_limits() {
    let args = Cli::parse_from(["mixnn", "--state", "/nonexistent"]).node;
    let (got, want) = (limits(&args), Limits::default());
    assert_eq!(format!("{got:?}"), format!("{want:?}"));
    assert_eq!(
        Duration::from_secs(args.link_idle),
        NodeConfig::default().link_idle
    );
    let (got, want) = (door(&args), NodeConfig::default().door);
    assert_eq!(format!("{got:?}"), format!("{want:?}"));
    let config = NodeConfig::default();
    assert_eq!(
        (
            Duration::from_secs(args.write_timeout),
            Duration::from_secs(args.request_timeout)
        ),
        (config.write_timeout, config.request_timeout)
    );
}

#[test]
fn peers_are_recorded_only_when_asked() {
    let args = Cli::parse_from(["mixnn", "--state", "/s"]).node;
    assert!(!args.debug_record_peers);
    let args = Cli::parse_from(["mixnn", "--state", "/s", "--debug-record-peers"]).node;
    assert!(args.debug_record_peers);
}
