//! Tests of loading and validating the configuration.

use std::io::Write;

use super::*;

fn env(pairs: &[(&str, &str)]) -> HashMap<String, String> {
    pairs
        .iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect()
}

fn toml_file(text: &str) -> tempfile::NamedTempFile {
    let mut file = tempfile::Builder::new()
        .suffix(".toml")
        .tempfile()
        .expect("temp file");
    file.write_all(text.as_bytes()).expect("write temp file");
    file
}

fn load_err(file: Option<&Path>, pairs: &[(&str, &str)]) -> ConfigError {
    Config::load_from(file, env(pairs)).expect_err("configuration should be rejected")
}

#[test]
fn defaults_validate() {
    Config::default().validate().expect("defaults are valid");
    let loaded = Config::load_from(None, HashMap::new()).expect("defaults load");
    assert_eq!(loaded, Config::default());
}

#[test]
fn empty_file_gives_defaults() {
    let file = toml_file("");
    let cfg = Config::load_from(Some(file.path()), HashMap::new()).expect("loads");
    assert_eq!(cfg, Config::default());
}

#[test]
fn file_overrides_defaults_and_replaces_the_listener_list() {
    let file = toml_file(
        r#"
        data_dir = "/var/lib/holdfast"
        [[listener]]
        bind = "0.0.0.0:1883"
        allow_anonymous = true
        [[listener]]
        bind = "[::1]:1884"
        [log]
        format = "json"
        [mqtt]
        max_inflight = 16
        queue_policy = "reject-new"
        server_keep_alive = 30
        "#,
    );
    let cfg = Config::load_from(Some(file.path()), HashMap::new()).expect("loads");
    assert_eq!(cfg.data_dir, PathBuf::from("/var/lib/holdfast"));
    let binds: Vec<_> = cfg.listener.iter().map(|l| l.bind.as_str()).collect();
    assert_eq!(binds, ["0.0.0.0:1883", "[::1]:1884"]);
    assert_eq!(cfg.log.format, LogFormat::Json);
    assert_eq!(cfg.mqtt.max_inflight, 16);
    assert_eq!(cfg.mqtt.queue_policy, QueuePolicy::RejectNew);
    assert_eq!(cfg.mqtt.server_keep_alive, Some(30));
    // Untouched keys keep their defaults.
    assert_eq!(cfg.mqtt.max_qos, 2);
    assert_eq!(cfg.log.level, "info");
}

#[test]
fn env_overrides_file() {
    let file = toml_file("data_dir = \"/from/file\"\n[mqtt]\nmax_inflight = 16\n");
    let cfg = Config::load_from(
        Some(file.path()),
        env(&[
            ("HOLDFAST_MQTT__MAX_INFLIGHT", "32"),
            ("HOLDFAST_DATA_DIR", "/var/lib/holdfast"),
            ("HOLDFAST_LOG__LEVEL", "debug"),
            ("HOLDFAST_LOG__FORMAT", "json"),
            ("HOLDFAST_MQTT__ALLOW_ANONYMOUS", "false"),
            ("HOLDFAST_MQTT__RETAIN_AVAILABLE", "true"),
            ("HOLDFAST_MQTT__SERVER_KEEP_ALIVE", "60"),
            ("HOLDFAST_MQTT__QUEUE_POLICY", "reject-new"),
            ("HOLDFAST_MQTT__MAX_QUEUED_BYTES", "1048576"),
        ]),
    )
    .expect("loads");
    assert_eq!(cfg.mqtt.max_inflight, 32);
    assert_eq!(cfg.data_dir, PathBuf::from("/var/lib/holdfast"));
    assert_eq!(cfg.log.level, "debug");
    assert_eq!(cfg.log.format, LogFormat::Json);
    assert!(!cfg.mqtt.allow_anonymous);
    assert!(cfg.mqtt.retain_available);
    assert_eq!(cfg.mqtt.server_keep_alive, Some(60));
    assert_eq!(cfg.mqtt.queue_policy, QueuePolicy::RejectNew);
    assert_eq!(cfg.mqtt.max_queued_bytes, 1_048_576);
}

