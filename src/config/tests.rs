//! Tests of loading, precedence, validation messages and `config show`.

use super::*;

fn env(pairs: &[(&str, &str)]) -> Env {
    Env::from_pairs(pairs.iter().copied())
}

fn write(dir: &Path, text: &str) -> PathBuf {
    let path = dir.join("config.toml");
    std::fs::write(&path, text).expect("write config");
    path
}

#[test]
fn defaults_are_the_seed_ports_and_local_monitoring() {
    let loaded =
        load(None, &env(&[("HOME", "/home/u"), ("XDG_RUNTIME_DIR", "/run/user/1")]), &FlagValues::default())
            .expect("load");
    let c = loaded.config;
    assert_eq!(c.quic_listen.port(), 30906);
    assert_eq!(c.dht.listen.port(), 30609);
    assert_eq!(c.monitoring_listen.to_string(), "127.0.0.1:6060");
    assert_eq!(c.data_dir, Path::new("/home/u/.local/share/remote-network"));
    assert_eq!(c.control.socket, Path::new("/run/user/1/remote-network/control.sock"));
    assert!(c.control.tcp.is_none());
}

#[test]
fn the_monitoring_address_knows_whether_the_operator_chose_it() {
    let dir = tempfile::tempdir().expect("tempdir");
    let home = [("HOME", "/home/u")];
    let source = |file: Option<&Path>, env_pairs: &[(&str, &str)], flags: &FlagValues| {
        let loaded = load(file, &env(env_pairs), flags).expect("load");
        (loaded.config.monitoring_listen.to_string(), loaded.config.monitoring_listen_source)
    };
    let (addr, from) = source(None, &home, &FlagValues::default());
    assert_eq!(addr, "127.0.0.1:6060");
    assert!(from.is_default(), "{from}");

    // The default's own value, given explicitly, is the operator's choice all the same.
    let mut flags = FlagValues::default();
    flags.set("monitoring.listen", Some("127.0.0.1:6060".into()));
    let (_, from) = source(None, &home, &flags);
    assert_eq!(from, Source::Flag("--monitoring-listen"));
    assert!(!from.is_default());
    let (_, from) = source(
        None,
        &[("HOME", "/home/u"), ("RN_MONITORING_LISTEN", "127.0.0.1:6060")],
        &FlagValues::default(),
    );
    assert_eq!(from, Source::Env("RN_MONITORING_LISTEN".into()));
    assert!(!from.is_default());
    let file = write(dir.path(), "[monitoring]\nlisten = \"127.0.0.1:6060\"\n");
    let (_, from) = source(Some(&file), &home, &FlagValues::default());
    assert_eq!(from, Source::File(file.clone()));
    assert!(!from.is_default());
}

#[test]
fn systemd_directories_win_over_xdg() {
    let e = env(&[
        ("HOME", "/home/u"),
        ("XDG_RUNTIME_DIR", "/run/user/1"),
        ("STATE_DIRECTORY", "/var/lib/remote-network:/var/lib/other"),
        ("RUNTIME_DIRECTORY", "/run/remote-network"),
    ]);
    let loaded = load(None, &e, &FlagValues::default()).expect("load");
    assert_eq!(loaded.config.data_dir, Path::new("/var/lib/remote-network"));
    assert_eq!(loaded.config.control.socket, Path::new("/run/remote-network/control.sock"));
    assert!(loaded.render(false).contains("default (from $STATE_DIRECTORY)"));
}

#[test]
fn precedence_is_flags_then_env_then_file_then_default() {
    let dir = tempfile::tempdir().expect("tempdir");
    let file = write(
        dir.path(),
        "data_dir = \"/from/file\"\n[quic]\nlisten = \"0.0.0.0:1111\"\n[dht]\nlisten = \"0.0.0.0:2222\"\n\
         [store]\nmax_peers = 7\n",
    );
    let e = env(&[("HOME", "/h"), ("RN_QUIC_LISTEN", "0.0.0.0:3333"), ("RN_DHT_LISTEN", "0.0.0.0:4444")]);
    let mut flags = FlagValues::default();
    flags.set("quic.listen", Some("127.0.0.1:5555".into()));
    let loaded = load(Some(&file), &e, &flags).expect("load");
    let c = &loaded.config;
    assert_eq!(c.quic_listen.to_string(), "127.0.0.1:5555");
    assert_eq!(c.dht.listen.to_string(), "0.0.0.0:4444");
    assert_eq!(c.data_dir, Path::new("/from/file"));
    assert_eq!(c.store.max_peers, 7);
    assert_eq!(c.store.max_joined_topics, 1024);
    let shown = loaded.render(false);
    assert!(shown.contains("quic.listen = \"127.0.0.1:5555\""), "{shown}");
    assert!(shown.contains("# flag --quic-listen"), "{shown}");
    assert!(shown.contains("# env RN_DHT_LISTEN"), "{shown}");
    assert!(shown.contains(&format!("# file {}", file.display())), "{shown}");
}

