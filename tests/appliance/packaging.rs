//! Packaging consistency without cargo-deb or systemd: the `[package.metadata.deb]` assets
//! exist, the unit and the package agree on paths, the maintainer scripts parse, and the
//! unit keeps the settings the daemon relies on (`Type=notify` needs the sd-notify code,
//! `WatchdogSec=` needs the pings). CI also runs `systemd-analyze verify` on the unit.

use std::path::Path;
use std::process::Command;

fn root() -> &'static Path {
    Path::new(env!("CARGO_MANIFEST_DIR"))
}

fn manifest() -> toml::Table {
    let text = std::fs::read_to_string(root().join("Cargo.toml")).expect("Cargo.toml");
    toml::from_str(&text).expect("Cargo.toml parses")
}

fn unit() -> String {
    std::fs::read_to_string(root().join("systemd/holdfast.service")).expect("unit")
}

#[test]
fn deb_assets_exist_and_agree_with_the_unit() {
    let m = manifest();
    let deb = m["package"]["metadata"]["deb"]
        .as_table()
        .expect("[package.metadata.deb]");
    let assets = deb["assets"].as_array().expect("assets");
    let mut installed = Vec::new();
    for a in assets {
        let a = a.as_array().expect("[source, dest, mode]");
        let (src, dest) = (a[0].as_str().unwrap(), a[1].as_str().unwrap());
        if !src.starts_with("target/") {
            assert!(root().join(src).is_file(), "asset {src} missing");
        }
        let dest = if dest.ends_with('/') {
            format!(
                "/{dest}{}",
                Path::new(src).file_name().unwrap().to_string_lossy()
            )
        } else {
            format!("/{dest}")
        };
        installed.push(dest);
    }
    for conf in deb["conf-files"].as_array().expect("conf-files") {
        let conf = conf.as_str().unwrap();
        assert!(
            installed.iter().any(|d| d == conf),
            "conffile {conf} is not an asset"
        );
    }
    // The unit runs the packaged binary with the packaged configuration.
    let unit = unit();
    let exec = unit
        .lines()
        .find_map(|l| l.strip_prefix("ExecStart="))
        .expect("ExecStart");
    let mut words = exec.split_whitespace();
    let bin = words.next().unwrap();
    assert!(installed.iter().any(|d| d == bin), "{bin} is not an asset");
    let config = exec.split("--config ").nth(1).expect("--config").trim();
    assert!(
        installed.iter().any(|d| d == config),
        "{config} is not an asset"
    );
    // cargo-deb finds the unit as <unit-scripts>/<unit-name>.service.
    let units = deb["systemd-units"].as_table().expect("systemd-units");
    let file = root()
        .join(units["unit-scripts"].as_str().unwrap())
        .join(format!("{}.service", units["unit-name"].as_str().unwrap()));
    assert!(file.is_file(), "{}", file.display());
}

#[test]
fn maintainer_scripts_parse_and_keep_the_debhelper_token() {
    use std::os::unix::fs::PermissionsExt;
    let dir = manifest()["package"]["metadata"]["deb"]["maintainer-scripts"]
        .as_str()
        .expect("maintainer-scripts")
        .to_string();
    for name in ["postinst", "postrm"] {
        let path = root().join(&dir).join(name);
        let text = std::fs::read_to_string(&path).expect("script");
        assert!(text.starts_with("#!/bin/sh\n"), "{name}");
        assert!(
            text.contains("\n#DEBHELPER#\n"),
            "{name}: systemd snippets go there"
        );
        let mode = std::fs::metadata(&path).unwrap().permissions().mode();
        assert!(mode & 0o111 != 0, "{name} is executable");
        let ok = Command::new("sh").arg("-n").arg(&path).status().unwrap();
        assert!(ok.success(), "{name} does not parse");
    }
}

#[test]
fn unit_is_notify_with_watchdog_and_hardened() {
    let unit = unit();
    for line in [
        "Type=notify",
        "NotifyAccess=main",
        "WatchdogSec=30",
        "ConfigurationDirectory=holdfast",
        "StateDirectory=holdfast",
        "NoNewPrivileges=yes",
        "ProtectSystem=strict",
        "CapabilityBoundingSet=",
        // sd-notify talks over a Unix datagram socket.
        "RestrictAddressFamilies=AF_INET AF_INET6 AF_UNIX",
    ] {
        assert!(unit.lines().any(|l| l == line), "unit lacks {line}");
    }
}

#[test]
fn dist_profile_keeps_unwinding() {
    // Connection tasks rely on tokio containing a panic to its task (see Cargo.toml).
    let m = manifest();
    let dist = m["profile"]["dist"].as_table().expect("[profile.dist]");
    assert_eq!(dist["inherits"].as_str(), Some("release"));
    assert_ne!(dist.get("panic").and_then(|p| p.as_str()), Some("abort"));
    let release = m["profile"]["release"]
        .as_table()
        .expect("[profile.release]");
    assert_ne!(release.get("panic").and_then(|p| p.as_str()), Some("abort"));
}