#[test]
fn unknown_key_in_file_names_key_and_file() {
    for (text, key) in [
        ("colour = \"blue\"\n", "colour"),
        ("[mqtt]\nmax_qso = 1\n", "mqtt.max_qso"),
        ("[log]\nlevle = \"debug\"\n", "log.levle"),
        (
            "[[listener]]\nbind = \"0.0.0.0:1883\"\nport = 1\n",
            "listener[0].port",
        ),
    ] {
        let file = toml_file(text);
        let err = load_err(Some(file.path()), &[]);
        assert!(
            matches!(&err, ConfigError::UnknownKey { key: k, .. } if k == key),
            "{err:?}"
        );
        let msg = err.to_string();
        let prefix = format!(
            "config file {}: key `{key}`: unknown key",
            file.path().display()
        );
        assert!(msg.starts_with(&prefix), "{msg}");
    }
}

#[test]
fn unknown_key_in_env_names_key_and_variable() {
    let err = load_err(None, &[("HOLDFAST_MQTT__NOPE", "1")]);
    assert_eq!(err.key(), Some("mqtt.nope"));
    assert_eq!(err.origin(), Origin::Env("HOLDFAST_MQTT__NOPE".to_string()));
    let msg = err.to_string();
    assert!(
        msg.starts_with("environment variable HOLDFAST_MQTT__NOPE: key `mqtt.nope`: unknown key"),
        "{msg}"
    );
}

#[test]
fn test_switches_are_not_configuration_keys() {
    assert!(!is_config_env_var("HOLDFAST_INTEROP"));
    assert!(!is_config_env_var("HOLDFAST_TEST_SLOW"));
    assert!(is_config_env_var("HOLDFAST_MQTT__MAX_QOS"));
    assert!(!is_config_env_var("PATH"));
    assert_eq!(
        env_var_for_key("mqtt.max_inflight"),
        "HOLDFAST_MQTT__MAX_INFLIGHT"
    );
    assert_eq!(
        env_var_key("HOLDFAST_DATA_DIR").as_deref(),
        Some("data_dir")
    );
}

#[test]
fn bad_type_names_key_and_origin() {
    let file = toml_file("[mqtt]\nmax_inflight = \"lots\"\n");
    let err = load_err(Some(file.path()), &[]);
    assert_eq!(err.key(), Some("mqtt.max_inflight"));
    let msg = err.to_string();
    assert!(
        msg.starts_with(&format!(
            "config file {}: key `mqtt.max_inflight`: ",
            file.path().display()
        )),
        "{msg}"
    );
    assert!(msg.contains("lots"), "{msg}");

    let err = load_err(None, &[("HOLDFAST_MQTT__RETAIN_AVAILABLE", "maybe")]);
    assert_eq!(err.key(), Some("mqtt.retain_available"));
    assert_eq!(
        err.origin(),
        Origin::Env("HOLDFAST_MQTT__RETAIN_AVAILABLE".to_string())
    );

    let err = load_err(None, &[("HOLDFAST_MQTT__MAX_INFLIGHT", "70000")]);
    assert_eq!(err.key(), Some("mqtt.max_inflight"), "{err}");

    let err = load_err(None, &[("HOLDFAST_LOG__FORMAT", "xml")]);
    assert_eq!(err.key(), Some("log.format"), "{err}");
}

#[test]
fn bad_toml_syntax_names_the_file() {
    let file = toml_file("[mqtt\nmax_qos = 1\n");
    let err = load_err(Some(file.path()), &[]);
    assert!(matches!(err, ConfigError::Syntax { .. }), "{err:?}");
    let msg = err.to_string();
    assert!(
        msg.starts_with(&format!(
            "config file {}: invalid TOML",
            file.path().display()
        )),
        "{msg}"
    );
}

