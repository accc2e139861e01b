//! MQTT 5 properties (spec 2.2.2): identifiers, per-packet decoding with duplicate and range
//! checks, and encoding.

use bytes::Bytes;

use super::decode::Reader;
use super::encode::{put_bin, put_str, put_varint, Sink};
use super::DecodeError::{self, Malformed, Protocol};
use crate::protocol::types::*;

type Result<T> = std::result::Result<T, DecodeError>;

pub(super) const PAYLOAD_FORMAT_INDICATOR: u8 = 0x01;
pub(super) const MESSAGE_EXPIRY_INTERVAL: u8 = 0x02;
pub(super) const CONTENT_TYPE: u8 = 0x03;
pub(super) const RESPONSE_TOPIC: u8 = 0x08;
pub(super) const CORRELATION_DATA: u8 = 0x09;
pub(super) const SUBSCRIPTION_IDENTIFIER: u8 = 0x0B;
pub(super) const SESSION_EXPIRY_INTERVAL: u8 = 0x11;
pub(super) const ASSIGNED_CLIENT_IDENTIFIER: u8 = 0x12;
pub(super) const SERVER_KEEP_ALIVE: u8 = 0x13;
pub(super) const AUTHENTICATION_METHOD: u8 = 0x15;
pub(super) const AUTHENTICATION_DATA: u8 = 0x16;
pub(super) const REQUEST_PROBLEM_INFORMATION: u8 = 0x17;
pub(super) const WILL_DELAY_INTERVAL: u8 = 0x18;
pub(super) const REQUEST_RESPONSE_INFORMATION: u8 = 0x19;
pub(super) const RESPONSE_INFORMATION: u8 = 0x1A;
pub(super) const SERVER_REFERENCE: u8 = 0x1C;
pub(super) const REASON_STRING: u8 = 0x1F;
pub(super) const RECEIVE_MAXIMUM: u8 = 0x21;
pub(super) const TOPIC_ALIAS_MAXIMUM: u8 = 0x22;
pub(super) const TOPIC_ALIAS: u8 = 0x23;
pub(super) const MAXIMUM_QOS: u8 = 0x24;
pub(super) const RETAIN_AVAILABLE: u8 = 0x25;
pub(super) const USER_PROPERTY: u8 = 0x26;
pub(super) const MAXIMUM_PACKET_SIZE: u8 = 0x27;
pub(super) const WILDCARD_SUBSCRIPTION_AVAILABLE: u8 = 0x28;
pub(super) const SUBSCRIPTION_IDENTIFIER_AVAILABLE: u8 = 0x29;
pub(super) const SHARED_SUBSCRIPTION_AVAILABLE: u8 = 0x2A;

// ---------------------------------------------------------------------------------------
// Decoding
// ---------------------------------------------------------------------------------------

/// An identifier that is unknown, or known but not valid for this packet type: both are a
/// Malformed Packet (spec 2.2.2.2).
fn unexpected(id: u8) -> DecodeError {
    match id {
        0x01..=0x03
        | 0x08
        | 0x09
        | 0x0B
        | 0x11..=0x13
        | 0x15..=0x19
        | 0x1A
        | 0x1C
        | 0x1F
        | 0x21..=0x2A => Malformed("property not valid for this packet type"),
        _ => Malformed("unknown property identifier"),
    }
}

/// Stores a property that may appear at most once.
fn once<T>(slot: &mut Option<T>, value: T) -> Result<()> {
    if slot.is_some() {
        return Err(Protocol("duplicate property"));
    }
    *slot = Some(value);
    Ok(())
}

fn flag(v: u8, what: &'static str) -> Result<u8> {
    if v > 1 {
        return Err(Protocol(what));
    }
    Ok(v)
}

fn nonzero_u16(v: u16, what: &'static str) -> Result<u16> {
    if v == 0 {
        return Err(Protocol(what));
    }
    Ok(v)
}

fn nonzero_u32(v: u32, what: &'static str) -> Result<u32> {
    if v == 0 {
        return Err(Protocol(what));
    }
    Ok(v)
}

/// Property identifiers are Variable Byte Integers; every defined one fits in one byte, so a
/// byte with the continuation bit is an unknown identifier.
fn next_id(r: &mut Reader) -> Result<Option<u8>> {
    if r.is_empty() {
        Ok(None)
    } else {
        r.u8().map(Some)
    }
}

