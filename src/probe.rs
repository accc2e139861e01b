//! `holdfast pub` / `holdfast sub`: a small MQTT client for operators, so a gateway can be
//! checked from its own shell (a minimal image has no `mosquitto_pub`/`mosquitto_sub`).
//! Built on rumqttc, an independent MQTT implementation: what it sees is what any
//! standard client sees, not Holdfast's own codec talking to itself.

use std::time::Duration;

use rumqttc::{AsyncClient, Event, MqttOptions, Packet, QoS};

/// Where and as whom to connect.
#[derive(Debug, Clone)]
pub struct Target {
    pub host: String,
    pub port: u16,
    pub client_id: String,
    pub username: Option<String>,
    pub password: Option<String>,
}

impl Target {
    fn options(&self) -> MqttOptions {
        let mut o = MqttOptions::new(self.client_id.clone(), self.host.clone(), self.port);
        o.set_keep_alive(Duration::from_secs(30));
        if let Some(u) = &self.username {
            o.set_credentials(u.clone(), self.password.clone().unwrap_or_default());
        }
        o
    }
}

fn qos(level: u8) -> anyhow::Result<QoS> {
    Ok(match level {
        0 => QoS::AtMostOnce,
        1 => QoS::AtLeastOnce,
        2 => QoS::ExactlyOnce,
        other => anyhow::bail!("QoS must be 0, 1 or 2 (got {other})"),
    })
}

/// Publishes one message and waits until the broker has it (PUBACK / PUBCOMP; for QoS 0,
/// until it is written), or `wait` passes.
pub async fn publish(
    t: &Target,
    topic: &str,
    payload: Vec<u8>,
    level: u8,
    retain: bool,
    wait: Duration,
) -> anyhow::Result<()> {
    let q = qos(level)?;
    let (client, mut events) = AsyncClient::new(t.options(), 10);
    client.publish(topic, q, retain, payload).await?;
    let done = async {
        loop {
            match events.poll().await {
                Ok(Event::Incoming(Packet::ConnAck(a)))
                    if a.code != rumqttc::ConnectReturnCode::Success =>
                {
                    anyhow::bail!("connection refused: {:?}", a.code)
                }
                Ok(Event::Incoming(Packet::PubAck(_) | Packet::PubComp(_))) => return Ok(()),
                Ok(Event::Outgoing(rumqttc::Outgoing::Publish(_))) if q == QoS::AtMostOnce => {
                    return Ok(())
                }
                Ok(_) => {}
                Err(e) => anyhow::bail!("{e}"),
            }
        }
    };
    tokio::time::timeout(wait, done)
        .await
        .map_err(|_| anyhow::anyhow!("no acknowledgement within {wait:?}"))??;
    let _ = client.disconnect().await;
    let _ = tokio::time::timeout(Duration::from_millis(500), events.poll()).await;
    Ok(())
}

/// Subscribes to `filter` and calls `each(topic, payload)` for every message until `count`
/// messages arrived (0 = no limit) or nothing arrived for `idle` (None = wait for ever).
pub async fn subscribe(
    t: &Target,
    filter: &str,
    level: u8,
    count: usize,
    idle: Option<Duration>,
    mut each: impl FnMut(&str, &[u8]),
) -> anyhow::Result<usize> {
    let q = qos(level)?;
    let (client, mut events) = AsyncClient::new(t.options(), 10);
    client.subscribe(filter, q).await?;
    let mut got = 0;
    loop {
        let next = match idle {
            Some(d) => match tokio::time::timeout(d, events.poll()).await {
                Ok(ev) => ev,
                Err(_) => break,
            },
            None => events.poll().await,
        };
        match next {
            Ok(Event::Incoming(Packet::ConnAck(a)))
                if a.code != rumqttc::ConnectReturnCode::Success =>
            {
                anyhow::bail!("connection refused: {:?}", a.code)
            }
            Ok(Event::Incoming(Packet::SubAck(a)))
                if a.return_codes
                    .iter()
                    .any(|c| matches!(c, rumqttc::SubscribeReasonCode::Failure)) =>
            {
                anyhow::bail!("subscription to {filter:?} refused")
            }
            Ok(Event::Incoming(Packet::Publish(p))) => {
                each(&p.topic, &p.payload);
                got += 1;
                if count > 0 && got >= count {
                    break;
                }
            }
            Ok(_) => {}
            Err(e) => anyhow::bail!("{e}"),
        }
    }
    let _ = client.disconnect().await;
    let _ = tokio::time::timeout(Duration::from_millis(500), events.poll()).await;
    Ok(got)
}