#[test]
fn overlapping_out_rules_of_different_priorities_are_refused() {
    let file = toml_file(
        "[[bridge]]\nname = \"c\"\naddress = \"h:1883\"\n\
         [[bridge.topic]]\npattern = \"sensors/#\"\n\
         [[bridge.topic]]\npattern = \"sensors/alarm/+\"\npriority = 2\n",
    );
    let msg = load_err(Some(file.path()), &[]).to_string();
    assert!(msg.contains("bridge[0].topic[1].priority"), "{msg}");
    let file = toml_file(
        "[[bridge]]\nname = \"c\"\naddress = \"h:1883\"\n\
         [[bridge.topic]]\npattern = \"telemetry/#\"\n\
         [[bridge.topic]]\npattern = \"alarms/#\"\npriority = 2\n\
         [[bridge.topic]]\npattern = \"cmd/#\"\ndirection = \"in\"\npriority = 5\n",
    );
    let cfg = Config::load_from(Some(file.path()), HashMap::new()).expect("loads");
    assert_eq!(crate::bridge::priorities(&cfg.bridge[0]), vec![2, 0]);
    let ids: Vec<String> = crate::bridge::internal_sessions(&cfg.bridge[0])
        .iter()
        .map(|i| i.client_id.to_string())
        .collect();
    assert_eq!(ids, vec!["$bridge/c/p2", "$bridge/c"]);
}

#[test]
fn bridge_protocol_5_keys_are_checked_naming_the_key() {
    let bridge = |extra: &str, qos: u8| {
        toml_file(&format!(
            "[[bridge]]\nname = \"c\"\naddress = \"h:1883\"\n{extra}\n\
             [[bridge.topic]]\npattern = \"a/#\"\nqos = {qos}\n"
        ))
    };
    let file = bridge("protocol = \"5\"\nsession_expiry_secs = 600", 2);
    let cfg = Config::load_from(Some(file.path()), HashMap::new()).expect("loads");
    assert_eq!(cfg.bridge[0].protocol, crate::bridge::BridgeProtocol::V5);
    assert_eq!(cfg.bridge[0].session_expiry_secs, 600);
    for (extra, qos, key) in [
        ("", 2, "bridge[0].topic[0].qos"),
        ("protocol = \"5\"", 3, "bridge[0].topic[0].qos"),
        (
            "protocol = \"5\"\nsession_expiry_secs = 0",
            1,
            "bridge[0].session_expiry_secs",
        ),
        (
            "tls = true\nserver_name = \"not a name\"",
            1,
            "bridge[0].server_name",
        ),
        ("server_name = \"cloud.example\"", 1, "bridge[0].tls"),
    ] {
        let file = bridge(extra, qos);
        let msg = load_err(Some(file.path()), &[]).to_string();
        assert!(msg.contains(key), "{extra} / qos {qos}: {msg}");
    }
}

#[test]
fn bad_bind_is_rejected() {
    let file = toml_file("[[listener]]\nbind = \"0.0.0.0\"\n");
    let err = load_err(Some(file.path()), &[]);
    assert_eq!(err.key(), Some("listener[0].bind"));
    assert_eq!(err.origin(), Origin::File(file.path().to_path_buf()));
    assert!(
        err.to_string().contains("`0.0.0.0` is not an address"),
        "{err}"
    );

    let err = load_err(None, &[("HOLDFAST_LISTENER", "0.0.0.0:1883")]);
    assert_eq!(err.origin(), Origin::Env("HOLDFAST_LISTENER".to_string()));
    assert!(err.to_string().contains("[[listener]] tables"), "{err}");

    let file = toml_file("listener = []\n");
    assert_eq!(load_err(Some(file.path()), &[]).key(), Some("listener"));

    let file =
        toml_file("[[listener]]\nbind = \"1.2.3.4:1883\"\n[[listener]]\nbind = \"1.2.3.4:1883\"\n");
    assert_eq!(
        load_err(Some(file.path()), &[]).key(),
        Some("listener[1].bind")
    );
}

