//! The clock anchor (see [`crate::clock`]): the time line and the wall clock read at one
//! moment, kept in three `counter` rows so the next start can continue the time line.
//! Written at start-up, with every expiry sweep and at shutdown.

use rusqlite::{params, Connection, OptionalExtension};

use crate::clock::Anchor;

const LINE: &str = "clock_line_ms";
const WALL: &str = "clock_wall_ms";
const SYNCED: &str = "clock_synced";

/// The anchor of the last run; None in a store no Holdfast with a time line wrote.
pub fn read(conn: &Connection) -> rusqlite::Result<Option<Anchor>> {
    let get = |name: &str| -> rusqlite::Result<Option<i64>> {
        conn.query_row("SELECT value FROM counter WHERE name = ?1", [name], |r| {
            r.get(0)
        })
        .optional()
    };
    Ok(match (get(LINE)?, get(WALL)?, get(SYNCED)?) {
        (Some(line_ms), Some(wall_ms), Some(synced)) => Some(Anchor {
            line_ms,
            wall_ms,
            synced: synced != 0,
        }),
        _ => None,
    })
}

/// What to add to a time on the store's time line to show it as wall-clock Unix ms (as
/// of the last anchor; 0 for a store without one). For people only, never for deadlines.
pub fn wall_offset_ms(conn: &Connection) -> i64 {
    match read(conn) {
        Ok(Some(a)) => a.wall_ms.saturating_sub(a.line_ms),
        _ => 0,
    }
}

/// Records `a` (inside the caller's transaction, if any).
pub fn write(conn: &Connection, a: &Anchor) -> rusqlite::Result<()> {
    let mut st = conn.prepare_cached(
        "INSERT INTO counter (name, value) VALUES (?1, ?2)
         ON CONFLICT(name) DO UPDATE SET value = excluded.value",
    )?;
    st.execute(params![LINE, a.line_ms])?;
    st.execute(params![WALL, a.wall_ms])?;
    st.execute(params![SYNCED, i64::from(a.synced)])?;
    Ok(())
}
