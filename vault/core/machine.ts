// The decision logic for one record, as pure functions:
// (stored record, request facts) → (outcome, record change). No I/O and no
// clock reads, so every rule below is covered directly by table-driven tests.
//
// States: absent (no row) | active | locked (destroyed by lockout) | deleted.
// Rule of the vault: an attempt is spent at recover.begin, before anything
// that depends on the guess leaves; a correct password resets the count; the
// record is destroyed once the limit is spent and no counted guess is pending.
import { ErrorCodes, type ErrorCode } from '../../protocol/errors.js';
import type { StoredRecord } from '../store/records.js';

export type Refusal = { ok: false; code: ErrorCode; change?: StoredRecord };

/** The record with its secrets dropped: what a locked or deleted user leaves behind. */
export function destroyed(rec: StoredRecord, state: 'locked' | 'deleted', now: number): StoredRecord {
  return { ...rec, state, verifier: null, sealed: null, sealEpoch: null, kdf: null, updatedAt: now };
}

function refuseInactive(rec: StoredRecord | undefined): Refusal | undefined {
  if (!rec || rec.state === 'deleted') return { ok: false, code: ErrorCodes.RECORD_NOT_FOUND };
  if (rec.state === 'locked') return { ok: false, code: ErrorCodes.LOCKED };
  return undefined;
}

export type BeginDecision = Refusal | { ok: true; change: StoredRecord; attemptsLeft: number };

/** recover.begin: spend one attempt, or refuse. `pending` = other counted guesses not yet finished. */
export function decideRecoverBegin(rec: StoredRecord | undefined, pending: number, now: number): BeginDecision {
  const inactive = refuseInactive(rec);
  if (inactive) return inactive;
  const r = rec!;
  if (r.attempts >= r.attemptLimit) {
    // Every allowed guess is spent. While one is still in flight it may yet be the
    // right password, so only refuse; once none is, the record is destroyed.
    if (pending > 0) return { ok: false, code: ErrorCodes.LOCKED };
    return { ok: false, code: ErrorCodes.LOCKED, change: destroyed(r, 'locked', now) };
  }
  const attempts = r.attempts + 1;
  return { ok: true, change: { ...r, attempts, updatedAt: now }, attemptsLeft: r.attemptLimit - attempts };
}

export type FinishDecision =
  | Refusal
  | { ok: true; outcome: 'ok'; change: StoredRecord }
  | { ok: true; outcome: 'wrong-password'; attemptsLeft: number; change?: undefined }
  | { ok: true; outcome: 'locked'; change: StoredRecord };

/** recover.finish once the HSM compared the verifier. */
export function decideRecoverFinish(
  rec: StoredRecord | undefined,
  sessionGeneration: number,
  verified: boolean,
  pending: number,
  now: number,
): FinishDecision {
  const inactive = refuseInactive(rec);
  if (inactive) return inactive;
  const r = rec!;
  // The user re-enrolled (or the row was swapped) since this guess was counted.
  if (r.generation !== sessionGeneration) return { ok: false, code: ErrorCodes.SESSION_EXPIRED };
  if (verified) return { ok: true, outcome: 'ok', change: { ...r, attempts: 0, updatedAt: now } };
  if (r.attempts >= r.attemptLimit && pending === 0) {
    return { ok: true, outcome: 'locked', change: destroyed(r, 'locked', now) };
  }
  return { ok: true, outcome: 'wrong-password', attemptsLeft: Math.max(0, r.attemptLimit - r.attempts) };
}

export type EnrollDecision = Refusal | { ok: true; generation: number };

/**
 * May this user enrol now? A fresh or destroyed user may; an active record is
 * replaced only with proof of its current password (a grant from a successful
 * recovery of this very generation).
 */
export function decideEnroll(rec: StoredRecord | undefined, grantGeneration: number | undefined): EnrollDecision {
  if (rec && rec.state === 'active' && grantGeneration !== rec.generation) {
    return { ok: false, code: ErrorCodes.RECORD_EXISTS };
  }
  return { ok: true, generation: (rec?.generation ?? 0) + 1 };
}

export type DeleteDecision = Refusal | { ok: true; change: StoredRecord };

export function decideDelete(rec: StoredRecord | undefined, now: number): DeleteDecision {
  if (!rec || rec.state === 'deleted') return { ok: false, code: ErrorCodes.RECORD_NOT_FOUND };
  return { ok: true, change: destroyed(rec, 'deleted', now) };
}

/** A session expired unfinished: destroy the record if that was the last counted guess at the limit. */
export function decideExpiry(rec: StoredRecord | undefined, generation: number, pending: number, now: number): StoredRecord | undefined {
  if (!rec || rec.state !== 'active' || rec.generation !== generation) return undefined;
  if (rec.attempts >= rec.attemptLimit && pending === 0) return destroyed(rec, 'locked', now);
  return undefined;
}