#[test]
fn bind_accepts_ip_literals_and_localhost() {
    for (bind, expected) in [
        ("0.0.0.0:1883", "0.0.0.0:1883"),
        ("[::]:1883", "[::]:1883"),
        ("localhost:1884", "127.0.0.1:1884"),
        ("127.0.0.1:0", "127.0.0.1:0"),
    ] {
        let listener = ListenerConfig::new(bind);
        let addr = listener.socket_addr().expect("valid bind");
        assert_eq!(addr.to_string(), expected);
    }
    for bad in ["example.com:1883", "127.0.0.1:99999", ":1883", "localhost"] {
        let listener = ListenerConfig::new(bad);
        assert!(listener.socket_addr().is_err(), "{bad}");
    }
}

#[test]
fn max_qos_above_two_is_rejected_naming_the_origin() {
    let file = toml_file("[mqtt]\nmax_qos = 3\n");
    let err = load_err(Some(file.path()), &[]);
    assert_eq!(
        err.to_string(),
        format!(
            "config file {}: key `mqtt.max_qos`: must be 0, 1 or 2 (got 3)",
            file.path().display()
        )
    );
    let err = load_err(Some(file.path()), &[("HOLDFAST_MQTT__MAX_QOS", "5")]);
    assert_eq!(
        err.to_string(),
        "environment variable HOLDFAST_MQTT__MAX_QOS: key `mqtt.max_qos`: must be 0, 1 or 2 (got 5)"
    );
}

#[test]
fn range_checks_name_their_keys() {
    let cases: [(&str, &str); 7] = [
        ("HOLDFAST_MQTT__MAX_INFLIGHT", "mqtt.max_inflight"),
        ("HOLDFAST_MQTT__MAX_PACKET_SIZE", "mqtt.max_packet_size"),
        ("HOLDFAST_MQTT__MAX_TOPIC_LENGTH", "mqtt.max_topic_length"),
        ("HOLDFAST_MQTT__MAX_TOPIC_LEVELS", "mqtt.max_topic_levels"),
        (
            "HOLDFAST_MQTT__CONNECT_TIMEOUT_SECS",
            "mqtt.connect_timeout_secs",
        ),
        ("HOLDFAST_MQTT__MAX_CONNECTIONS", "mqtt.max_connections"),
        ("HOLDFAST_DATA_DIR", "data_dir"),
    ];
    for (var, key) in cases {
        let value = if key == "data_dir" { "" } else { "0" };
        let err = load_err(None, &[(var, value)]);
        assert_eq!(err.key(), Some(key), "{err}");
        assert_eq!(err.origin(), Origin::Env(var.to_string()));
    }
    let mut cfg = Config::default();
    cfg.mqtt.max_packet_size = 268_435_456;
    assert_eq!(
        cfg.validate().expect_err("too big").key(),
        Some("mqtt.max_packet_size")
    );
    cfg.mqtt.max_packet_size = 16;
    cfg.mqtt.max_topic_length = 65_536;
    assert_eq!(
        cfg.validate().expect_err("too long").key(),
        Some("mqtt.max_topic_length")
    );
}

#[test]
fn commit_delay_is_bounded_and_read_from_the_environment() {
    let err = load_err(None, &[("HOLDFAST_STORE__COMMIT_DELAY_MS", "5000")]);
    assert_eq!(err.key(), Some("store.commit_delay_ms"), "{err}");
    let cfg = Config::load_from(None, env(&[("HOLDFAST_STORE__COMMIT_DELAY_MS", "250")]))
        .expect("a delay within the bound loads");
    assert_eq!(cfg.store.commit_delay_ms, 250);
    assert_eq!(Config::default().store.commit_delay_ms, 0, "off by default");
}

