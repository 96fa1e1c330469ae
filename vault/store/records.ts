// The record table. Holds only what is useless without the HSM: verifiers
// (HMAC under an HSM key), envelopes sealed under an HSM key, counters and
// parameters. The store stores; it never decides (see core/machine.ts).
import { closeSync, fdatasync, fstatSync, openSync } from 'node:fs';
import { promisify } from 'node:util';
import type { Db } from './db.js';
import { VaultError, ErrorCodes } from '../../protocol/errors.js';
import type { KdfParams } from '../../protocol/kdf.js';
import type { RecordState, StoredRecord } from '../core/record.js';
import { bucketOf, leafHash } from '../core/state-hash.js';
import { Checkpointer, type CheckpointStats } from './checkpointer.js';

const datasync = promisify(fdatasync);

export type { RecordState, StoredRecord } from '../core/record.js';
const STATE_CODE: Record<RecordState, number> = { active: 1, locked: 2, deleted: 3 };
const STATE_NAME: Record<number, RecordState> = { 1: 'active', 2: 'locked', 3: 'deleted' };

export interface Row {
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
  bucket: number;
  /** The record's leaf hash in the state tree (protocol/state-hash.ts), kept beside it so a
   *  bucket is checked from the index alone (core/ledger.ts). Derived; never trusted by itself. */
  leaf: Buffer | null;
}

/** One entry of a bucket as the index holds it. */
export interface BucketLeaf {
  userId: string;
  leaf: Uint8Array | null;
}

export interface UndoEntry {
  batch: number;
  userId: string;
  /** The row before the batch touched it; null when the batch created it. */
  prev: StoredRecord | null;
}

export interface RecordCounts {
  active: number;
  locked: number;
  deleted: number;
}

export interface RecordStoreOptions {
  /**
   * Run WAL checkpoints on a thread of their own (checkpointer.ts) instead of inside a
   * COMMIT on this thread. The serving daemon does; tools and tests need not.
   */
  checkpointWorker?: { onFailure?: (code: string) => void };
}

export class RecordStore {
  private readonly getStmt;
  private readonly putStmt;
  private readonly countStmt;
  private readonly metaGet;
  private readonly metaPut;
  private readonly liveByEpochStmt;
  private readonly bucketStmt;
  private readonly leavesStmt;
  private readonly countEpochStmt;
  private readonly deleteStmt;
  private readonly bucketsAll;
  private readonly bucketPut;
  private readonly undoAdd;
  private readonly undoAbove;
  private readonly undoClear;
  private readonly beginStmt;
  private readonly commitStmt;
  private readonly rollbackStmt;
  private readonly lazyStmt;
  private readonly fullStmt;
  /** WAL mode: a group commit may defer its fsync to syncWal(). */
  private readonly wal: boolean;
  private walFd: number | undefined;
  private readonly checkpointer: Checkpointer | undefined;

  constructor(
    private readonly db: Db,
    opts: RecordStoreOptions = {},
  ) {
    this.getStmt = db.prepare<[string], Row>('SELECT * FROM records WHERE user_id = ?');
    this.putStmt = db.prepare(
      `INSERT INTO records (user_id, state, generation, attempts, attempt_limit, verifier, sealed, seal_epoch, kdf, created_at, updated_at, bucket, leaf)
       VALUES (@user_id, @state, @generation, @attempts, @attempt_limit, @verifier, @sealed, @seal_epoch, @kdf, @created_at, @updated_at, @bucket, @leaf)
       ON CONFLICT (user_id) DO UPDATE SET
         state = excluded.state, generation = excluded.generation, attempts = excluded.attempts,
         attempt_limit = excluded.attempt_limit, verifier = excluded.verifier, sealed = excluded.sealed,
         seal_epoch = excluded.seal_epoch, kdf = excluded.kdf, updated_at = excluded.updated_at, leaf = excluded.leaf`,
    );
    this.countStmt = db.prepare<[], { state: number; n: number }>('SELECT state, count(*) AS n FROM records GROUP BY state');
    this.metaGet = db.prepare<[string], { value: string }>('SELECT value FROM meta WHERE key = ?');
    this.metaPut = db.prepare('INSERT INTO meta (key, value) VALUES (?, ?) ON CONFLICT (key) DO UPDATE SET value = excluded.value');
    this.liveByEpochStmt = db.prepare<[number, number], Row>(
      'SELECT * FROM records WHERE state = 1 AND seal_epoch < ? ORDER BY seal_epoch, user_id LIMIT ?',
    );
    this.countEpochStmt = db.prepare<[number], { n: number }>('SELECT count(*) AS n FROM records WHERE state = 1 AND seal_epoch < ?');
    this.bucketStmt = db.prepare<[number], Row>('SELECT * FROM records WHERE bucket = ? ORDER BY user_id');
    // Answered from the covering index records_leaves: no table rows are read.
    this.leavesStmt = db.prepare<[number], { user_id: string; leaf: Buffer | null }>(
      'SELECT user_id, leaf FROM records WHERE bucket = ? ORDER BY user_id',
    );
    this.deleteStmt = db.prepare<[string]>('DELETE FROM records WHERE user_id = ?');
    this.bucketsAll = db.prepare<[], { id: number; hash: Buffer }>('SELECT id, hash FROM buckets');
    this.bucketPut = db.prepare('INSERT INTO buckets (id, hash) VALUES (?, ?) ON CONFLICT (id) DO UPDATE SET hash = excluded.hash');
    this.undoAdd = db.prepare('INSERT OR IGNORE INTO undo (batch, user_id, prev) VALUES (?, ?, ?)');
    this.undoAbove = db.prepare<[number], { batch: number; user_id: string; prev: string | null }>(
      'SELECT batch, user_id, prev FROM undo WHERE batch > ? ORDER BY batch DESC, user_id',
    );
    this.undoClear = db.prepare<[number]>('DELETE FROM undo WHERE batch <= ?');
    this.beginStmt = db.prepare('BEGIN IMMEDIATE');
    this.commitStmt = db.prepare('COMMIT');
    this.rollbackStmt = db.prepare('ROLLBACK');
    this.lazyStmt = db.prepare('PRAGMA synchronous = NORMAL');
    this.fullStmt = db.prepare('PRAGMA synchronous = FULL');
    this.wal = !db.memory && !db.readonly && String(db.pragma('journal_mode', { simple: true })).toLowerCase() === 'wal';
    if (this.wal && opts.checkpointWorker) {
      this.checkpointer = new Checkpointer(db.name, {
        setAutocheckpoint: (pages) => {
          if (db.open) this.guard(() => db.pragma(`wal_autocheckpoint = ${pages}`));
        },
        onFailure: opts.checkpointWorker.onFailure,
      });
    }
  }

