// The record port: where the vault's flows read a record and commit a change
// to it. Two implementations:
//
// - LocalRecordLog (single node): the step runs inside one SQLite transaction
//   of core/ledger.ts, and update() resolves once the batch is durable and its
//   root anchored in the HSM (commit-before-reveal). Exactly what the flows
//   did before the port existed.
// - CohortRecordLog (cohort, docs/COHORT.md): the step is the engine's
//   decide(); update() resolves once an etcd quorum committed it and the local
//   replica applied it (quorum-commit-before-reveal). The step may run more
//   than once (a lost compare), so it must have no effects of its own: effects
//   go after update() resolves, or in `committed`.
//
// In cohort mode the record's value in etcd also carries the guesses counted
// at recover.begin and not yet finished (id + expiry), so a node deciding to
// destroy a record at the limit sees guesses another node counted. Single
// node keeps them in its session table, as before, and `guesses` stays empty.
import { createHash } from 'node:crypto';
import { VaultError, ErrorCodes } from '../../protocol/errors.js';
import type { StoredRecord } from '../store/records.js';
import type { CohortLedger } from '../cohort/ledger.js';
import type { ObservedReplica, Replica } from '../cohort/replica.js';
import { decodeEnvelope } from '../cohort/envelope.js';
import type { Ledger } from './ledger.js';

/** A guess counted at recover.begin and not yet finished, as the cohort shares it. */
export interface PendingGuess {
  id: string;
  expiresAt: number;
}

export interface LogEntry {
  rec: StoredRecord | undefined;
  /** Cohort mode only; always empty on a single node. */
  guesses: readonly PendingGuess[];
}

export interface StepOut<R> {
  /** The record's next value; absent: no change (nothing written, nothing to wait for on a single node). */
  next?: LogEntry;
  result: R;
}

export type Step<R> = (cur: LogEntry) => StepOut<R>;

export interface RecordLog {
  readonly mode: 'single' | 'cohort';
  /** The local copy, possibly behind (cohort): for cheap pre-checks only; the decision is update()'s. */
  peek(key: string): LogEntry;
  /** The current record: a cohort node reads only after applying etcd's current revision. */
  read(key: string): Promise<LogEntry>;
  /**
   * Decide and commit one change to one record. Resolves with the step's result
   * once the change is durable and anchored (single) or quorum-committed and
   * applied here (cohort); throws (and nothing is revealed) otherwise.
   * `committed` runs as soon as the change is committed, before it is anchored
   * on a single node (the flows use it to mark a counted guess pending at once).
   */
  update<R>(key: string, step: Step<R>, committed?: (result: R) => void): Promise<R>;
}

export class LocalRecordLog implements RecordLog {
  readonly mode = 'single' as const;
  constructor(
    private readonly ledger: Ledger,
    /** ledger.sync(), through the vault (which remembers a failing anchor). */
    private readonly durable: () => Promise<void>,
  ) {}

  peek(key: string): LogEntry {
    return { rec: this.ledger.get(key), guesses: [] };
  }

  read(key: string): Promise<LogEntry> {
    try {
      return Promise.resolve(this.peek(key));
    } catch (e) {
      return Promise.reject(e);
    }
  }

  async update<R>(key: string, step: Step<R>, committed?: (result: R) => void): Promise<R> {
    const out = this.ledger.transaction(() => {
      const o = step({ rec: this.ledger.get(key), guesses: [] });
      if (o.next?.rec) this.ledger.put(o.next.rec);
      return o;
    });
    committed?.(out.result);
    if (out.next) await this.durable();
    return out.result;
  }
}

/** The engine's record id of a record key: SHA-256 hex (the id must be ≤ 128 hex digits; keys can be longer). */
export function cohortRecordId(key: string): string {
  return createHash('sha256').update('bkv-cohort-record-v1').update(key).digest('hex');
}

export class CohortRecordLog implements RecordLog {
  readonly mode = 'cohort' as const;
  constructor(
    private readonly ledger: CohortLedger,
    private readonly replica: Replica,
    /** Seconds from the call to the quorum commit applied here (metrics). */
    private readonly observe?: (seconds: number) => void,
    private readonly readRetryMs = 3_000,
  ) {}

  peek(key: string): LogEntry {
    const e = this.replica.get(this.ledger.recordKey(cohortRecordId(key)));
    if (!e) return { rec: undefined, guesses: [] };
    const env = decodeEnvelope(e.value);
    if (!env) throw corrupt();
    return decodeEntry(key, env.payload);
  }

  /**
   * Records at their limit with a counted guess still pending, by the latest such
   * guess's expiry. The node that counted the guess destroys the record when the
   * guess's session expires; if that node died, no one would: Vault.sweep asks for
   * the due ones here (dueForExpiry) and destroys them through etcd.
   */
  private readonly exhausted = new Map<string, number>();

  /** Keep `exhausted` current from what the replica applies (cohort/node.ts wires it). */
  follow(r: ObservedReplica): void {
    const prefix = this.ledger.recordPrefix();
    r.listen({
      apply: (ops) => {
        for (const op of ops) if (op.type === 'put' && op.key.startsWith(prefix)) this.note(op.value);
      },
      reset: () => this.rescan(),
    });
    this.rescan();
  }

  private rescan(): void {
    this.exhausted.clear();
    for (const k of this.replica.keys(this.ledger.recordPrefix())) this.note(this.replica.get(k)?.value);
  }