#[test]
fn page_size_must_be_a_power_of_two_sqlite_accepts() {
    for bad in ["1000", "256", "131072"] {
        let err = load_err(None, &[("HOLDFAST_STORE__PAGE_SIZE", bad)]);
        assert_eq!(err.key(), Some("store.page_size"), "{bad}: {err}");
    }
    let cfg =
        Config::load_from(None, env(&[("HOLDFAST_STORE__PAGE_SIZE", "1024")])).expect("1024 loads");
    assert_eq!(cfg.store.page_size, 1024);
}

#[test]
fn the_store_cache_size_is_bounded_and_2_mib_by_default() {
    for bad in ["0", "255", "1048577"] {
        let err = load_err(None, &[("HOLDFAST_STORE__CACHE_SIZE_KIB", bad)]);
        assert_eq!(err.key(), Some("store.cache_size_kib"), "{bad}: {err}");
    }
    let cfg = Config::load_from(None, env(&[("HOLDFAST_STORE__CACHE_SIZE_KIB", "8192")]))
        .expect("8192 loads");
    assert_eq!(cfg.store.cache_size_kib, 8192);
    assert_eq!(Config::default().store.cache_size_kib, 2048);
}

#[test]
fn log_level_must_be_a_filter() {
    for good in [
        "debug",
        "WARN",
        "info,holdfast=trace",
        "holdfast::broker=debug",
        "off",
    ] {
        let mut cfg = Config::default();
        cfg.log.level = good.to_string();
        cfg.validate().expect(good);
    }
    for bad in ["verbose", "holdfast=loud", "", "info,chatty"] {
        let mut cfg = Config::default();
        cfg.log.level = bad.to_string();
        let err = cfg.validate().expect_err(bad);
        assert_eq!(err.key(), Some("log.level"), "{bad}");
        assert!(
            err.to_string()
                .starts_with("configuration: key `log.level`"),
            "{err}"
        );
    }
}

#[test]
fn missing_file_is_an_error_naming_the_file() {
    let dir = tempfile::tempdir().expect("temp dir");
    let path = dir.path().join("nope.toml");
    let err = load_err(Some(&path), &[]);
    assert!(matches!(err, ConfigError::Read { .. }), "{err:?}");
    let msg = err.to_string();
    assert!(
        msg.starts_with(&format!("config file {}: cannot read:", path.display())),
        "{msg}"
    );
}

#[test]
fn to_toml_round_trips() {
    let mut cfg = Config {
        data_dir: PathBuf::from("/var/lib/holdfast"),
        ..Config::default()
    };
    cfg.listener.push(ListenerConfig {
        allow_anonymous: Some(false),
        tls_cert: Some(PathBuf::from("/etc/holdfast/cert.pem")),
        tls_key: Some(PathBuf::from("/etc/holdfast/key.pem")),
        tls_client_ca: Some(PathBuf::from("/etc/holdfast/ca.pem")),
        require_client_cert: true,
        websocket: true,
        websocket_path: Some("/ws/mqtt".to_string()),
        ..ListenerConfig::new("[::]:1884")
    });
    cfg.log.format = LogFormat::Json;
    cfg.mqtt.server_keep_alive = Some(120);
    cfg.mqtt.queue_policy = QueuePolicy::RejectNew;
    for cfg in [Config::default(), cfg] {
        let file = toml_file(&cfg.to_toml());
        let loaded = Config::load_from(Some(file.path()), HashMap::new())
            .unwrap_or_else(|e| panic!("{e}\n{}", cfg.to_toml()));
        assert_eq!(loaded, cfg);
    }
}