  get(userId: string): StoredRecord | undefined {
    const row = this.guard(() => this.getStmt.get(userId));
    return row ? fromRow(row) : undefined;
  }

  /** Insert or replace a record; returns the leaf hash written beside it. */
  put(rec: StoredRecord): Uint8Array {
    const row = toRow(rec);
    this.guard(() => this.putStmt.run(row));
    return new Uint8Array(row.leaf!);
  }

  /** Runs `fn` as one atomic, durable SQLite transaction (nothing async may happen inside). Nested in begin(): a savepoint. */
  transaction<T>(fn: () => T): T {
    const outermost = !this.db.inTransaction;
    const out = this.guard(() => this.db.transaction(fn).immediate());
    if (outermost) this.writeFailure = undefined;
    return out;
  }

  /**
   * Group commit (core/ledger.ts): open one write transaction that the
   * transactions of many requests nest in as savepoints, commit them all at
   * once, then make them durable with one syncWal(), before any of them is
   * answered. In WAL mode that COMMIT runs with synchronous=NORMAL: it writes
   * the log without an fsync, which syncWal() then does off the event loop.
   * Every other write on this connection stays synchronous=FULL.
   */
  begin(): void {
    this.guard(() => {
      if (this.wal) this.lazyStmt.run();
      this.beginStmt.run();
    });
  }

  commit(): void {
    try {
      this.guard(() => this.commitStmt.run());
    } finally {
      this.restoreFull();
    }
  }

  /** Undo an open begin(); harmless when SQLite already rolled it back. */
  rollback(): void {
    try {
      if (this.db.inTransaction) this.guard(() => this.rollbackStmt.run());
    } finally {
      this.restoreFull();
    }
  }

  /**
   * fdatasync the write-ahead log on the libuv thread pool: what synchronous=FULL
   * would have done inside COMMIT, without stalling every other request for it.
   * Covers every transaction committed before the call.
   */
  async syncWal(): Promise<void> {
    if (!this.wal) return;
    try {
      // SQLite keeps its log file while the connection is open; reopen if it was replaced anyway.
      if (this.walFd !== undefined && fstatSync(this.walFd).nlink === 0) this.closeWal();
      this.walFd ??= openSync(`${this.db.name}-wal`, 'r+');
      await datasync(this.walFd);
      this.checkpointer?.poke();
    } catch (e) {
      const code = (e as NodeJS.ErrnoException).code === 'ENOSPC' ? 'SQLITE_FULL' : 'SQLITE_IOERR_FSYNC';
      this.writeFailure = code;
      throw new VaultError(ErrorCodes.STORE_UNAVAILABLE, `database operation failed (${code})`);
    }
  }

  private restoreFull(): void {
    if (this.wal && !this.db.inTransaction && this.db.open) this.guard(() => this.fullStmt.run());
  }

  private closeWal(): void {
    if (this.walFd === undefined) return;
    try {
      closeSync(this.walFd);
    } catch {
      /* already gone */
    }
    this.walFd = undefined;
  }

  get inTransaction(): boolean {
    return this.db.inTransaction;
  }

  counts(): RecordCounts {
    const out: RecordCounts = { active: 0, locked: 0, deleted: 0 };
    for (const { state, n } of this.guard(() => this.countStmt.all())) {
      const name = STATE_NAME[state];
      if (name) out[name] = n;
    }
    return out;
  }

