//! Pure parts of the lines formats: the framer (delimiter, longest frame), the payload
//! formats (`raw`, `json`, `csv`, `nmea`) and topic templates.

use bytes::{Bytes, BytesMut};
use serde_json::{Map, Value};

use super::config::{Format, SerialConfig};

/// A topic template: literal text with `{placeholder}`s.
#[derive(Debug, Clone, PartialEq)]
pub struct Template {
    parts: Vec<Part>,
}

#[derive(Debug, Clone, PartialEq)]
enum Part {
    Lit(String),
    Var(String),
}

impl Template {
    pub fn parse(s: &str) -> Result<Template, String> {
        let mut parts = Vec::new();
        let mut rest = s;
        while let Some(open) = rest.find('{') {
            if open > 0 {
                parts.push(Part::Lit(rest[..open].to_string()));
            }
            let after = &rest[open + 1..];
            let close = after
                .find('}')
                .ok_or_else(|| format!("`{s}`: unclosed `{{`"))?;
            let var = &after[..close];
            if var.is_empty() || var.contains('{') {
                return Err(format!("`{s}`: bad placeholder `{{{var}}}`"));
            }
            parts.push(Part::Var(var.to_string()));
            rest = &after[close + 1..];
        }
        if rest.contains('}') {
            return Err(format!("`{s}`: stray `}}`"));
        }
        if !rest.is_empty() {
            parts.push(Part::Lit(rest.to_string()));
        }
        let t = Template { parts };
        // The literal skeleton must already be a valid topic name.
        let skeleton = t.render(|_| Some("x".into())).unwrap_or_default();
        if !crate::protocol::topic::valid_topic_name(&skeleton) || skeleton.starts_with('$') {
            return Err(format!(
                "`{s}` is not a valid topic name (no wildcards, not empty, not `$...`)"
            ));
        }
        Ok(t)
    }

    pub fn vars(&self) -> impl Iterator<Item = &str> {
        self.parts.iter().filter_map(|p| match p {
            Part::Var(v) => Some(v.as_str()),
            Part::Lit(_) => None,
        })
    }

    /// Renders with `lookup`; None if a placeholder has no value. Values are made safe for
    /// one topic level (`/`, `+`, `#` and NUL become `_`; empty becomes `_`).
    pub fn render(&self, lookup: impl Fn(&str) -> Option<String>) -> Option<String> {
        let mut out = String::new();
        for p in &self.parts {
            match p {
                Part::Lit(l) => out.push_str(l),
                Part::Var(v) => {
                    let val = lookup(v)?;
                    if val.is_empty() {
                        out.push('_');
                    }
                    out.extend(val.chars().map(|c| match c {
                        '/' | '+' | '#' | '\0' => '_',
                        c => c,
                    }));
                }
            }
        }
        Some(out)
    }
}

/// Splits a byte stream into frames at a delimiter, bounded by `max` bytes per frame.
#[derive(Debug)]
pub struct Framer {
    delim: Vec<u8>,
    max: usize,
    buf: BytesMut,
    /// Where the delimiter search resumes (bytes before it hold no delimiter start).
    scanned: usize,
    /// Inside an over-long frame: discard up to the next delimiter.
    skipping: bool,
}

/// What the framer yields.
#[derive(Debug, PartialEq)]
pub enum Frame {
    Line(Bytes),
    /// An over-long frame was dropped (reported once per frame).
    TooLong,
}

impl Framer {
    pub fn new(delim: &[u8], max: usize) -> Framer {
        Framer {
            delim: delim.to_vec(),
            max,
            buf: BytesMut::with_capacity(max.min(64 * 1024) + 4096),
            scanned: 0,
            skipping: false,
        }
    }

    /// Room to read into (the caller reads the port straight into it).
    pub fn buffer(&mut self) -> &mut BytesMut {
        &mut self.buf
    }

    /// Bytes held (a partial frame).
    pub fn pending(&self) -> usize {
        self.buf.len()
    }

    /// Forgets any partial frame (the port was reopened).
    pub fn reset(&mut self) {
        self.buf.clear();
        self.scanned = 0;
        self.skipping = false;
    }

