//! The store's tables and server-side functions, as SQL, for one schema: the text only
//! (the version, the shape it must have and the checks are in `schema.rs`). The schema
//! name is spliced in, quoted, after the URL parser has validated it.

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
    /// $6 holder_id, $7 holder_json, $8 ttl_ms, $9 magic, $10 ticket_ttl_ms, $11 refresh,
    /// $12 lock_delay_ms, $13 claims, $14 channel, $15 pid_ns)`; `claims` is a flat array of
    /// `(slot, token, renewals, lost 0/1)` quadruples, the rows the caller saw unchanged
    /// long enough to take over (or, held back, to free).
    pub attempt: String,
    /// `release($1 key, $2 slot, $3 token, $4 holder_id, $5 channel)`: 0 not held (never,
    /// released before, taken over, broken), 1 released.
    pub release: String,
    /// `leave($1 key, $2 ticket, $3 magic, $4 channel)`: an abandoned wait's cleanup.
    pub leave: String,
    /// Renews a lease (its renewal count goes up by one): `$1 key, $2 slot, $3 token,
    /// $4 holder_id, $5 ttl_ms`.
    pub renew: String,
    /// The version row.
    pub version: String,
    /// Inserts the version row.
    pub set_version: String,
    /// The columns of the schema's tables.
    pub columns: String,
    /// The functions present in the schema.
    pub functions: String,
    /// A key's row: `lim, seq, lock_delay_ms`.
    pub key_row: String,
    /// A key's leases, with the server's stamps (display only) and whether the server's
    /// clock says a TTL passed since the last renewal (a hint for `status`, never a decision).
    pub lease_rows: String,
    /// Live waiters of a key (`$1 key, $2 magic`).
    pub live_waiters: String,
    /// Every key.
    pub list: String,
    /// Breaks a key's leases (of one holder when `$2` is not null), returning them: deletes
    /// them, or, when the key has a lock-delay, marks them lost (held back).
    pub break_leases: String,
    /// Sets a key's limit (`$2`) if it is still the limit read (`$3`).
    pub resize: String,
    /// Wakes a key's waiters.
    pub notify: String,
    /// `delete_key($1 key, $2 magic)`: `found, held, waiting, held_back`; deleted when
    /// found and all three are 0.
    pub delete: String,
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
    key           text PRIMARY KEY,
    lim           integer NOT NULL,
    seq           bigint NOT NULL,
    lock_delay_ms bigint NOT NULL DEFAULT 0
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
    renewals    bigint NOT NULL DEFAULT 0,
    ttl_ms      bigint NOT NULL,
    lost        boolean NOT NULL DEFAULT false,
    lost_at     timestamptz,
    pid_ns      text,
    PRIMARY KEY (key, slot)
);
-- Version 1 to 2: leases get a renewal counter, their TTL and a lost mark; keys a
-- lock-delay. A version 1 lease's TTL is what its server stamps say.
ALTER TABLE {s}.keys ADD COLUMN IF NOT EXISTS lock_delay_ms bigint NOT NULL DEFAULT 0;
ALTER TABLE {s}.leases ADD COLUMN IF NOT EXISTS renewals bigint NOT NULL DEFAULT 0;
ALTER TABLE {s}.leases ADD COLUMN IF NOT EXISTS ttl_ms bigint;
UPDATE {s}.leases SET ttl_ms = greatest(1, ceil(extract(epoch FROM expires_at - renewed_at) * 1000))::bigint
    WHERE ttl_ms IS NULL;
