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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::{db_path, load, Command, OnCorrupt, StoreOptions};

    fn opts(dir: &std::path::Path) -> StoreOptions {
        StoreOptions {
            on_corrupt: OnCorrupt::Quarantine,
            integrity_check: false,
            ..StoreOptions::for_test(dir)
        }
    }

    #[test]
    fn a_store_last_run_at_1970_continues_its_time_line_not_the_wall_clock() {
        let dir = tempfile::tempdir().unwrap();
        let o = opts(dir.path());
        let (conn, rec) = load::open_and_load(&o).unwrap();
        let wall = crate::clock::wall_ms();
        assert!(
            (rec.clock.now_ms() - wall).abs() < 5_000,
            "a new store starts at the wall clock"
        );
        let a = read(&conn).unwrap().expect("anchor written at start-up");
        assert!((a.wall_ms - wall).abs() < 5_000);
        // The last run's clock said 1970-01-02.
        let day = 86_400_000;
        write(
            &conn,
            &Anchor {
                line_ms: day,
                wall_ms: day,
                synced: false,
            },
        )
        .unwrap();
        drop(conn);
        let (conn, rec) = load::open_and_load(&o).unwrap();
        let line = rec.clock.now_ms();
        assert!((day..day + 5_000).contains(&line), "time line at {line}");
        assert!(
            wall_offset_ms(&conn) > wall - day - 5_000,
            "shown as wall clock"
        );
    }

    #[test]
    fn the_expiry_sweep_records_the_anchor() {
        let dir = tempfile::tempdir().unwrap();
        let o = opts(dir.path());
        let (store, rec, _ev) = crate::store::Store::open(&o).unwrap();
        let conn = rusqlite::Connection::open(db_path(dir.path())).unwrap();
        write(
            &conn,
            &Anchor {
                line_ms: 1,
                wall_ms: 1,
                synced: false,
            },
        )
        .unwrap();
        store
            .send(Command::SweepExpired {
                now_ms: rec.clock.now_ms(),
            })
            .unwrap();
        let (tx, rx) = tokio::sync::oneshot::channel();
        store.send(Command::Ping(tx)).unwrap();
        rx.blocking_recv().unwrap();
        let a = read(&conn).unwrap().unwrap();
        assert!(a.line_ms > 1 && a.wall_ms > 1, "{a:?}");
    }
}
