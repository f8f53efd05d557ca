//! The store's schema: its version, the shape baton expects of its tables, and the check
//! run before a handle's first statement (`ensure_schema`): create what is missing on
//! first use, upgrade version 1 in place, refuse tables that are not baton's and a schema
//! made by a newer baton. The SQL text itself is in `schema/sql.rs`.
//!
//! Every grant decision runs inside one PL/pgSQL call (`attempt`), in one transaction on
//! the server, so an acquire is one round trip and the limit is decided under the key
//! row's lock. The server's clock decides nothing about leases: it only stamps rows for
//! display and expires waiters' tickets (see `acquire.rs` for who decides a lease is
//! stale). Hand-edited or damaged rows make the server-side functions raise SQLSTATE
//! `BT001` (corrupt state) with a message naming the row; `BT002` means a waiter's server
//! session changed under it (a transaction-mode pooler); `BT003` means a waiter's advisory
//! lock number is taken by someone else.

use std::collections::HashMap;
use std::sync::atomic::Ordering;

use baton_core::{Error, ErrorKind};
use tokio_postgres::types::Type;

use crate::core::{corrupt, Conn, Fail, Inner};
use crate::layout::col;

mod sql;

pub use sql::Sql;

/// The version of the tables and functions (`schema/sql.rs`), kept in `<schema>.meta`. A
/// store that finds a newer version refuses the schema instead of guessing; one that finds
/// version 1 (leases that expired by the server's clock) upgrades it: it adds the renewal
/// counter, the TTL, the lost mark and the key's lock-delay, and replaces the functions, so
/// a baton that knows only version 1 then refuses the schema. Version 3 adds the token
/// floors of deleted keys (`retired_keys`, `delete_key`); a version 2 schema is upgraded
/// in place the same way.
pub const SCHEMA_VERSION: i32 = 3;

/// The columns version 2 added to version 1's tables: a schema that lacks them is
/// upgraded, not refused.
pub const ADDED_IN_2: &[(&str, &str)] = &[
    ("keys", "lock_delay_ms"),
    ("leases", "renewals"),
    ("leases", "ttl_ms"),
    ("leases", "lost"),
    ("leases", "lost_at"),
    ("leases", "pid_ns"),
];

/// SQLSTATE of corrupt state found by the server-side functions.
pub const CORRUPT_STATE: &str = "BT001";
/// SQLSTATE of a waiter whose server session changed under it.
pub const SESSION_CHANGED: &str = "BT002";
/// SQLSTATE of a waiter whose advisory lock number is already taken.
pub const LOCK_TAKEN: &str = "BT003";

/// The columns each table must have, with their types as `format_type` spells them.
pub const SHAPE: &[(&str, &[(&str, &str)])] = &[
    ("meta", &[("name", "text"), ("value", "text")]),
    (
        "keys",
        &[
            ("key", "text"),
            ("lim", "integer"),
            ("seq", "bigint"),
            ("lock_delay_ms", "bigint"),
        ],
    ),
    (
        "leases",
        &[
            ("key", "text"),
            ("slot", "integer"),
            ("token", "bigint"),
            ("holder_id", "text"),
            ("holder_json", "text"),
            ("acquired_at", "timestamp with time zone"),
            ("renewed_at", "timestamp with time zone"),
            ("expires_at", "timestamp with time zone"),
            ("renewals", "bigint"),
            ("ttl_ms", "bigint"),
            ("lost", "boolean"),
            ("lost_at", "timestamp with time zone"),
            ("pid_ns", "text"),
        ],
    ),
    (
        "waiters",
        &[
            ("ticket", "bigint"),
            ("key", "text"),
            ("holder_id", "text"),
            ("pid", "integer"),
            ("expires_at", "timestamp with time zone"),
        ],
    ),
    (
        "barriers",
        &[
            ("key", "text"),
            ("generation", "bigint"),
            ("parties", "integer"),
        ],
    ),
    (
        "barrier_arrivals",
        &[
            ("ticket", "bigint"),
            ("key", "text"),
            ("holder_id", "text"),
            ("pid", "integer"),
            ("passed", "bigint"),
            ("expires_at", "timestamp with time zone"),
        ],
    ),
    ("retired_keys", &[("key", "text"), ("seq", "bigint")]),
];

/// The functions `attempt`, `release`, `leave` and `delete_key`, with their argument counts (checked
/// to exist; a missing one, or one with an older argument list, is created).
pub const FUNCTIONS: &[(&str, i16)] = &[
    ("attempt", 15),
    ("release", 5),
    ("leave", 4),
    ("delete_key", 2),
];

/// `Corrupt`, permanent: `what` (a table, the schema) belongs to something other than
/// this baton; retrying will not change it.
fn not_batons(what: impl std::fmt::Display, why: impl std::fmt::Display) -> Fail {
    Fail::Err(
        baton_core::kit::errors::corrupt(
            what,
            format_args!("{why}: it is not baton's (use another ?schema=)"),
        )
        .permanent(),
    )
}

/// `Unsupported`, permanent: a newer baton made the schema.
fn newer(schema: &str, version: &str) -> Fail {
    Fail::Err(
        Error::new(
            ErrorKind::Unsupported,
            format!(
                "schema \"{schema}\" has version {version}, made by a newer baton; this one \
                 knows version {SCHEMA_VERSION}"
            ),
        )
        .permanent(),
    )
}

