//! What lives in Redis, and the Lua scripts that change it (one script per operation, so
//! every operation is atomic on the server).
//!
//! Every baton key `K` is a set of Redis keys under the base `PREFIX:{K}` (the hash tag
//! keeps them together, as a Redis Cluster would need):
//!
//! | Redis key | type | holds |
//! |---|---|---|
//! | `B:meta` | hash | `v` = `1`, `limit`, `delay_ms` (the lock-delay; 0 = none) |
//! | `B:token` | string | the fencing counter (`INCR`) |
//! | `B:holders` | sorted set | member = slot number, score = the lease's renewal counter |
//! | `B:slot:N` | hash | the lease in slot N: `grant` (request id), `hid` (holder id), `token`, `ttl` (ms), `holder` (JSON), `acq`/`ren` (server ms, display only), `lost` (`0`/`1`), `lost_ms` |
//! | `B:ticket` | string | the arrival counter of waiters |
//! | `B:waiters` | sorted set | member = request id, score = arrival ticket (FIFO) |
//! | `B:wcount` | sorted set | member = request id, score = the waiter's refresh counter |
//! | `B:winfo` | hash | request id → `TTL_MS|HOLDER_ID|holder JSON` (`TTL_MS|holder JSON` from older versions) |
//! | `B:wake:ID` | list | the waiter's own wake-up list (`BLPOP`); one push per hand-off: `1` (look again) or `g SLOT TOKEN` (the release granted it that slot) |
//!
//! Guarantees: a script checks every record it reads before it writes anything (Redis
//! does not roll a script back), and answers `CORRUPT <what is wrong>` for anything baton
//! does not write, so damage is reported, never repaired or obeyed. The server's clock
//! (`TIME`) only stamps records for display; no script compares it with anything.

use baton_core::{Error, Key};

/// The base name of `key`'s Redis keys under `prefix`.
pub(crate) fn base(prefix: &str, key: &Key) -> String {
    format!("{prefix}:{{{}}}", key.as_str())
}

/// The base name of barrier `key`'s Redis keys (barriers and locks of one name do not
/// interfere).
pub(crate) fn barrier_base(prefix: &str, key: &Key) -> String {
    format!("{prefix}:b:{{{}}}", key.as_str())
}

/// The glob `list` scans for, and how to read a key back from a match.
pub(crate) fn meta_pattern(prefix: &str) -> String {
    format!("{prefix}:{{*}}:meta")
}

/// The key part of a `meta` key name found by [`meta_pattern`].
pub(crate) fn key_of_meta<'a>(prefix: &str, name: &'a str) -> Option<&'a str> {
    name.strip_prefix(prefix)?
        .strip_prefix(":{")?
        .strip_suffix("}:meta")
}

/// A waiter record's TTL (ms) and holder JSON (`TTL_MS|HOLDER_ID|JSON`, or an older
/// version's `TTL_MS|JSON`).
pub(crate) fn waiter_info(v: &str) -> Option<(u64, &str)> {
    let (t, rest) = v.split_once('|')?;
    let ttl = t.parse().ok()?;
    let json = match rest.split_once('|') {
        Some((hid, j)) if !hid.is_empty() && hid.bytes().all(|b| b.is_ascii_hexdigit()) => j,
        _ => rest,
    };
    Some((ttl, json))
}

/// `Corrupt`, as the scripts and the decoding say it.
pub(crate) fn corrupt(what: impl std::fmt::Display) -> Error {
    baton_core::kit::errors::corrupt(what, "(baton's Redis keys were changed by something else)")
}

/// Shared by every script: ARGV[1] is the base name.
pub(crate) const PRELUDE: &str = r#"
local B = ARGV[1]
local function now_ms()
  local t = redis.call('TIME')
  return tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
end
local function corrupt(msg) error({err = 'CORRUPT ' .. msg}) end
local function need(k, want)
  local t = redis.call('TYPE', k)['ok']
  if t ~= 'none' and t ~= want then
    corrupt(k .. ' is a ' .. t .. ' where baton keeps a ' .. want)
  end
  return t ~= 'none'
end
local function num(v)
  if not v then return nil end
  local n = tonumber(v)
  if n == nil or n ~= math.floor(n) or n < 0 then return nil end
  return n
