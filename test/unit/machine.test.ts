// Table-driven tests of the record state machine (vault/core/machine.ts). Every
// row names its input and the exact decision expected; expected records are
// spelled out field by field rather than computed with the code under test.
import { describe, it, expect } from 'vitest';
import {
  decideRecoverBegin,
  decideRecoverFinish,
  decideEnroll,
  decideDelete,
  decideExpiry,
  destroyed,
} from '../../vault/core/machine.js';
import type { StoredRecord } from '../../vault/store/records.js';
import { ErrorCodes } from '../../protocol/errors.js';

const CREATED = 1_600_000_000_000;
const BEFORE = 1_650_000_000_000;
const NOW = 1_700_000_000_000;
const LIMIT = 5;
const GEN = 3;

/** An active record of generation 3 with 5 allowed guesses and all its secrets. */
function active(p: Partial<StoredRecord> = {}): StoredRecord {
  return {
    userId: 'alice',
    state: 'active',
    generation: GEN,
    attempts: 0,
    attemptLimit: LIMIT,
    verifier: new Uint8Array([0xa1, 0xa2, 0xa3]),
    sealed: new Uint8Array([0x51, 0x52, 0x53, 0x54]),
    sealEpoch: 2,
    kdf: { alg: 'argon2id', m: 19456, t: 2, p: 1 },
    createdAt: CREATED,
    updatedAt: BEFORE,
    ...p,
  };
}

/** What a lockout or delete leaves behind, as stored. */
function gone(state: 'locked' | 'deleted', p: Partial<StoredRecord> = {}): StoredRecord {
  return active({ state, verifier: null, sealed: null, sealEpoch: null, kdf: null, ...p });
}

/** `r` destroyed at NOW into `state`, spelled out. */
function destroyedAtNow(r: StoredRecord, state: 'locked' | 'deleted'): StoredRecord {
  return {
    userId: r.userId,
    state,
    generation: r.generation,
    attempts: r.attempts,
    attemptLimit: r.attemptLimit,
    verifier: null,
    sealed: null,
    sealEpoch: null,
    kdf: null,
    createdAt: r.createdAt,
    updatedAt: NOW,
  };
}

const NOT_FOUND = { ok: false, code: ErrorCodes.RECORD_NOT_FOUND } as const;
const LOCKED = { ok: false, code: ErrorCodes.LOCKED } as const;

/** Runs `fn` and checks it left its input record untouched (the functions are pure). */
function pure<T>(rec: StoredRecord | undefined, fn: (r: StoredRecord | undefined) => T): T {
  const before = rec ? structuredClone(rec) : undefined;
  const out = fn(rec);
  expect(rec).toEqual(before);
  return out;
}

describe('destroyed', () => {
  it.each([
    { state: 'locked' as const, input: active({ attempts: 5 }) },
    { state: 'deleted' as const, input: active({ attempts: 2, generation: 9 }) },
    { state: 'deleted' as const, input: gone('locked', { attempts: 5 }) },
  ])('→ $state drops verifier, sealed, sealEpoch and kdf and keeps the rest', ({ state, input }) => {
    const out = pure(input, (r) => destroyed(r!, state, NOW));
    expect(out).toStrictEqual(destroyedAtNow(input, state));
    expect(out.verifier).toBeNull();
    expect(out.sealed).toBeNull();
    expect(out.sealEpoch).toBeNull();
    expect(out.kdf).toBeNull();
  });
});