#[test]
fn config_show_output_loads_back_as_the_same_config() {
    let dir = tempfile::tempdir().expect("tempdir");
    let e = env(&[("HOME", "/h"), ("RN_CONTROL_TOKEN", "tok"), ("RN_STORE_RETENTION", "1h30m")]);
    let mut flags = FlagValues::default();
    flags.set("control.tcp", Some("127.0.0.1:5000".into()));
    flags.set_list("dht.bootstrap", vec!["127.0.0.1:7000".into()]);
    let first = load(None, &e, &flags).expect("load");
    let file = write(dir.path(), &first.render(true));
    // The token is redacted in the output, so give it again; everything else comes from the file.
    let second =
        load(Some(&file), &env(&[("HOME", "/h"), ("RN_CONTROL_TOKEN", "tok")]), &FlagValues::default())
            .expect("rendered config loads");
    // Every value is explicit in the rendered file: the values are the same, only their sources differ.
    assert_eq!(second.config.monitoring_listen_source, Source::File(file.clone()));
    let mut second_config = second.config.clone();
    second_config.monitoring_listen_source = first.config.monitoring_listen_source.clone();
    assert_eq!(format!("{:?}", first.config), format!("{second_config:?}"));
    assert!(second.render(false).contains("# file "));
}

#[test]
fn unknown_keys_are_named() {
    let dir = tempfile::tempdir().expect("tempdir");
    let file = write(dir.path(), "[quic]\nlisen = \"0.0.0.0:1\"\n");
    let err = load(Some(&file), &env(&[("HOME", "/h")]), &FlagValues::default()).expect_err("unknown key");
    let msg = err.to_string();
    assert!(msg.contains("unknown config key `quic.lisen`"), "{msg}");
    assert!(msg.contains("quic.listen"), "{msg}");
}

#[test]
fn bad_values_name_the_key_and_what_is_accepted() {
    let e = env(&[("HOME", "/h"), ("RN_STORE_RETENTION", "soon")]);
    let msg = load(None, &e, &FlagValues::default()).expect_err("bad duration").to_string();
    assert!(msg.contains("store.retention"), "{msg}");
    assert!(msg.contains("env RN_STORE_RETENTION"), "{msg}");
    assert!(msg.contains("30d"), "{msg}");

    let mut flags = FlagValues::default();
    flags.set("dht.listen", Some("localhost".into()));
    let msg = load(None, &env(&[("HOME", "/h")]), &flags).expect_err("bad addr").to_string();
    assert!(msg.contains("dht.listen") && msg.contains("IP:PORT"), "{msg}");

    let mut flags = FlagValues::default();
    flags.set_list("dht.bootstrap", vec!["nohost".into()]);
    let msg = load(None, &env(&[("HOME", "/h")]), &flags).expect_err("bad bootstrap").to_string();
    assert!(msg.contains("dht.bootstrap") && msg.contains("`nohost`"), "{msg}");
}

#[test]
fn bootstrap_flags_replace_the_public_routers() {
    let mut flags = FlagValues::default();
    flags.set_list("dht.bootstrap", vec!["127.0.0.1:7000".into(), "127.0.0.1:7001".into()]);
    let c = load(None, &env(&[("HOME", "/h")]), &flags).expect("load").config;
    assert_eq!(c.dht.bootstrap, ["127.0.0.1:7000", "127.0.0.1:7001"]);
    let c = load(None, &env(&[("HOME", "/h"), ("RN_DHT_BOOTSTRAP", "a:1, b:2")]), &FlagValues::default())
        .expect("load")
        .config;
    assert_eq!(c.dht.bootstrap, ["a:1", "b:2"]);
}

#[test]
fn public_tcp_listener_needs_a_token() {
    let mut flags = FlagValues::default();
    flags.set("control.tcp", Some("0.0.0.0:50051".into()));
    let msg = load(None, &env(&[("HOME", "/h")]), &flags).expect_err("needs token").to_string();
    assert!(msg.contains("control.token_file"), "{msg}");
    let ok = load(None, &env(&[("HOME", "/h"), ("RN_CONTROL_TOKEN", "s3cret")]), &flags).expect("load");
    assert!(matches!(ok.config.control.token, Some(TokenSource::Inline(_))));
    assert!(!ok.render(false).contains("s3cret"));
    let mut flags = FlagValues::default();
    flags.set("control.tcp", Some("127.0.0.1:50051".into()));
    assert!(load(None, &env(&[("HOME", "/h")]), &flags).is_ok());
}