  private note(raw: Uint8Array | undefined): void {
    // Records are never removed (only marked locked or deleted): a value that is not a record is not ours.
    const w = raw ? wireOf(raw) : undefined;
    if (!w) return;
    if (w.r.state === 'active' && w.r.attempts >= w.r.attemptLimit && w.g.length > 0) {
      this.exhausted.set(w.k, Math.max(...w.g.map(([, expiresAt]) => expiresAt)));
    } else this.exhausted.delete(w.k);
  }

  /** Record keys at their limit whose every counted guess has expired by `now`. */
  dueForExpiry(now: number): string[] {
    const out: string[] = [];
    for (const [k, expiry] of this.exhausted) if (expiry <= now) out.push(k);
    return out;
  }

  /** The keys of live records sealed under an epoch older than `epoch`, as this replica holds them (rotation). */
  sealedBefore(epoch: number): string[] {
    const out: string[] = [];
    for (const k of this.replica.keys(this.ledger.recordPrefix())) {
      const w = wireOf(this.replica.get(k)!.value);
      if (w && w.r.state === 'active' && w.r.sealEpoch !== null && w.r.sealEpoch < epoch) out.push(w.k);
    }
    return out;
  }

  /**
   * A read changes nothing, so any failure of etcd's (an election, a member gone) is
   * tried again for up to `readRetryMs`; then STORE_UNAVAILABLE (retryable: a client
   * moves to another node). The engine's own verdicts (STATE_ROLLBACK_DETECTED, a
   * corrupt value) are not retried.
   */
  async read(key: string): Promise<LogEntry> {
    const deadline = Date.now() + this.readRetryMs;
    for (let delay = 25; ; delay = Math.min(delay * 2, 250)) {
      try {
        const { value } = await this.ledger.read(cohortRecordId(key));
        return decodeEntry(key, value);
      } catch (e) {
        if (e instanceof VaultError) throw e;
        if (Date.now() + delay > deadline) {
          throw new VaultError(ErrorCodes.STORE_UNAVAILABLE, `cohort: etcd did not answer a read (${(e as Error).message.slice(0, 120)}); retry`);
        }
        await new Promise((r) => setTimeout(r, delay * (0.5 + Math.random() / 2)));
      }
    }
  }

  async update<R>(key: string, step: Step<R>, committed?: (result: R) => void): Promise<R> {
    let result: R | undefined;
    let ran = false;
    const t0 = performance.now();
    const r = await this.ledger.commit(cohortRecordId(key), (cur) => {
      const o = step(decodeEntry(key, cur));
      result = o.result;
      ran = true;
      return o.next ? encodeEntry(key, o.next) : undefined;
    });
    // Only the run the quorum accepted counts; the engine returns its result (an
    // in-doubt txn found landed does not run the step again).
    if (!ran) throw new VaultError(ErrorCodes.INTERNAL, 'cohort: commit resolved without a decision');
    await this.ledger.waitApplied(r.revision);
    this.observe?.((performance.now() - t0) / 1000);
    committed?.(result as R);
    return result as R;
  }
}

function corrupt(): VaultError {
  return new VaultError(ErrorCodes.RECORD_CORRUPT, 'cohort: a record value in etcd is not a record of this vault');
}

// The record's value in etcd: JSON, bytes as base64. `k` is the record key, checked on
// decode: the etcd id is a hash of it, so a value copied under another user's id is refused.
interface Wire {
  v: 1;
  k: string;
  r: Omit<StoredRecord, 'verifier' | 'sealed'> & { verifier: string | null; sealed: string | null };
  g: [string, number][];
}

/** A replica value as a record's wire form; undefined for a tombstone or a value that is not a record (the keyring, tenants). */
function wireOf(raw: Uint8Array): Wire | undefined {
  const env = decodeEnvelope(raw);
  if (!env?.payload) return undefined;
  let w: Partial<Wire>;
  try {
    w = JSON.parse(Buffer.from(env.payload).toString('utf8')) as Partial<Wire>;
  } catch {
    return undefined;
  }
  return w.v === 1 && typeof w.k === 'string' && w.r && Array.isArray(w.g) ? (w as Wire) : undefined;
}

export function encodeEntry(key: string, e: LogEntry): Uint8Array {
  if (!e.rec) throw new VaultError(ErrorCodes.INTERNAL, 'cohort: a record is never removed, only marked locked or deleted');
  if (e.rec.userId !== key) throw new VaultError(ErrorCodes.INTERNAL, 'cohort: record key mismatch');
  const b64 = (b: Uint8Array | null) => (b ? Buffer.from(b).toString('base64') : null);
  const w: Wire = {
    v: 1,
    k: key,
    r: { ...e.rec, verifier: b64(e.rec.verifier), sealed: b64(e.rec.sealed) },
    g: e.guesses.map((g) => [g.id, g.expiresAt]),
  };
  return new Uint8Array(Buffer.from(JSON.stringify(w), 'utf8'));
}

export function decodeEntry(key: string, raw: Uint8Array | undefined): LogEntry {
  if (!raw) return { rec: undefined, guesses: [] };
  let w: Wire;
  try {
    w = JSON.parse(Buffer.from(raw).toString('utf8')) as Wire;
  } catch {
    throw corrupt();
  }
  if (w?.v !== 1 || w.k !== key || w.r?.userId !== key || !Array.isArray(w.g)) throw corrupt();
  const bytes = (s: string | null) => (s === null ? null : new Uint8Array(Buffer.from(s, 'base64')));
  return {
    rec: { ...w.r, verifier: bytes(w.r.verifier), sealed: bytes(w.r.sealed) },
    guesses: w.g.map(([id, expiresAt]) => ({ id, expiresAt })),
  };
}