describe('decideRecoverBegin(rec, pending, now)', () => {
  it.each([
    { name: 'absent record', rec: undefined, pending: 0, want: NOT_FOUND },
    { name: 'deleted record', rec: gone('deleted'), pending: 0, want: NOT_FOUND },
    { name: 'locked record', rec: gone('locked', { attempts: 5 }), pending: 0, want: LOCKED },
    { name: 'locked record with a pending guess', rec: gone('locked', { attempts: 5 }), pending: 1, want: LOCKED },
    {
      name: 'active, no attempts yet: spends one',
      rec: active({ attempts: 0 }),
      pending: 0,
      want: { ok: true, change: active({ attempts: 1, updatedAt: NOW }), attemptsLeft: 4 },
    },
    {
      name: 'active, below the limit with guesses pending: still spends one',
      rec: active({ attempts: 2 }),
      pending: 2,
      want: { ok: true, change: active({ attempts: 3, updatedAt: NOW }), attemptsLeft: 2 },
    },
    {
      name: 'active, one below the limit: spends the last attempt',
      rec: active({ attempts: 4 }),
      pending: 0,
      want: { ok: true, change: active({ attempts: 5, updatedAt: NOW }), attemptsLeft: 0 },
    },
    {
      name: 'limit 1, no attempts yet: spends the only attempt',
      rec: active({ attempts: 0, attemptLimit: 1 }),
      pending: 0,
      want: { ok: true, change: active({ attempts: 1, attemptLimit: 1, updatedAt: NOW }), attemptsLeft: 0 },
    },
    {
      name: 'at the limit with a guess pending: refuses, keeps the record',
      rec: active({ attempts: 5 }),
      pending: 1,
      want: LOCKED,
    },
    {
      name: 'at the limit, nothing pending: refuses and destroys',
      rec: active({ attempts: 5 }),
      pending: 0,
      want: { ok: false, code: ErrorCodes.LOCKED, change: destroyedAtNow(active({ attempts: 5 }), 'locked') },
    },
    {
      name: 'over the limit, nothing pending: refuses and destroys',
      rec: active({ attempts: 7 }),
      pending: 0,
      want: { ok: false, code: ErrorCodes.LOCKED, change: destroyedAtNow(active({ attempts: 7 }), 'locked') },
    },
    {
      name: 'over the limit with guesses pending: refuses, keeps the record',
      rec: active({ attempts: 7 }),
      pending: 3,
      want: LOCKED,
    },
  ])('$name', ({ rec, pending, want }) => {
    expect(pure(rec, (r) => decideRecoverBegin(r, pending, NOW))).toStrictEqual(want);
  });
});

describe('decideRecoverFinish(rec, sessionGeneration, verified, pending, now)', () => {
  it.each([
    { name: 'absent record', rec: undefined, gen: GEN, verified: true, pending: 0, want: NOT_FOUND },
    { name: 'deleted record, verified', rec: gone('deleted'), gen: GEN, verified: true, pending: 0, want: NOT_FOUND },
    { name: 'locked record, verified', rec: gone('locked', { attempts: 5 }), gen: GEN, verified: true, pending: 0, want: LOCKED },
    {
      name: 'locked record, not verified',
      rec: gone('locked', { attempts: 5 }),
      gen: GEN,
      verified: false,
      pending: 0,
      want: LOCKED,
    },
    {
      name: 'generation mismatch (re-enrolled since begin), verified',
      rec: active({ attempts: 1, generation: 4 }),
      gen: 3,
      verified: true,
      pending: 0,
      want: { ok: false, code: ErrorCodes.SESSION_EXPIRED },
    },
    {
      name: 'generation mismatch (session newer than record), verified',
      rec: active({ attempts: 1 }),
      gen: GEN + 1,
      verified: true,
      pending: 0,
      want: { ok: false, code: ErrorCodes.SESSION_EXPIRED },
    },
    {
      name: 'generation mismatch at the limit, not verified, nothing pending: expires, does not destroy',
      rec: active({ attempts: 5, generation: 4 }),
      gen: 3,
      verified: false,
      pending: 0,
      want: { ok: false, code: ErrorCodes.SESSION_EXPIRED },
    },
    {
      name: 'verified below the limit: resets attempts',
      rec: active({ attempts: 3 }),
      gen: GEN,
      verified: true,
      pending: 0,
      want: { ok: true, outcome: 'ok', change: active({ attempts: 0, updatedAt: NOW }) },
    },
    {
      name: 'verified on the last attempt with nothing pending: resets, does not lock',
      rec: active({ attempts: 5 }),
      gen: GEN,
      verified: true,
      pending: 0,
      want: { ok: true, outcome: 'ok', change: active({ attempts: 0, updatedAt: NOW }) },
    },
    {
      name: 'verified at the limit with other guesses pending: resets',
      rec: active({ attempts: 5 }),
      gen: GEN,
      verified: true,
      pending: 2,
      want: { ok: true, outcome: 'ok', change: active({ attempts: 0, updatedAt: NOW }) },
    },
    {
      name: 'wrong password below the limit: no change',
      rec: active({ attempts: 2 }),
      gen: GEN,
      verified: false,
      pending: 0,
      want: { ok: true, outcome: 'wrong-password', attemptsLeft: 3 },
    },
    {
      name: 'wrong password below the limit with guesses pending: no change',
      rec: active({ attempts: 4 }),
      gen: GEN,
      verified: false,
      pending: 1,
      want: { ok: true, outcome: 'wrong-password', attemptsLeft: 1 },
    },
    {
      name: 'wrong password at the limit, another guess pending: not yet locked',
      rec: active({ attempts: 5 }),
      gen: GEN,
      verified: false,
      pending: 1,
      want: { ok: true, outcome: 'wrong-password', attemptsLeft: 0 },
    },
    {
      name: 'wrong password at the limit, nothing pending: locks and destroys',
      rec: active({ attempts: 5 }),
      gen: GEN,
      verified: false,
      pending: 0,
      want: { ok: true, outcome: 'locked', change: destroyedAtNow(active({ attempts: 5 }), 'locked') },
    },
    {
      name: 'wrong password over the limit, nothing pending: locks and destroys',
      rec: active({ attempts: 6 }),
      gen: GEN,
      verified: false,
      pending: 0,
      want: { ok: true, outcome: 'locked', change: destroyedAtNow(active({ attempts: 6 }), 'locked') },
    },
    {
      name: 'wrong password over the limit, guess pending: attemptsLeft clamps to 0',
      rec: active({ attempts: 6 }),
      gen: GEN,
      verified: false,
      pending: 1,
      want: { ok: true, outcome: 'wrong-password', attemptsLeft: 0 },
    },
  ])('$name', ({ rec, gen, verified, pending, want }) => {
    expect(pure(rec, (r) => decideRecoverFinish(r, gen, verified, pending, NOW))).toStrictEqual(want);
  });
});