    /// The next complete frame, if the buffer holds one.
    pub fn next_frame(&mut self) -> Option<Frame> {
        loop {
            let dl = self.delim.len();
            let found = if self.buf.len() >= dl {
                let start = self.scanned;
                memfind(&self.buf[start..], &self.delim).map(|p| p + start)
            } else {
                None
            };
            match found {
                Some(pos) => {
                    let frame = self.buf.split_to(pos + dl);
                    self.scanned = 0;
                    if std::mem::take(&mut self.skipping) {
                        continue; // the tail of an over-long frame
                    }
                    let mut line = frame.freeze().slice(..pos);
                    if line.last() == Some(&b'\r') {
                        line = line.slice(..line.len() - 1);
                    }
                    if line.len() > self.max {
                        return Some(Frame::TooLong);
                    }
                    return Some(Frame::Line(line));
                }
                None => {
                    // Keep dl-1 bytes: a delimiter may straddle two reads.
                    self.scanned = self.buf.len().saturating_sub(dl - 1);
                    // +1: a trailing '\r' may still be stripped.
                    if self.buf.len() > self.max + dl + 1 {
                        let keep = dl - 1;
                        let drop = self.buf.len() - keep;
                        let _ = self.buf.split_to(drop);
                        self.scanned = 0;
                        if !std::mem::replace(&mut self.skipping, true) {
                            return Some(Frame::TooLong);
                        }
                    }
                    return None;
                }
            }
        }
    }
}

fn memfind(hay: &[u8], needle: &[u8]) -> Option<usize> {
    if needle.len() == 1 {
        return hay.iter().position(|&b| b == needle[0]);
    }
    hay.windows(needle.len()).position(|w| w == needle)
}

/// Why a line was dropped.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Reject {
    Utf8,
    Json,
    Csv,
    NmeaChecksum,
    NmeaSyntax,
    /// A topic placeholder had no value, or the topic is not valid.
    Topic,
}

impl Reject {
    pub fn label(self) -> &'static str {
        match self {
            Reject::Utf8 => "invalid UTF-8",
            Reject::Json => "malformed JSON",
            Reject::Csv => "malformed CSV",
            Reject::NmeaChecksum => "bad NMEA checksum",
            Reject::NmeaSyntax => "malformed NMEA sentence",
            Reject::Topic => "topic cannot be built",
        }
    }
}

/// A reading ready to publish.
#[derive(Debug, Clone, PartialEq)]
pub struct Reading {
    pub topic: String,
    pub payload: Bytes,
}

/// When a reading was taken: the gateway's wall clock, and whether that clock was
/// synchronised ([`crate::clock::synchronised`]); a board without a real-time clock reads
/// 1970 or a stale time until NTP sets it, and consumers must be able to tell.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Stamp {
    pub ms: i64,
    pub synced: bool,
}

impl Stamp {
    /// The wall clock now.
    pub fn now() -> Stamp {
        Stamp {
            ms: crate::clock::wall_ms(),
            synced: crate::clock::synchronised(),
        }
    }

    /// Adds `"ts"` and `"ts_synced"` to a JSON object.
    pub fn insert(&self, m: &mut Map<String, Value>) {
        m.insert("ts".into(), self.ms.into());
        m.insert("ts_synced".into(), self.synced.into());
    }
}

/// Turns one line into a reading according to the port's format.
pub struct LineFormat {
    format: Format,
    template: Template,
    name: String,
    columns: Vec<String>,
    separator: char,
    timestamp: bool,
}

impl LineFormat {
    pub fn new(cfg: &SerialConfig) -> Result<LineFormat, String> {
        Ok(LineFormat {
            format: cfg.format,
            template: Template::parse(&cfg.topic)?,
            name: cfg.name.clone(),
            columns: cfg.columns.clone(),
            separator: cfg.csv_separator.chars().next().unwrap_or(','),
            timestamp: cfg.timestamp,
        })
    }

