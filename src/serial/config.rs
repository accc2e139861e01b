//! `[[serial]]` settings: one serial port each (a UART or USB-serial adapter), read as
//! delimited lines (`raw`, `json`, `csv`, `nmea`) or polled as a Modbus RTU bus
//! (`modbus-rtu`, with `[[serial.device]]` and `[[serial.register]]` tables).

use serde::{Deserialize, Serialize};

use super::format::Template;
use crate::config::ConfigError;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Format {
    /// The line is the payload.
    Raw,
    /// The line must be a JSON value; fields may be used in the topic.
    Json,
    /// Separated values named by `columns`, published as a JSON object.
    Csv,
    /// NMEA 0183 sentences, checksum verified, published as JSON.
    Nmea,
    /// Modbus RTU polling of `[[serial.device]]`s.
    ModbusRtu,
}

impl Format {
    pub fn is_lines(self) -> bool {
        self != Format::ModbusRtu
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Parity {
    None,
    Odd,
    Even,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum FlowControl {
    None,
    Software,
    Hardware,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum RegisterKind {
    /// Holding registers (function 0x03).
    Holding,
    /// Input registers (0x04).
    Input,
    /// Coils (0x01).
    Coil,
    /// Discrete inputs (0x02).
    Discrete,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum RegisterType {
    U16,
    I16,
    U32,
    I32,
    F32,
    /// Coils and discrete inputs.
    Bool,
}

impl RegisterType {
    /// 16-bit words the value spans.
    pub fn words(self) -> u16 {
        match self {
            RegisterType::U16 | RegisterType::I16 | RegisterType::Bool => 1,
            RegisterType::U32 | RegisterType::I32 | RegisterType::F32 => 2,
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum WordOrder {
    /// High word first (the Modbus convention).
    Big,
    /// Low word first ("word swapped").
    Little,
}

/// One Modbus slave on the bus.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ModbusDevice {
    /// Name used in the topic (`{device}`) and the payload.
    pub name: String,
    /// Modbus unit (slave) id, 1..=247.
    pub unit_id: u8,
}

/// One value read from a device.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Register {
    /// Device name (`[[serial.device]]` `name`); may be left out when there is one device.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub device: Option<String>,
    /// Key in the JSON payload.
    pub name: String,
    #[serde(default = "default_kind")]
    pub kind: RegisterKind,
    /// Register (or coil) address, 0-based as on the wire.
    pub address: u16,
    #[serde(rename = "type", default = "default_type")]
    pub ty: RegisterType,
    #[serde(default = "default_word_order")]
    pub word_order: WordOrder,
    /// value = raw × scale + offset.
    #[serde(default = "default_scale")]
    pub scale: f64,
    #[serde(default)]
    pub offset: f64,
}

fn default_kind() -> RegisterKind {
    RegisterKind::Holding
}
fn default_type() -> RegisterType {
    RegisterType::U16
}
fn default_word_order() -> WordOrder {
    WordOrder::Big
}
fn default_scale() -> f64 {
    1.0
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SerialConfig {
    /// Short name: logs, internal session `$serial/<name>`, `$SYS/holdfast/serial/<name>/`.
    pub name: String,
    /// Device path; `/dev/serial/by-id/...` symlinks are followed at every (re)open.
    pub path: String,
    #[serde(default = "default_baud")]
    pub baud: u32,
    #[serde(default = "default_data_bits")]
    pub data_bits: u8,
    #[serde(default = "default_parity")]
    pub parity: Parity,
    #[serde(default = "default_stop_bits")]
    pub stop_bits: u8,
    #[serde(default = "default_flow")]
    pub flow_control: FlowControl,
    pub format: Format,
    /// Topic template: `{name}`, `{device}`, `{field.X}` (json/csv), `{sentence}`,
    /// `{talker}`, `{type}` (nmea), `{unit}` (modbus-rtu).
    pub topic: String,
    /// 0 or 1.
    #[serde(default = "default_qos")]
    pub qos: u8,
    #[serde(default)]
    pub retain: bool,
    /// Add `"ts"` (Unix ms, gateway clock) to JSON payloads (a `ts` user property for raw).
    #[serde(default)]
    pub timestamp: bool,
    /// Line delimiter (lines formats); a trailing `\r` is always stripped.
    #[serde(default = "default_delimiter")]
    pub delimiter: String,
    /// Longest frame in bytes (without the delimiter); longer ones are dropped (counted).
    #[serde(default = "default_max_frame")]
    pub max_frame_bytes: usize,
    /// CSV column names, in order (csv format).
    #[serde(default)]
    pub columns: Vec<String>,
    /// CSV separator, one character.
    #[serde(default = "default_separator")]
    pub csv_separator: String,
    /// Unacknowledged QoS 1 readings before the port stops being read (backpressure).
    #[serde(default = "default_inflight")]
    pub inflight: u16,
    /// Delay before a reading refused by the broker (e.g. 0x97 quota) is offered again.
    #[serde(default = "default_retry")]
    pub retry_delay_ms: u64,
    /// Reopen backoff bounds (exponential with jitter) for a missing or unplugged port.
    #[serde(default = "default_reopen_min")]
    pub reopen_min_ms: u64,
    #[serde(default = "default_reopen_max")]
    pub reopen_max_ms: u64,
    /// modbus-rtu: time between polls of all devices.
    #[serde(default = "default_poll")]
    pub poll_interval_ms: u64,
    /// modbus-rtu: time to wait for one response.
    #[serde(default = "default_response_timeout")]
    pub response_timeout_ms: u64,
    /// modbus-rtu: the slaves polled.
    #[serde(default)]
    pub device: Vec<ModbusDevice>,
    /// modbus-rtu: the values read from each device.
    #[serde(default)]
    pub register: Vec<Register>,
}

fn default_baud() -> u32 {
    9600
}
fn default_data_bits() -> u8 {
    8
}
fn default_parity() -> Parity {
    Parity::None
}
fn default_stop_bits() -> u8 {
    1
}
fn default_flow() -> FlowControl {
    FlowControl::None
}
fn default_qos() -> u8 {
    1
}
fn default_delimiter() -> String {
    "\n".into()
}
fn default_max_frame() -> usize {
    1024
}
fn default_separator() -> String {
    ",".into()
}
fn default_inflight() -> u16 {
    64
}
fn default_retry() -> u64 {
    1000
}
fn default_reopen_min() -> u64 {
    500
}
fn default_reopen_max() -> u64 {
    30_000
}
fn default_poll() -> u64 {
    1000
}
fn default_response_timeout() -> u64 {
    500
}

/// Placeholders every format offers.
const COMMON_VARS: &[&str] = &["name", "device"];

impl SerialConfig {
    /// A lines-format port with defaults (tests and the `json` example).
    pub fn lines(name: &str, path: &str, format: Format, topic: &str) -> Self {
        SerialConfig {
            name: name.into(),
            path: path.into(),
            baud: default_baud(),
            data_bits: default_data_bits(),
            parity: default_parity(),
            stop_bits: default_stop_bits(),
            flow_control: default_flow(),
            format,
            topic: topic.into(),
            qos: default_qos(),
            retain: false,
            timestamp: false,
            delimiter: default_delimiter(),
            max_frame_bytes: default_max_frame(),
            columns: Vec::new(),
            csv_separator: default_separator(),
            inflight: default_inflight(),
            retry_delay_ms: default_retry(),
            reopen_min_ms: default_reopen_min(),
            reopen_max_ms: default_reopen_max(),
            poll_interval_ms: default_poll(),
            response_timeout_ms: default_response_timeout(),
            device: Vec::new(),
            register: Vec::new(),
        }
    }

    /// A filled-in example with every key (documentation and tests).
    pub fn example() -> Self {
        SerialConfig {
            baud: 19200,
            parity: Parity::Even,
            columns: vec!["id".into(), "temp".into()],
            device: vec![ModbusDevice {
                name: "meter1".into(),
                unit_id: 1,
            }],
            register: vec![Register {
                device: Some("meter1".into()),
                name: "voltage".into(),
                kind: RegisterKind::Input,
                address: 0,
                ty: RegisterType::F32,
                word_order: WordOrder::Big,
                scale: 1.0,
                offset: 0.0,
            }],
            ..SerialConfig::lines(
                "rs485",
                "/dev/serial/by-id/usb-FTDI_FT232R-if00-port0",
                Format::ModbusRtu,
                "meters/{device}",
            )
        }
    }

    /// Placeholders the topic template may use with this format.
    fn allows(&self, var: &str) -> bool {
        if COMMON_VARS.contains(&var) {
            return true;
        }
        match self.format {
            Format::Raw => false,
            Format::Json => var.starts_with("field.") && var.len() > 6,
            Format::Csv => var
                .strip_prefix("field.")
                .is_some_and(|c| self.columns.iter().any(|x| x == c)),
            Format::Nmea => matches!(var, "sentence" | "talker" | "type"),
            Format::ModbusRtu => var == "unit",
        }
    }

    pub fn validate(&self, i: usize) -> Result<(), ConfigError> {
        let key = |k: &str| format!("serial[{i}].{k}");
        let bad = |k: &str, m: String| Err(ConfigError::invalid(key(k), m));
        if self.name.is_empty() || self.name.contains(['/', '+', '#']) {
            return bad("name", "must be non-empty without '/', '+' or '#'".into());
        }
        if self.path.is_empty() {
            return bad("path", "must name a device".into());
        }
        if self.baud == 0 {
            return bad("baud", "must be at least 1".into());
        }
        if !(5..=8).contains(&self.data_bits) {
            return bad(
                "data_bits",
                format!("must be 5, 6, 7 or 8 (got {})", self.data_bits),
            );
        }
        if !(1..=2).contains(&self.stop_bits) {
            return bad(
                "stop_bits",
                format!("must be 1 or 2 (got {})", self.stop_bits),
            );
        }
        if self.qos > 1 {
            return bad("qos", format!("must be 0 or 1 (got {})", self.qos));
        }
        let template =
            Template::parse(&self.topic).map_err(|m| ConfigError::invalid(key("topic"), m))?;
        for v in template.vars() {
            if !self.allows(v) {
                return bad(
                    "topic",
                    format!(
                        "placeholder `{{{v}}}` is not available with format {:?}",
                        self.format
                    ),
                );
            }
        }
        if self.delimiter.is_empty() {
            return bad("delimiter", "must not be empty".into());
        }
        if self.max_frame_bytes == 0 || self.max_frame_bytes > 1 << 20 {
            return bad("max_frame_bytes", "must be 1..=1048576".into());
        }
        if self.inflight == 0 || self.inflight > 1024 {
            return bad("inflight", "must be 1..=1024".into());
        }
        if self.reopen_min_ms == 0 || self.reopen_max_ms < self.reopen_min_ms {
            return bad(
                "reopen_max_ms",
                "needs 0 < reopen_min_ms <= reopen_max_ms".into(),
            );
        }
        if self.format == Format::Csv {
            if self.columns.is_empty() {
                return bad("columns", "format csv needs the column names".into());
            }
            if self.csv_separator.chars().count() != 1 {
                return bad("csv_separator", "must be one character".into());
            }
        }
        if self.format == Format::ModbusRtu {
            if self.poll_interval_ms == 0 {
                return bad("poll_interval_ms", "must be at least 1".into());
            }
            if self.response_timeout_ms == 0 {
                return bad("response_timeout_ms", "must be at least 1".into());
            }
            if self.device.is_empty() {
                return bad(
                    "device",
                    "modbus-rtu needs at least one [[serial.device]]".into(),
                );
            }
            for (j, d) in self.device.iter().enumerate() {
                let dk = |k: &str| format!("serial[{i}].device[{j}].{k}");
                if d.name.is_empty() || d.name.contains(['/', '+', '#']) {
                    return Err(ConfigError::invalid(
                        dk("name"),
                        "must be non-empty without '/', '+' or '#'",
                    ));
                }
                if self.device[..j].iter().any(|o| o.name == d.name) {
                    return Err(ConfigError::invalid(dk("name"), "used by another device"));
                }
                if !(1..=247).contains(&d.unit_id) {
                    return Err(ConfigError::invalid(dk("unit_id"), "must be 1..=247"));
                }
            }
            if self.register.is_empty() {
                return bad(
                    "register",
                    "modbus-rtu needs at least one [[serial.register]]".into(),
                );
            }
            for (j, r) in self.register.iter().enumerate() {
                let rk = |k: &str| format!("serial[{i}].register[{j}].{k}");
                match &r.device {
                    None if self.device.len() > 1 => {
                        return Err(ConfigError::invalid(
                            rk("device"),
                            "required when there are several devices",
                        ))
                    }
                    Some(d) if !self.device.iter().any(|x| &x.name == d) => {
                        return Err(ConfigError::invalid(
                            rk("device"),
                            format!("no [[serial.device]] is named `{d}`"),
                        ))
                    }
                    _ => {}
                }
                if r.name.is_empty() || matches!(r.name.as_str(), "device" | "unit" | "ts") {
                    return Err(ConfigError::invalid(
                        rk("name"),
                        "must be non-empty and not `device`, `unit` or `ts`",
                    ));
                }
                if self.register[..j]
                    .iter()
                    .any(|o| o.name == r.name && o.device == r.device)
                {
                    return Err(ConfigError::invalid(
                        rk("name"),
                        "used twice for one device",
                    ));
                }
                let bits = matches!(r.kind, RegisterKind::Coil | RegisterKind::Discrete);
                if bits != (r.ty == RegisterType::Bool) {
                    return Err(ConfigError::invalid(
                        rk("type"),
                        "coils and discrete inputs are `bool`; registers are not",
                    ));
                }
                if !r.scale.is_finite() || !r.offset.is_finite() {
                    return Err(ConfigError::invalid(rk("scale"), "must be finite"));
                }
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::Config;

    fn load(toml_text: &str) -> Result<Config, ConfigError> {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("h.toml");
        std::fs::write(&p, toml_text).unwrap();
        Config::load_from(Some(&p), Default::default())
    }

    #[test]
    fn a_modbus_port_loads_from_toml() {
        let cfg = load(
            r#"
[[serial]]
name = "rs485"
path = "/dev/ttyUSB0"
baud = 19200
parity = "even"
format = "modbus-rtu"
topic = "meters/{device}"
[[serial.device]]
name = "m1"
unit_id = 3
[[serial.register]]
name = "v"
kind = "input"
address = 2
type = "f32"
word_order = "little"
"#,
        )
        .expect("loads");
        let s = &cfg.serial[0];
        assert_eq!(s.format, Format::ModbusRtu);
        assert_eq!(s.register[0].ty, RegisterType::F32);
        assert_eq!(s.register[0].word_order, WordOrder::Little);
        assert_eq!(s.device[0].unit_id, 3);
    }

    #[test]
    fn errors_name_the_key() {
        let base = "[[serial]]\nname = \"a\"\npath = \"/dev/x\"\n";
        for (extra, key) in [
            ("format = \"raw\"\ntopic = \"t\"\nbaud = 0\n", "serial[0].baud"),
            ("format = \"raw\"\ntopic = \"t\"\ndata_bits = 9\n", "serial[0].data_bits"),
            ("format = \"raw\"\ntopic = \"t/#\"\n", "serial[0].topic"),
            ("format = \"raw\"\ntopic = \"t/{field.x}\"\n", "serial[0].topic"),
            ("format = \"csv\"\ntopic = \"t\"\n", "serial[0].columns"),
            ("format = \"nmea\"\ntopic = \"t\"\nqos = 2\n", "serial[0].qos"),
            ("format = \"modbus-rtu\"\ntopic = \"t\"\n", "serial[0].device"),
            (
                "format = \"modbus-rtu\"\ntopic = \"t\"\n[[serial.device]]\nname = \"d\"\nunit_id = 0\n",
                "serial[0].device[0].unit_id",
            ),
            (
                "format = \"modbus-rtu\"\ntopic = \"t\"\n[[serial.device]]\nname = \"d\"\nunit_id = 1\n[[serial.register]]\nname = \"c\"\nkind = \"coil\"\naddress = 1\n",
                "serial[0].register[0].type",
            ),
        ] {
            let e = load(&format!("{base}{extra}")).expect_err(extra);
            assert_eq!(e.key(), Some(key), "{extra}: {e}");
        }
        let e = load(&format!(
            "{base}format = \"raw\"\ntopic = \"t\"\nbogus = 1\n"
        ))
        .unwrap_err();
        assert!(e.to_string().contains("bogus"), "{e}");
    }
}
