//! Applying a group of ops inside one transaction: the SQL of every `Op`, the deletes held
//! back and applied as ranges, rows both inserted and deleted in one group that are never
//! written, queue read-backs answered from inside the transaction, and the per-session
//! counter changes (`super::counts`) each transaction reports to the writer. Every op that
//! touches a queue row finds it in `queue` or in the staging log (`super::staging`).

use std::collections::{HashMap, HashSet};

use rusqlite::{params, Connection};

use super::counts::Delta;
use super::staging::Staging;
use super::{queue_id, queue_range, split_queue_id, Op, QueueRow, Sid};

/// One entry of a group, in submission order.
pub(super) enum Item {
    Batch(u64, Vec<Op>),
    /// `Command::ReadQueue`: answered from inside the group's transaction, reported after
    /// the commit.
    Read {
        sid: Sid,
        from_seq: u64,
        limit: u32,
        next_seq_at_request: u64,
        /// Rows sent and awaiting their PUBACK / PUBREC (state 1) instead of unsent ones.
        sent: bool,
    },
}

pub(super) fn bump(tx: &rusqlite::Transaction, name: &str, add: i64) -> rusqlite::Result<()> {
    if add != 0 {
        tx.prepare_cached(
            "INSERT INTO counter (name, value) VALUES (?1, ?2)
             ON CONFLICT(name) DO UPDATE SET value = value + excluded.value",
        )?
        .execute(params![name, add])?;
    }
    Ok(())
}

/// Writes the policy drops of a transaction to `session.dropped`. The queue counters are
/// not written here: the writer keeps them (`super::counts`), so a message changes only the
/// queue's page.
pub(super) fn apply_deltas(
    tx: &rusqlite::Transaction,
    per: &HashMap<Sid, Delta>,
) -> rusqlite::Result<()> {
    let mut st = tx.prepare_cached("UPDATE session SET dropped = dropped + ?2 WHERE sid = ?1")?;
    for (sid, d) in per {
        if d.dropped != 0 {
            st.execute(params![*sid as i64, d.dropped])?;
        }
    }
    Ok(())
}

/// Up to `limit` not-yet-sent rows (`sent`: rows sent and awaiting their PUBACK / PUBREC)
/// of a session's queue with seq >= `from_seq`, from `queue` and the staging log, in order.
pub(super) fn read_rows(
    conn: &Connection,
    st: &Staging,
    sid: Sid,
    from_seq: u64,
    limit: u32,
    sent: bool,
) -> rusqlite::Result<Vec<QueueRow>> {
    let mut rows = read_queue_rows(conn, sid, from_seq, limit, sent)?;
    let staged = st.in_state(sid, queue_id(sid, from_seq), u8::from(sent), limit as usize);
    if staged.is_empty() {
        return Ok(rows);
    }
    let staged = st.read(conn, &staged)?;
    // A staged row is the newer version of a qid also in `queue` (never, in practice).
    rows.retain(|r| staged.iter().all(|s| s.seq != r.seq));
    rows.extend(staged);
    rows.sort_by_key(|r| r.seq);
    rows.truncate(limit as usize);
    Ok(rows)
}

/// Deletes a session's rows by policy: each row deleted counts as dropped.
fn drop_rows(
    tx: &rusqlite::Transaction,
    st: &mut Staging,
    sid: Sid,
    seqs: impl IntoIterator<Item = u64>,
    per: &mut HashMap<Sid, Delta>,
) -> rusqlite::Result<()> {
    let before = per.get(&sid).map_or(0, |d| d.queued);
    for seq in seqs {
        delete_range(tx, st, sid, seq, seq, per)?;
    }
    let d = per.entry(sid).or_default();
    d.dropped += before - d.queued;
    Ok(())
}

/// A session's rows in one state, from a sequence number on, in order.
pub(super) const READ_QUEUE_SQL: &str = "SELECT id, state, packet_id, expires_at, packet FROM queue
     WHERE id BETWEEN ?1 AND ?2 AND state = ?4 ORDER BY id LIMIT ?3";