/// Every key of the default configuration (plus the optional ones, which serialize to
/// nothing when unset) as dotted paths.
fn all_keys() -> Vec<String> {
    let mut cfg = Config::default();
    cfg.mqtt.server_keep_alive = Some(0);
    cfg.auth.password_file = Some(PathBuf::from("passwd"));
    cfg.auth.acl_file = Some(PathBuf::from("acl"));
    cfg.listener[0] = ListenerConfig {
        allow_anonymous: Some(true),
        tls_cert: Some(PathBuf::from("c")),
        tls_key: Some(PathBuf::from("k")),
        tls_client_ca: Some(PathBuf::from("ca")),
        require_client_cert: true,
        websocket: true,
        websocket_path: Some("/mqtt".to_string()),
        ..ListenerConfig::new("127.0.0.1:1883")
    };
    cfg.bridge = vec![crate::bridge::BridgeConfig::example().with_example_tls()];
    cfg.serial = vec![crate::serial::SerialConfig::example()];
    cfg.metrics.bind = Some("127.0.0.1:9100".to_string());
    let mut keys = Vec::new();
    let table: toml::Table = toml::from_str(&cfg.to_toml()).expect("to_toml is TOML");
    for (name, value) in table {
        match value {
            toml::Value::Table(inner) => {
                keys.extend(inner.keys().map(|k| format!("{name}.{k}")));
            }
            toml::Value::Array(items) => {
                for item in items.iter().filter_map(toml::Value::as_table) {
                    for (k, v) in item {
                        match v {
                            toml::Value::Array(inner)
                                if inner.iter().any(toml::Value::is_table) =>
                            {
                                for t in inner.iter().filter_map(toml::Value::as_table) {
                                    keys.extend(t.keys().map(|l| format!("{name}.{k}.{l}")));
                                }
                            }
                            _ => keys.push(format!("{name}.{k}")),
                        }
                    }
                }
            }
            _ => keys.push(name),
        }
    }
    keys.sort();
    keys.dedup();
    keys
}

#[test]
fn every_key_is_documented() {
    let example = include_str!("../../examples/holdfast.toml");
    let reference = include_str!("../../docs/configuration.md");
    let readme = include_str!("../../README.md");
    let keys = all_keys();
    for expected in [
        "data_dir",
        "listener.bind",
        "log.level",
        "mqtt.server_keep_alive",
    ] {
        assert!(keys.iter().any(|k| k == expected), "{keys:?}");
    }
    for key in keys {
        let leaf = key.rsplit('.').next().unwrap_or(&key);
        assert!(
            example.contains(&format!("\n{leaf} = ")) || example.contains(&format!("# {leaf} = ")),
            "examples/holdfast.toml lacks `{key}`"
        );
        let documented = if key.starts_with("listener.") {
            reference.contains(&format!("`[[listener]]` `{leaf}`"))
        } else {
            reference.contains(&format!("| `{key}` |"))
                && (key.starts_with("bridge.")
                    || key.starts_with("serial.")
                    || reference.contains(&format!("`{}`", env_var_for_key(&key))))
        };
        assert!(documented, "docs/configuration.md lacks `{key}`");
        let in_readme = key.starts_with("listener.") || readme.contains(&format!("| `{key}` |"));
        assert!(
            in_readme,
            "README.md's configuration reference lacks `{key}`"
        );
    }
}

#[test]
fn connection_limits_validate_and_name_their_keys() {
    let file = toml_file(
        "[mqtt]\nmax_connection_rate = 2.5\nconnection_rate_exempt = [\"10.0.0.0/8\"]\n\
         [auth]\nmax_connections_per_user = 3\n",
    );
    let cfg = Config::load_from(Some(file.path()), HashMap::new()).expect("valid");
    assert_eq!(cfg.mqtt.max_connection_rate, 2.5);
    assert_eq!(cfg.auth.max_connections_per_user, 3);
    let cfg = Config::load_from(
        None,
        env(&[(
            "HOLDFAST_MQTT__CONNECTION_RATE_EXEMPT",
            "127.0.0.1, fd00::/8",
        )]),
    )
    .expect("a comma-separated variable");
    assert_eq!(cfg.mqtt.connection_rate_exempt, ["127.0.0.1", "fd00::/8"]);

    for (text, key) in [
        (
            "[mqtt]\nmax_connection_rate = -1\n",
            "mqtt.max_connection_rate",
        ),
        (
            "[mqtt]\nmax_connection_burst = 0\n",
            "mqtt.max_connection_burst",
        ),
        (
            "[mqtt]\nconnection_rate_exempt = [\"::1\", \"10.0.0.0/40\"]\n",
            "mqtt.connection_rate_exempt[1]",
        ),
        (
            "[auth]\nmax_connections_per_user = -1\n",
            "auth.max_connections_per_user",
        ),
    ] {
        let file = toml_file(text);
        let err = load_err(Some(file.path()), &[]);
        assert_eq!(err.key(), Some(key), "{err}");
        assert!(
            err.to_string().contains(&file.path().display().to_string()),
            "{err}"
        );
    }
}