#[test]
fn rust_log_is_honoured_before_rn_log_level() {
    let c = load(
        None,
        &env(&[("HOME", "/h"), ("RUST_LOG", "debug"), ("RN_LOG_LEVEL", "warn")]),
        &FlagValues::default(),
    )
    .expect("load")
    .config;
    assert_eq!(c.log_level, "debug");
}

#[test]
fn byte_sizes_read_binary_units_and_show_back_the_same() {
    let raw = |s: &str| Raw::Text(s.to_owned());
    assert_eq!(parse_bytes(&raw("65536")), Ok(65536));
    assert_eq!(parse_bytes(&raw("64KiB")), Ok(64 * 1024));
    assert_eq!(parse_bytes(&raw("32MiB")), Ok(32 * 1024 * 1024));
    assert!(parse_bytes(&raw("0")).is_err());
    assert!(parse_bytes(&raw("10KB")).unwrap_err().contains("not a unit"));
    assert!(parse_bytes(&raw("99999999999GiB")).is_err(), "overflow is an error, not a wrap");
    for bytes in [1, 1000, 128 * 1024, 32 * 1024 * 1024, 3 * 1024 * 1024 * 1024] {
        let shown = show_bytes(&bytes);
        assert_eq!(parse_bytes(&raw(shown.trim_matches('"'))), Ok(bytes), "{shown}");
    }
    assert_eq!(parse_bool(&raw("false")), Ok(false));
    assert!(parse_bool(&raw("yes")).is_err());
}

#[test]
fn durations() {
    assert_eq!(parse_duration("90"), Ok(Duration::from_secs(90)));
    assert_eq!(parse_duration("1h30m"), Ok(Duration::from_secs(5400)));
    assert_eq!(parse_duration("30d"), Ok(Duration::from_secs(30 * 86_400)));
    assert_eq!(parse_duration("250ms"), Ok(Duration::from_millis(250)));
    assert!(parse_duration("").is_err());
    assert!(parse_duration("h").is_err());
    assert!(parse_duration("5 parsecs").is_err());
    assert_eq!(format_duration(Duration::from_secs(5400)), "1h30m");
    // The longest duration a bare number gives reads back from the days it is shown in.
    let longest = Duration::from_secs(u64::MAX);
    assert_eq!(parse_duration(&format_duration(longest)), Ok(longest));
    assert!(parse_duration("213503982334602d").is_err(), "past u64 seconds");
    assert_eq!(
        parse_duration(&format_duration(Duration::from_secs(93_784))),
        Ok(Duration::from_secs(93_784))
    );
}

#[test]
fn the_example_config_and_edge_values_pass_the_fuzz_checks() {
    let example = include_str!("../../deploy/config.example.toml");
    fuzz_config_text(example.as_bytes());
    let uncommented: String =
        example.lines().map(|line| line.trim_start_matches("# ")).collect::<Vec<_>>().join("\n");
    fuzz_config_text(uncommented.as_bytes());
    fuzz_config_text(
        b"18446744073709551615\n18446744073709551615d\n0ms\n1500ms\n16GiB\n17179869184KiB\n\xff",
    );
}

#[test]
fn every_setting_has_a_unique_key_env_and_flag() {
    let mut keys = std::collections::HashSet::new();
    let mut envs = std::collections::HashSet::new();
    for s in SETTINGS {
        assert!(keys.insert(s.key), "{}", s.key);
        assert!(envs.insert(s.env), "{}", s.env);
        assert!(s.env.starts_with("RN_"));
        assert!(!s.doc.is_empty());
    }
}

#[test]
fn every_declared_default_reads_as_its_kind() {
    for setting in SETTINGS {
        let DefaultValue::Text(text) = setting.default else { continue };
        let raw = Raw::Text(text.to_owned());
        let read = match setting.kind {
            Kind::Path => parse_path(&raw).map(drop),
            Kind::OptionalPath => parse_optional_path(&raw).map(drop),
            Kind::Addr => parse_addr(&raw).map(drop),
            Kind::OptionalAddr => parse_optional_addr(&raw).map(drop),
            Kind::HostPortList => parse_host_ports(&raw).map(drop),
            Kind::Duration => parse_duration_raw(&raw).map(drop),
            Kind::Count => parse_count(&raw).map(drop),
            Kind::LogLevel => parse_log_level(&raw).map(drop),
            Kind::Secret => parse_secret(&raw).map(drop),
            Kind::DhtMode => parse_dht_mode(&raw).map(drop),
            Kind::LogFormat => matches!(text, "text" | "json").then_some(()).ok_or_else(String::new),
            Kind::Bool => parse_bool(&raw).map(drop),
            Kind::Bytes => parse_bytes(&raw).map(drop),
        };
        assert!(
            read.is_ok(),
            "the declared default of {} does not read as {:?}: {read:?}",
            setting.key,
            setting.kind
        );
    }
}