/// [`read_rows`] of `queue` alone.
fn read_queue_rows(
    conn: &Connection,
    sid: Sid,
    from_seq: u64,
    limit: u32,
    sent: bool,
) -> rusqlite::Result<Vec<QueueRow>> {
    (|| -> rusqlite::Result<Vec<QueueRow>> {
        let mut st = conn.prepare_cached(READ_QUEUE_SQL)?;
        let rows = st.query_map(
            params![
                queue_id(sid, from_seq),
                queue_range(sid).1,
                limit,
                i64::from(sent)
            ],
            |r| {
                Ok(QueueRow {
                    seq: split_queue_id(r.get(0)?).1,
                    state: r.get::<_, i64>(1)? as u8,
                    packet_id: r.get::<_, Option<i64>>(2)?.map(|p| p as u16),
                    expires_at: r.get(3)?,
                    packet: bytes::Bytes::from(r.get::<_, Vec<u8>>(4)?),
                })
            },
        )?;
        rows.collect()
    })()
}

/// The queue row an op touches, for the row ops that [`transient_rows`] may skip.
fn row_of(op: &Op) -> Option<(Sid, u64)> {
    match op {
        Op::Enqueue { sid, seq, .. }
        | Op::MarkSent { sid, seq, .. }
        | Op::MarkReleased { sid, seq }
        | Op::Delete { sid, seq } => Some((*sid, *seq)),
        _ => None,
    }
}

/// Queue rows both inserted and deleted by the same group: a bridge's message that the
/// upstream acknowledged while its insert was still waiting for this commit. Writing and
/// then deleting it would change nothing on disk, so neither (nor anything in between) is
/// written: the upstream has the message, and the local publisher's PUBACK still waits for
/// this commit.
///
/// A row inserted as sent (`packet_id` set, state 1) is invisible to reads and to
/// `DeleteOldest` (both look at state 0 only), so it always qualifies. A row inserted
/// unsent qualifies only if no read, `DeleteOldest` or `DeleteSession` of the group looks
/// at its session (their outcome may depend on the row being there).
pub(super) fn transient_rows(group: &[Item]) -> HashSet<(Sid, u64)> {
    // (sid, seq) -> inserted as sent
    let mut inserted = HashMap::new();
    let mut transient = HashSet::new();
    let mut untouchable = HashSet::new();
    for item in group {
        match item {
            Item::Read { sid, .. } => {
                untouchable.insert(*sid);
            }
            Item::Batch(_, ops) => {
                for op in ops {
                    match op {
                        Op::Enqueue {
                            sid,
                            seq,
                            packet_id,
                            ..
                        } => {
                            inserted.insert((*sid, *seq), packet_id.is_some());
                        }
                        Op::Delete { sid, seq } if inserted.contains_key(&(*sid, *seq)) => {
                            transient.insert((*sid, *seq));
                        }
                        Op::DeleteOldest { sid, .. } | Op::DeleteSession { sid } => {
                            untouchable.insert(*sid);
                        }
                        _ => {}
                    }
                }
            }
        }
    }
    transient.retain(|row| inserted.get(row) == Some(&true) || !untouchable.contains(&row.0));
    transient
}

/// Applies `retry`, then the group's batches in one transaction, answering its reads from
/// inside it (each sees exactly the writes submitted before it), and skipping the
/// [`transient_rows`]. Any error rolls everything back. Returns the reads' rows, in order,
/// and the counter changes.
#[allow(clippy::type_complexity)]
pub(super) fn apply_group(
    conn: &mut Connection,
    st: &mut Staging,
    retry: &[Op],
    group: &[Item],
    now: i64,
) -> rusqlite::Result<(Vec<rusqlite::Result<Vec<QueueRow>>>, HashMap<Sid, Delta>)> {
    st.ensure(conn)?;
    st.plan(retry.iter().chain(group.iter().flat_map(|item| match item {
        Item::Batch(_, ops) => ops.iter(),
        Item::Read { .. } => [].iter(),
    })));
    let result = apply_group_in(conn, st, retry, group, now);
    if result.is_err() {
        st.invalidate();
    }
    result
}

