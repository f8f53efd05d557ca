//! The store's tables and server-side functions, as SQL, for one schema.
//!
//! Every grant decision runs inside one PL/pgSQL call (`attempt`), in one transaction on
//! the server, so an acquire is one round trip and the limit is decided under the key
//! row's lock with the server's clock. Hand-edited or damaged rows make these functions
//! raise SQLSTATE `BT001` (corrupt state) with a message naming the row; `BT002` means a
//! waiter's server session changed under it (a transaction-mode pooler); `BT003` means a
//! waiter's advisory lock number is taken by someone else.

/// The version of the tables and functions below, kept in `<schema>.meta`. A store that
/// finds another version refuses the schema instead of guessing.
pub const SCHEMA_VERSION: i32 = 1;

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
        &[("key", "text"), ("lim", "integer"), ("seq", "bigint")],
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
];

/// The functions `attempt`, `release` and `leave`, with their argument counts (checked
/// to exist; a missing one, or one with an older argument list, is created).
pub const FUNCTIONS: &[(&str, i16)] = &[("attempt", 11), ("release", 5), ("leave", 4)];

/// The statements of one schema, with its name spliced in (it is validated to be a
/// plain lowercase identifier, and quoted).
#[derive(Clone, Debug)]
pub struct Sql {
    /// The schema name, unquoted.
    pub schema: String,
    /// Tables, created if missing.
    pub create_tables: String,
    /// The functions, created or replaced (only while holding the setup lock, and only
    /// when the version row is missing).
    pub create_functions: String,
    /// One grant attempt: `attempt($1 key, $2 limit, $3 check_limit, $4 ticket, $5 queue,
    /// $6 holder_id, $7 holder_json, $8 ttl_ms, $9 magic, $10 ticket_ttl_ms, $11 refresh)`.
    pub attempt: String,
    /// `release($1 key, $2 slot, $3 token, $4 holder_id, $5 channel)`: 0 not there,
    /// 1 released, 2 was ours but had expired.
    pub release: String,
    /// `leave($1 key, $2 ticket, $3 magic, $4 channel)`: an abandoned wait's cleanup.
    pub leave: String,
    /// Extends a live lease: `$1 key, $2 slot, $3 token, $4 holder_id, $5 ttl_ms`.
    pub renew: String,
    /// The version row.
    pub version: String,
    /// Inserts the version row.
    pub set_version: String,
    /// The columns of the schema's tables.
    pub columns: String,
    /// The functions present in the schema.
    pub functions: String,
    /// A key's row: `lim, seq`.
    pub key_row: String,
    /// A key's leases with their state by the server's clock.
    pub lease_rows: String,
    /// Live waiters of a key (`$1 key, $2 magic`).
    pub live_waiters: String,
    /// Every key.
    pub list: String,
    /// Deletes a key's leases (of one holder when `$2` is not null), returning them.
    pub break_leases: String,
    /// Sets a key's limit.
    pub resize: String,
    /// Wakes a key's waiters.
    pub notify: String,
}

