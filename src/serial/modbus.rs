//! Modbus RTU polling: one JSON object per device per poll, from its register map.

use std::time::Duration;

use serde_json::{Map, Value};
use tokio_modbus::client::{Context, Reader};
use tokio_modbus::slave::{Slave, SlaveContext};

use super::config::{ModbusDevice, Register, RegisterKind, RegisterType, WordOrder};

/// Why a device poll failed.
#[derive(Debug)]
pub enum PollError {
    Timeout,
    /// The device answered with an exception code.
    Exception(String),
    /// The port failed (unplugged): reopen it.
    Transport(String),
    /// The answer did not fit the request (garbled line, another master).
    Protocol(String),
}

/// Decodes one register value from its words (`words.len() == ty.words()`).
pub fn decode(r: &Register, words: &[u16]) -> Option<Value> {
    let (hi, lo) = match (r.ty.words(), r.word_order) {
        (1, _) => (0, *words.first()?),
        (_, WordOrder::Big) => (*words.first()?, *words.get(1)?),
        (_, WordOrder::Little) => (*words.get(1)?, *words.first()?),
    };
    let u32v = (u32::from(hi) << 16) | u32::from(lo);
    let raw: f64 = match r.ty {
        RegisterType::Bool => return Some(Value::Bool(lo != 0)),
        RegisterType::U16 => f64::from(lo),
        RegisterType::I16 => f64::from(lo as i16),
        RegisterType::U32 => f64::from(u32v),
        RegisterType::I32 => f64::from(u32v as i32),
        RegisterType::F32 => f64::from(f32::from_bits(u32v)),
    };
    let v = raw * r.scale + r.offset;
    let integral = r.ty != RegisterType::F32 && r.scale == 1.0 && r.offset == 0.0;
    if integral {
        return Some(Value::from(v as i64));
    }
    // NaN/inf (an f32 register can hold them) → null.
    Some(serde_json::Number::from_f64(v).map_or(Value::Null, Value::Number))
}

/// Reads every register of `dev` and builds its JSON object (without `ts`).
pub async fn poll_device(
    ctx: &mut Context,
    dev: &ModbusDevice,
    registers: &[&Register],
    timeout: Duration,
) -> Result<Map<String, Value>, PollError> {
    ctx.set_slave(Slave(dev.unit_id));
    let mut m = Map::new();
    m.insert("device".into(), dev.name.clone().into());
    m.insert("unit".into(), dev.unit_id.into());
    for r in registers {
        let n = r.ty.words();
        let call = async {
            match r.kind {
                RegisterKind::Holding => ctx.read_holding_registers(r.address, n).await,
                RegisterKind::Input => ctx.read_input_registers(r.address, n).await,
                RegisterKind::Coil => ctx
                    .read_coils(r.address, 1)
                    .await
                    .map(|x| x.map(|c| c.into_iter().map(u16::from).collect())),
                RegisterKind::Discrete => ctx
                    .read_discrete_inputs(r.address, 1)
                    .await
                    .map(|x| x.map(|c| c.into_iter().map(u16::from).collect())),
            }
        };
        let words = match tokio::time::timeout(timeout, call).await {
            Err(_) => return Err(PollError::Timeout),
            Ok(Err(tokio_modbus::Error::Transport(e))) => {
                return Err(PollError::Transport(e.to_string()))
            }
            Ok(Err(e)) => return Err(PollError::Protocol(e.to_string())),
            Ok(Ok(Err(code))) => {
                return Err(PollError::Exception(format!("{code:?} on {}", r.name)))
            }
            Ok(Ok(Ok(words))) => words,
        };
        let v = decode(r, &words)
            .ok_or_else(|| PollError::Protocol(format!("short answer for {}", r.name)))?;
        m.insert(r.name.clone(), v);
    }
    Ok(m)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn reg(ty: RegisterType, order: WordOrder, scale: f64, offset: f64) -> Register {
        Register {
            device: None,
            name: "x".into(),
            kind: RegisterKind::Holding,
            address: 0,
            ty,
            word_order: order,
            scale,
            offset,
        }
    }

    #[test]
    fn decodes_types_word_orders_and_scaling() {
        use RegisterType::*;
        use WordOrder::*;
        assert_eq!(
            decode(&reg(U16, Big, 1.0, 0.0), &[65535]),
            Some(65535.into())
        );
        assert_eq!(
            decode(&reg(I16, Big, 1.0, 0.0), &[65535]),
            Some((-1).into())
        );
        assert_eq!(
            decode(&reg(U32, Big, 1.0, 0.0), &[1, 2]),
            Some(65538.into())
        );
        assert_eq!(
            decode(&reg(U32, Little, 1.0, 0.0), &[2, 1]),
            Some(65538.into())
        );
        assert_eq!(
            decode(&reg(I32, Big, 1.0, 0.0), &[0xFFFF, 0xFFFE]),
            Some((-2).into())
        );
        let bits = 230.5f32.to_bits();
        let (h, l) = ((bits >> 16) as u16, bits as u16);
        assert_eq!(
            decode(&reg(F32, Big, 1.0, 0.0), &[h, l]),
            Some(230.5.into())
        );
        assert_eq!(
            decode(&reg(F32, Little, 1.0, 0.0), &[l, h]),
            Some(230.5.into())
        );
        assert_eq!(
            decode(&reg(I16, Big, 0.1, -10.0), &[250]),
            Some(15.0.into())
        );
        assert_eq!(decode(&reg(Bool, Big, 1.0, 0.0), &[1]), Some(true.into()));
        assert_eq!(decode(&reg(U32, Big, 1.0, 0.0), &[1]), None);
    }
}