/// The modules' own defaults (used where no config is loaded: unit tests, rn-bench, embedders) are the
/// daemon's: both come from the one declaration.
#[test]
fn module_defaults_are_the_declared_ones() {
    let c = load(None, &env(&[("HOME", "/home/u")]), &FlagValues::default()).expect("load").config;
    let quic = crate::quic::QuicLimits::default();
    assert_eq!(
        (quic.max_connections, quic.handshake_timeout, quic.inbound_handshake_timeout),
        (
            c.quic_limits.max_connections,
            c.quic_limits.handshake_timeout,
            c.quic_limits.inbound_handshake_timeout
        )
    );
    assert_eq!(
        (quic.max_pending_handshakes, quic.retry_threshold, quic.max_unvalidated_per_ip),
        (
            c.quic_limits.max_pending_handshakes,
            c.quic_limits.retry_threshold,
            c.quic_limits.max_unvalidated_per_ip
        )
    );
    let relay = crate::exchange::relay::RelayOptions::default();
    assert_eq!(relay.enabled, c.relay.enabled);
    assert_eq!(relay.max_reservations as u64, c.relay.max_reservations);
    assert_eq!(relay.max_circuits as u64, c.relay.max_circuits);
    assert_eq!(relay.max_bytes_per_second, c.relay.max_bytes_per_second);
    assert_eq!(relay.max_bytes_per_circuit, c.relay.max_bytes_per_circuit);
    let dht = crate::dht::DhtOptions::default();
    assert_eq!(dht.listen, c.dht.listen, "the DHT port");
    assert_eq!(dht.bootstrap, c.dht.bootstrap);
    assert_eq!(
        (dht.announce_interval, dht.lookup_interval),
        (c.dht.announce_interval, c.dht.lookup_interval)
    );
    let store = crate::store::StoreOptions::new("peers.db");
    assert_eq!(
        (store.retention, store.max_peers, store.max_joined_topics),
        (c.store.retention, c.store.max_peers, c.store.max_joined_topics)
    );
    assert_eq!(ServerLimitSettings::control(), c.control.limits);
    assert_eq!(ServerLimitSettings::monitoring(), c.monitoring_limits);
}

/// The README's settings table has one row per declared setting, in the declared order, with its environment
/// variable, flag and default.
#[test]
fn the_readme_settings_table_matches_the_declarations() {
    let readme = include_str!("../../README.md");
    let rows: Vec<Vec<&str>> = readme
        .lines()
        .skip_while(|line| !line.starts_with("| key | env | flag | default |"))
        .skip(2)
        .take_while(|line| line.starts_with('|'))
        .map(|line| line.split('|').map(str::trim).collect::<Vec<_>>())
        .map(|cells| cells[1..cells.len() - 1].to_vec())
        .collect();
    let keys: Vec<&str> = rows.iter().map(|row| row[0].trim_matches('`')).collect();
    let declared: Vec<&str> = SETTINGS.iter().map(|s| s.key).collect();
    assert_eq!(keys, declared, "README rows and declared settings differ (or are in another order)");
    for (row, setting) in rows.iter().zip(SETTINGS) {
        let [_, env, flag, default] = row[..] else { panic!("a README row without four cells: {row:?}") };
        assert!(env.contains(&format!("`{}`", setting.env)), "{}: env cell {env:?}", setting.key);
        match setting.flag {
            Some(name) => assert!(flag.contains(&format!("`{name}`")), "{}: flag cell {flag:?}", setting.key),
            None => {
                assert!(flag.is_empty(), "{}: no flag is declared, the README says {flag:?}", setting.key)
            }
        }
        match setting.default {
            DefaultValue::Text("") => {
                assert!(default.starts_with("none"), "{}: default {default:?}", setting.key)
            }
            DefaultValue::Text(text) => {
                assert!(
                    default.starts_with(&format!("`{text}`")),
                    "{}: declared {text:?}, README {default:?}",
                    setting.key
                )
            }
            DefaultValue::List(_) | DefaultValue::Computed => {}
        }
    }
}