fn user_property(r: &mut Reader) -> Result<UserProperty> {
    Ok((r.string()?, r.string()?))
}

fn auth_data_needs_method(method: &Option<String>, data: &Option<Bytes>) -> Result<()> {
    if data.is_some() && method.is_none() {
        return Err(Protocol(
            "authentication data without authentication method",
        ));
    }
    Ok(())
}

pub(super) fn connect_properties(r: &mut Reader) -> Result<ConnectProperties> {
    let mut p = ConnectProperties::default();
    while let Some(id) = next_id(r)? {
        match id {
            SESSION_EXPIRY_INTERVAL => once(&mut p.session_expiry_interval, r.u32()?)?,
            RECEIVE_MAXIMUM => once(
                &mut p.receive_maximum,
                nonzero_u16(r.u16()?, "receive maximum 0")?,
            )?,
            MAXIMUM_PACKET_SIZE => once(
                &mut p.maximum_packet_size,
                nonzero_u32(r.u32()?, "maximum packet size 0")?,
            )?,
            TOPIC_ALIAS_MAXIMUM => once(&mut p.topic_alias_maximum, r.u16()?)?,
            REQUEST_RESPONSE_INFORMATION => once(
                &mut p.request_response_information,
                flag(r.u8()?, "request response information not 0 or 1")?,
            )?,
            REQUEST_PROBLEM_INFORMATION => once(
                &mut p.request_problem_information,
                flag(r.u8()?, "request problem information not 0 or 1")?,
            )?,
            USER_PROPERTY => p.user_properties.push(user_property(r)?),
            AUTHENTICATION_METHOD => once(&mut p.authentication_method, r.string()?)?,
            AUTHENTICATION_DATA => once(&mut p.authentication_data, r.binary()?)?,
            _ => return Err(unexpected(id)),
        }
    }
    auth_data_needs_method(&p.authentication_method, &p.authentication_data)?;
    Ok(p)
}

pub(super) fn will_properties(r: &mut Reader) -> Result<WillProperties> {
    let mut p = WillProperties::default();
    while let Some(id) = next_id(r)? {
        match id {
            WILL_DELAY_INTERVAL => once(&mut p.will_delay_interval, r.u32()?)?,
            PAYLOAD_FORMAT_INDICATOR => once(
                &mut p.payload_format_indicator,
                flag(r.u8()?, "payload format indicator not 0 or 1")?,
            )?,
            MESSAGE_EXPIRY_INTERVAL => once(&mut p.message_expiry_interval, r.u32()?)?,
            CONTENT_TYPE => once(&mut p.content_type, r.string()?)?,
            RESPONSE_TOPIC => once(&mut p.response_topic, r.string()?)?,
            CORRELATION_DATA => once(&mut p.correlation_data, r.binary()?)?,
            USER_PROPERTY => p.user_properties.push(user_property(r)?),
            _ => return Err(unexpected(id)),
        }
    }
    Ok(p)
}