#[allow(clippy::type_complexity)]
fn apply_group_in(
    conn: &mut Connection,
    st: &mut Staging,
    retry: &[Op],
    group: &[Item],
    now: i64,
) -> rusqlite::Result<(Vec<rusqlite::Result<Vec<QueueRow>>>, HashMap<Sid, Delta>)> {
    let tx = conn.transaction_with_behavior(rusqlite::TransactionBehavior::Immediate)?;
    let mut per: HashMap<Sid, Delta> = HashMap::new();
    let mut reads = Vec::new();
    for op in retry {
        apply_op(&tx, st, op, &mut per, now)?;
    }
    let transient = transient_rows(group);
    let mut deletes = Deletes::default();
    for item in group {
        match item {
            Item::Batch(_, ops) => {
                for op in ops {
                    if row_of(op).is_some_and(|r| transient.contains(&r)) {
                        continue;
                    }
                    if !deletes.defer(&tx, st, op, &mut per)? {
                        apply_op(&tx, st, op, &mut per, now)?;
                    }
                }
            }
            Item::Read {
                sid,
                from_seq,
                limit,
                sent,
                ..
            } => {
                deletes.flush(&tx, st, *sid, &mut per)?;
                reads.push(read_rows(&tx, st, *sid, *from_seq, *limit, *sent));
            }
        }
    }
    deletes.flush_all(&tx, st, &mut per)?;
    apply_deltas(&tx, &per)?;
    tx.commit()?;
    Ok((reads, per))
}

/// Deletes the queue rows of `sid` with `lo <= seq <= hi` (those that exist, staged or
/// not), counting them in `per`. Two plain statements: `DELETE ... RETURNING` would build
/// an ephemeral table for every call.
pub(super) fn delete_range(
    tx: &rusqlite::Transaction,
    st: &mut Staging,
    sid: Sid,
    lo: u64,
    hi: u64,
    per: &mut HashMap<Sid, Delta>,
) -> rusqlite::Result<()> {
    let (staged, staged_bytes) = st.delete_range(tx, queue_id(sid, lo), queue_id(sid, hi))?;
    if staged > 0 {
        let d = per.entry(sid).or_default();
        d.queued -= staged;
        d.bytes -= staged_bytes;
        if staged as u64 == hi - lo + 1 {
            // Every row of the range was staged: none can be in `queue` too.
            return Ok(());
        }
    }
    let range = params![queue_id(sid, lo), queue_id(sid, hi)];
    let (rows, bytes): (i64, i64) = tx
        .prepare_cached(
            "SELECT count(*), coalesce(sum(size), 0) FROM queue WHERE id >= ?1 AND id <= ?2",
        )?
        .query_row(range, |r| Ok((r.get(0)?, r.get(1)?)))?;
    if rows > 0 {
        tx.prepare_cached("DELETE FROM queue WHERE id >= ?1 AND id <= ?2")?
            .execute(range)?;
        let d = per.entry(sid).or_default();
        d.queued -= rows;
        d.bytes -= bytes;
    }
    Ok(())
}

/// `Op::Delete`s of a group held back and applied as ranges of consecutive rows: an
/// upstream or subscriber acknowledges in order, so a group's deletes of one session are
/// usually one run, deleted by one statement instead of one per row.
///
/// Holding a delete back is equivalent to applying it in place as long as nothing in
/// between can see the row: the session's deletes are applied first when a read, a
/// `DeleteOldest` or a `DeleteSession` of that session comes, or an `Enqueue` of a row that
/// is waiting to be deleted. Marking a row that is then deleted ends the same either way.
#[derive(Default)]
struct Deletes {
    /// Per session: the seqs to delete, in submission order, and the highest of them.
    pending: HashMap<Sid, (Vec<u64>, u64)>,
}

