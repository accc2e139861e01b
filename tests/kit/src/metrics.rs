//! `/metrics` and `/healthz` over real HTTP for tests: one request, and a strict reader of
//! the Prometheus text format.

use std::collections::{BTreeMap, HashMap};
use std::net::SocketAddr;

use tokio::io::{AsyncReadExt, AsyncWriteExt};

use crate::TIMEOUT;

/// One HTTP/1.1 request; returns (status, headers lower-cased, body).
pub async fn http(
    addr: SocketAddr,
    method: &str,
    path: &str,
) -> (u16, HashMap<String, String>, String) {
    let mut s = tokio::net::TcpStream::connect(addr).await.expect("connect");
    s.write_all(
        format!("{method} {path} HTTP/1.1\r\nHost: test\r\nAccept: */*\r\n\r\n").as_bytes(),
    )
    .await
    .expect("write");
    let mut raw = Vec::new();
    tokio::time::timeout(TIMEOUT, s.read_to_end(&mut raw))
        .await
        .expect("response in time")
        .expect("read");
    let text = String::from_utf8(raw).expect("UTF-8 response");
    let (head, body) = text.split_once("\r\n\r\n").expect("head and body");
    let mut lines = head.split("\r\n");
    let status_line = lines.next().unwrap();
    assert!(status_line.starts_with("HTTP/1.1 "), "{status_line}");
    let code = status_line[9..12].parse().expect("status code");
    let headers: HashMap<String, String> = lines
        .filter_map(|l| l.split_once(':'))
        .map(|(k, v)| (k.trim().to_ascii_lowercase(), v.trim().to_string()))
        .collect();
    if method != "HEAD" {
        assert_eq!(
            headers["content-length"].parse::<usize>().unwrap(),
            body.len(),
            "Content-Length"
        );
    }
    (code, headers, body.to_string())
}

/// A strict reader of the Prometheus text format (0.0.4): every sample belongs to a family
/// declared with `# TYPE` before it, names and labels are well-formed, values are floats,
/// families are not split, histograms have increasing buckets ending in `+Inf` = `_count`.
/// Returns `"name{labels}" -> value`.
pub fn parse_prometheus(text: &str) -> BTreeMap<String, f64> {
    fn is_name(s: &str, colon: bool) -> bool {
        let mut chars = s.chars();
        chars
            .next()
            .is_some_and(|c| c.is_ascii_alphabetic() || c == '_' || (colon && c == ':'))
            && chars.all(|c| c.is_ascii_alphanumeric() || c == '_' || (colon && c == ':'))
    }
    let mut types: HashMap<String, String> = HashMap::new();
    let mut finished: Vec<String> = Vec::new();
    let mut current: Option<String> = None;
    let mut out = BTreeMap::new();
    let mut buckets: HashMap<String, Vec<(f64, f64)>> = HashMap::new();
    assert!(text.ends_with('\n'), "exposition ends with a newline");
    for line in text.lines() {
        assert!(!line.is_empty(), "no empty lines");
        if let Some(rest) = line.strip_prefix("# ") {
            let mut parts = rest.splitn(3, ' ');
            let (kw, name) = (parts.next().unwrap(), parts.next().expect("metric name"));
            assert!(is_name(name, true), "bad metric name in {line:?}");
            match kw {
                "HELP" => assert!(parts.next().is_some_and(|h| !h.is_empty()), "{line}"),
                "TYPE" => {
                    let t = parts.next().expect("type");
                    assert!(
                        ["counter", "gauge", "histogram", "summary", "untyped"].contains(&t),
                        "{line}"
                    );
                    assert!(
                        types.insert(name.to_string(), t.to_string()).is_none(),
                        "TYPE twice: {name}"
                    );
                    if let Some(c) = current.replace(name.to_string()) {
                        finished.push(c);
                    }
                }
                _ => panic!("unknown comment {line:?}"),
            }
            continue;
        }
        let (series, value) = line.rsplit_once(' ').expect("sample has a value");
        let value: f64 = match value {
            "+Inf" => f64::INFINITY,
            "-Inf" => f64::NEG_INFINITY,
            v => v
                .parse()
                .unwrap_or_else(|_| panic!("bad value in {line:?}")),
        };
        let (name, labels) = match series.split_once('{') {
            Some((n, l)) => (n, l.strip_suffix('}').expect("closing brace")),
            None => (series, ""),
        };
        assert!(is_name(name, true), "bad sample name in {line:?}");
        let mut label_map = BTreeMap::new();
        let mut rest = labels;
        while !rest.is_empty() {
            let (k, v) = rest.split_once("=\"").expect("label=\"value\"");
            assert!(is_name(k, false), "bad label name in {line:?}");
            let end = v.find('"').expect("closing quote");
            assert!(!v[..end].contains('\\'), "no escapes expected: {line}");
            label_map.insert(k.to_string(), v[..end].to_string());
            rest = v[end + 1..].strip_prefix(',').unwrap_or(&v[end + 1..]);
        }
        let family = current.clone().expect("sample before any TYPE");
        let kind = &types[&family];
        // `quantile` is the summary's label; `le` the histogram bucket's.
        assert!(
            !label_map.contains_key("quantile") || kind == "summary",
            "`quantile` label outside a summary in {line:?}"
        );
        assert!(
            !label_map.contains_key("le") || kind == "histogram",
            "`le` label outside a histogram in {line:?}"
        );
        let ok_name = if kind == "histogram" {
            [
                format!("{family}_bucket"),
                format!("{family}_sum"),
                format!("{family}_count"),
            ]
            .contains(&name.to_string())
        } else {
            name == family
        };
        assert!(ok_name, "sample {name} outside its family {family}");
        assert!(!finished.contains(&family), "family {family} split");
        if kind == "counter" {
            assert!(
                family.ends_with("_total"),
                "counter {family} ends in _total"
            );
            assert!(value >= 0.0, "{line}");
        }
        if name.ends_with("_bucket") {
            let le = label_map.get("le").expect("bucket has le");
            let le = if le == "+Inf" {
                f64::INFINITY
            } else {
                le.parse().expect("le is a float")
            };
            buckets.entry(family.clone()).or_default().push((le, value));
        }
        assert!(
            out.insert(series.to_string(), value).is_none(),
            "duplicate {series}"
        );
    }
    for (family, b) in buckets {
        assert!(
            b.windows(2).all(|w| w[0].0 < w[1].0 && w[0].1 <= w[1].1),
            "{family} buckets"
        );
        let last = b.last().unwrap();
        assert!(last.0.is_infinite(), "{family} ends with +Inf");
        assert_eq!(
            last.1,
            out[&format!("{family}_count")],
            "{family} +Inf = count"
        );
    }
    out
}

/// `/metrics` of an in-process broker started with `metrics.bind` set, parsed.
pub async fn scrape(b: &crate::TestBroker) -> BTreeMap<String, f64> {
    let addr = b
        .broker
        .as_ref()
        .and_then(|b| b.metrics_addr())
        .expect("metrics.bind set");
    let (code, _, body) = http(addr, "GET", "/metrics").await;
    assert_eq!(code, 200, "{body}");
    parse_prometheus(&body)
}