pub(super) fn connack_properties(r: &mut Reader) -> Result<ConnAckProperties> {
    let mut p = ConnAckProperties::default();
    while let Some(id) = next_id(r)? {
        match id {
            SESSION_EXPIRY_INTERVAL => once(&mut p.session_expiry_interval, r.u32()?)?,
            RECEIVE_MAXIMUM => once(
                &mut p.receive_maximum,
                nonzero_u16(r.u16()?, "receive maximum 0")?,
            )?,
            MAXIMUM_QOS => once(&mut p.maximum_qos, flag(r.u8()?, "maximum QoS not 0 or 1")?)?,
            RETAIN_AVAILABLE => once(
                &mut p.retain_available,
                flag(r.u8()?, "retain available not 0 or 1")?,
            )?,
            MAXIMUM_PACKET_SIZE => once(
                &mut p.maximum_packet_size,
                nonzero_u32(r.u32()?, "maximum packet size 0")?,
            )?,
            ASSIGNED_CLIENT_IDENTIFIER => once(&mut p.assigned_client_identifier, r.string()?)?,
            TOPIC_ALIAS_MAXIMUM => once(&mut p.topic_alias_maximum, r.u16()?)?,
            REASON_STRING => once(&mut p.reason_string, r.string()?)?,
            USER_PROPERTY => p.user_properties.push(user_property(r)?),
            WILDCARD_SUBSCRIPTION_AVAILABLE => once(
                &mut p.wildcard_subscription_available,
                flag(r.u8()?, "wildcard subscription available not 0 or 1")?,
            )?,
            SUBSCRIPTION_IDENTIFIER_AVAILABLE => once(
                &mut p.subscription_identifiers_available,
                flag(r.u8()?, "subscription identifiers available not 0 or 1")?,
            )?,
            SHARED_SUBSCRIPTION_AVAILABLE => once(
                &mut p.shared_subscription_available,
                flag(r.u8()?, "shared subscription available not 0 or 1")?,
            )?,
            SERVER_KEEP_ALIVE => once(&mut p.server_keep_alive, r.u16()?)?,
            RESPONSE_INFORMATION => once(&mut p.response_information, r.string()?)?,
            SERVER_REFERENCE => once(&mut p.server_reference, r.string()?)?,
            AUTHENTICATION_METHOD => once(&mut p.authentication_method, r.string()?)?,
            AUTHENTICATION_DATA => once(&mut p.authentication_data, r.binary()?)?,
            _ => return Err(unexpected(id)),
        }
    }
    auth_data_needs_method(&p.authentication_method, &p.authentication_data)?;
    Ok(p)
}

pub(super) fn publish_properties(r: &mut Reader) -> Result<PublishProperties> {
    let mut p = PublishProperties::default();
    while let Some(id) = next_id(r)? {
        match id {
            PAYLOAD_FORMAT_INDICATOR => once(
                &mut p.payload_format_indicator,
                flag(r.u8()?, "payload format indicator not 0 or 1")?,
            )?,
            MESSAGE_EXPIRY_INTERVAL => once(&mut p.message_expiry_interval, r.u32()?)?,
            TOPIC_ALIAS => once(&mut p.topic_alias, nonzero_u16(r.u16()?, "topic alias 0")?)?,
            RESPONSE_TOPIC => once(&mut p.response_topic, r.string()?)?,
            CORRELATION_DATA => once(&mut p.correlation_data, r.binary()?)?,
            USER_PROPERTY => p.user_properties.push(user_property(r)?),
            SUBSCRIPTION_IDENTIFIER => p
                .subscription_identifiers
                .push(nonzero_u32(r.varint()?, "subscription identifier 0")?),
            CONTENT_TYPE => once(&mut p.content_type, r.string()?)?,
            _ => return Err(unexpected(id)),
        }
    }
    Ok(p)
}

/// Properties of PUBACK, PUBREC, PUBREL, PUBCOMP, SUBACK and UNSUBACK.
pub(super) fn ack_properties(r: &mut Reader) -> Result<AckProperties> {
    let mut p = AckProperties::default();
    while let Some(id) = next_id(r)? {
        match id {
            REASON_STRING => once(&mut p.reason_string, r.string()?)?,
            USER_PROPERTY => p.user_properties.push(user_property(r)?),
            _ => return Err(unexpected(id)),
        }
    }
    Ok(p)
}

pub(super) fn subscribe_properties(r: &mut Reader) -> Result<(Option<u32>, Vec<UserProperty>)> {
    let mut subscription_identifier = None;
    let mut user_properties = Vec::new();
    while let Some(id) = next_id(r)? {
        match id {
            SUBSCRIPTION_IDENTIFIER => once(
                &mut subscription_identifier,
                nonzero_u32(r.varint()?, "subscription identifier 0")?,
            )?,
            USER_PROPERTY => user_properties.push(user_property(r)?),
            _ => return Err(unexpected(id)),
        }
    }
    Ok((subscription_identifier, user_properties))
}

pub(super) fn unsubscribe_properties(r: &mut Reader) -> Result<Vec<UserProperty>> {
    let mut user_properties = Vec::new();
    while let Some(id) = next_id(r)? {
        match id {
            USER_PROPERTY => user_properties.push(user_property(r)?),
            _ => return Err(unexpected(id)),
        }
    }
    Ok(user_properties)
}