#[test]
fn network_listeners_must_authenticate_unless_explicit() {
    let file = toml_file(
        "[[listener]]\nbind = \"127.0.0.1:1883\"\n[[listener]]\nbind = \"0.0.0.0:1883\"\n",
    );
    let err = load_err(Some(file.path()), &[]);
    assert_eq!(err.key(), Some("listener[1].allow_anonymous"));
    assert!(err.to_string().contains("listener `0.0.0.0:1883`"), "{err}");
    assert!(err.to_string().contains("anonymous"), "{err}");

    // Anonymous off, but nothing verifies user names.
    let file = toml_file("[[listener]]\nbind = \"[::]:1883\"\nallow_anonymous = false\n");
    let err = load_err(Some(file.path()), &[]);
    assert_eq!(err.key(), Some("listener[0].allow_anonymous"));
    assert!(err.to_string().contains("password_file"), "{err}");

    // With a password file (the file is only read when the broker starts).
    let file = toml_file(
        "[auth]\npassword_file = \"/x\"\n[[listener]]\nbind = \"0.0.0.0:1883\"\nallow_anonymous = false\n",
    );
    Config::load_from(Some(file.path()), HashMap::new()).expect("authenticated");
    // Global switch off is enough too.
    let file = toml_file(
        "[auth]\npassword_file = \"/x\"\n[mqtt]\nallow_anonymous = false\n[[listener]]\nbind = \"0.0.0.0:1883\"\n",
    );
    Config::load_from(Some(file.path()), HashMap::new()).expect("authenticated");
    // Explicit opt-in.
    let file = toml_file("[[listener]]\nbind = \"0.0.0.0:1883\"\nallow_anonymous = true\n");
    Config::load_from(Some(file.path()), HashMap::new()).expect("explicit");
    // Client certificates required.
    let file = toml_file(
        "[[listener]]\nbind = \"0.0.0.0:8883\"\ntls_cert = \"c\"\ntls_key = \"k\"\ntls_client_ca = \"ca\"\nrequire_client_cert = true\n",
    );
    Config::load_from(Some(file.path()), HashMap::new()).expect("mutual TLS");
    // The embedded default stays valid.
    Config::default().validate().expect("default");
}

#[test]
fn tls_keys_come_in_pairs() {
    for (text, key) in [
        ("tls_cert = \"c\"\n", "listener[0].tls_key"),
        ("tls_key = \"k\"\n", "listener[0].tls_cert"),
        ("tls_client_ca = \"ca\"\n", "listener[0].tls_client_ca"),
        (
            "tls_cert = \"c\"\ntls_key = \"k\"\nrequire_client_cert = true\n",
            "listener[0].require_client_cert",
        ),
    ] {
        let file = toml_file(&format!("[[listener]]\nbind = \"127.0.0.1:8883\"\n{text}"));
        assert_eq!(load_err(Some(file.path()), &[]).key(), Some(key), "{text}");
    }
}

