//! Authorization inside the router (DESIGN invariant 11): what a session may receive and
//! what its will may publish, after the connection has checked the client's own packets.
//!
//! - **Ownership.** A session belongs to the identity that created it (`Session::owner`,
//!   stored with `Op::SetOwner`). A CONNECT from another identity for its client id is
//!   refused with CONNACK 0x87 Not authorized (3.1.1: return code 5) before anything is
//!   touched: neither a resume (which would hand over its queue) nor a clean start (which
//!   would end it) nor a takeover of its connection. A session stored before owners were
//!   recorded is claimed by the first identity that resumes it.
//! - **Current ACL.** Each client session carries the ACL in force (`Session::acl`), set at
//!   CONNECT and replaced after every SIGHUP ([`Router::reauthorize`]). Each time, its
//!   stored subscriptions are re-checked: those the ACL no longer grants are removed (from
//!   the tree and the store), so neither a resumed session nor an offline one keeps
//!   receiving what its owner may no longer read.
//! - **Filtered deliveries.** A subscription granted although it overlaps a deny rule
//!   (`#` with `deny secret/#`) marks its session `acl_filtered`; only such sessions have
//!   each delivery checked ([`filtered_out`], in `deliver`, which also covers retained
//!   messages sent on SUBSCRIBE). Every other session pays one boolean test.
//! - **Wills** are checked again when they are published ([`permitted_will`]): the ACL may
//!   have changed since CONNECT; a will to `$SYS` never goes out.

use super::*;
use crate::auth::{is_sys_topic, Auth, ClientAcl, Identity, SessionOwner, SubscribeCheck};

impl Router {
    /// True if the CONNECT must be refused because its client id names a session of another
    /// identity; the refusing CONNACK has been sent.
    pub(super) fn refuse_foreign_session(&self, req: &ConnectRequest, id: &Identity) -> bool {
        let Some(s) = self
            .sessions
            .sid_of(&req.client_id)
            .and_then(|sid| self.sessions.get(&sid))
        else {
            return false;
        };
        if s.internal || s.owner.admits(&id.owner) {
            return false;
        }
        warn!(
            client_id = %req.client_id,
            user = ?id.owner.username(),
            owner = ?s.owner.username(),
            "CONNECT refused: the session belongs to another identity"
        );
        let mut ack = req.connack.clone();
        ack.reason_code = reason::NOT_AUTHORIZED;
        ack.session_present = false;
        ack.properties = Default::default();
        req.link
            .send(Outgoing::Packet(Box::new(Packet::ConnAck(ack))));
        true
    }

    /// Gives a session (new or resumed) the connecting client's identity: its owner if it
    /// had none, the ACL in force, and a re-check of its stored subscriptions.
    pub(super) fn adopt_identity(&mut self, sid: SessionId, id: Identity) {
        let Some(s) = self.sessions.get_mut(&sid) else {
            return;
        };
        if s.owner == SessionOwner::Unknown {
            if !s.subscriptions.is_empty() {
                info!(client_id = %s.client_id, user = ?id.owner.username(), "session without a recorded owner claimed");
            }
            s.owner = id.owner;
        }
        s.acl = id.acl;
        self.recheck_subscriptions(sid);
    }

    /// The owner to record for a durable session (after its `UpsertSession`).
    pub(super) fn owner_op(s: &Session) -> Option<Op> {
        let owner = s.owner.to_stored()?;
        Some(Op::SetOwner { sid: s.id, owner })
    }

    /// Removes the session's subscriptions that its ACL no longer grants, and works out
    /// whether its deliveries need checking.
    pub(super) fn recheck_subscriptions(&mut self, sid: SessionId) {
        let Router {
            sessions,
            tree,
            commits: super::commits::Commits { ops, .. },
            ..
        } = self;
        let Some(s) = sessions.get_mut(&sid) else {
            return;
        };
        let Some(acl) = s.acl.clone() else {
            s.acl_filtered = false;
            return;
        };
        let mut filtered = false;
        let mut denied = Vec::new();
        for full in s.subscriptions.keys() {
            match acl.check_subscribe(full) {
                SubscribeCheck::Denied => denied.push(full.to_owned()),
                SubscribeCheck::Filtered => filtered = true,
                SubscribeCheck::Granted => {}
            }
        }
        for full in denied {
            info!(client_id = %s.client_id, filter = %full, "subscription removed: no longer granted by the ACL");
            s.subscriptions.remove(&full);
            let (filter, group) = super::super::session::split_share(&full);
            tree.unsubscribe(&filter, group.as_deref(), sid);
            if s.durable {
                ops.push(Op::Unsubscribe { sid, filter: full });
            }
        }
        s.acl_filtered = filtered;
    }

    /// After the ACL file was (re)loaded: every client session gets its owner's current
    /// rules, and its subscriptions are re-checked against them.
    pub(super) fn reauthorize(&mut self, auth: &Auth) {
        let sids: Vec<SessionId> = self
            .sessions
            .values()
            .filter(|s| !s.internal && s.owner != SessionOwner::Unknown)
            .map(|s| s.id)
            .collect();
        for sid in sids {
            if let Some(s) = self.sessions.get_mut(&sid) {
                s.acl = auth.acl_for(s.owner.username(), &s.client_id);
            }
            self.recheck_subscriptions(sid);
        }
    }

    /// A SUBSCRIBE the connection let through: if one of its filters overlaps a deny rule,
    /// the session's deliveries are checked from now on (before its retained messages go).
    pub(super) fn note_subscribe(&mut self, conn: ConnId, sub: &Subscribe) {
        let Some(s) = self
            .by_conn
            .get(&conn, &self.sessions)
            .and_then(|sid| self.sessions.get_mut(&sid))
        else {
            return;
        };
        if let Some(acl) = &s.acl {
            if sub
                .filters
                .iter()
                .any(|f| acl.check_subscribe(&f.filter) == SubscribeCheck::Filtered)
            {
                s.acl_filtered = true;
            }
        }
    }
}

/// True if a message on `topic` must not reach session `s` (a filtered session whose ACL
/// denies it). One boolean test for sessions without filtered subscriptions.
#[inline]
pub(super) fn filtered_out(s: &Session, topic: &str) -> bool {
    s.acl_filtered && s.acl.as_deref().is_some_and(|acl| !acl.can_read(topic))
}

/// The will of session `s`, if the session's current ACL lets it be published.
pub(super) fn permitted_will(s: &Session, w: Will) -> Option<Will> {
    if will_allowed(s.acl.as_deref(), &w.topic) {
        Some(w)
    } else {
        info!(client_id = %s.client_id, topic = %w.topic, "will not published: not authorized");
        None
    }
}

/// May a will be published on `topic` under `acl`?
pub fn will_allowed(acl: Option<&ClientAcl>, topic: &str) -> bool {
    !is_sys_topic(topic) && acl.is_none_or(|a| a.can_publish(topic))
}