ALTER TABLE {s}.leases ALTER COLUMN ttl_ms SET NOT NULL;
ALTER TABLE {s}.leases ADD COLUMN IF NOT EXISTS lost boolean NOT NULL DEFAULT false;
ALTER TABLE {s}.leases ADD COLUMN IF NOT EXISTS lost_at timestamptz;
ALTER TABLE {s}.leases ADD COLUMN IF NOT EXISTS pid_ns text;
DROP FUNCTION IF EXISTS {s}.attempt(text, integer, boolean, bigint, boolean, text, text, bigint,
                                    integer, bigint, boolean);
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
-- Version 3: the token floors of deleted keys.
CREATE TABLE IF NOT EXISTS {s}.retired_keys (
    key text PRIMARY KEY,
    seq bigint NOT NULL
);
"#
            ),
            create_functions: functions(&s),
            attempt: format!(
                "SELECT o_outcome, o_slot, o_token, o_lim, o_ticket, o_held, o_ahead, o_now_ms, \
                 o_delay_ms, o_rows, o_holders \
                 FROM {s}.attempt($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12, $13, $14, $15)"
            ),
            release: format!("SELECT {s}.release($1, $2, $3, $4, $5)"),
            leave: format!("SELECT {s}.leave($1, $2, $3, $4)::text"),
            renew: format!(
                "UPDATE {s}.leases SET renewals = renewals + 1, ttl_ms = $5, \
                 expires_at = clock_timestamp() + $5::float8 * interval '1 millisecond', \
                 renewed_at = clock_timestamp() \
                 WHERE key = $1 AND slot = $2 AND token = $3 AND holder_id = $4 AND NOT lost"
            ),
            version: format!("SELECT value FROM {s}.meta WHERE name = 'schema_version'"),
            set_version: format!(
                "INSERT INTO {s}.meta AS m (name, value) VALUES ('schema_version', $1) \
                 ON CONFLICT (name) DO UPDATE SET value = EXCLUDED.value WHERE m.value IN ('1', '2')"
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
            key_row: format!("SELECT lim, seq, lock_delay_ms FROM {s}.keys WHERE key = $1"),
            lease_rows: format!(
                "SELECT slot, token, holder_id, holder_json, \
                 (extract(epoch FROM acquired_at) * 1000)::float8, \
                 (extract(epoch FROM renewed_at) * 1000)::float8, \
                 (extract(epoch FROM expires_at) * 1000)::float8, \
                 lost, expires_at <= clock_timestamp(), pid_ns \
                 FROM {s}.leases WHERE key = $1 ORDER BY slot"
            ),
            live_waiters: format!(
                "SELECT count(*) FROM {s}.waiters w WHERE w.key = $1 \
                 AND w.expires_at > clock_timestamp() \
                 AND NOT pg_try_advisory_xact_lock_shared($2, (w.ticket % 2147483647)::integer)"
            ),
            list: format!("SELECT key FROM {s}.keys ORDER BY key"),
            break_leases: format!(
                "WITH k AS (SELECT lock_delay_ms AS delay FROM {s}.keys WHERE key = $1), \
                 held_back AS (UPDATE {s}.leases l SET lost = true, lost_at = clock_timestamp() \
                   FROM k WHERE l.key = $1 AND k.delay > 0 AND NOT l.lost \
                   AND ($2::text IS NULL OR l.holder_id = $2) \
                   RETURNING l.slot, l.token, l.holder_json, \
                   (extract(epoch FROM l.acquired_at) * 1000)::float8, true AS held_back), \
                 gone AS (DELETE FROM {s}.leases l USING k WHERE l.key = $1 AND k.delay <= 0 \
                   AND ($2::text IS NULL OR l.holder_id = $2) \
                   RETURNING l.slot, l.token, l.holder_json, \
                   (extract(epoch FROM l.acquired_at) * 1000)::float8, false AS held_back) \
                 SELECT * FROM held_back UNION ALL SELECT * FROM gone"
            ),
            resize: format!("UPDATE {s}.keys SET lim = $2 WHERE key = $1 AND lim = $3"),
            notify: "SELECT pg_notify($1, $2)::text".to_owned(),
            delete: format!(
                "SELECT o_found, o_held, o_waiting, o_back FROM {s}.delete_key($1, $2)"
            ),
        }
    }
}