impl Inner {
    /// Creates the schema on first use (once per process and store), checks its version
    /// and the shape of its tables.
    pub(crate) async fn ensure_schema(&self, conn: &Conn) -> Result<(), Fail> {
        if self.schema_ready.load(Ordering::Acquire) {
            return Ok(());
        }
        let _guard = self.setup.lock().await;
        if self.schema_ready.load(Ordering::Acquire) {
            return Ok(());
        }
        if !self.schema_looks_ready(conn).await? {
            self.create_schema(conn).await?;
            if !self.schema_looks_ready(conn).await? {
                return Err(corrupt(
                    format_args!("schema \"{}\"", self.sql.schema),
                    "is missing baton's version row or functions right after creating them",
                ));
            }
        }
        self.schema_ready.store(true, Ordering::Release);
        Ok(())
    }

    /// `Ok(true)`: version, tables and functions are baton's; `Ok(false)`: something is
    /// missing (to be created); `Err`: something is there that is not baton's.
    async fn schema_looks_ready(&self, conn: &Conn) -> Result<bool, Fail> {
        let schema = self.sql.schema.as_str();
        let rows = self
            .query(conn, &self.sql.columns, &[(&schema, Type::TEXT)])
            .await?;
        let mut have: HashMap<(String, String), String> = HashMap::new();
        let mut tables: Vec<String> = Vec::new();
        for r in &rows {
            let t: String = col(r, 0)?;
            let c: String = col(r, 1)?;
            let ty: String = col(r, 2)?;
            if !tables.contains(&t) {
                tables.push(t.clone());
            }
            have.insert((t, c), ty);
        }
        let mut missing_table = false;
        for (table, cols) in SHAPE {
            if !tables.iter().any(|t| t == table) {
                missing_table = true;
                continue;
            }
            for (col, want) in *cols {
                match have.get(&((*table).to_owned(), (*col).to_owned())) {
                    Some(ty) if ty == want => {}
                    Some(ty) => {
                        return Err(not_batons(
                            format_args!("table \"{schema}\".{table}"),
                            format!("has column {col} of type {ty}, not {want}"),
                        ))
                    }
                    None if ADDED_IN_2.contains(&(*table, *col)) => missing_table = true,
                    None => {
                        return Err(not_batons(
                            format_args!("table \"{schema}\".{table}"),
                            format!("has no column {col}"),
                        ))
                    }
                }
            }
        }
        if missing_table {
            // A table or column this baton knows is missing (the barrier tables in a
            // schema made before them, version 1's tables): it is created, unless a newer
            // baton made the schema (its functions must not be replaced).
            if tables.iter().any(|t| t == "meta") {
                let rows = self.query(conn, &self.sql.version, &[]).await?;
                if let Some(r) = rows.first() {
                    if let Some(v) = col::<Option<String>>(r, 0)? {
                        if v.parse::<i32>().is_ok_and(|n| n > SCHEMA_VERSION) {
                            return Err(newer(schema, &v));
                        }
                    }
                }
            }
            return Ok(false);
        }
        let rows = self.query(conn, &self.sql.version, &[]).await?;
        let version = match rows.first() {
            None => return Ok(false),
            Some(r) => col::<Option<String>>(r, 0)?,
        };
        let want = SCHEMA_VERSION.to_string();
        match version.as_deref() {
            Some(v) if v == want => {}
            // Versions 1 and 2 are upgraded in place (see SCHEMA_VERSION).
            Some("1" | "2") => return Ok(false),
            Some(v) if v.parse::<i32>().is_ok_and(|n| n > SCHEMA_VERSION) => {
                return Err(newer(schema, v))
            }
            other => {
                return Err(not_batons(
                    format_args!("schema \"{schema}\""),
                    format!(
                        "has version {:?} in its meta table, not {SCHEMA_VERSION}",
                        other.unwrap_or("NULL")
                    ),
                ))
            }
        }
        let rows = self
            .query(conn, &self.sql.functions, &[(&schema, Type::TEXT)])
            .await?;
        let mut fns = Vec::new();
        for r in &rows {
            fns.push((col::<String>(r, 0)?, col::<i16>(r, 1)?));
        }
        Ok(FUNCTIONS
            .iter()
            .all(|(f, n)| fns.iter().any(|(g, m)| g == f && m == n)))
    }

    /// Creates the tables and functions under a transaction-level advisory lock, so that
    /// concurrent first uses do not trip over each other.
    async fn create_schema(&self, conn: &Conn) -> Result<(), Fail> {
        let version = SCHEMA_VERSION.to_string();
        let setup = format!(
            "BEGIN; SELECT pg_advisory_xact_lock({}, 0); {} {} COMMIT;",
            self.magic, self.sql.create_tables, self.sql.create_functions
        );
        let r = tokio::time::timeout(self.cfg.timeout, conn.client.batch_execute(&setup)).await;
        let r = match r {
            Ok(r) => r.map_err(Fail::from),
            Err(_) => Err(Fail::Timeout("the schema setup")),
        };
        if let Err(e) = r {
            // The connection may be left inside the failed transaction.
            let _ =
                tokio::time::timeout(self.cfg.timeout, conn.client.batch_execute("ROLLBACK")).await;
            return Err(e);
        }
        self.query(conn, &self.sql.set_version, &[(&version, Type::TEXT)])
            .await?;
        Ok(())
    }
}