end
-- `cmd` on `k` (a record baton keeps as a `want`); the server's WRONGTYPE is answered as
-- the record that is not baton's, so a read needs no TYPE of its own.
local function rd(want, cmd, k, ...)
  local r = redis.pcall(cmd, k, ...)
  if type(r) == 'table' and r['err'] then
    if string.find(r['err'], 'WRONGTYPE', 1, true) then
      corrupt(k .. ' is a ' .. redis.call('TYPE', k)['ok'] .. ' where baton keeps a ' .. want)
    end
    error(r)
  end
  return r
end
local function load_meta()
  local k = B .. ':meta'
  local m = rd('hash', 'HMGET', k, 'v', 'limit', 'delay_ms')
  if not m[1] and not m[2] and not m[3] and redis.call('EXISTS', k) == 0 then return nil end
  local lim, d = num(m[2]), num(m[3])
  if m[1] ~= '1' or lim == nil or lim < 1 or d == nil then
    corrupt(k .. ' is not baton\'s key record (v=1, limit, delay_ms)')
  end
  return {limit = lim, delay = d}
end
local function check_counter(k)
  local v = rd('string', 'GET', k)
  if v and num(v) == nil then corrupt(k .. ' does not hold a counter') end
end
local function load_holders()
  local hk = B .. ':holders'
  local z = rd('zset', 'ZRANGE', hk, 0, -1, 'WITHSCORES')
  local out = {}
  for i = 1, #z, 2 do
    local slot, count = z[i], z[i + 1]
    local sk = B .. ':slot:' .. slot
    local r = num(slot) ~= nil and rd('hash', 'HMGET', sk, 'grant', 'token', 'ttl', 'lost', 'holder', 'acq', 'ren', 'hid', 'lost_ms')
    if not r or (not r[1] and redis.call('EXISTS', sk) == 0) then
      corrupt(hk .. ' names slot ' .. slot .. ' without its record ' .. sk)
    end
    if not r[1] or num(r[2]) == nil or num(r[3]) == nil or (r[4] ~= '0' and r[4] ~= '1') or not r[5] then
      corrupt('the holder record ' .. sk .. ' is not baton\'s (grant, token, ttl, lost, holder)')
    end
    out[#out + 1] = {slot = slot, count = count, grant = r[1], token = r[2], ttl = r[3],
      lost = r[4], holder = r[5], acq = r[6] or '0', ren = r[7] or '0', hid = r[8] or '',
      lost_ms = r[9] or '0'}
  end
  return out
end
local function check_waiters()
  need(B .. ':waiters', 'zset'); need(B .. ':wcount', 'zset'); need(B .. ':winfo', 'hash')
  check_counter(B .. ':ticket')