fn functions(s: &str) -> String {
    format!(
        r#"
CREATE OR REPLACE FUNCTION {s}.attempt(
    p_key text, p_lim integer, p_check_lim boolean, p_ticket bigint, p_queue boolean,
    p_holder_id text, p_holder_json text, p_ttl_ms bigint, p_magic integer,
    p_ticket_ttl_ms bigint, p_refresh boolean, p_lock_delay_ms bigint, p_claims bigint[],
    p_channel text, p_pid_ns text)
RETURNS TABLE(o_outcome text, o_slot integer, o_token bigint, o_lim integer,
              o_ticket bigint, o_held integer, o_ahead integer, o_now_ms bigint,
              o_delay_ms bigint, o_rows bigint[], o_holders text[])
LANGUAGE plpgsql AS $fn$
DECLARE
    v_lim integer;
    v_seq bigint;
    v_delay bigint;
    v_max bigint;
    v_live integer := 0;
    v_slots integer[] := '{{}}';
    v_avail integer;
    v_mine boolean := false;
    v_bad boolean := false;
    v_ahead integer := 0;
    v_slot integer;
    v_token bigint;
    v_now timestamptz;
    v_ticket bigint := p_ticket;
    v_types text;
    v_pid integer;
    v_rows bigint[] := '{{}}';
    v_holders text[] := '{{}}';
    v_claimed boolean;
    v_freed boolean := false;
    -- The caller's boot id and PID namespace: only holders that ran in the same PID
    -- namespace since the same boot can be judged dead by their PID (the caller then
    -- checks host and boot id too), so only their details are sent back.
    v_boot text := nullif(p_holder_json::json ->> 'boot_id', '');
    i integer;
    r record;
BEGIN
    -- A queued waiter looks without locks first: while it cannot be served it answers
    -- without writing anything (no transaction id, no WAL, no flush), so a release that
    -- wakes many waiters costs one write (the grant), not one per waiter. A look that
    -- claims a slot (below) always takes the locked path.
    IF p_ticket IS NOT NULL AND NOT p_refresh AND cardinality(p_claims) = 0 THEN
        SELECT k.lim, k.seq, k.lock_delay_ms,
               pg_typeof(k.lim)::text || ' ' || pg_typeof(k.seq)::text || ' '
               || pg_typeof(k.lock_delay_ms)::text
            INTO v_lim, v_seq, v_delay, v_types FROM {s}.keys k WHERE k.key = p_key;
        IF FOUND AND v_types = 'integer bigint bigint' AND v_lim BETWEEN 1 AND 1000000
           AND v_seq >= 0 AND v_delay >= 0 AND NOT (p_check_lim AND v_lim <> p_lim) THEN
            v_now := clock_timestamp();
            FOR r IN SELECT l.slot AS slot, l.token AS token, l.renewals AS renewals,
                            l.ttl_ms AS ttl_ms, l.lost AS lost, l.holder_json AS holder_json,
                            l.pid_ns AS pid_ns
                     FROM {s}.leases l WHERE l.key = p_key ORDER BY l.slot LOOP
                v_live := v_live + 1;
                IF r.slot IS NULL OR r.slot < 0 OR r.token IS NULL OR r.token < 1
                   OR r.renewals IS NULL OR r.ttl_ms IS NULL OR r.ttl_ms < 1
                   OR r.lost IS NULL THEN
                    v_bad := true;
                ELSE
                    v_rows := v_rows || ARRAY[r.slot::bigint, r.token, r.renewals, r.ttl_ms,
                                              CASE WHEN r.lost THEN 1 ELSE 0 END];
                    v_holders := v_holders || CASE WHEN r.pid_ns = p_pid_ns
                                                        AND strpos(r.holder_json, v_boot) > 0
                                                   THEN r.holder_json END;
                END IF;
            END LOOP;
            IF v_bad THEN
                -- A row baton did not write: the locked path below names it.
                v_avail := -1;
            ELSE
                v_avail := greatest(v_lim - v_live, 0);
            END IF;
            SELECT w.pid INTO v_pid FROM {s}.waiters w WHERE w.ticket = p_ticket;
            v_mine := FOUND;
            IF v_mine AND v_pid IS DISTINCT FROM pg_backend_pid() THEN
                RAISE EXCEPTION USING ERRCODE = 'BT002', MESSAGE = format(
                    'the waiter''s server session changed (backend pid %s, now %s): '
                    'a transaction-mode pooler (PgBouncer pool_mode=transaction) is '
                    'between baton and PostgreSQL; connect directly or use session pooling',
                    v_pid, pg_backend_pid());
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
                    p_ticket, v_live, v_ahead, NULL::bigint, v_delay, v_rows, v_holders;
                RETURN;
            END IF;
            v_live := 0;
            v_ahead := 0;
            v_mine := false;
            v_rows := '{{}}';
            v_holders := '{{}}';
        END IF;
    END IF;
    SELECT k.lim, k.seq, k.lock_delay_ms,
           pg_typeof(k.lim)::text || ' ' || pg_typeof(k.seq)::text || ' '
           || pg_typeof(k.lock_delay_ms)::text
        INTO v_lim, v_seq, v_delay, v_types FROM {s}.keys k WHERE k.key = p_key FOR UPDATE;
    IF NOT FOUND THEN
        INSERT INTO {s}.keys AS k (key, lim, seq, lock_delay_ms)
            VALUES (p_key, p_lim,
                    coalesce((SELECT rk.seq FROM {s}.retired_keys rk WHERE rk.key = p_key), 0),
                    greatest(coalesce(p_lock_delay_ms, 0), 0))
            ON CONFLICT (key) DO NOTHING;
        SELECT k.lim, k.seq, k.lock_delay_ms,
               pg_typeof(k.lim)::text || ' ' || pg_typeof(k.seq)::text || ' '
               || pg_typeof(k.lock_delay_ms)::text
            INTO v_lim, v_seq, v_delay, v_types FROM {s}.keys k WHERE k.key = p_key FOR UPDATE;
    END IF;
    IF v_types IS DISTINCT FROM 'integer bigint bigint' THEN
        RAISE EXCEPTION USING ERRCODE = 'BT001', MESSAGE = format(
            'the keys table''s lim, seq and lock_delay_ms columns are %s, not integer bigint '
            'bigint: the table was altered by hand', v_types);
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
    IF v_delay IS NULL OR v_delay < 0 THEN
        RAISE EXCEPTION USING ERRCODE = 'BT001', MESSAGE = format(
            'the keys row of %s holds the lock-delay %s, not a number of milliseconds',
            p_key, coalesce(v_delay::text, 'NULL'));
    END IF;
    IF p_check_lim AND v_lim <> p_lim THEN
        RETURN QUERY SELECT 'mismatch'::text, NULL::integer, NULL::bigint, v_lim,
            NULL::bigint, NULL::integer, NULL::integer, NULL::bigint, v_delay,
            NULL::bigint[], NULL::text[];
        RETURN;
    END IF;
    v_now := clock_timestamp();
    v_max := v_seq;
    -- No lease ends by the server's clock (a wall clock, which may step). A lease row goes
    -- only when it is released, broken, or claimed: a waiter names it by slot, token,
    -- renewal count and state after it saw that exact row unchanged for the lease's TTL
    -- (or, held back, for the key's lock-delay) on its own monotonic clock, or saw its
    -- holder's process gone on its own host. The rows are locked first, so a renewal
    -- racing the claim either commits before it (the count moved: the claim fails) or
    -- finds the row gone or held back (its renew answers lost).
    FOR r IN SELECT l.slot AS slot, l.token AS token, l.renewals AS renewals,
                    l.ttl_ms AS ttl_ms, l.lost AS lost, l.holder_json AS holder_json,
                    l.pid_ns AS pid_ns,
                    pg_typeof(l.slot)::text || ' ' || pg_typeof(l.token)::text || ' '
                    || pg_typeof(l.renewals)::text || ' ' || pg_typeof(l.ttl_ms)::text
                    || ' ' || pg_typeof(l.lost)::text AS types
             FROM {s}.leases l WHERE l.key = p_key ORDER BY l.slot FOR UPDATE LOOP
        IF r.types IS DISTINCT FROM 'integer bigint bigint bigint boolean' THEN
            RAISE EXCEPTION USING ERRCODE = 'BT001', MESSAGE = format(
                'the leases table''s slot, token, renewals, ttl_ms and lost columns are %s, '
                'not integer bigint bigint bigint boolean: the table was altered by hand',
                r.types);
        END IF;
        IF r.slot IS NULL OR r.slot < 0 OR r.token IS NULL OR r.token < 1
           OR r.renewals IS NULL OR r.ttl_ms IS NULL OR r.ttl_ms < 1 OR r.lost IS NULL THEN
            RAISE EXCEPTION USING ERRCODE = 'BT001', MESSAGE = format(
                'a leases row of %s holds slot %s, token %s, TTL %s: not a lease baton wrote',
                p_key, coalesce(r.slot::text, 'NULL'), coalesce(r.token::text, 'NULL'),
                coalesce(r.ttl_ms::text, 'NULL'));
        END IF;
        v_max := greatest(v_max, r.token);
        v_claimed := false;
        i := 1;
        WHILE i + 3 <= cardinality(p_claims) LOOP
            IF p_claims[i] = r.slot AND p_claims[i + 1] = r.token
               AND p_claims[i + 2] = r.renewals
               AND p_claims[i + 3] = r.lost::integer THEN
                v_claimed := true;
            END IF;
            i := i + 4;
        END LOOP;
        IF v_claimed AND NOT r.lost AND v_delay > 0 THEN
            -- Lost, not released: the slot is held back for the key's lock-delay.
            UPDATE {s}.leases l SET lost = true, lost_at = v_now
                WHERE l.key = p_key AND l.slot = r.slot;
            v_freed := true;
            v_live := v_live + 1;
            v_slots := v_slots || r.slot;
            v_rows := v_rows || ARRAY[r.slot::bigint, r.token, r.renewals, r.ttl_ms, 1];
            v_holders := v_holders || CASE WHEN r.pid_ns = p_pid_ns
                                                AND strpos(r.holder_json, v_boot) > 0
                                           THEN r.holder_json END;
        ELSIF v_claimed THEN
            DELETE FROM {s}.leases l WHERE l.key = p_key AND l.slot = r.slot;
            v_freed := true;
        ELSE
            v_live := v_live + 1;
            v_slots := v_slots || r.slot;
            v_rows := v_rows || ARRAY[r.slot::bigint, r.token, r.renewals, r.ttl_ms,
                                      CASE WHEN r.lost THEN 1 ELSE 0 END];
            v_holders := v_holders || CASE WHEN r.pid_ns = p_pid_ns
                                                AND strpos(r.holder_json, v_boot) > 0
                                           THEN r.holder_json END;
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
    IF v_freed AND v_ahead > 0 THEN
        -- A claimed slot is for the first in line, which may be another waiter.
        PERFORM pg_notify(p_channel, p_key);
    END IF;
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
                                renewed_at, expires_at, renewals, ttl_ms, lost, pid_ns)
        VALUES (p_key, v_slot, v_token, p_holder_id, p_holder_json, v_now, v_now,
                v_now + p_ttl_ms * interval '1 millisecond', 0, p_ttl_ms, false, p_pid_ns);
        IF p_ticket IS NOT NULL THEN
            DELETE FROM {s}.waiters w WHERE w.ticket = p_ticket;
            PERFORM pg_advisory_unlock(p_magic, (p_ticket % 2147483647)::integer);
        END IF;
        RETURN QUERY SELECT 'granted'::text, v_slot, v_token, v_lim, NULL::bigint, v_live,
            v_ahead, floor(extract(epoch FROM v_now) * 1000)::bigint, v_delay,
            NULL::bigint[], NULL::text[];
        RETURN;
    END IF;
    IF NOT v_freed THEN
        -- Nothing below needs to survive a crash: a ticket lives no longer than its
        -- session, and a swept dead waiter or a refreshed expiry can be redone. Only
        -- grants and claims wait for the WAL flush.
        PERFORM set_config('synchronous_commit', 'off', true);
    END IF;
    IF NOT p_queue THEN
        RETURN QUERY SELECT 'busy'::text, NULL::integer, NULL::bigint, v_lim, NULL::bigint,
            v_live, v_ahead, NULL::bigint, v_delay, v_rows, v_holders;
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
        v_ahead, NULL::bigint, v_delay, v_rows, v_holders;
END
$fn$;

CREATE OR REPLACE FUNCTION {s}.release(
    p_key text, p_slot integer, p_token bigint, p_holder_id text, p_channel text)
RETURNS integer
LANGUAGE plpgsql AS $fn$
BEGIN
    -- A lease held back after it was lost (taken over, broken) is not its holder's any
    -- more: releasing it answers not held and leaves the lock-delay running.
    DELETE FROM {s}.leases l
        WHERE l.key = p_key AND l.slot = p_slot AND l.token = p_token
          AND l.holder_id = p_holder_id AND NOT l.lost;
    IF NOT FOUND THEN
        RETURN 0;
    END IF;
    -- A release lost in a crash brings the lease back until a waiter sees it unrenewed
    -- for its TTL: late, never unsafe. So the release does not wait for the WAL flush.
    PERFORM set_config('synchronous_commit', 'off', true);
    -- Wake the key's waiters, if it has any. A waiter queueing right now cannot be
    -- missed: its attempt locks the key's lease rows (FOR UPDATE), so either the DELETE
    -- above waited for its ticket to commit, or its attempt sees the lease gone.
    IF EXISTS (SELECT 1 FROM {s}.waiters w WHERE w.key = p_key) THEN
        PERFORM pg_notify(p_channel, p_key);
    END IF;
    RETURN 1;
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

CREATE OR REPLACE FUNCTION {s}.delete_key(p_key text, p_magic integer)
RETURNS TABLE(o_found boolean, o_held bigint, o_waiting bigint, o_back bigint)
LANGUAGE plpgsql AS $fn$
DECLARE
    v_seq bigint;
    v_held bigint;
    v_back bigint;
    v_last bigint;
    v_waiting bigint;
BEGIN
    -- The key row's lock first: an attempt takes it before it grants or queues, so none
    -- is half done, and each statement below sees every attempt that committed.
    SELECT k.seq INTO v_seq FROM {s}.keys k WHERE k.key = p_key FOR UPDATE;
    IF NOT FOUND THEN
        RETURN QUERY SELECT false, 0::bigint, 0::bigint, 0::bigint;
        RETURN;
    END IF;
    -- A lost lease's row holds its slot back until a waiter frees it on its own clock;
    -- the server's clock does not decide that here either.
    SELECT count(*) FILTER (WHERE NOT l.lost),
           count(*) FILTER (WHERE l.lost),
           max(l.token)
        INTO v_held, v_back, v_last FROM {s}.leases l WHERE l.key = p_key;
    SELECT count(*) INTO v_waiting FROM {s}.waiters w WHERE w.key = p_key
        AND w.expires_at > clock_timestamp()
        AND NOT pg_try_advisory_xact_lock_shared(p_magic, (w.ticket % 2147483647)::integer);
    IF v_held + v_back + v_waiting > 0 THEN
        RETURN QUERY SELECT true, v_held, v_waiting, v_back;
        RETURN;
    END IF;
    -- A key made again takes its tokens on from here.
    INSERT INTO {s}.retired_keys AS rk (key, seq)
        VALUES (p_key, greatest(v_seq, coalesce(v_last, 0)))
        ON CONFLICT (key) DO UPDATE SET seq = greatest(rk.seq, excluded.seq);
    DELETE FROM {s}.leases l WHERE l.key = p_key;
    DELETE FROM {s}.waiters w WHERE w.key = p_key;
    DELETE FROM {s}.keys k WHERE k.key = p_key;
    RETURN QUERY SELECT true, 0::bigint, 0::bigint, 0::bigint;
END
$fn$;
"#
    )
}