pub(super) fn disconnect_properties(r: &mut Reader) -> Result<DisconnectProperties> {
    let mut p = DisconnectProperties::default();
    while let Some(id) = next_id(r)? {
        match id {
            SESSION_EXPIRY_INTERVAL => once(&mut p.session_expiry_interval, r.u32()?)?,
            REASON_STRING => once(&mut p.reason_string, r.string()?)?,
            USER_PROPERTY => p.user_properties.push(user_property(r)?),
            SERVER_REFERENCE => once(&mut p.server_reference, r.string()?)?,
            _ => return Err(unexpected(id)),
        }
    }
    Ok(p)
}

pub(super) fn auth_properties(r: &mut Reader) -> Result<AuthProperties> {
    let mut p = AuthProperties::default();
    while let Some(id) = next_id(r)? {
        match id {
            AUTHENTICATION_METHOD => once(&mut p.authentication_method, r.string()?)?,
            AUTHENTICATION_DATA => once(&mut p.authentication_data, r.binary()?)?,
            REASON_STRING => once(&mut p.reason_string, r.string()?)?,
            USER_PROPERTY => p.user_properties.push(user_property(r)?),
            _ => return Err(unexpected(id)),
        }
    }
    auth_data_needs_method(&p.authentication_method, &p.authentication_data)?;
    Ok(p)
}

// ---------------------------------------------------------------------------------------
// Encoding
// ---------------------------------------------------------------------------------------

/// A property set that can write itself (without its Property Length prefix).
pub(super) trait Props {
    fn write<S: Sink>(&self, s: &mut S);
}

fn p_u8<S: Sink>(s: &mut S, id: u8, v: Option<u8>) {
    if let Some(v) = v {
        s.put_u8(id);
        s.put_u8(v);
    }
}

fn p_u16<S: Sink>(s: &mut S, id: u8, v: Option<u16>) {
    if let Some(v) = v {
        s.put_u8(id);
        s.put_u16(v);
    }
}

fn p_u32<S: Sink>(s: &mut S, id: u8, v: Option<u32>) {
    if let Some(v) = v {
        s.put_u8(id);
        s.put_u32(v);
    }
}

fn p_str<S: Sink>(s: &mut S, id: u8, v: &Option<String>) {
    if let Some(v) = v {
        s.put_u8(id);
        put_str(s, v);
    }
}

fn p_bin<S: Sink>(s: &mut S, id: u8, v: &Option<Bytes>) {
    if let Some(v) = v {
        s.put_u8(id);
        put_bin(s, v);
    }
}

fn p_user<S: Sink>(s: &mut S, v: &[UserProperty]) {
    for (name, value) in v {
        s.put_u8(USER_PROPERTY);
        put_str(s, name);
        put_str(s, value);
    }
}

fn p_sub_id<S: Sink>(s: &mut S, v: u32) {
    s.put_u8(SUBSCRIPTION_IDENTIFIER);
    put_varint(s, v as usize);
}

impl Props for ConnectProperties {
    fn write<S: Sink>(&self, s: &mut S) {
        p_u32(s, SESSION_EXPIRY_INTERVAL, self.session_expiry_interval);
        p_u16(s, RECEIVE_MAXIMUM, self.receive_maximum);
        p_u32(s, MAXIMUM_PACKET_SIZE, self.maximum_packet_size);
        p_u16(s, TOPIC_ALIAS_MAXIMUM, self.topic_alias_maximum);
        p_u8(
            s,
            REQUEST_RESPONSE_INFORMATION,
            self.request_response_information,
        );
        p_u8(
            s,
            REQUEST_PROBLEM_INFORMATION,
            self.request_problem_information,
        );
        p_str(s, AUTHENTICATION_METHOD, &self.authentication_method);
        p_bin(s, AUTHENTICATION_DATA, &self.authentication_data);
        p_user(s, &self.user_properties);
    }
}

impl Props for WillProperties {
    fn write<S: Sink>(&self, s: &mut S) {
        p_u32(s, WILL_DELAY_INTERVAL, self.will_delay_interval);
        p_u8(s, PAYLOAD_FORMAT_INDICATOR, self.payload_format_indicator);
        p_u32(s, MESSAGE_EXPIRY_INTERVAL, self.message_expiry_interval);
        p_str(s, CONTENT_TYPE, &self.content_type);
        p_str(s, RESPONSE_TOPIC, &self.response_topic);
        p_bin(s, CORRELATION_DATA, &self.correlation_data);
        p_user(s, &self.user_properties);
    }
}

