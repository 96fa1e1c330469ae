// The authenticated record state. Every record is a leaf of a bucketed Merkle
// tree whose root, with a batch number, is anchored in the HSM. The HSM — not
// the disk — decides which state is current:
//
// - writes: a record change, its bucket hash and an undo entry form one
//   SQLite transaction (a savepoint); the transactions of one event-loop turn
//   nest in one batch transaction, committed when the batch is flushed and
//   made durable by one fsync off the event loop; then `sync()` anchors the
//   new root (one HSM write per batch).
//   Group commit both ways; callers answer only after `sync()` resolved.
// - reads: a record is served only if its bucket still hashes to the trusted
//   in-memory bucket hash, so a row restored from an older copy is refused.
// - start-up: a database older than the anchor is refused as a whole; one
//   batch ahead of it (a crash between commit and anchor) is rolled back with
//   the undo log, since nothing in that batch was ever acknowledged.
// - one writer: when an anchor write (or readiness) finds that another process
//   wrote the anchor (hsm/anchor.ts), the ledger stops: every later read, write
//   and sync fails with that error until the process is restarted. The batch
//   whose write was refused stays committed but unanswered; the next start
//   undoes it if the anchor it finds does not cover it.
import type { Logger } from 'pino';
import { VaultError, ErrorCodes, isVaultError } from '../../protocol/errors.js';
import type { AnchorState, VaultKeys } from '../hsm/vault-keys.js';
import { anchorConflict, isAnchorConflict } from '../hsm/anchor.js';
import type { RecordStore, StoredRecord } from '../store/records.js';
import { BucketTree, bucketHash, bucketOf, leafHash } from './state-hash.js';
import { equalBytes, toHex } from '../../protocol/bytes.js';
import { userRef } from './user-ref.js';
import { BucketCache, verifiedLeaves, withLeaf } from './bucket-cache.js';

export interface LedgerStatus {
  /** Batch number of the newest committed change. */
  seq: number;
  /** Batch number the HSM anchor holds. */
  anchored: number;
  root: string;
  /** Set once another writer was found on the anchor: why this ledger serves nothing more. */
  stopped?: string;
}

export class Ledger {
  private batch: number;
  private anchored: number;
  private dirty = false;
  private scheduled = false;
  private flushing = false;
  private chain: Promise<void> = Promise.resolve();
  private waiters: { res: () => void; rej: (e: unknown) => void }[] = [];
  /** Bucket hashes changed by the transaction in progress, to restore if it aborts. */
  private touched: Map<number, Uint8Array> | undefined;
  /** Rows as the transaction in progress read or wrote them: put()'s undo entry needs no second read. */
  private rows: Map<string, StoredRecord | undefined> | undefined;
  /** The batch's SQLite transaction is open (group commit): bucket hashes as of its start. */
  private batchTx: Map<number, Uint8Array> | undefined;
  /** `dirty` when the batch transaction opened, restored if its commit fails. */
  private dirtyBeforeTx = false;
  /** Undo entries up to this batch are obsolete; deleted with the next write (inside a batch). */
  private undoObsolete: number | undefined;
  /** Leaves already checked against the tree, so a recovery reads its bucket once. */
  private readonly leaves = new BucketCache();
  /** Another writer moved the HSM anchor: this ledger serves nothing more (fail closed). */
  private stopped: VaultError | undefined;

  private constructor(
    private readonly records: RecordStore,
    private readonly keys: VaultKeys,
    private readonly log: Logger,
    private readonly tree: BucketTree,
    anchored: number,
  ) {
    this.anchored = anchored;
    this.batch = anchored + 1;
  }

  /** Check the database against the HSM anchor, repair an interrupted batch, or refuse. */
  static async open(records: RecordStore, keys: VaultKeys, log: Logger): Promise<Ledger> {
    const anchor = await keys.readAnchor();
    const seq = Number(records.getMeta('state_seq') ?? '0');
    if (seq < anchor.seq) {
      log.error({ event: 'state.rollback', dbSeq: seq, anchorSeq: anchor.seq }, 'database is older than the HSM anchor');
      throw new VaultError(
        ErrorCodes.STATE_ROLLBACK_DETECTED,
        `database state is at batch ${seq} but the HSM anchor is at batch ${anchor.seq}: this is an older copy ` +
          `(a restored backup or a rollback). Serving it would revive spent attempts and destroyed records, so the vault refuses. ` +
          `Start with the database this vault last wrote; see docs/OPERATIONS.md.`,
      );
    }
    if (seq > anchor.seq) Ledger.rollBackUnanchored(records, anchor, seq, log);
    else records.clearUndo(anchor.seq);
    const tree = new BucketTree(records.bucketHashes());
    if (!equalBytes(tree.root(), anchor.root)) {
      log.error({ event: 'state.mismatch', anchorSeq: anchor.seq }, 'database does not match the HSM anchor');
      throw new VaultError(
        ErrorCodes.STATE_ROLLBACK_DETECTED,
        `database state does not match the HSM anchor at batch ${anchor.seq}: its bucket hashes were altered or restored ` +
          `from another copy. The vault cannot vouch for any record in it and refuses to serve.`,
      );
    }
    return new Ledger(records, keys, log, tree, anchor.seq);
  }