describe('decideEnroll(rec, grantGeneration)', () => {
  const EXISTS = { ok: false, code: ErrorCodes.RECORD_EXISTS } as const;
  it.each([
    { name: 'absent, no grant: generation 1', rec: undefined, grant: undefined, want: { ok: true, generation: 1 } },
    { name: 'absent, stray grant: generation 1', rec: undefined, grant: 5, want: { ok: true, generation: 1 } },
    { name: 'active, no grant: refused', rec: active(), grant: undefined, want: EXISTS },
    { name: 'active, grant for this generation: next generation', rec: active(), grant: GEN, want: { ok: true, generation: GEN + 1 } },
    { name: 'active, grant for an older generation: refused', rec: active(), grant: GEN - 1, want: EXISTS },
    { name: 'active, grant for a newer generation: refused', rec: active(), grant: GEN + 1, want: EXISTS },
    { name: 'active, grant 0: refused', rec: active(), grant: 0, want: EXISTS },
    { name: 'locked, no grant: next generation', rec: gone('locked', { attempts: 5 }), grant: undefined, want: { ok: true, generation: GEN + 1 } },
    { name: 'deleted, no grant: next generation', rec: gone('deleted', { generation: 7 }), grant: undefined, want: { ok: true, generation: 8 } },
    { name: 'deleted, stale grant: next generation', rec: gone('deleted', { generation: 7 }), grant: 2, want: { ok: true, generation: 8 } },
  ])('$name', ({ rec, grant, want }) => {
    expect(pure(rec, (r) => decideEnroll(r, grant))).toStrictEqual(want);
  });
});

describe('decideDelete(rec, now)', () => {
  it.each([
    { name: 'absent: not found', rec: undefined, want: NOT_FOUND },
    { name: 'already deleted: not found', rec: gone('deleted'), want: NOT_FOUND },
    {
      name: 'active: destroyed as deleted',
      rec: active({ attempts: 2 }),
      want: { ok: true, change: destroyedAtNow(active({ attempts: 2 }), 'deleted') },
    },
    {
      name: 'locked: becomes deleted',
      rec: gone('locked', { attempts: 5 }),
      want: { ok: true, change: destroyedAtNow(gone('locked', { attempts: 5 }), 'deleted') },
    },
  ])('$name', ({ rec, want }) => {
    expect(pure(rec, (r) => decideDelete(r, NOW))).toStrictEqual(want);
  });
});