impl Sql {
    /// The statements for `schema`.
    pub fn new(schema: &str) -> Sql {
        let s = format!("\"{schema}\"");
        Sql {
            schema: schema.to_owned(),
            create_tables: format!(
                r#"
CREATE SCHEMA IF NOT EXISTS {s};
CREATE TABLE IF NOT EXISTS {s}.meta (
    name  text PRIMARY KEY,
    value text NOT NULL
);
CREATE TABLE IF NOT EXISTS {s}.keys (
    key text PRIMARY KEY,
    lim integer NOT NULL,
    seq bigint NOT NULL
);
CREATE TABLE IF NOT EXISTS {s}.leases (
    key         text NOT NULL,
    slot        integer NOT NULL,
    token       bigint NOT NULL,
    holder_id   text NOT NULL,
    holder_json text NOT NULL,
    acquired_at timestamptz NOT NULL,
    renewed_at  timestamptz NOT NULL,
    expires_at  timestamptz NOT NULL,
    PRIMARY KEY (key, slot)
);
CREATE TABLE IF NOT EXISTS {s}.waiters (
    ticket     bigserial PRIMARY KEY,
    key        text NOT NULL,
    holder_id  text NOT NULL,
    pid        integer NOT NULL,
    expires_at timestamptz NOT NULL
);
CREATE INDEX IF NOT EXISTS waiters_key_ticket ON {s}.waiters (key, ticket);
CREATE TABLE IF NOT EXISTS {s}.barriers (
    key        text PRIMARY KEY,
    generation bigint NOT NULL,
    parties    integer NOT NULL
);
CREATE TABLE IF NOT EXISTS {s}.barrier_arrivals (
    ticket     bigserial PRIMARY KEY,
    key        text NOT NULL,
    holder_id  text NOT NULL,
    pid        integer NOT NULL,
    passed     bigint,
    expires_at timestamptz NOT NULL
);
CREATE INDEX IF NOT EXISTS barrier_arrivals_key ON {s}.barrier_arrivals (key, ticket);
"#
            ),
            create_functions: functions(&s),
            attempt: format!(
                "SELECT o_outcome, o_slot, o_token, o_lim, o_ticket, o_held, o_ahead, o_next_ms, \
                 o_now_ms FROM {s}.attempt($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11)"
            ),
            release: format!("SELECT {s}.release($1, $2, $3, $4, $5)"),
            leave: format!("SELECT {s}.leave($1, $2, $3, $4)::text"),
            renew: format!(
                "UPDATE {s}.leases SET expires_at = clock_timestamp() + $5::float8 * interval '1 millisecond', \
                 renewed_at = clock_timestamp() \
                 WHERE key = $1 AND slot = $2 AND token = $3 AND holder_id = $4 \
                 AND expires_at > clock_timestamp()"
            ),
            version: format!("SELECT value FROM {s}.meta WHERE name = 'schema_version'"),
            set_version: format!(
                "INSERT INTO {s}.meta (name, value) VALUES ('schema_version', $1) \
                 ON CONFLICT (name) DO NOTHING"
            ),
            columns: "SELECT c.relname::text, a.attname::text, format_type(a.atttypid, a.atttypmod) \
                 FROM pg_attribute a JOIN pg_class c ON c.oid = a.attrelid \
                 JOIN pg_namespace n ON n.oid = c.relnamespace \
                 WHERE n.nspname = $1 AND c.relkind IN ('r', 'p') AND a.attnum > 0 \
                 AND NOT a.attisdropped"
                .to_owned(),
            functions: "SELECT p.proname::text, p.pronargs FROM pg_proc p JOIN pg_namespace n ON n.oid = p.pronamespace \
                 WHERE n.nspname = $1"
                .to_owned(),
            key_row: format!("SELECT lim, seq FROM {s}.keys WHERE key = $1"),
            lease_rows: format!(
                "SELECT slot, token, holder_id, holder_json, \
                 (extract(epoch FROM acquired_at) * 1000)::float8, \
                 expires_at > clock_timestamp() \
                 FROM {s}.leases WHERE key = $1 ORDER BY slot"
            ),
            live_waiters: format!(
                "SELECT count(*) FROM {s}.waiters w WHERE w.key = $1 \
                 AND w.expires_at > clock_timestamp() \
                 AND NOT pg_try_advisory_xact_lock_shared($2, (w.ticket % 2147483647)::integer)"
            ),
            list: format!("SELECT key FROM {s}.keys ORDER BY key"),
            break_leases: format!(
                "DELETE FROM {s}.leases WHERE key = $1 AND ($2::text IS NULL OR holder_id = $2) \
                 RETURNING slot, token, holder_json, \
                 (extract(epoch FROM acquired_at) * 1000)::float8, expires_at > clock_timestamp()"
            ),
            resize: format!("UPDATE {s}.keys SET lim = $2 WHERE key = $1"),
            notify: "SELECT pg_notify($1, $2)::text".to_owned(),
        }
    }
}