  /** Live records sealed under an epoch older than `epoch`, for rotation in batches. */
  liveSealedBefore(epoch: number, limit: number): StoredRecord[] {
    return this.guard(() => this.liveByEpochStmt.all(epoch, limit)).map(fromRow);
  }

  countSealedBefore(epoch: number): number {
    return this.guard(() => this.countEpochStmt.get(epoch)!.n);
  }

  /** Every record of one state bucket, ordered by user id (the order the bucket hash uses). */
  inBucket(bucket: number): StoredRecord[] {
    return this.guard(() => this.bucketStmt.all(bucket)).map(fromRow);
  }

  /** The user ids and leaf hashes of one bucket, ordered by user id. */
  bucketLeaves(bucket: number): BucketLeaf[] {
    return this.guard(() => this.leavesStmt.all(bucket)).map((r) => ({ userId: r.user_id, leaf: r.leaf ? new Uint8Array(r.leaf) : null }));
  }

  remove(userId: string): void {
    this.guard(() => this.deleteStmt.run(userId));
  }

  bucketHashes(): Map<number, Uint8Array> {
    const out = new Map<number, Uint8Array>();
    for (const r of this.guard(() => this.bucketsAll.all())) out.set(r.id, new Uint8Array(r.hash));
    return out;
  }

  putBucket(id: number, hash: Uint8Array): void {
    this.guard(() => this.bucketPut.run(id, Buffer.from(hash)));
  }

  /** Remember a row as it was before `batch` first touched it. Later calls in the same batch keep the first. */
  addUndo(batch: number, userId: string, prev: StoredRecord | undefined): void {
    this.guard(() => this.undoAdd.run(batch, userId, prev ? JSON.stringify(serialise(prev)) : null));
  }

  /** Undo entries of batches after `batch`, newest batch first. */
  undoAfter(batch: number): UndoEntry[] {
    return this.guard(() => this.undoAbove.all(batch)).map((r) => ({
      batch: r.batch,
      userId: r.user_id,
      prev: r.prev ? deserialise(JSON.parse(r.prev) as Record<string, unknown>) : null,
    }));
  }

  clearUndo(upToBatch: number): void {
    this.guard(() => this.undoClear.run(upToBatch));
  }

  getMeta(key: string): string | undefined {
    return this.guard(() => this.metaGet.get(key))?.value;
  }

  setMeta(key: string, value: string): void {
    this.guard(() => this.metaPut.run(key, value));
  }

  /** True when a write transaction can be started right now (readiness). */
  writable(): boolean {
    // Inside an open group commit the write lock is ours already.
    if (this.db.inTransaction) return true;
    try {
      this.db.prepare('BEGIN IMMEDIATE').run();
      this.db.prepare('ROLLBACK').run();
      return true;
    } catch {
      return false;
    }
  }

  /** The checkpoint worker's counts, when there is one. */
  checkpoints(): CheckpointStats | undefined {
    return this.checkpointer?.stats();
  }

  close(): void {
    // The worker's connection first: the last connection to close checkpoints and removes the log.
    this.checkpointer?.close();
    this.closeWal();
    if (this.db.open) this.db.close();
  }

  /**
   * SQLite reported a damaged file (SQLITE_CORRUPT*, SQLITE_NOTADB) since this process
   * opened it. Latched: the records on the damaged pages stay unreadable until an operator
   * restores the file, so readiness reports it (test/integration/adversarial-disk.test.ts).
   */
  corruptionSeen = false;

  /**
   * SQLite's code of the last failed write (disk full, I/O error), cleared by the
   * next successful transaction: a one-page readiness probe may still fit where
   * every real batch fails, so readiness then asks for a larger probe write.
   */
  writeFailure: string | undefined;

  private guard<T>(fn: () => T): T {
    try {
      return fn();
    } catch (e) {
      if (e instanceof VaultError) throw e;
      const code = (e as { code?: string }).code ?? 'SQLITE_ERROR';
      if (code.startsWith('SQLITE_CORRUPT') || code === 'SQLITE_NOTADB') this.corruptionSeen = true;
      if (code.startsWith('SQLITE_FULL') || code.startsWith('SQLITE_IOERR') || code.startsWith('SQLITE_READONLY')) this.writeFailure = code;
      throw new VaultError(ErrorCodes.STORE_UNAVAILABLE, `database operation failed (${code})`);
    }
  }
}

export function fromRow(r: Row): StoredRecord {
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
    bucket: bucketOf(rec.userId),
    leaf: Buffer.from(leafHash(rec)),
  };
}

// Undo entries hold whole rows as JSON text (blobs as base64) so replay needs no schema knowledge.
function serialise(rec: StoredRecord): Record<string, unknown> {
  const b = (x: Uint8Array | null) => (x ? Buffer.from(x).toString('base64') : null);
  return { ...rec, verifier: b(rec.verifier), sealed: b(rec.sealed) };
}

function deserialise(o: Record<string, unknown>): StoredRecord {
  const b = (x: unknown) => (typeof x === 'string' ? new Uint8Array(Buffer.from(x, 'base64')) : null);
  return { ...(o as unknown as StoredRecord), verifier: b(o.verifier), sealed: b(o.sealed) };
}