    /// `now` is only used with `timestamp = true`.
    pub fn reading(&self, line: &Bytes, now: Stamp) -> Result<Reading, Reject> {
        let text = std::str::from_utf8(line).map_err(|_| Reject::Utf8)?;
        let common = |v: &str| match v {
            "name" | "device" => Some(self.name.clone()),
            _ => None,
        };
        match self.format {
            Format::Raw | Format::ModbusRtu => {
                let topic = self.template.render(common).ok_or(Reject::Topic)?;
                Ok(Reading {
                    topic,
                    payload: line.clone(),
                })
            }
            Format::Json => {
                let mut v: Value = serde_json::from_str(text).map_err(|_| Reject::Json)?;
                let topic = self
                    .template
                    .render(|k| common(k).or_else(|| field(&v, k.strip_prefix("field.")?)))
                    .ok_or(Reject::Topic)?;
                let payload = match (&mut v, self.timestamp) {
                    (Value::Object(m), true) => {
                        now.insert(m);
                        Bytes::from(v.to_string())
                    }
                    _ => line.clone(),
                };
                Ok(Reading { topic, payload })
            }
            Format::Csv => {
                let cells = split_csv(text, self.separator).ok_or(Reject::Csv)?;
                if cells.len() != self.columns.len() {
                    return Err(Reject::Csv);
                }
                let mut m = Map::new();
                for (c, cell) in self.columns.iter().zip(cells) {
                    m.insert(c.clone(), cell_value(&cell));
                }
                let v = Value::Object(m);
                let topic = self
                    .template
                    .render(|k| common(k).or_else(|| field(&v, k.strip_prefix("field.")?)))
                    .ok_or(Reject::Topic)?;
                let mut v = v;
                if self.timestamp {
                    if let Value::Object(m) = &mut v {
                        now.insert(m);
                    }
                }
                Ok(Reading {
                    topic,
                    payload: Bytes::from(v.to_string()),
                })
            }
            Format::Nmea => {
                let s = parse_nmea(text)?;
                let topic = self
                    .template
                    .render(|k| {
                        common(k).or_else(|| match k {
                            "sentence" => Some(s.sentence.to_string()),
                            "talker" => Some(s.talker().to_string()),
                            "type" => Some(s.kind().to_string()),
                            _ => None,
                        })
                    })
                    .ok_or(Reject::Topic)?;
                let mut m = Map::new();
                m.insert("sentence".into(), s.sentence.into());
                m.insert(
                    "fields".into(),
                    Value::Array(s.fields.iter().map(|f| Value::from(*f)).collect()),
                );
                m.insert("raw".into(), text.into());
                if self.timestamp {
                    now.insert(&mut m);
                }
                Ok(Reading {
                    topic,
                    payload: Bytes::from(Value::Object(m).to_string()),
                })
            }
        }
    }
}

/// A JSON field by dotted path, as topic text (strings unquoted; objects/arrays/null: None).
fn field(v: &Value, path: &str) -> Option<String> {
    let mut cur = v;
    for k in path.split('.') {
        cur = match cur {
            Value::Object(m) => m.get(k)?,
            Value::Array(a) => a.get(k.parse::<usize>().ok()?)?,
            _ => return None,
        };
    }
    match cur {
        Value::String(s) => Some(s.clone()),
        Value::Number(n) => Some(n.to_string()),
        Value::Bool(b) => Some(b.to_string()),
        _ => None,
    }
}

/// Splits one CSV record: fields may be double-quoted (`""` is a quote inside). None if a
/// quote is not closed or text follows a closing quote.
pub fn split_csv(line: &str, sep: char) -> Option<Vec<String>> {
    let mut out = Vec::new();
    let mut chars = line.chars().peekable();
    loop {
        let mut cell = String::new();
        while chars.peek() == Some(&' ') {
            chars.next();
        }
        if chars.peek() == Some(&'"') {
            chars.next();
            loop {
                match chars.next() {
                    None => return None,
                    Some('"') if chars.peek() == Some(&'"') => {
                        chars.next();
                        cell.push('"');
                    }
                    Some('"') => break,
                    Some(c) => cell.push(c),
                }
            }
            while chars.peek() == Some(&' ') {
                chars.next();
            }
            match chars.next() {
                None => {
                    out.push(cell);
                    return Some(out);
                }
                Some(c) if c == sep => out.push(cell),
                Some(_) => return None,
            }
        } else {
            loop {
                match chars.next() {
                    None => {
                        out.push(cell.trim_end().to_string());
                        return Some(out);
                    }
                    Some(c) if c == sep => break,
                    Some('"') => return None,
                    Some(c) => cell.push(c),
                }
            }
            out.push(cell.trim_end().to_string());
        }
    }
}

/// A CSV cell as JSON: integer, finite number, empty → null, else string.
fn cell_value(cell: &str) -> Value {
    if cell.is_empty() {
        return Value::Null;
    }
    if let Ok(i) = cell.parse::<i64>() {
        return i.into();
    }
    match cell.parse::<f64>() {
        Ok(f) if f.is_finite() && !cell.contains(|c: char| c.is_ascii_alphabetic()) => {
            serde_json::Number::from_f64(f).map_or_else(|| cell.into(), Value::Number)
        }
        _ => cell.into(),
    }
}