impl Deletes {
    /// Holds `op` back if it is a delete (returns true); first applies what must not be
    /// held past `op`.
    fn defer(
        &mut self,
        tx: &rusqlite::Transaction,
        st: &mut Staging,
        op: &Op,
        per: &mut HashMap<Sid, Delta>,
    ) -> rusqlite::Result<bool> {
        match op {
            Op::Delete { sid, seq } => {
                let (seqs, max) = self.pending.entry(*sid).or_default();
                seqs.push(*seq);
                *max = (*max).max(*seq);
                return Ok(true);
            }
            Op::Enqueue { sid, seq, .. }
                if self
                    .pending
                    .get(sid)
                    .is_some_and(|(seqs, max)| *seq <= *max && seqs.contains(seq)) =>
            {
                self.flush(tx, st, *sid, per)?;
            }
            Op::DeleteOldest { sid, .. } | Op::DeleteSession { sid } | Op::Drop { sid, .. } => {
                self.flush(tx, st, *sid, per)?
            }
            _ => {}
        }
        Ok(false)
    }

    /// Applies the held deletes of `sid`.
    fn flush(
        &mut self,
        tx: &rusqlite::Transaction,
        st: &mut Staging,
        sid: Sid,
        per: &mut HashMap<Sid, Delta>,
    ) -> rusqlite::Result<()> {
        let Some((mut seqs, _)) = self.pending.remove(&sid) else {
            return Ok(());
        };
        seqs.sort_unstable();
        seqs.dedup();
        let mut i = 0;
        while i < seqs.len() {
            let lo = seqs[i];
            let mut hi = lo;
            i += 1;
            while i < seqs.len() && seqs[i] == hi + 1 {
                hi += 1;
                i += 1;
            }
            delete_range(tx, st, sid, lo, hi, per)?;
        }
        Ok(())
    }

    /// Applies every held delete.
    fn flush_all(
        &mut self,
        tx: &rusqlite::Transaction,
        st: &mut Staging,
        per: &mut HashMap<Sid, Delta>,
    ) -> rusqlite::Result<()> {
        let sids: Vec<Sid> = self.pending.keys().copied().collect();
        for sid in sids {
            self.flush(tx, st, sid, per)?;
        }
        Ok(())
    }
}

/// Applies ops in one transaction, `now` on the store time line. Any error rolls
/// everything back. Returns the counter changes.
pub(super) fn apply<'a>(
    conn: &mut Connection,
    st: &mut Staging,
    ops: impl Iterator<Item = &'a Op> + Clone,
    now: i64,
) -> rusqlite::Result<HashMap<Sid, Delta>> {
    st.ensure(conn)?;
    st.plan(ops.clone());
    let result = (|| {
        let tx = conn.transaction_with_behavior(rusqlite::TransactionBehavior::Immediate)?;
        let mut per: HashMap<Sid, Delta> = HashMap::new();
        for op in ops {
            apply_op(&tx, st, op, &mut per, now)?;
        }
        apply_deltas(&tx, &per)?;
        tx.commit()?;
        Ok(per)
    })();
    if result.is_err() {
        st.invalidate();
    }
    result
}

/// Up to `count` unsent rows of `sid` from `from_seq` on, oldest first, staged or not:
/// (seq, payload size).
pub(super) fn oldest_unsent(
    tx: &rusqlite::Transaction,
    st: &Staging,
    sid: Sid,
    from_seq: u64,
    count: u32,
) -> rusqlite::Result<Vec<(u64, u32)>> {
    let from = queue_id(sid, from_seq);
    let mut rows: Vec<(u64, u32)> = tx
        .prepare_cached(
            "SELECT id, size FROM queue WHERE id BETWEEN ?1 AND ?2 AND state = 0
             ORDER BY id LIMIT ?3",
        )?
        .query_map(params![from, queue_range(sid).1, count], |r| {
            Ok((
                split_queue_id(r.get(0)?).1,
                r.get::<_, i64>(1)?.max(0) as u32,
            ))
        })?
        .collect::<rusqlite::Result<_>>()?;
    rows.extend(
        st.in_state(sid, from, 0, count as usize)
            .into_iter()
            .map(|(qid, size)| (split_queue_id(qid).1, size)),
    );
    rows.sort_unstable();
    rows.dedup_by_key(|r| r.0);
    rows.truncate(count as usize);
    Ok(rows)
}