  // A crash between a batch's commit and its anchor write leaves the database
  // ahead of the HSM. No answer from that batch ever left the vault, so undoing
  // it loses nothing acknowledged and never lowers an acknowledged counter.
  private static rollBackUnanchored(records: RecordStore, anchor: AnchorState, seq: number, log: Logger): void {
    const entries = records.undoAfter(anchor.seq);
    records.transaction(() => {
      const buckets = new Set<number>();
      for (const e of entries) {
        if (e.prev) records.put(e.prev);
        else records.remove(e.userId);
        buckets.add(bucketOf(e.userId));
      }
      for (const b of buckets) records.putBucket(b, hashBucket(records, b));
      records.clearUndo(seq);
      records.setMeta('state_seq', String(anchor.seq));
      records.setMeta('state_root', toHex(anchor.root));
    });
    log.warn(
      { event: 'state.recovered', undone: entries.length, fromSeq: seq, toSeq: anchor.seq },
      'rolled back changes of a batch that was never anchored (interrupted before any answer left)',
    );
  }

  status(): LedgerStatus {
    return { seq: this.dirty ? this.batch : this.batch - 1, anchored: this.anchored, root: toHex(this.tree.root()), ...(this.stopped ? { stopped: this.stopped.message } : {}) };
  }

  /**
   * The anchor as the HSM holds it; stops the ledger when a slot holds a label another
   * process wrote (readiness calls this, so an idle vault notices too).
   */
  async readAnchor(): Promise<AnchorState> {
    const a = await this.keys.readAnchor();
    if (a.foreign) this.stop(anchorConflict(a.foreign), a.seq);
    return a;
  }

  /** Fail closed: logged (and audited) once, then every call gets `e`. */
  private stop(e: VaultError, seq: number): void {
    if (this.stopped) return;
    this.stopped = e;
    this.log.error({ event: 'state.anchor.foreign', seq, err: e.message }, 'another process wrote the HSM state anchor: this vault stops serving');
  }

  private check(): void {
    if (this.stopped) throw this.stopped;
  }

  /**
   * A record, only if it matches the trusted state. The bucket's leaf hashes come from the
   * index and must hash to the trusted bucket hash; the row itself must hash to its leaf
   * among them. So one leaf hash per read, however full the bucket, and a row restored
   * from an older copy (or a leaf column edited to match it) is still refused. Leaves
   * checked once are kept while the tree still holds their hash (core/bucket-cache.ts).
   */
  get(userId: string): StoredRecord | undefined {
    this.check();
    const b = bucketOf(userId);
    const hash = this.tree.bucket(b);
    let leaves = this.leaves.get(b, hash);
    if (!leaves) {
      leaves = verifiedLeaves(this.records.bucketLeaves(b), hash);
      if (leaves) this.leaves.set(b, hash, leaves);
    }
    const mine = leaves?.find((l) => l.userId === userId);
    const rec = this.records.get(userId);
    const trusted = !!leaves && (mine ? !!rec && equalBytes(leafHash(rec), mine.leaf) : !rec);
    if (!trusted) {
      this.log.error({ event: 'state.rollback', user: userRef(userId), bucket: b }, 'stored record does not match the anchored state');
      throw new VaultError(
        ErrorCodes.STATE_ROLLBACK_DETECTED,
        'the stored record does not match the anchored state (restored or altered); refusing to serve it',
      );
    }
    this.rows?.set(userId, rec);
    return rec;
  }