/// A verified NMEA 0183 sentence.
#[derive(Debug, PartialEq)]
pub struct Nmea<'a> {
    /// Address field, e.g. `GPGGA` (talker + type; proprietary `P...` kept whole).
    pub sentence: &'a str,
    pub fields: Vec<&'a str>,
}

impl Nmea<'_> {
    pub fn talker(&self) -> &str {
        if self.sentence.starts_with('P') {
            "P"
        } else {
            self.sentence.get(..2).unwrap_or(self.sentence)
        }
    }
    pub fn kind(&self) -> &str {
        if self.sentence.starts_with('P') {
            &self.sentence[1..]
        } else {
            self.sentence.get(2..).unwrap_or("")
        }
    }
}

/// Parses `$GPGGA,...*hh` (or `!AIVDM...`), verifying the checksum (XOR of the bytes
/// between the start character and `*`). A sentence without a checksum is rejected.
pub fn parse_nmea(line: &str) -> Result<Nmea<'_>, Reject> {
    let line = line.trim_matches(|c: char| c.is_ascii_whitespace() || c == '\0');
    let body = line
        .strip_prefix('$')
        .or_else(|| line.strip_prefix('!'))
        .ok_or(Reject::NmeaSyntax)?;
    let (data, sum) = body.rsplit_once('*').ok_or(Reject::NmeaSyntax)?;
    if sum.len() != 2 {
        return Err(Reject::NmeaSyntax);
    }
    let want = u8::from_str_radix(sum, 16).map_err(|_| Reject::NmeaSyntax)?;
    let got = data.bytes().fold(0u8, |a, b| a ^ b);
    if got != want {
        return Err(Reject::NmeaChecksum);
    }
    let mut it = data.split(',');
    let sentence = it.next().unwrap_or("");
    if sentence.len() < 2 || !sentence.bytes().all(|b| b.is_ascii_alphanumeric()) {
        return Err(Reject::NmeaSyntax);
    }
    Ok(Nmea {
        sentence,
        fields: it.collect(),
    })
}

/// Appends `*hh` to an NMEA body (`$GPGGA,...`): for tests and examples.
pub fn nmea_with_checksum(body: &str) -> String {
    let sum = body[1..].bytes().fold(0u8, |a, b| a ^ b);
    format!("{body}*{sum:02X}")
}

#[cfg(test)]
mod tests {
    use super::*;

    fn frames(f: &mut Framer, input: &[u8]) -> Vec<Frame> {
        f.buffer().extend_from_slice(input);
        std::iter::from_fn(|| f.next_frame()).collect()
    }

    fn line(s: &str) -> Frame {
        Frame::Line(Bytes::copy_from_slice(s.as_bytes()))
    }

    #[test]
    fn framer_reassembles_partial_lines_and_strips_cr() {
        let mut f = Framer::new(b"\n", 16);
        assert_eq!(frames(&mut f, b"ab"), vec![]);
        assert_eq!(frames(&mut f, b"c\r\nde"), vec![line("abc")]);
        assert_eq!(frames(&mut f, b"f\n\n"), vec![line("def"), line("")]);
        assert_eq!(f.pending(), 0);
    }

    #[test]
    fn framer_multi_byte_delimiter_across_reads() {
        let mut f = Framer::new(b"\r\n", 16);
        assert_eq!(frames(&mut f, b"one\r"), vec![]);
        assert_eq!(frames(&mut f, b"\ntwo\r\n"), vec![line("one"), line("two")]);
    }

    #[test]
    fn framer_drops_over_long_frames_once_and_resyncs() {
        let mut f = Framer::new(b"\n", 4);
        assert_eq!(frames(&mut f, b"1234\n"), vec![line("1234")]);
        assert_eq!(frames(&mut f, b"12345\n"), vec![Frame::TooLong]);
        // Longer than the buffer bound, over several reads: one TooLong, then resync.
        assert_eq!(frames(&mut f, b"aaaaaaaaaa"), vec![Frame::TooLong]);
        assert_eq!(frames(&mut f, b"bbbbbbbbbbbb"), vec![]);
        assert_eq!(frames(&mut f, b"cc\nok\n"), vec![line("ok")]);
        assert!(f.pending() <= 4 + 2);
    }