describe('decideExpiry(rec, generation, pending, now)', () => {
  it.each([
    { name: 'absent: nothing', rec: undefined, gen: GEN, pending: 0, want: undefined },
    { name: 'locked: nothing', rec: gone('locked', { attempts: 5 }), gen: GEN, pending: 0, want: undefined },
    { name: 'deleted: nothing', rec: gone('deleted', { attempts: 5 }), gen: GEN, pending: 0, want: undefined },
    { name: 'active below the limit: nothing', rec: active({ attempts: 4 }), gen: GEN, pending: 0, want: undefined },
    { name: 'active at the limit, guess pending: nothing', rec: active({ attempts: 5 }), gen: GEN, pending: 1, want: undefined },
    {
      name: 'active at the limit, other generation: nothing',
      rec: active({ attempts: 5, generation: 4 }),
      gen: 3,
      pending: 0,
      want: undefined,
    },
    {
      name: 'active at the limit, last guess expired: destroyed as locked',
      rec: active({ attempts: 5 }),
      gen: GEN,
      pending: 0,
      want: destroyedAtNow(active({ attempts: 5 }), 'locked'),
    },
    {
      name: 'active over the limit, last guess expired: destroyed as locked',
      rec: active({ attempts: 6 }),
      gen: GEN,
      pending: 0,
      want: destroyedAtNow(active({ attempts: 6 }), 'locked'),
    },
  ])('$name', ({ rec, gen, pending, want }) => {
    expect(pure(rec, (r) => decideExpiry(r, gen, pending, NOW))).toStrictEqual(want);
  });
});

// Invariants over a sweep of states, counters and pending guesses: any record a
// decision produces that is not active carries no secret, and nothing is
// destroyed while a counted guess may still prove the password.
describe('invariants over a sweep of inputs', () => {
  const recs: (StoredRecord | undefined)[] = [undefined];
  for (const attempts of [0, 1, 4, 5, 6]) {
    recs.push(active({ attempts }), gone('locked', { attempts }), gone('deleted', { attempts }));
  }
  const changes: { from: string; pending: number; change: StoredRecord | undefined }[] = [];
  for (const rec of recs) {
    for (const pending of [0, 1, 3]) {
      const from = `${rec?.state ?? 'absent'}/${rec?.attempts ?? '-'}`;
      changes.push({ from, pending, change: decideRecoverBegin(rec, pending, NOW).change });
      for (const verified of [true, false]) {
        for (const gen of [GEN - 1, GEN]) {
          changes.push({ from, pending, change: decideRecoverFinish(rec, gen, verified, pending, NOW).change });
        }
      }
      changes.push({ from, pending, change: decideDelete(rec, NOW).change });
      changes.push({ from, pending, change: decideExpiry(rec, GEN, pending, NOW) });
    }
  }

  it('produced some destroyed records (the sweep is not empty)', () => {
    expect(changes.filter((c) => c.change && c.change.state !== 'active').length).toBeGreaterThan(10);
  });

  it('a locked or deleted record never carries verifier, sealed, sealEpoch or kdf', () => {
    for (const { from, change } of changes) {
      if (!change || change.state === 'active') continue;
      expect({ from, verifier: change.verifier, sealed: change.sealed, sealEpoch: change.sealEpoch, kdf: change.kdf }).toEqual({
        from,
        verifier: null,
        sealed: null,
        sealEpoch: null,
        kdf: null,
      });
    }
  });

  it('lockout never happens while a counted guess is pending', () => {
    for (const { from, pending, change } of changes) {
      // (decideDelete is an explicit user action and may delete at any time.)
      if (pending > 0 && change && from.startsWith('active')) {
        expect({ from, pending, locked: change.state === 'locked' }).toEqual({ from, pending, locked: false });
      }
    }
  });

  it('recover.begin never lets attempts exceed the limit', () => {
    for (const rec of recs) {
      const d = decideRecoverBegin(rec, 0, NOW);
      if (d.ok) expect(d.change.attempts).toBeLessThanOrEqual(d.change.attemptLimit);
    }
  });
});