fn functions(s: &str) -> String {
    format!(
        r#"
CREATE OR REPLACE FUNCTION {s}.attempt(
    p_key text, p_lim integer, p_check_lim boolean, p_ticket bigint, p_queue boolean,
    p_holder_id text, p_holder_json text, p_ttl_ms bigint, p_magic integer,
    p_ticket_ttl_ms bigint, p_refresh boolean)
RETURNS TABLE(o_outcome text, o_slot integer, o_token bigint, o_lim integer,
              o_ticket bigint, o_held integer, o_ahead integer, o_next_ms bigint,
              o_now_ms bigint)
LANGUAGE plpgsql AS $fn$
DECLARE
    v_lim integer;
    v_seq bigint;
    v_max bigint;
    v_live integer := 0;
    v_slots integer[] := '{{}}';
    v_avail integer;
    v_mine boolean := false;
    v_ahead integer := 0;
    v_slot integer;
    v_token bigint;
    v_now timestamptz;
    v_next timestamptz;
    v_ticket bigint := p_ticket;
    v_types text;
    v_pid integer;
    r record;
BEGIN
    -- A queued waiter looks without locks first: while it cannot be served it answers
    -- without writing anything (no transaction id, no WAL, no flush), so a release that
    -- wakes many waiters costs one write (the grant), not one per waiter.
    IF p_ticket IS NOT NULL AND NOT p_refresh THEN
        SELECT k.lim, k.seq, pg_typeof(k.lim)::text || ' ' || pg_typeof(k.seq)::text
            INTO v_lim, v_seq, v_types FROM {s}.keys k WHERE k.key = p_key;
        IF FOUND AND v_types = 'integer bigint' AND v_lim BETWEEN 1 AND 1000000 AND v_seq >= 0
           AND NOT (p_check_lim AND v_lim <> p_lim) THEN
            v_now := clock_timestamp();
            SELECT count(*) FILTER (WHERE l.expires_at > v_now)::integer,
                   min(l.expires_at) FILTER (WHERE l.expires_at > v_now),
                   coalesce(bool_or(l.slot IS NULL OR l.slot < 0 OR l.token IS NULL
                                    OR l.token < 1 OR l.expires_at IS NULL), false)
                INTO v_live, v_next, v_mine
                FROM {s}.leases l WHERE l.key = p_key;
            IF v_mine THEN
                -- A row baton did not write: the locked path below names it.
                v_avail := -1;
            ELSE
                v_avail := greatest(v_lim - v_live, 0);
            END IF;
            v_mine := false;
            IF p_ticket IS NOT NULL THEN
                SELECT w.pid INTO v_pid FROM {s}.waiters w WHERE w.ticket = p_ticket;
                v_mine := FOUND;
                IF v_mine AND v_pid IS DISTINCT FROM pg_backend_pid() THEN
                    RAISE EXCEPTION USING ERRCODE = 'BT002', MESSAGE = format(
                        'the waiter''s server session changed (backend pid %s, now %s): '
                        'a transaction-mode pooler (PgBouncer pool_mode=transaction) is '
                        'between baton and PostgreSQL; connect directly or use session pooling',
                        v_pid, pg_backend_pid());
                END IF;
            END IF;
            IF v_avail >= 0 AND v_mine THEN
                -- Every live ticket ahead is counted: the waiter uses its place to skip
                -- wake-ups that cannot be for it.
                FOR r IN SELECT w.ticket AS ticket, w.expires_at AS expires_at
                         FROM {s}.waiters w
                         WHERE w.key = p_key AND w.ticket < p_ticket
                         ORDER BY w.ticket LOOP
                    IF r.expires_at > v_now AND NOT pg_try_advisory_xact_lock_shared(
                           p_magic, (r.ticket % 2147483647)::integer) THEN
                        v_ahead := v_ahead + 1;
                    END IF;
                END LOOP;
            END IF;
            IF v_avail >= 0 AND v_ahead >= v_avail AND v_mine THEN
                RETURN QUERY SELECT 'queued'::text, NULL::integer, NULL::bigint, v_lim,
                    p_ticket, v_live, v_ahead,
                    CASE WHEN v_next IS NULL THEN NULL
                         ELSE greatest(0, ceil(extract(epoch FROM (v_next - clock_timestamp())) * 1000))::bigint
                    END,
                    NULL::bigint;
                RETURN;
            END IF;
            v_live := 0;
            v_ahead := 0;
            v_mine := false;
            v_next := NULL;
        END IF;
    END IF;
    SELECT k.lim, k.seq, pg_typeof(k.lim)::text || ' ' || pg_typeof(k.seq)::text
        INTO v_lim, v_seq, v_types FROM {s}.keys k WHERE k.key = p_key FOR UPDATE;
    IF NOT FOUND THEN
        INSERT INTO {s}.keys AS k (key, lim, seq) VALUES (p_key, p_lim, 0)
            ON CONFLICT (key) DO NOTHING;
        SELECT k.lim, k.seq, pg_typeof(k.lim)::text || ' ' || pg_typeof(k.seq)::text
            INTO v_lim, v_seq, v_types FROM {s}.keys k WHERE k.key = p_key FOR UPDATE;
    END IF;
    IF v_types IS DISTINCT FROM 'integer bigint' THEN
        RAISE EXCEPTION USING ERRCODE = 'BT001', MESSAGE = format(
            'the keys table''s lim and seq columns are %s, not integer bigint: the table '
            'was altered by hand', v_types);
    END IF;
    IF v_lim IS NULL OR v_lim < 1 OR v_lim > 1000000 THEN
        RAISE EXCEPTION USING ERRCODE = 'BT001', MESSAGE = format(
            'the keys row of %s holds the limit %s, not a limit of 1 to 1000000 slots',
            p_key, coalesce(v_lim::text, 'NULL'));
    END IF;
    IF v_seq IS NULL OR v_seq < 0 THEN
        RAISE EXCEPTION USING ERRCODE = 'BT001', MESSAGE = format(
            'the keys row of %s holds the token sequence %s, not a count of tokens',
            p_key, coalesce(v_seq::text, 'NULL'));
    END IF;
    IF p_check_lim AND v_lim <> p_lim THEN
        RETURN QUERY SELECT 'mismatch'::text, NULL::integer, NULL::bigint, v_lim,
            NULL::bigint, NULL::integer, NULL::integer, NULL::bigint, NULL::bigint;
        RETURN;
    END IF;
    v_now := clock_timestamp();
    v_max := v_seq;
    FOR r IN SELECT l.slot AS slot, l.token AS token, l.expires_at AS expires_at,
                    pg_typeof(l.slot)::text || ' ' || pg_typeof(l.token)::text || ' '
                    || pg_typeof(l.expires_at)::text AS types
             FROM {s}.leases l WHERE l.key = p_key FOR UPDATE LOOP
        IF r.types IS DISTINCT FROM 'integer bigint timestamp with time zone' THEN
            RAISE EXCEPTION USING ERRCODE = 'BT001', MESSAGE = format(
                'the leases table''s slot, token and expires_at columns are %s, not integer '
                'bigint timestamptz: the table was altered by hand', r.types);
        END IF;
        IF r.slot IS NULL OR r.slot < 0 OR r.token IS NULL OR r.token < 1
           OR r.expires_at IS NULL THEN
            RAISE EXCEPTION USING ERRCODE = 'BT001', MESSAGE = format(
                'a leases row of %s holds slot %s, token %s, expiry %s: not a lease baton wrote',
                p_key, coalesce(r.slot::text, 'NULL'), coalesce(r.token::text, 'NULL'),
                coalesce(r.expires_at::text, 'NULL'));
        END IF;
        v_max := greatest(v_max, r.token);
        IF r.expires_at <= v_now THEN
            DELETE FROM {s}.leases l WHERE l.key = p_key AND l.slot = r.slot;
        ELSE
            v_live := v_live + 1;
            v_slots := v_slots || r.slot;
            v_next := least(v_next, r.expires_at);
        END IF;
    END LOOP;
    v_avail := greatest(v_lim - v_live, 0);
    FOR r IN SELECT w.ticket AS ticket, w.expires_at AS expires_at, w.pid AS pid
             FROM {s}.waiters w WHERE w.key = p_key ORDER BY w.ticket LOOP
        IF r.ticket = p_ticket THEN
            IF r.pid IS DISTINCT FROM pg_backend_pid() THEN
                RAISE EXCEPTION USING ERRCODE = 'BT002', MESSAGE = format(
                    'the waiter''s server session changed (backend pid %s, now %s): '
                    'a transaction-mode pooler (PgBouncer pool_mode=transaction) is between '
                    'baton and PostgreSQL; connect directly or use session pooling',
                    r.pid, pg_backend_pid());
            END IF;
            v_mine := true;
            EXIT;
        END IF;
        IF r.expires_at IS NULL OR r.expires_at <= v_now
           OR pg_try_advisory_xact_lock_shared(p_magic, (r.ticket % 2147483647)::integer) THEN
            -- Its session is gone (nobody holds its lock) or it stopped refreshing.
            DELETE FROM {s}.waiters w WHERE w.ticket = r.ticket;
        ELSE
            v_ahead := v_ahead + 1;
        END IF;
    END LOOP;
    IF v_ahead < v_avail THEN
        v_slot := 0;
        WHILE v_slot = ANY (v_slots) LOOP
            v_slot := v_slot + 1;
        END LOOP;
        IF v_slot >= v_lim THEN
            RAISE EXCEPTION USING ERRCODE = 'BT001', MESSAGE = format(
                'the leases of %s fill every slot number below its limit %s although fewer are live',
                p_key, v_lim);
        END IF;
        IF v_max >= 9223372036854775807 THEN
            RAISE EXCEPTION USING ERRCODE = 'BT001', MESSAGE = format(
                'the token sequence of %s is exhausted (it reached 2^63 - 1)', p_key);
        END IF;
        v_token := v_max + 1;
        UPDATE {s}.keys k SET seq = v_token WHERE k.key = p_key;
        INSERT INTO {s}.leases (key, slot, token, holder_id, holder_json, acquired_at,
                                renewed_at, expires_at)
        VALUES (p_key, v_slot, v_token, p_holder_id, p_holder_json, v_now, v_now,
                v_now + p_ttl_ms * interval '1 millisecond');
        IF p_ticket IS NOT NULL THEN
            DELETE FROM {s}.waiters w WHERE w.ticket = p_ticket;
            PERFORM pg_advisory_unlock(p_magic, (p_ticket % 2147483647)::integer);
        END IF;
        RETURN QUERY SELECT 'granted'::text, v_slot, v_token, v_lim, NULL::bigint, v_live,
            v_ahead, NULL::bigint, floor(extract(epoch FROM v_now) * 1000)::bigint;
        RETURN;
    END IF;
    -- Nothing below needs to survive a crash: a ticket lives no longer than its
    -- session, and a swept dead waiter or a refreshed expiry can be redone. Only grants
    -- wait for the WAL flush.
    PERFORM set_config('synchronous_commit', 'off', true);
    IF NOT p_queue THEN
        RETURN QUERY SELECT 'busy'::text, NULL::integer, NULL::bigint, v_lim, NULL::bigint,
            v_live, v_ahead, NULL::bigint, NULL::bigint;
        RETURN;
    END IF;
    IF v_mine THEN
        UPDATE {s}.waiters w SET expires_at = v_now + p_ticket_ttl_ms * interval '1 millisecond'
            WHERE w.ticket = p_ticket;
    ELSE
        IF p_ticket IS NOT NULL THEN
            PERFORM pg_advisory_unlock(p_magic, (p_ticket % 2147483647)::integer);
        END IF;
        INSERT INTO {s}.waiters (key, holder_id, pid, expires_at)
            VALUES (p_key, p_holder_id, pg_backend_pid(),
                    v_now + p_ticket_ttl_ms * interval '1 millisecond')
            RETURNING ticket INTO v_ticket;
        -- Taken before the ticket is visible to anyone: nobody sees it without its lock.
        IF NOT pg_try_advisory_lock(p_magic, (v_ticket % 2147483647)::integer) THEN
            RAISE EXCEPTION USING ERRCODE = 'BT003', MESSAGE = format(
                'advisory lock (%s, %s) of waiter ticket %s is held by another session',
                p_magic, (v_ticket % 2147483647)::integer, v_ticket);
        END IF;
    END IF;
    RETURN QUERY SELECT 'queued'::text, NULL::integer, NULL::bigint, v_lim, v_ticket, v_live,
        v_ahead,
        CASE WHEN v_next IS NULL THEN NULL
             ELSE greatest(0, ceil(extract(epoch FROM (v_next - clock_timestamp())) * 1000))::bigint
        END,
        NULL::bigint;
END
$fn$;

CREATE OR REPLACE FUNCTION {s}.release(
    p_key text, p_slot integer, p_token bigint, p_holder_id text, p_channel text)
RETURNS integer
LANGUAGE plpgsql AS $fn$
DECLARE
    v_live boolean;
BEGIN
    DELETE FROM {s}.leases l
        WHERE l.key = p_key AND l.slot = p_slot AND l.token = p_token
          AND l.holder_id = p_holder_id
        RETURNING l.expires_at > clock_timestamp() INTO v_live;
    IF NOT FOUND THEN
        RETURN 0;
    END IF;
    -- A release lost in a crash brings the lease back until its TTL ends: late, never
    -- unsafe. So the release does not wait for the WAL flush.
    PERFORM set_config('synchronous_commit', 'off', true);
    -- Wake the key's waiters, if it has any. A waiter queueing right now cannot be
    -- missed: its attempt locks the key's lease rows (FOR UPDATE), so either the DELETE
    -- above waited for its ticket to commit, or its attempt sees the lease gone.
    IF EXISTS (SELECT 1 FROM {s}.waiters w WHERE w.key = p_key) THEN
        PERFORM pg_notify(p_channel, p_key);
    END IF;
    RETURN CASE WHEN v_live THEN 1 ELSE 2 END;
END
$fn$;

CREATE OR REPLACE FUNCTION {s}.leave(
    p_key text, p_ticket bigint, p_magic integer, p_channel text)
RETURNS void
LANGUAGE plpgsql AS $fn$
BEGIN
    PERFORM set_config('synchronous_commit', 'off', true);
    DELETE FROM {s}.waiters w WHERE w.ticket = p_ticket AND w.key = p_key;
    IF FOUND THEN
        -- Waiters behind it may be served now.
        PERFORM pg_notify(p_channel, p_key);
    END IF;
    IF EXISTS (SELECT 1 FROM pg_locks
               WHERE locktype = 'advisory' AND pid = pg_backend_pid()
                 AND classid = p_magic::oid AND objid = (p_ticket % 2147483647)::oid
                 AND objsubid = 2) THEN
        PERFORM pg_advisory_unlock(p_magic, (p_ticket % 2147483647)::integer);
    END IF;
END
$fn$;
"#
    )
}