    #[test]
    fn template_parse_render_and_sanitise() {
        let t = Template::parse("sensors/{device}/{field.id}").unwrap();
        assert_eq!(t.vars().collect::<Vec<_>>(), vec!["device", "field.id"]);
        let r = t.render(|k| {
            Some(if k == "device" {
                "a/b".into()
            } else {
                "#".into()
            })
        });
        assert_eq!(r.unwrap(), "sensors/a_b/_");
        assert!(Template::parse("a/{x").is_err());
        assert!(Template::parse("a/#").is_err());
        assert!(Template::parse("$SYS/x").is_err());
        assert!(Template::parse("a/{}").is_err());
    }

    const T0: Stamp = Stamp {
        ms: 0,
        synced: true,
    };

    fn cfg(format: Format, topic: &str) -> SerialConfig {
        SerialConfig::lines("gps0", "/dev/null", format, topic)
    }

    #[test]
    fn json_fields_in_topic_and_timestamp() {
        let mut c = cfg(Format::Json, "sensors/{device}/{field.id}");
        c.timestamp = true;
        let f = LineFormat::new(&c).unwrap();
        let r = f
            .reading(
                &Bytes::from_static(br#"{"id":"t1","v":2.5}"#),
                Stamp {
                    ms: 42,
                    synced: false,
                },
            )
            .unwrap();
        assert_eq!(r.topic, "sensors/gps0/t1");
        let v: Value = serde_json::from_slice(&r.payload).unwrap();
        assert_eq!(v["ts"], 42);
        assert_eq!(v["ts_synced"], false, "an unsynchronised clock is said");
        assert_eq!(v["v"], 2.5);
        assert_eq!(
            f.reading(&Bytes::from_static(b"{\"id\":"), T0),
            Err(Reject::Json)
        );
        assert_eq!(
            f.reading(&Bytes::from_static(b"{\"v\":1}"), T0),
            Err(Reject::Topic),
            "missing field"
        );
        assert_eq!(
            f.reading(&Bytes::from_static(b"\xff\xfe"), T0),
            Err(Reject::Utf8)
        );
    }

    #[test]
    fn csv_columns_to_json() {
        let mut c = cfg(Format::Csv, "csv/{field.id}");
        c.columns = vec!["id".into(), "temp".into(), "note".into()];
        let f = LineFormat::new(&c).unwrap();
        let r = f
            .reading(&Bytes::from_static(b"7, 21.5 ,\"a, \"\"b\"\"\""), T0)
            .unwrap();
        assert_eq!(r.topic, "csv/7");
        assert_eq!(
            serde_json::from_slice::<Value>(&r.payload).unwrap(),
            serde_json::json!({"id": 7, "temp": 21.5, "note": "a, \"b\""})
        );
        assert_eq!(f.reading(&Bytes::from_static(b"1,2"), T0), Err(Reject::Csv));
        assert_eq!(
            f.reading(&Bytes::from_static(b"1,\"2,3"), T0),
            Err(Reject::Csv)
        );
        assert_eq!(split_csv("a,,b", ',').unwrap(), vec!["a", "", "b"]);
    }

    #[test]
    fn nmea_checksum_and_topic() {
        let gga = "$GPGGA,123519,4807.038,N,01131.000,E,1,08,0.9,545.4,M,46.9,M,,*47";
        let s = parse_nmea(gga).unwrap();
        assert_eq!(s.sentence, "GPGGA");
        assert_eq!((s.talker(), s.kind()), ("GP", "GGA"));
        assert_eq!(s.fields.len(), 14);
        assert_eq!(parse_nmea("$GPGGA,123519*00"), Err(Reject::NmeaChecksum));
        assert_eq!(parse_nmea("GPGGA,1*47"), Err(Reject::NmeaSyntax));
        assert_eq!(parse_nmea("$GPGGA,1"), Err(Reject::NmeaSyntax));
        assert_eq!(nmea_with_checksum(&gga[..gga.len() - 3]), gga);
        let f = LineFormat::new(&cfg(Format::Nmea, "gps/{name}/{sentence}")).unwrap();
        let r = f
            .reading(&Bytes::copy_from_slice(gga.as_bytes()), T0)
            .unwrap();
        assert_eq!(r.topic, "gps/gps0/GPGGA");
        let v: Value = serde_json::from_slice(&r.payload).unwrap();
        assert_eq!(v["fields"][1], "4807.038");
        assert_eq!(v["raw"], gga);
    }
}