  /**
   * Run `fn` as one SQLite transaction, nested in this turn's batch transaction;
   * bucket hashes it changed are restored if it throws. It is durable once the
   * batch commits, which `sync()` waits for.
   */
  transaction<T>(fn: () => T): T {
    if (this.touched) return fn();
    this.check();
    const opened = !this.batchTx;
    const batchTx = this.openBatch();
    this.touched = new Map();
    this.rows = new Map();
    try {
      return this.records.transaction(fn);
    } catch (e) {
      for (const [b, h] of this.touched) this.tree.set(b, h);
      throw e;
    } finally {
      for (const [b, h] of this.touched) if (!batchTx.has(b)) batchTx.set(b, h);
      this.touched = undefined;
      this.rows = undefined;
      // Nothing written: do not hold the write lock until the flush (a read-only commit costs no fsync).
      if (opened && batchTx.size === 0 && this.batchTx === batchTx) this.commitBatch();
    }
  }

  /** The open batch transaction, or a new one that this turn's flush will commit. */
  private openBatch(): Map<number, Uint8Array> {
    if (this.batchTx) return this.batchTx;
    this.records.begin();
    this.batchTx = new Map();
    this.dirtyBeforeTx = this.dirty;
    this.schedule();
    return this.batchTx;
  }

  /** Make the batch durable: one COMMIT (one fsync) for every transaction of the turn. */
  private commitBatch(): void {
    const tx = this.batchTx;
    if (!tx) return;
    this.batchTx = undefined;
    try {
      this.records.commit();
    } catch (e) {
      // Nothing of the batch reached the disk: put the trusted hashes back to match it.
      try {
        this.records.rollback();
      } catch {
        /* SQLite rolled back already */
      }
      for (const [b, h] of tx) this.tree.set(b, h);
      this.dirty = this.dirtyBeforeTx;
      throw e;
    }
  }

  /** Write a record inside `transaction()`. The change is durable at commit, anchored at the next sync. */
  put(rec: StoredRecord): void {
    if (!this.touched) throw new Error('Ledger.put outside a transaction');
    this.dirty = true;
    if (this.undoObsolete !== undefined) {
      this.records.clearUndo(this.undoObsolete);
      this.undoObsolete = undefined;
    }
    const rows = this.rows!;
    this.records.addUndo(this.batch, rec.userId, rows.has(rec.userId) ? rows.get(rec.userId) : this.records.get(rec.userId));
    const leaf = this.records.put(rec);
    rows.set(rec.userId, rec);
    const b = bucketOf(rec.userId);
    const before = this.tree.bucket(b);
    if (!this.touched.has(b)) this.touched.set(b, before);
    // The leaves as checked by this transaction's get(), with the new one in SQLite's place;
    // without them (no get() first), the index as it now stands, as before the cache.
    const cached = this.leaves.get(b, before);
    const after = cached && withLeaf(cached, rec.userId, leaf);
    const h = after ? bucketHash(after.map((l) => l.leaf)) : hashBucket(this.records, b);
    if (after) this.leaves.set(b, h, after);
    this.records.putBucket(b, h);
    this.tree.set(b, h);
  }

  /** Resolves once the HSM anchor covers every change committed before the call. */
  sync(): Promise<void> {
    if (this.stopped) return Promise.reject(this.stopped);
    // A flush in progress may cover our change, or may fail: either way wait for the next word.
    if (!this.dirty && !this.flushing) return Promise.resolve();
    return new Promise((res, rej) => {
      this.waiters.push({ res, rej });
      this.schedule();
    });
  }

  private schedule(): void {
    if (this.scheduled) return;
    this.scheduled = true;
    // Let every request of this event-loop turn join the batch.
    setImmediate(() => {
      this.scheduled = false;
      this.chain = this.chain.then(() => this.flush());
    });
  }