#[test]
fn websocket_path_is_checked() {
    for (text, key) in [
        ("websocket_path = \"/mqtt\"\n", "listener[0].websocket_path"),
        (
            "websocket = true\nwebsocket_path = \"mqtt\"\n",
            "listener[0].websocket_path",
        ),
        (
            "websocket = true\nwebsocket_path = \"/a b\"\n",
            "listener[0].websocket_path",
        ),
        (
            "websocket = true\nwebsocket_path = \"/mqtt?x=1\"\n",
            "listener[0].websocket_path",
        ),
        ("websocket = \"maybe\"\n", "listener[0].websocket"),
    ] {
        let file = toml_file(&format!("[[listener]]\nbind = \"127.0.0.1:8080\"\n{text}"));
        let err = load_err(Some(file.path()), &[]);
        assert_eq!(err.key(), Some(key), "{text}");
        let msg = err.to_string();
        assert!(msg.contains(&file.path().display().to_string()), "{msg}");
    }
    let file = toml_file(
        "[[listener]]\nbind = \"127.0.0.1:8080\"\nwebsocket = true\nwebsocket_path = \"/ws/mqtt\"\n",
    );
    let cfg = Config::load_from(Some(file.path()), HashMap::new()).expect("valid");
    assert_eq!(cfg.listener[0].websocket_path(), "/ws/mqtt");
    assert_eq!(ListenerConfig::new("127.0.0.1:1").websocket_path(), "/mqtt");
    // The exposure rule applies to WebSocket listeners as to any other.
    let file = toml_file("[[listener]]\nbind = \"0.0.0.0:8080\"\nwebsocket = true\n");
    assert_eq!(
        load_err(Some(file.path()), &[]).key(),
        Some("listener[0].allow_anonymous")
    );
}

#[test]
fn example_file_loads_and_validates() {
    let path = Path::new(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/examples/holdfast.toml"
    ));
    let cfg = Config::load_from(Some(path), HashMap::new()).expect("example loads");
    cfg.validate().expect("example validates");
}

/// `examples/holdfast.toml` says each key's default in its comment ("Default: 64."): those
/// must be the defaults the code has (its `page_size` said 4096 after the default became
/// 1024). Checked for the tables with one instance (`[mqtt]`, `[store]`...) and top-level keys,
/// where the comment's default is a plain value (a number, a quoted string, true or false).
#[test]
fn the_example_file_states_the_real_defaults() {
    let example = include_str!("../../examples/holdfast.toml");
    let defaults: toml::Table = toml::from_str(&Config::default().to_toml()).expect("TOML");
    let mut section: Option<String> = None;
    let mut comment = String::new();
    let mut checked = 0;
    for line in example.lines() {
        let line = line.trim();
        if let Some(c) = line.strip_prefix('#') {
            comment.push_str(c);
            comment.push(' ');
            continue;
        }
        if line.starts_with("[[") {
            section = None; // repeated tables have no single default
            comment.clear();
            continue;
        }
        if let Some(name) = line.strip_prefix('[').and_then(|l| l.strip_suffix(']')) {
            section = Some(name.to_string());
            comment.clear();
            continue;
        }
        let Some((key, _)) = line.split_once(" = ") else {
            comment.clear();
            continue;
        };
        let stated = comment.rsplit_once("Default: ").map(|(_, d)| {
            d.split([' ', ',', '('])
                .next()
                .unwrap_or("")
                .trim_end_matches('.')
                .to_string()
        });
        comment.clear();
        let Some(stated) = stated else { continue };
        let Ok(stated) = toml::from_str::<toml::Table>(&format!("v = {stated}")) else {
            continue; // "unset", "<data_dir>/...": not a plain value
        };
        let actual = match &section {
            Some(s) => defaults.get(s).and_then(|t| t.get(key)),
            None if example.find(line) < example.find("\n[") => defaults.get(key),
            None => None,
        };
        let Some(actual) = actual else { continue };
        // 0 and 0.0 state the same default.
        let num = |v: Option<&toml::Value>| match v {
            Some(toml::Value::Integer(i)) => Some(toml::Value::Float(*i as f64)),
            other => other.cloned(),
        };
        assert_eq!(
            num(Some(actual)),
            num(stated.get("v")),
            "examples/holdfast.toml states the default of {}{key} wrongly",
            section
                .as_deref()
                .map(|s| format!("{s}."))
                .unwrap_or_default()
        );
        checked += 1;
    }
    assert!(checked >= 40, "only {checked} defaults checked");
}
