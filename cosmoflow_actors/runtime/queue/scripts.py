"""The Lua scripts of the run queue: each reads and changes the queue's keys in one
atomic step on the server (see :mod:`cosmoflow_actors.runtime.queue` for the keys).

Each script's docstring names its KEYS and ARGV and what it returns.
"""

from __future__ import annotations

from typing import Final

FINISH: Final = """
if redis.call('GET', KEYS[1]) ~= ARGV[1] then return 0 end
redis.call('HSET', KEYS[2], ARGV[2], ARGV[3])
redis.call('XACK', KEYS[3], ARGV[4], ARGV[5])
redis.call('DEL', KEYS[1])
return 1
"""
"""Record a run's outcome, acknowledge its entry and drop its lease, if the lease is
still the caller's (KEYS: lease, runs, stream; ARGV: owner, run id, info, group, id)."""
_IDLE_UNTIL_EXPIRY: Final = """
local function idle_until_expiry(lease, stream, group, consumer, entry_id, lease_ms)
  local left = redis.call('PTTL', lease)
  local idle = math.max(0, tonumber(lease_ms) - left)
  redis.call('XCLAIM', stream, group, consumer, 0, entry_id, 'IDLE', idle)
end
"""
"""A Lua function: make the stream entry ``entry_id`` idle for ``lease_ms`` less the
milliseconds the lease key ``lease`` has left, so that it has been idle for a lease
(and a look for expired leases takes it over) when that lease expires, not a lease
after the look that found it held."""
_FOREIGN: Final = """
local function foreign(key)
  local kind = redis.call('TYPE', key)['ok']
  if kind == 'none' or kind == 'string' then return false end
  return kind
end
"""
"""A Lua function: the type of the key ``key`` when it holds another Redis type than a
string (a lease key someone else wrote: a queue writes a string there), else false.
The scripts below that read a lease say so then, where GET would fail with WRONGTYPE
and SET NX would find the key held for ever."""
CLAIM: Final = (
    _IDLE_UNTIL_EXPIRY
    + _FOREIGN
    + """
if redis.call('HGET', KEYS[2], ARGV[3]) ~= ARGV[4] then return 0 end
local kind = foreign(KEYS[1])
if kind then return {kind} end
if not redis.call('SET', KEYS[1], ARGV[1], 'NX', 'PX', ARGV[2]) then
  idle_until_expiry(KEYS[1], KEYS[4], ARGV[6], ARGV[1], ARGV[7], ARGV[2])
  return 0
end
redis.call('HSET', KEYS[2], ARGV[3], ARGV[5])
local passed = redis.call('HGET', KEYS[3], ARGV[3])
if not passed then return 1 end
redis.call('HDEL', KEYS[3], ARGV[3])
return passed
"""
)
"""Take the lease of a run and record it running, if its entry is still what the
caller read and no one holds the lease; forget who passed it over. When another
worker holds the lease, make the stream entry due when it expires (KEYS: lease, runs,
passed, stream; ARGV: owner, lease ms, run id, entry as read, entry running, group,
entry id). If taken, the passed-over note it forgot (for :data:`UNCLAIM`), or 1 when
there was none; 0 if not; ``{type}`` when the lease key holds another type (see
:data:`_FOREIGN`)."""
UNCLAIM: Final = """
if redis.call('GET', KEYS[1]) ~= ARGV[1] then return 0 end
redis.call('DEL', KEYS[1])
if redis.call('HGET', KEYS[2], ARGV[2]) ~= ARGV[3] then return 0 end
redis.call('HSET', KEYS[2], ARGV[2], ARGV[4])
if ARGV[5] ~= '' then redis.call('HSET', KEYS[3], ARGV[2], ARGV[5]) end
return 1
"""
"""Undo a :data:`CLAIM`: drop the lease KEYS[1] if ARGV[1] holds it, and then, if run
ARGV[2]'s entry in the hash KEYS[2] is still ARGV[3] (as the claim wrote it), put back
its entry as read, ARGV[4], and its passed-over note ARGV[5] in the hash KEYS[3] (none
when empty); 1 if put back. The run's stream entry is left as it is."""
HELD: Final = (
    _IDLE_UNTIL_EXPIRY
    + """
idle_until_expiry(KEYS[1], KEYS[2], ARGV[1], ARGV[2], ARGV[3], ARGV[4])
return 0
"""
)
"""Make the entry ARGV[3] of the stream KEYS[2] (group ARGV[1], now consumer
ARGV[2]'s) due when the lease KEYS[1] expires (ARGV[4]: the lease in ms)."""
_RUN_ID_OF: Final = """
local function run_id_of(fields)
  if not fields then return nil end
  for index = 1, #fields, 2 do
    if fields[index] == 'run_id' then return fields[index + 1] end
  end
  return nil
end
"""
"""A Lua function: the ``run_id`` field of a stream entry's fields (nil when none)."""
EXPIRED: Final = (
    _RUN_ID_OF
    + """
local cursor = ARGV[4]
for _ = 1, tonumber(ARGV[5]) do
  local reply = redis.call('XAUTOCLAIM', KEYS[1], ARGV[1], ARGV[2], ARGV[3], cursor, 'COUNT', 1)
  cursor = reply[1]
  local entry = reply[2][1]
  if entry and entry[2] then
    local run_id = run_id_of(entry[2])
    local data = run_id and redis.call('HGET', KEYS[2], run_id)
    return {cursor, entry[1], run_id or false, data or false}
  end
  if cursor == '0-0' then break end
end
return {cursor}
"""
)
"""Go on with the scan of the pending entries of the stream KEYS[1] (group ARGV[1])
from the cursor ARGV[4] for entries idle for at least ARGV[3] ms, taking over the first
one that is not deleted for consumer ARGV[2]; at most ARGV[5] steps. Returns the next
cursor ("0-0" once the scan is complete), then that entry's id, its run id (nil when
it has none) and what the hash KEYS[2] holds about the run (nil when nothing) if one
was taken."""
READ_NEW: Final = (
    _RUN_ID_OF
    + """
local reply = redis.call('XREADGROUP', 'GROUP', ARGV[1], ARGV[2], 'COUNT', 1,
  'STREAMS', KEYS[1], '>')
local entry = reply and reply[1][2][1]
if not entry then return {} end
local run_id = run_id_of(entry[2])
local data = run_id and redis.call('HGET', KEYS[2], run_id)
return {entry[1], run_id or false, data or false}
"""
)
"""Read a new entry of the stream KEYS[1] for consumer ARGV[2] of group ARGV[1], without
waiting; return its id, its run id (nil when it has none) and what the hash KEYS[2]
holds about the run (nil when nothing), or nothing when there is no new entry."""
PASS_OVER: Final = (
    _IDLE_UNTIL_EXPIRY
    + _FOREIGN
    + """
local kind = foreign(KEYS[2])
if kind then return {kind} end
if redis.call('EXISTS', KEYS[2]) == 1 then
  idle_until_expiry(KEYS[2], KEYS[3], ARGV[4], ARGV[2], ARGV[5], ARGV[6])
  return false
end
local function readable(saved)
  local ok, note = pcall(cjson.decode, saved)
  if not ok or type(note) ~= 'table' or type(note.by) ~= 'table' then return nil end
  local since = note.since
  if type(since) ~= 'number' or since ~= since or math.abs(since) == math.huge then
    return nil
  end
  local count = 0
  for index, name in pairs(note.by) do
    if type(index) ~= 'number' or type(name) ~= 'string' then return nil end
    count = count + 1
  end
  if count ~= #note.by then return nil end
  return note
end
local saved = redis.call('HGET', KEYS[1], ARGV[1])
local passed = saved and readable(saved) or {since = tonumber(ARGV[3]), by = {}}
local noted = false
for _, name in ipairs(passed.by) do
  if name == ARGV[2] then noted = true end
end
if not noted then table.insert(passed.by, ARGV[2]) end
local refused = ARGV[7] ~= '1' and passed.refused ~= true
if refused then passed.refused = true end
local served = ARGV[7] == '1' and passed.refused ~= true and redis.call('EXISTS', KEYS[4]) == 1
if served then passed.since = tonumber(ARGV[3]) end
local encoded = cjson.encode(passed)
if served or refused or not noted then redis.call('HSET', KEYS[1], ARGV[1], encoded) end
if served then
  redis.call('XCLAIM', KEYS[3], ARGV[4], ARGV[2], 0, ARGV[5], 'IDLE', ARGV[6])
  return false
end
return encoded
"""
)
"""Note that worker ARGV[2] passed run ARGV[1] over at ARGV[3] (Unix time) in the hash
KEYS[1] (a note there that is not what this script writes is replaced, as if there
were none); return the run's JSON ``{"since": time, "by": [workers]}``, the time being
that of the first pass, or of the last one that found the run's flow served. Returns
nil when a worker holds the run's lease KEYS[2] (it is no one's to pass over: its entry
ARGV[5] of the stream KEYS[3], group ARGV[4], is made due when the lease of ARGV[6] ms
expires), and nil as well when ARGV[7] is '1' and a live worker serves the run's flow
(its key KEYS[4] exists, see :data:`ADVERTISE`): the note's time is then this pass's,
and the entry is made idle for ARGV[6] ms, for the next worker that looks for expired
leases to take over. ARGV[7] is '' for a worker whose version of the flow does not fit
the run's record: the note then says ``"refused": true``, and no later pass heeds the
flow's key (the workers that serve the flow may be those that refused it).
``{type}`` when the lease key holds another type (see :data:`_FOREIGN`)."""
FAIL_PASSED: Final = """
if redis.call('HGET', KEYS[1], ARGV[1]) ~= ARGV[2] then return 0 end
if redis.call('EXISTS', KEYS[2]) == 1 then return 0 end
if ARGV[6] == '1' and redis.call('EXISTS', KEYS[4]) == 1 then
  redis.call('XCLAIM', KEYS[3], ARGV[4], ARGV[7], 0, ARGV[5], 'IDLE', ARGV[8])
  return 0
end
redis.call('HSET', KEYS[1], ARGV[1], ARGV[3])
redis.call('XACK', KEYS[3], ARGV[4], ARGV[5])
return 1
"""
"""Record run ARGV[1] failed (entry ARGV[3] in the hash KEYS[1]) and acknowledge its
entry ARGV[5] of the stream KEYS[3] (group ARGV[4]), if its entry in the hash is still
ARGV[2] (what the caller read), no worker holds its lease KEYS[2] and, when ARGV[6] is
'1', no live worker serves its flow (its key KEYS[4] does not exist, see
:data:`ADVERTISE`); 1 if done. A flow served gives the entry back instead, idle for
ARGV[8] ms (consumer ARGV[7]), for the next worker that looks for expired leases."""
ADVERTISE: Final = """
for _, key in ipairs(KEYS) do
  if redis.call('PTTL', key) < tonumber(ARGV[1]) then
    redis.call('SET', key, ARGV[2], 'PX', ARGV[1])
  end
end
return 0
"""
"""Say that worker ARGV[2] serves the flows whose keys are KEYS, for ARGV[1] ms: each
key names the worker and expires in ARGV[1] ms, unless it would expire later already
(another worker, of a longer lease, serves the flow too)."""
FAIL_AS_READ: Final = """
if redis.call('HGET', KEYS[1], ARGV[1]) ~= ARGV[2] then return 0 end
redis.call('HSET', KEYS[1], ARGV[1], ARGV[3])
redis.call('XACK', KEYS[2], ARGV[4], ARGV[5])
return 1
"""
"""Record run ARGV[1] failed (entry ARGV[3] in the hash KEYS[1]) and acknowledge its
entry ARGV[5] of the stream KEYS[2] (group ARGV[4]), if its entry in the hash is still
ARGV[2] (what the caller read); 1 if done. For a run no worker can take the lease of
(see :data:`_FOREIGN`)."""
RENEW: Final = """
local held = {}
for index, key in ipairs(KEYS) do
  if redis.call('GET', key) == ARGV[1] then
    held[index] = redis.call('PEXPIRE', key, ARGV[2])
  else
    held[index] = 0
  end
end
return held
"""
"""Extend each lease of KEYS to ARGV[2] ms if it is still held by ARGV[1]; for each,
1 if it was, else 0."""
_LEFT: Final = """
local function left(runs, run_id, claimed, marked)
  if redis.call('HGET', runs, run_id) == claimed then redis.call('HSET', runs, run_id, marked) end
end
"""
"""A Lua function: replace run ``run_id``'s entry in the hash ``runs`` by ``marked`` (the
entry as its claim wrote it, ``claimed``, marked to be resumed: see
``claims.Claim.resumes``) if it is still ``claimed``."""
RELEASE: Final = (
    _LEFT
    + """
if redis.call('GET', KEYS[1]) ~= ARGV[1] then return 0 end
redis.call('DEL', KEYS[1])
left(KEYS[2], ARGV[2], ARGV[3], ARGV[4])
return 1
"""
)
"""Drop the lease KEYS[1] if it is held by ARGV[1], and mark run ARGV[2]'s entry in the
hash KEYS[2] to be resumed (ARGV[4]) if it is still as the claim wrote it (ARGV[3]); 1
if the lease was ARGV[1]'s."""
HAND_BACK: Final = (
    _LEFT
    + """
if redis.call('GET', KEYS[1]) ~= ARGV[1] then return 0 end
redis.call('DEL', KEYS[1])
redis.call('XCLAIM', KEYS[2], ARGV[2], ARGV[1], 0, ARGV[3], 'IDLE', ARGV[4])
left(KEYS[3], ARGV[5], ARGV[6], ARGV[7])
return 1
"""
)
"""Drop the lease KEYS[1] if it is held by ARGV[1], make the entry ARGV[3] of the
stream KEYS[2] (group ARGV[2]) idle for ARGV[4] ms, so that a worker looking for
expired leases takes it over at once, and mark run ARGV[5]'s entry in the hash KEYS[3]
to be resumed (ARGV[7]) if it is still as the claim wrote it (ARGV[6]); 1 if the lease
was ARGV[1]'s."""
LEASE: Final = (
    _FOREIGN
    + """
local kind = foreign(KEYS[1])
return {
  not kind and redis.call('GET', KEYS[1]),
  redis.call('PTTL', KEYS[1]),
  redis.call('HGET', KEYS[2], ARGV[1]),
  kind,
}
"""
)
"""The holder of the lease KEYS[1] (nil when none), its milliseconds left (negative
when no one holds it), what the hash KEYS[2] holds about run ARGV[1] (nil when
nothing), and the lease key's type when it holds another type (nil when not; see
:data:`_FOREIGN`), read at one instant: a run that ends meanwhile drops its lease as
it records its outcome, so read apart they could show a finished run as orphaned."""
SUBMIT: Final = """
if redis.call('HSETNX', KEYS[1], ARGV[1], ARGV[2]) == 0 then return 0 end
redis.call('XADD', KEYS[2], '*', 'run_id', ARGV[1])
return 1
"""
"""Add run ARGV[1] (info ARGV[2]) to the hash KEYS[1] and the stream KEYS[2], unless
the hash has it already; 1 if it was added."""
REQUEUE: Final = """
if redis.call('HGET', KEYS[1], ARGV[1]) ~= ARGV[2] then return 0 end
redis.call('HSET', KEYS[1], ARGV[1], ARGV[3])
redis.call('HDEL', KEYS[3], ARGV[1])
redis.call('XADD', KEYS[2], '*', 'run_id', ARGV[1])
return 1
"""
"""Replace run ARGV[1]'s entry in the hash KEYS[1] by ARGV[3], forget who passed it
over (the hash KEYS[3]) and add the run to the stream KEYS[2] again, if its entry is
still ARGV[2] (what the caller read); 1 if done."""