/// One op inside a transaction; queue counter changes go to `per`.
fn apply_op(
    tx: &rusqlite::Transaction,
    st: &mut Staging,
    op: &Op,
    per: &mut HashMap<Sid, Delta>,
    now: i64,
) -> rusqlite::Result<()> {
    {
        match op {
            Op::UpsertSession {
                sid,
                client_id,
                protocol,
                expiry,
                will,
            } => {
                tx.prepare_cached(
                    "INSERT INTO session (sid, client_id, protocol, expiry_interval, disconnected_at,
                                          will, will_delay, created_at)
                     VALUES (?1, ?2, ?3, ?4, NULL, ?5, ?6, ?7)
                     ON CONFLICT(sid) DO UPDATE SET protocol = excluded.protocol,
                        expiry_interval = excluded.expiry_interval, disconnected_at = NULL,
                        will = excluded.will, will_delay = excluded.will_delay",
                )?
                .execute(params![
                    *sid as i64,
                    &**client_id,
                    *protocol,
                    i64::from(*expiry),
                    will.as_ref().map(|w| &w.packet[..]),
                    will.as_ref().map(|w| i64::from(w.delay)).unwrap_or(0),
                    now
                ])?;
            }
            Op::MarkOnline { sid } => {
                tx.prepare_cached("UPDATE session SET disconnected_at = NULL WHERE sid = ?1")?
                    .execute([*sid as i64])?;
            }
            Op::SessionOffline {
                sid,
                at_ms,
                expiry,
                will,
            } => {
                tx.prepare_cached(
                    "UPDATE session SET disconnected_at = ?2, expiry_interval = ?3, will = ?4,
                     will_delay = ?5 WHERE sid = ?1",
                )?
                .execute(params![
                    *sid as i64,
                    at_ms,
                    i64::from(*expiry),
                    will.as_ref().map(|w| &w.packet[..]),
                    will.as_ref().map(|w| i64::from(w.delay)).unwrap_or(0)
                ])?;
            }
            Op::SetOwner { sid, owner } => {
                tx.prepare_cached("UPDATE session SET owner = ?2 WHERE sid = ?1")?
                    .execute(params![*sid as i64, &**owner])?;
            }
            Op::DeleteSession { sid } => {
                let s = *sid as i64;
                tx.prepare_cached("DELETE FROM session WHERE sid = ?1")?
                    .execute([s])?;
                tx.prepare_cached("DELETE FROM subscription WHERE sid = ?1")?
                    .execute([s])?;
                tx.prepare_cached("DELETE FROM incoming_qos2 WHERE sid = ?1")?
                    .execute([s])?;
                let (lo, hi) = queue_range(*sid);
                tx.prepare_cached("DELETE FROM queue WHERE id BETWEEN ?1 AND ?2")?
                    .execute(params![lo, hi])?;
                st.delete_range(tx, lo, hi)?;
                per.insert(
                    *sid,
                    Delta {
                        deleted: true,
                        ..Delta::default()
                    },
                );
            }
            Op::Subscribe {
                sid,
                filter,
                options,
                identifier,
            } => {
                tx.prepare_cached(
                    "INSERT OR REPLACE INTO subscription (sid, filter, options, identifier)
                     VALUES (?1, ?2, ?3, ?4)",
                )?
                .execute(params![
                    *sid as i64,
                    filter,
                    *options,
                    identifier.map(i64::from)
                ])?;
            }
            Op::Unsubscribe { sid, filter } => {
                tx.prepare_cached("DELETE FROM subscription WHERE sid = ?1 AND filter = ?2")?
                    .execute(params![*sid as i64, filter])?;
            }
            Op::Enqueue {
                sid,
                seq,
                packet_id,
                expires_at,
                size,
                packet,
            } => {
                let qid = queue_id(*sid, *seq);
                let state = u8::from(packet_id.is_some());
                let staged =
                    st.enqueue(tx, qid, state, *packet_id, *expires_at, *size, packet, now)?;
                if !staged {
                    tx.prepare_cached(
                        "INSERT OR REPLACE INTO queue (id, state, packet_id, expires_at, size,
                                                       packet, enqueued_at)
                         VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7)",
                    )?
                    .execute(params![
                        qid,
                        state,
                        packet_id.map(i64::from),
                        expires_at,
                        *size,
                        &packet[..],
                        now
                    ])?;
                }
                let d = per.entry(*sid).or_default();
                d.queued += 1;
                d.bytes += i64::from(*size);
            }
            Op::MarkSent {
                sid,
                seq,
                packet_id,
            } => {
                let qid = queue_id(*sid, *seq);
                if !st.mark(tx, qid, 1, Some(*packet_id))? {
                    tx.prepare_cached("UPDATE queue SET state = 1, packet_id = ?2 WHERE id = ?1")?
                        .execute(params![qid, *packet_id])?;
                }
            }
            Op::MarkReleased { sid, seq } => {
                let qid = queue_id(*sid, *seq);
                if !st.mark(tx, qid, 2, None)? {
                    tx.prepare_cached("UPDATE queue SET state = 2 WHERE id = ?1")?
                        .execute(params![qid])?;
                }
            }
            Op::Delete { sid, seq } => delete_range(tx, st, *sid, *seq, *seq, per)?,
            Op::Drop { sid, seq } => drop_rows(tx, st, *sid, [*seq], per)?,
            Op::DeleteOldest {
                sid,
                from_seq,
                count,
                ..
            } if st.has_session(*sid) => {
                let oldest = oldest_unsent(tx, st, *sid, *from_seq, *count)?;
                drop_rows(tx, st, *sid, oldest.into_iter().map(|(seq, _)| seq), per)?;
            }
            Op::DeleteOldest {
                sid,
                from_seq,
                count,
                ..
            } => {
                let mut q = tx.prepare_cached(
                    "DELETE FROM queue WHERE id IN (SELECT id FROM queue WHERE id BETWEEN ?1 AND ?2
                     AND state = 0 ORDER BY id LIMIT ?3) RETURNING size",
                )?;
                let mut rows = q.query(params![
                    queue_id(*sid, *from_seq),
                    queue_range(*sid).1,
                    *count
                ])?;
                let d = per.entry(*sid).or_default();
                while let Some(r) = rows.next()? {
                    d.queued -= 1;
                    d.bytes -= r.get::<_, i64>(0)?;
                    d.dropped += 1;
                }
            }
            Op::Retain { topic, message } => match message {
                Some((expires_at, packet)) => {
                    tx.prepare_cached(
                        "INSERT OR REPLACE INTO retained (topic, expires_at, packet) VALUES (?1, ?2, ?3)",
                    )?
                    .execute(params![&**topic, expires_at, &packet[..]])?;
                }
                None => {
                    tx.prepare_cached("DELETE FROM retained WHERE topic = ?1")?
                        .execute(params![&**topic])?;
                }
            },
            Op::IncomingQos2 {
                sid,
                packet_id,
                present,
            } => {
                if *present {
                    tx.prepare_cached(
                        "INSERT OR IGNORE INTO incoming_qos2 (sid, packet_id) VALUES (?1, ?2)",
                    )?
                    .execute(params![*sid as i64, *packet_id])?;
                } else {
                    tx.prepare_cached(
                        "DELETE FROM incoming_qos2 WHERE sid = ?1 AND packet_id = ?2",
                    )?
                    .execute(params![*sid as i64, *packet_id])?;
                }
            }
            Op::Count { name, add } => bump(tx, name, *add)?,
        }
    }
    Ok(())
}
