// The record table. Holds only what is useless without the HSM: verifiers
// (HMAC under an HSM key), envelopes sealed under an HSM key, counters and
// parameters. The store stores; it never decides (see core/machine.ts).
import type { Db } from './db.js';
import { VaultError, ErrorCodes } from '../errors.js';
import type { KdfParams } from '../protocol/kdf.js';

export type RecordState = 'active' | 'locked' | 'deleted';
const STATE_CODE: Record<RecordState, number> = { active: 1, locked: 2, deleted: 3 };
const STATE_NAME: Record<number, RecordState> = { 1: 'active', 2: 'locked', 3: 'deleted' };

export interface StoredRecord {
  userId: string;
  state: RecordState;
  /** Bumped on every enrolment for this user; bound into the verifier and the seal. */
  generation: number;
  attempts: number;
  attemptLimit: number;
  /** null once the record is locked or deleted. */
  verifier: Uint8Array | null;
  sealed: Uint8Array | null;
  sealEpoch: number | null;
  kdf: KdfParams | null;
  createdAt: number;
  updatedAt: number;
}

interface Row {
  user_id: string;
  state: number;
  generation: number;
  attempts: number;
  attempt_limit: number;
  verifier: Buffer | null;
  sealed: Buffer | null;
  seal_epoch: number | null;
  kdf: string | null;
  created_at: number;
  updated_at: number;
}

export interface RecordCounts {
  active: number;
  locked: number;
  deleted: number;
}

export class RecordStore {
  private readonly getStmt;
  private readonly putStmt;
  private readonly countStmt;
  private readonly metaGet;
  private readonly metaPut;
  private readonly liveByEpochStmt;

  constructor(private readonly db: Db) {
    this.getStmt = db.prepare<[string], Row>('SELECT * FROM records WHERE user_id = ?');
    this.putStmt = db.prepare(
      `INSERT INTO records (user_id, state, generation, attempts, attempt_limit, verifier, sealed, seal_epoch, kdf, created_at, updated_at)
       VALUES (@user_id, @state, @generation, @attempts, @attempt_limit, @verifier, @sealed, @seal_epoch, @kdf, @created_at, @updated_at)
       ON CONFLICT (user_id) DO UPDATE SET
         state = excluded.state, generation = excluded.generation, attempts = excluded.attempts,
         attempt_limit = excluded.attempt_limit, verifier = excluded.verifier, sealed = excluded.sealed,
         seal_epoch = excluded.seal_epoch, kdf = excluded.kdf, updated_at = excluded.updated_at`,
    );
    this.countStmt = db.prepare<[], { state: number; n: number }>('SELECT state, count(*) AS n FROM records GROUP BY state');
    this.metaGet = db.prepare<[string], { value: string }>('SELECT value FROM meta WHERE key = ?');
    this.metaPut = db.prepare('INSERT INTO meta (key, value) VALUES (?, ?) ON CONFLICT (key) DO UPDATE SET value = excluded.value');
    this.liveByEpochStmt = db.prepare<[number, number], Row>(
      'SELECT * FROM records WHERE state = 1 AND seal_epoch = ? ORDER BY user_id LIMIT ?',
    );
  }

  get(userId: string): StoredRecord | undefined {
    const row = this.guard(() => this.getStmt.get(userId));
    return row ? fromRow(row) : undefined;
  }

  put(rec: StoredRecord): void {
    this.guard(() => this.putStmt.run(toRow(rec)));
  }

  /** Runs `fn` as one atomic, durable SQLite transaction (nothing async may happen inside). */
  transaction<T>(fn: () => T): T {
    return this.guard(() => this.db.transaction(fn).immediate());
  }

  counts(): RecordCounts {
    const out: RecordCounts = { active: 0, locked: 0, deleted: 0 };
    for (const { state, n } of this.guard(() => this.countStmt.all())) {
      const name = STATE_NAME[state];
      if (name) out[name] = n;
    }
    return out;
  }

  /** Live records still sealed under `epoch`, for rotation in batches. */
  liveSealedUnder(epoch: number, limit: number): StoredRecord[] {
    return this.guard(() => this.liveByEpochStmt.all(epoch, limit)).map(fromRow);
  }

  getMeta(key: string): string | undefined {
    return this.guard(() => this.metaGet.get(key))?.value;
  }

  setMeta(key: string, value: string): void {
    this.guard(() => this.metaPut.run(key, value));
  }

  /** True when a write transaction can be started right now (readiness). */
  writable(): boolean {
    try {
      this.db.prepare('BEGIN IMMEDIATE').run();
      this.db.prepare('ROLLBACK').run();
      return true;
    } catch {
      return false;
    }
  }

  close(): void {
    if (this.db.open) this.db.close();
  }

  private guard<T>(fn: () => T): T {
    try {
      return fn();
    } catch (e) {
      if (e instanceof VaultError) throw e;
      const code = (e as { code?: string }).code ?? 'SQLITE_ERROR';
      throw new VaultError(ErrorCodes.STORE_UNAVAILABLE, `database operation failed (${code})`);
    }
  }
}

function fromRow(r: Row): StoredRecord {
  const state = STATE_NAME[r.state];
  if (!state) throw new VaultError(ErrorCodes.RECORD_CORRUPT, `record has unknown state ${r.state}`);
  return {
    userId: r.user_id,
    state,
    generation: r.generation,
    attempts: r.attempts,
    attemptLimit: r.attempt_limit,
    verifier: r.verifier ? new Uint8Array(r.verifier) : null,
    sealed: r.sealed ? new Uint8Array(r.sealed) : null,
    sealEpoch: r.seal_epoch,
    kdf: r.kdf ? (JSON.parse(r.kdf) as KdfParams) : null,
    createdAt: r.created_at,
    updatedAt: r.updated_at,
  };
}

function toRow(rec: StoredRecord): Row {
  return {
    user_id: rec.userId,
    state: STATE_CODE[rec.state],
    generation: rec.generation,
    attempts: rec.attempts,
    attempt_limit: rec.attemptLimit,
    verifier: rec.verifier ? Buffer.from(rec.verifier) : null,
    sealed: rec.sealed ? Buffer.from(rec.sealed) : null,
    seal_epoch: rec.sealEpoch,
    kdf: rec.kdf ? JSON.stringify({ alg: rec.kdf.alg, m: rec.kdf.m, t: rec.kdf.t, p: rec.kdf.p }) : null,
    created_at: rec.createdAt,
    updated_at: rec.updatedAt,
  };
}