  private async flush(): Promise<void> {
    const waiters = this.waiters;
    this.waiters = [];
    try {
      // The batch number and root go in once per batch, in the batch's own transaction. After a
      // failed anchor write the retry anchors under the next number, so the database carries it too,
      // or the next start would take it for an older copy.
      if (this.dirty) {
        this.openBatch();
        this.records.setMeta('state_seq', String(this.batch));
        this.records.setMeta('state_root', toHex(this.tree.root()));
      }
      this.commitBatch();
    } catch (e) {
      this.log.error({ event: 'state.commit.failed', seq: this.batch, err: (e as Error).message }, 'could not commit a batch');
      return waiters.forEach((w) => w.rej(e));
    }
    if (!this.dirty) return waiters.forEach((w) => w.res());
    const seq = this.batch;
    const root = this.tree.root();
    this.dirty = false;
    this.batch = seq + 1;
    this.flushing = true;
    try {
      // Durable first, then anchored: an anchor ahead of the disk would make the next start
      // refuse the database as an older copy. Requests of the next batch run meanwhile.
      await this.records.syncWal();
      await this.keys.writeAnchor({ seq, root });
    } catch (e) {
      this.flushing = false;
      if (isAnchorConflict(e)) {
        // Another writer: nothing more is served; the next start undoes what its anchor does not cover.
        this.dirty = true;
        this.stop(e, seq);
        return waiters.forEach((w) => w.rej(e));
      }
      const event = isVaultError(e, ErrorCodes.STORE_UNAVAILABLE) ? 'state.sync.failed' : 'state.anchor.failed';
      this.log.error({ event, seq, err: (e as Error).message }, event === 'state.sync.failed' ? 'could not make a batch durable' : 'could not write the HSM anchor');
      // The callers are told HSM_UNAVAILABLE / STORE_UNAVAILABLE, "retryable, nothing changed":
      // make that true before they hear it. Requests of the next batch ran on the state being
      // undone, so their uncommitted batch goes too, and they get the same answer.
      const queued = this.waiters;
      this.waiters = [];
      this.abandonOpenBatch();
      try {
        this.undoUnanchored();
      } catch (u) {
        // Could not write the undo (the disk failed too): the change stays committed and the
        // next sync anchors it, as a restart would either keep or undo it (docs/SECURITY.md F5).
        this.dirty = true;
        this.log.error({ event: 'state.undo.failed', seq, err: (u as Error).message }, 'could not undo a batch whose anchor write failed');
      }
      return [...waiters, ...queued].forEach((w) => w.rej(e));
    }
    this.flushing = false;
    this.anchored = seq;
    // Not now: a delete outside a batch would cost its own fsync. Stale entries are harmless.
    this.undoObsolete = seq;
    waiters.forEach((w) => w.res());
  }

  /** Roll back the batch transaction still open (nothing of it reached the disk) and its hashes. */
  private abandonOpenBatch(): void {
    const tx = this.batchTx;
    this.batchTx = undefined;
    if (tx) {
      try {
        this.records.rollback();
      } catch {
        /* SQLite rolled back already */
      }
      for (const [b, h] of tx) this.tree.set(b, h);
    }
    this.dirty = false;
  }

  /**
   * Undo every committed batch the anchor does not cover (issue 15, SECURITY.md F5), by a
   * new batch that writes the anchored values back rather than by deleting the old one: the
   * failed anchor write may have reached the HSM all the same (a lost reply), and the next
   * start must find the database at or ahead of whichever anchor the HSM holds. The undo
   * entries reach both: this batch's restore the failed batch's values (anchor at the failed
   * number), and the failed batch's restore the values before it (anchor unchanged). Not
   * anchored here: the next sync() anchors it, so an HSM that stays down costs no busy loop.
   */
  private undoUnanchored(): void {
    const entries = this.records.undoAfter(this.anchored);
    if (entries.length === 0) return;
    // Newest batch first: the last value seen per user is the one the anchor covers.
    const target = new Map<string, StoredRecord | null>();
    for (const e of entries) target.set(e.userId, e.prev);
    const before = new Map<number, Uint8Array>();
    this.records.begin();
    try {
      for (const [userId, prev] of target) {
        this.records.addUndo(this.batch, userId, this.records.get(userId));
        if (prev) this.records.put(prev);
        else this.records.remove(userId);
        const b = bucketOf(userId);
        if (!before.has(b)) before.set(b, this.tree.bucket(b));
      }
      for (const b of before.keys()) {
        const h = hashBucket(this.records, b);
        this.records.putBucket(b, h);
        this.tree.set(b, h);
      }
      this.records.setMeta('state_seq', String(this.batch));
      this.records.setMeta('state_root', toHex(this.tree.root()));
      this.records.commit();
    } catch (e) {
      try {
        this.records.rollback();
      } catch {
        /* SQLite rolled back already */
      }
      for (const [b, h] of before) this.tree.set(b, h);
      throw e;
    }
    this.dirty = true;
    this.log.warn({ event: 'state.undone', users: target.size, toSeq: this.anchored }, 'undid a batch whose anchor write failed; its callers were told nothing changed');
  }
}

/** A bucket's hash from its rows' stored leaf hashes (each written from the row it stands for). */
function hashBucket(records: RecordStore, b: number): Uint8Array {
  return bucketHash(records.bucketLeaves(b).map((l) => l.leaf ?? new Uint8Array(0)));
}