end
local function load_waiters(n)
  local out = {}
  if n <= 0 then return out end
  local ids = redis.call('ZRANGE', B .. ':waiters', 0, n - 1)
  for _, id in ipairs(ids) do
    local c = redis.call('ZSCORE', B .. ':wcount', id)
    local info = redis.call('HGET', B .. ':winfo', id)
    if not c or not info then
      corrupt('the waiter ' .. id .. ' of ' .. B .. ':waiters has no refresh count or record')
    end
    out[#out + 1] = {id = id, count = c, info = info}
  end
  return out
end
local function remove_waiter(id)
  local r = redis.call('ZRANK', B .. ':waiters', id)
  redis.call('ZREM', B .. ':waiters', id)
  redis.call('ZREM', B .. ':wcount', id)
  redis.call('HDEL', B .. ':winfo', id)
  redis.call('DEL', B .. ':wake:' .. id)
  return r
end
local function push(id)
  local wk = B .. ':wake:' .. id
  redis.call('LPUSH', wk, '1')
  redis.call('PEXPIRE', wk, 3600000)
end
local function wake_ranks(from, to)
  if to <= from then return end
  for _, id in ipairs(redis.call('ZRANGE', B .. ':waiters', from, to - 1)) do push(id) end
end
local function free_slots(limit)
  return limit - redis.call('ZCARD', B .. ':holders')
end
local function wake_eligible(limit)
  wake_ranks(0, free_slots(limit))
end
"#;

/// One attempt to acquire. ARGV: base, request id, limit, TTL ms, holder JSON, holder id,
/// lock-delay ms, mode (`wait` queues the request, `nowait` does not), the number of
/// claims, then per claim five values: `h` slot grant count lost (a lease seen unchanged
/// for its TTL, or dead) or `w` id - count - (a waiter seen unrefreshed for its TTL).
///
/// Answers `granted slot token now_ms`, `mismatch limit`, or `queued|busy held limit
/// ahead delay_ms nh [slot grant count lost ttl holder]*nh nw [id count info]*nw`.
pub(crate) const ATTEMPT: &str = r#"
local id, limit, ttl, holder, hid, delay, mode = ARGV[2], tonumber(ARGV[3]), ARGV[4], ARGV[5], ARGV[6], tonumber(ARGV[7]), ARGV[8]
local meta = load_meta()
local holders = load_holders()
check_counter(B .. ':token')
local n, i, freed = tonumber(ARGV[9]), 10, false
-- The queue's records are checked before the first write that needs them; a grant with no
-- claims to a request not in the queue reads only B:waiters (checked by its ZRANK).
local checked = false
local function check_queue()
  if not checked then check_waiters(); checked = true end
end
if meta == nil then
  check_queue()
  meta = {limit = limit, delay = delay}
  redis.call('HSET', B .. ':meta', 'v', '1', 'limit', limit, 'delay_ms', delay)
elseif meta.limit ~= limit then
  return {'mismatch', meta.limit}
end
if n > 0 then check_queue() end
local now = now_ms()
local byslot = {}
for _, h in ipairs(holders) do byslot[h.slot] = h end
for c = 1, n do
  local kind, a, g, cnt, lost = ARGV[i], ARGV[i + 1], ARGV[i + 2], ARGV[i + 3], ARGV[i + 4]
  i = i + 5
  if kind == 'h' then
    local h = byslot[a]
    if h and h.grant == g and tonumber(h.count) == tonumber(cnt) and h.lost == lost then
      if lost == '0' and meta.delay > 0 then
        redis.call('HSET', B .. ':slot:' .. a, 'lost', '1', 'lost_ms', now)
        redis.call('ZINCRBY', B .. ':holders', 1, a)
      else
        redis.call('DEL', B .. ':slot:' .. a)
        redis.call('ZREM', B .. ':holders', a)
        freed = true
      end
      byslot[a] = nil
    end
  elseif kind == 'w' then
    local sc = redis.call('ZSCORE', B .. ':wcount', a)
    if sc and tonumber(sc) == tonumber(cnt) then remove_waiter(a); freed = true end
  end
end
if n > 0 then holders = load_holders() end
for _, h in ipairs(holders) do
  if h.grant == id and h.lost == '0' then
    -- Granted before (by a release, or an attempt whose answer was lost): what the
    -- release pushed to its list is not needed.
    redis.call('DEL', B .. ':wake:' .. id)
    return {'granted', h.slot, h.token, h.acq}
  end
end
local rank = rd('zset', 'ZRANK', B .. ':waiters', id)
local ahead = rank or redis.call('ZCARD', B .. ':waiters')
if rank then check_queue() end
local free = meta.limit - #holders
if ahead < free then
  local taken = {}
  for _, h in ipairs(holders) do taken[h.slot] = true end
  local slot = 0
  while taken[tostring(slot)] do slot = slot + 1 end
  local tok = redis.call('INCR', B .. ':token')
  redis.call('HSET', B .. ':slot:' .. slot, 'grant', id, 'hid', hid, 'token', tok, 'ttl', ttl,
    'holder', holder, 'acq', now, 'ren', now, 'lost', '0', 'lost_ms', '0')
  redis.call('ZADD', B .. ':holders', 0, slot)
  if rank then remove_waiter(id) end
  if freed then wake_eligible(meta.limit) end
  return {'granted', slot, tok, now}
end
check_queue()
local status = 'busy'
if mode == 'wait' then
  status = 'queued'
  if rank then
    redis.call('ZINCRBY', B .. ':wcount', 1, id)
  else
    local t = redis.call('INCR', B .. ':ticket')
    redis.call('ZADD', B .. ':waiters', t, id)
    redis.call('ZADD', B .. ':wcount', 0, id)
    redis.call('HSET', B .. ':winfo', id, ttl .. '|' .. hid .. '|' .. holder)
  end
end
if freed then wake_eligible(meta.limit) end
local out = {status, #holders, meta.limit, ahead, meta.delay, #holders}
for _, h in ipairs(holders) do
  out[#out + 1] = h.slot; out[#out + 1] = h.grant; out[#out + 1] = h.count
  out[#out + 1] = h.lost; out[#out + 1] = h.ttl; out[#out + 1] = h.holder
end
local w = load_waiters(ahead)
out[#out + 1] = #w
for _, x in ipairs(w) do
  out[#out + 1] = x.id; out[#out + 1] = x.count; out[#out + 1] = x.info
end
return out
"#;

/// Renews a lease. ARGV: base, slot, token. Answers `ok count`, `lost` (taken over or
/// broken, held back by the lock-delay) or `gone`.
pub(crate) const RENEW: &str = r#"
local slot, token = ARGV[2], ARGV[3]
local sk = B .. ':slot:' .. slot
local r = rd('hash', 'HMGET', sk, 'token', 'lost')
if tonumber(r[1]) ~= tonumber(token) or not rd('zset', 'ZSCORE', B .. ':holders', slot) then return {'gone'} end
if r[2] ~= '0' then return {'lost'} end
local c = redis.call('ZINCRBY', B .. ':holders', 1, slot)
redis.call('HSET', sk, 'ren', now_ms())
return {'ok', c}
"#;

/// Releases a lease. ARGV: base, slot, token. Answers `released` or `not_held`; a
/// release hands the slot to exactly one waiter: the one its freeing made eligible. When
/// that slot is the only free one, the release grants it to the head of the queue itself
/// (`INCR`, the slot record from the waiter's record, the queue entry removed) and pushes
/// `g SLOT TOKEN`, so the waiter needs no script of its own; else it pushes `1` and the
/// waiter's next attempt takes the slot.
pub(crate) const RELEASE: &str = r#"
local slot, token = ARGV[2], ARGV[3]
local sk, hk = B .. ':slot:' .. slot, B .. ':holders'
local r = rd('hash', 'HMGET', sk, 'token', 'lost')
if tonumber(r[1]) ~= tonumber(token) or r[2] ~= '0' then return {'not_held'} end
local meta = load_meta()
-- The waiter the freed slot makes eligible, read before anything is written.
local card = rd('zset', 'ZCARD', hk)
local mine = redis.call('ZSCORE', hk, slot)
local next_id, free, g = nil, 0, nil
if meta then
  free = meta.limit - card + (mine and 1 or 0)
  if free > 0 then next_id = rd('zset', 'ZRANGE', B .. ':waiters', free - 1, free - 1)[1] end
end
if next_id and free == 1 and mine then
  check_waiters()
  check_counter(B .. ':token')
  local info = redis.call('HGET', B .. ':winfo', next_id)
  if not info then corrupt('the waiter ' .. next_id .. ' of ' .. B .. ':waiters has no record') end
  local t, h, j = string.match(info, '^(%d+)|(%x+)|(.*)$')
  if t then g = {ttl = t, hid = h, holder = j} end
end
redis.call('DEL', sk)
redis.call('ZREM', hk, slot)
if g then
  local tok = redis.call('INCR', B .. ':token')
  local now = now_ms()
  redis.call('HSET', sk, 'grant', next_id, 'hid', g.hid, 'token', tok, 'ttl', g.ttl,
    'holder', g.holder, 'acq', now, 'ren', now, 'lost', '0', 'lost_ms', '0')
  redis.call('ZADD', hk, 0, slot)
  remove_waiter(next_id)
  local wk = B .. ':wake:' .. next_id
  redis.call('LPUSH', wk, 'g ' .. slot .. ' ' .. tok)
  redis.call('PEXPIRE', wk, 3600000)
elseif next_id then
  push(next_id)
end
return {'released'}
"#;

/// Withdraws a request that gives up: its queue entry goes, and a grant it got that its
/// caller never received is released. ARGV: base, request id. Answers `ok`.
pub(crate) const WITHDRAW: &str = r#"
local id = ARGV[2]
local meta = load_meta()
if not meta then return {'ok'} end
local holders = load_holders()
check_waiters()
local changed = remove_waiter(id) ~= nil
for _, h in ipairs(holders) do
  if h.grant == id and h.lost == '0' then
    redis.call('DEL', B .. ':slot:' .. h.slot)
    redis.call('ZREM', B .. ':holders', h.slot)
    changed = true
  end
end
if changed then wake_eligible(meta.limit) end
return {'ok'}
"#;

/// A key's state. ARGV: base. Answers `none`, or `key limit delay token nwaiters nh
/// [slot token hid holder acq ren ttl lost lost_ms count]*nh nw [TTL_MS|holder]*nw`.
pub(crate) const INSPECT: &str = r#"
local meta = load_meta()
if not meta then return {'none'} end
local holders = load_holders()
check_counter(B .. ':token')
check_waiters()
local out = {'key', meta.limit, meta.delay, redis.call('GET', B .. ':token') or '0',
  redis.call('ZCARD', B .. ':waiters'), #holders}
for _, h in ipairs(holders) do
  for _, v in ipairs({h.slot, h.token, h.hid, h.holder, h.acq, h.ren, h.ttl, h.lost, h.lost_ms, h.count}) do
    out[#out + 1] = v
  end
end
local infos = redis.call('HVALS', B .. ':winfo')
out[#out + 1] = #infos
for _, v in ipairs(infos) do out[#out + 1] = v end
return out
"#;

/// Breaks leases. ARGV: base, holder id (empty: every holder). Answers `none`, or
/// `broken n [slot token holder acq was_live]*n`.
pub(crate) const BREAK: &str = r#"
local hid = ARGV[2]
local meta = load_meta()
if not meta then return {'none'} end
local holders = load_holders()
check_waiters()
local now = now_ms()
local out, n = {'broken', 0}, 0
for _, h in ipairs(holders) do
  if hid == '' or h.hid == hid then
    local live = h.lost == '0'
    if live and meta.delay > 0 then
      redis.call('HSET', B .. ':slot:' .. h.slot, 'lost', '1', 'lost_ms', now)
      redis.call('ZINCRBY', B .. ':holders', 1, h.slot)
    elseif live then
      redis.call('DEL', B .. ':slot:' .. h.slot)
      redis.call('ZREM', B .. ':holders', h.slot)
    end
    n = n + 1
    for _, v in ipairs({h.slot, h.token, h.holder, h.acq, live and '1' or '0'}) do out[#out + 1] = v end
  end
end
out[2] = n
wake_eligible(meta.limit)
return out
"#;

/// Changes a key's limit (never evicting). ARGV: base, limit, and the limit it replaces
/// (empty: whatever it is). Answers `none`, `ok`, or `changed LIMIT` (the limit is not the
/// one it was to replace; nothing was written).
pub(crate) const RESIZE: &str = r#"
local meta = load_meta()
if not meta then return {'none'} end
if ARGV[3] ~= '' and tonumber(ARGV[3]) ~= meta.limit then return {'changed', tostring(meta.limit)} end
load_holders()
check_waiters()
redis.call('HSET', B .. ':meta', 'limit', tonumber(ARGV[2]))
wake_eligible(tonumber(ARGV[2]))
return {'ok'}
"#;

/// Deletes a key nobody holds or waits for. ARGV: base. Answers `none`, `ok`, or
/// `in_use HELD WAITING LOST` (nothing was written). The token counter stays, so a key
/// made again goes on from it.
pub(crate) const DELETE: &str = r#"
local meta = load_meta()
if not meta then return {'none'} end
local holders = load_holders()
check_waiters()
local held, lost = 0, 0
for _, h in ipairs(holders) do
  if h.lost == '1' then lost = lost + 1 else held = held + 1 end
end
local waiting = redis.call('ZCARD', B .. ':waiters')
if held + lost + waiting > 0 then
  return {'in_use', tostring(held), tostring(waiting), tostring(lost)}
end
for i = 0, meta.limit - 1 do redis.call('DEL', B .. ':slot:' .. i) end
redis.call('DEL', B .. ':meta', B .. ':holders', B .. ':waiters', B .. ':wcount', B .. ':winfo')
return {'ok'}
"#;

/// Barrier keys, under the base `PREFIX:b:{K}`: `B:gen` (hash: `gen`, the next
/// generation's number, and `parties` while one waits), `B:arr` (sorted set: arrival id →
/// refresh counter), `B:ainfo` (arrival id → `TTL_MS|holder JSON`), `B:done` (arrival id →
/// the generation it passed in, until the party reads it) and `B:wake:ID`.
pub(crate) const BARRIER_PRELUDE: &str = r#"
local function check_barrier()
  need(B .. ':gen', 'hash'); need(B .. ':arr', 'zset'); need(B .. ':ainfo', 'hash')
  need(B .. ':done', 'hash')
  local g = redis.call('HGET', B .. ':gen', 'gen')
  if g and num(g) == nil then corrupt(B .. ':gen does not hold a generation number') end
end
local function claim_arrivals(from)
  local n = tonumber(ARGV[from])
  local i = from + 1
  for c = 1, n do
    local id, cnt = ARGV[i], ARGV[i + 1]
    i = i + 2
    local sc = redis.call('ZSCORE', B .. ':arr', id)
    if sc and tonumber(sc) == tonumber(cnt) then
      redis.call('ZREM', B .. ':arr', id)
      redis.call('HDEL', B .. ':ainfo', id)
    end
  end
end
local function snapshot(status, id)
  local out = {status}
  local z = redis.call('ZRANGE', B .. ':arr', 0, -1, 'WITHSCORES')
  for i = 1, #z, 2 do
    if z[i] ~= id then
      out[#out + 1] = z[i]; out[#out + 1] = z[i + 1]
      out[#out + 1] = redis.call('HGET', B .. ':ainfo', z[i]) or ''
    end
  end
  return out
end
local function taken(id)
  local g = redis.call('HGET', B .. ':done', id)
  if g then redis.call('HDEL', B .. ':done', id) end
  return g
end
"#;

/// A party arrives. ARGV: base, arrival id, parties, `TTL_MS|holder`, the number of
/// claims, then per claim: id count. Answers `passed gen`, `mismatch parties`, or
/// `waiting [id count info]*` (the other arrivals).
pub(crate) const BARRIER_ARRIVE: &str = r#"
local id, parties, info = ARGV[2], tonumber(ARGV[3]), ARGV[4]
check_barrier()
local g = taken(id)
if g then return {'passed', g} end
claim_arrivals(5)
local cur = redis.call('HGET', B .. ':gen', 'parties')
local n = redis.call('ZCARD', B .. ':arr')
local mine = redis.call('ZSCORE', B .. ':arr', id)
if n > 0 and cur and tonumber(cur) ~= parties then return {'mismatch', cur} end
if not mine then
  redis.call('ZADD', B .. ':arr', 0, id)
  redis.call('HSET', B .. ':ainfo', id, info)
  redis.call('HSET', B .. ':gen', 'parties', parties)
  n = n + 1
end
if n >= parties then
  local gen = redis.call('HGET', B .. ':gen', 'gen') or '0'
  for _, other in ipairs(redis.call('ZRANGE', B .. ':arr', 0, -1)) do
    if other ~= id then
      redis.call('HSET', B .. ':done', other, gen)
      push(other)
    end
  end
  redis.call('PEXPIRE', B .. ':done', 86400000)
  redis.call('DEL', B .. ':arr', B .. ':ainfo')
  redis.call('HSET', B .. ':gen', 'gen', tonumber(gen) + 1)
  redis.call('HDEL', B .. ':gen', 'parties')
  return {'passed', gen}
end
return snapshot('waiting', id)
"#;

/// A waiting party looks again (and refreshes its arrival). ARGV: base, arrival id, the
/// number of claims, then per claim: id count. Answers `passed gen`, `gone` (its arrival
/// was taken as dead) or `waiting [id count info]*`.
pub(crate) const BARRIER_LOOK: &str = r#"
local id = ARGV[2]
check_barrier()
local g = taken(id)
if g then return {'passed', g} end
claim_arrivals(3)
if not redis.call('ZSCORE', B .. ':arr', id) then return {'gone'} end
redis.call('ZINCRBY', B .. ':arr', 1, id)
return snapshot('waiting', id)
"#;

/// A party gives up. ARGV: base, arrival id. Answers `passed gen` when its generation
/// passed meanwhile, else `withdrawn`.
pub(crate) const BARRIER_LEAVE: &str = r#"
local id = ARGV[2]
check_barrier()
local g = taken(id)
redis.call('DEL', B .. ':wake:' .. id)
if g then return {'passed', g} end
redis.call('ZREM', B .. ':arr', id)
redis.call('HDEL', B .. ':ainfo', id)
if redis.call('ZCARD', B .. ':arr') == 0 then redis.call('HDEL', B .. ':gen', 'parties') end
return {'withdrawn'}
"#;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_round_trip() {
        let k = Key::new("a/b.c-d").expect("key");
        let b = base("baton", &k);
        assert_eq!(b, "baton:{a/b.c-d}");
        assert_eq!(key_of_meta("baton", &format!("{b}:meta")), Some("a/b.c-d"));
        assert_eq!(key_of_meta("baton", "baton:{x}:token"), None);
        assert_eq!(meta_pattern("p"), "p:{*}:meta");
    }
}