impl Props for ConnAckProperties {
    fn write<S: Sink>(&self, s: &mut S) {
        p_u32(s, SESSION_EXPIRY_INTERVAL, self.session_expiry_interval);
        p_u16(s, RECEIVE_MAXIMUM, self.receive_maximum);
        p_u8(s, MAXIMUM_QOS, self.maximum_qos);
        p_u8(s, RETAIN_AVAILABLE, self.retain_available);
        p_u32(s, MAXIMUM_PACKET_SIZE, self.maximum_packet_size);
        p_str(
            s,
            ASSIGNED_CLIENT_IDENTIFIER,
            &self.assigned_client_identifier,
        );
        p_u16(s, TOPIC_ALIAS_MAXIMUM, self.topic_alias_maximum);
        p_str(s, REASON_STRING, &self.reason_string);
        p_u8(
            s,
            WILDCARD_SUBSCRIPTION_AVAILABLE,
            self.wildcard_subscription_available,
        );
        p_u8(
            s,
            SUBSCRIPTION_IDENTIFIER_AVAILABLE,
            self.subscription_identifiers_available,
        );
        p_u8(
            s,
            SHARED_SUBSCRIPTION_AVAILABLE,
            self.shared_subscription_available,
        );
        p_u16(s, SERVER_KEEP_ALIVE, self.server_keep_alive);
        p_str(s, RESPONSE_INFORMATION, &self.response_information);
        p_str(s, SERVER_REFERENCE, &self.server_reference);
        p_str(s, AUTHENTICATION_METHOD, &self.authentication_method);
        p_bin(s, AUTHENTICATION_DATA, &self.authentication_data);
        p_user(s, &self.user_properties);
    }
}

impl Props for PublishProperties {
    fn write<S: Sink>(&self, s: &mut S) {
        p_u8(s, PAYLOAD_FORMAT_INDICATOR, self.payload_format_indicator);
        p_u32(s, MESSAGE_EXPIRY_INTERVAL, self.message_expiry_interval);
        p_u16(s, TOPIC_ALIAS, self.topic_alias);
        p_str(s, RESPONSE_TOPIC, &self.response_topic);
        p_bin(s, CORRELATION_DATA, &self.correlation_data);
        p_str(s, CONTENT_TYPE, &self.content_type);
        for &id in &self.subscription_identifiers {
            p_sub_id(s, id);
        }
        p_user(s, &self.user_properties);
    }
}

impl Props for AckProperties {
    fn write<S: Sink>(&self, s: &mut S) {
        p_str(s, REASON_STRING, &self.reason_string);
        p_user(s, &self.user_properties);
    }
}

impl Props for DisconnectProperties {
    fn write<S: Sink>(&self, s: &mut S) {
        p_u32(s, SESSION_EXPIRY_INTERVAL, self.session_expiry_interval);
        p_str(s, REASON_STRING, &self.reason_string);
        p_str(s, SERVER_REFERENCE, &self.server_reference);
        p_user(s, &self.user_properties);
    }
}

impl Props for AuthProperties {
    fn write<S: Sink>(&self, s: &mut S) {
        p_str(s, AUTHENTICATION_METHOD, &self.authentication_method);
        p_bin(s, AUTHENTICATION_DATA, &self.authentication_data);
        p_str(s, REASON_STRING, &self.reason_string);
        p_user(s, &self.user_properties);
    }
}

/// SUBSCRIBE properties: Subscription Identifier and User Properties.
pub(super) struct SubscribeProps<'a>(pub(super) &'a Subscribe);

impl Props for SubscribeProps<'_> {
    fn write<S: Sink>(&self, s: &mut S) {
        if let Some(id) = self.0.subscription_identifier {
            p_sub_id(s, id);
        }
        p_user(s, &self.0.user_properties);
    }
}

/// UNSUBSCRIBE properties: User Properties only.
pub(super) struct UserProps<'a>(pub(super) &'a [UserProperty]);

impl Props for UserProps<'_> {
    fn write<S: Sink>(&self, s: &mut S) {
        p_user(s, self.0);
    }
}
