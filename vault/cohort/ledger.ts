// The cohort's replication engine: records live in etcd, every change is a
// compare-and-swap txn committed by an etcd quorum, and each node keeps a
// local replica applied from the watch stream in revision order. Not yet wired
// into the daemon; docs/COHORT.md has the design and its limits.
//
// Writes. commit(id, decide) reads the record (local replica, a hint from this
// node's own last txn, or etcd when the replica lags), runs decide(current),
// and commits with a txn that compares the record's mod_revision. Calls that
// arrive while a txn is in flight wait and go together in the next txn (group
// commit: one hot key CAS-ed by every writer collapses to ~60 commits/s here;
// one loop per node gives thousands). Two commits on one key in one batch are
// chained: the second decides on the first's result, and the txn puts the last.
// A decision that changes nothing is still validated: its key's compare rides
// in the txn, so "no change" is as current as a write. A failed compare reads
// the fresh values in the same round trip (the txn's failure branch) and the
// batch decides again.
//
// Unknown outcomes. Each txn attempt writes a fresh commit id into every value
// it puts (envelope.ts). When the client cannot tell whether a txn applied, the
// engine never re-runs decide() blindly: it reads etcd's current revision R,
// waits until its applier has applied R, and looks whether the watch delivered
// a value carrying that id (the applier sees every revision, so a write that
// landed and was overwritten since is still seen). If it landed, the callers
// get that txn's result; if not, they decide again on fresh values, and the
// key is always re-written (a fence) so the lost txn can never land later.
//
// Applier. A gap-free watch (watch.ts) from appliedRevision + 1, applied one
// revision at a time, atomically with a hash-chain step (replica.ts). A fresh
// replica, or one whose watch start was compacted away, loads a snapshot (a
// paginated range at one revision) and watches from there.
//
// Rollback. Once a node has applied revision A, etcd must never show it a
// history that contradicts what it applied. Checked on every response: the
// cluster id is the pinned one; a linearizable response's revision is not
// below what was applied when the request left; a value etcd reports as last
// modified at or before A equals the replica's; every watch event's prev_kv
// equals the replica's entry. Checkpoint keys (one per node, written after new
// record writes, read back by verify()) make a rewind that lost any checkpoint
// write show up within one verify period. A node whose replica is gone or old
// can be given its HSM anchor (revision, own last checkpoint): etcd must not be
// below either. Any violation stops the engine with STATE_ROLLBACK_DETECTED.
import { createHash } from 'node:crypto';
import type { Etcd3, IEvent, IKeyValue, IResponseHeader } from 'etcd3';
import { ErrorCodes, VaultError } from '../../protocol/errors.js';
import { commitOutcome, isTransientNotApplied } from './etcd.js';
import { commitIdOf, decodeEnvelope, encodeEnvelope, newCommitId } from './envelope.js';
import { chainStep, snapshotHead, type Replica, type ReplicaEntry, type ReplicaOp } from './replica.js';
import { watchFrom, type WatchFrom } from './watch.js';

/**
 * Gets the record's current value (undefined: absent or deleted) and returns
 * the next one: bytes to store, null to delete (a tombstone), undefined for
 * no change. It may run several times (after a lost race); only the result of
 * its last run is committed, so it must not have effects of its own.
 */
export type Decide = (current: Uint8Array | undefined, info: DecideInfo) => Uint8Array | null | undefined;

export interface DecideInfo {
  /** The record was deleted (a tombstone), as opposed to never written: a destroyed record can be kept from coming back. */
  deleted: boolean;
  /** mod_revision of the version decided on (0: never written); an earlier op of the same batch may have changed it since. */
  modRevision: bigint;
}

export interface CommitResult {
  /** The etcd revision at which a quorum validated this decision (the write's revision, or the read's for no change). */
  revision: bigint;
  /** The record after this commit. */
  value: Uint8Array | undefined;
  changed: boolean;
}

export interface CohortLedgerOptions {
  etcd: Etcd3;
  replica: Replica;
  /** Key prefix in etcd, without a trailing slash, e.g. "bkv/v1". */
  prefix: string;
  /** This node's name: its checkpoint key. Unique in the cohort. */
  nodeId: string;
  /** Most distinct keys per txn; etcd refuses more than 128 ops per branch (--max-txn-ops). */
  maxBatchKeys?: number;
  /** Attempts of one commit (lost races, unreachable etcd) before it gives up. */
  maxAttempts?: number;
  /** How long in-doubt resolution and waitApplied() wait for the applier. */
  applyWaitMs?: number;
  /** Period of checkpoint writes and verify(); 0: only when called. */
  checkpointMs?: number;
  /** Keys per page of a snapshot. */
  snapshotPage?: number;
  /**
   * What this node's HSM anchor says it had reached, for a replica that may be
   * older than that or gone (wiped): etcd must be at least at `revision`, and
   * this node's own checkpoint key must be the one it last wrote, or a later one.
   */
  anchor?: LedgerAnchor;
}

export interface LedgerAnchor {
  revision: bigint;
  /**
   * The replica's chain head at `revision`. A replica at that revision must have
   * it; an older copy (same origin) must reach it when it has caught up to
   * `revision`: otherwise its history is not the one this node applied.
   */
  head?: Uint8Array;
  /** From status().checkpoint after the node's last checkpoint write. */
  checkpoint?: CheckpointMark;
}

export interface CheckpointMark {
  /** The etcd mod_revision of the node's last checkpoint write. */
  modRevision: bigint;
  /** SHA-256 (hex) of that checkpoint's payload. */
  digest: string;
}

export interface LedgerStats {
  /** Commit txns sent (group commits), and how they ended. */
  txns: number;
  applied: number;
  compareFailed: number;
  ambiguous: number;
  notApplied: number;
  /** Commits resolved (including no-change ones), and those whose txn came back ambiguous but had landed. */
  commits: number;
  landedInDoubt: number;
  /** Reads of current values from etcd before deciding (replica lagging, or after an unknown outcome). */
  prefetches: number;
  snapshots: number;
  largestBatch: number;
}

export interface LedgerStatus {
  nodeId: string;
  appliedRevision: bigint;
  /** Highest etcd revision seen in a linearizable answer. */
  seenRevision: bigint;
  lag: bigint;
  chainHead: string;
  clusterId: string | undefined;
  stopped: string | undefined;
  /** This node's last checkpoint write (anchor it in the HSM with the applied revision and head). */
  checkpoint: CheckpointMark | undefined;
  stats: LedgerStats;
}

/** A commit whose txn may or may not have applied, and the engine could not find out. Nothing may be revealed. */
export class CommitOutcomeUnknown extends VaultError {
  constructor(why: string) {
    super(ErrorCodes.INTERNAL, `cohort: commit outcome unknown (${why}); nothing may be revealed`, { outcome: 'unknown' });
  }
}

export function rollbackDetected(why: string): VaultError {
  return new VaultError(ErrorCodes.STATE_ROLLBACK_DETECTED, `cohort: etcd history contradicts the applied replica: ${why}`);
}

interface Base {
  mod: bigint;
  raw: Uint8Array | undefined;
}

interface Op {
  key: string;
  decide: Decide;
  resolve: (r: CommitResult) => void;
  reject: (e: unknown) => void;
  attempts: number;
  /** The result this op had in each txn attempt whose outcome is unknown, by commit id. */
  inDoubt: Map<string, Omit<CommitResult, 'revision'>>;
  /** Snapshot epoch when it first became in doubt: a snapshot in between hides history. */
  doubtEpoch: number;
  /** This attempt's decision. */
  pending?: Omit<CommitResult, 'revision'>;
  settled?: boolean;
}

interface Waiter {
  revision: bigint;
  resolve: () => void;
  reject: (e: unknown) => void;
  timer: NodeJS.Timeout;
}

const PREFIX = /^[A-Za-z0-9._-]+(\/[A-Za-z0-9._-]+)*$/;
const NODE_ID = /^[a-z0-9][a-z0-9-]{0,62}$/;
const RECORD_ID = /^[0-9a-f]{2,128}$/;
const sleep = (ms: number) => new Promise((r) => setTimeout(r, ms));
const jitter = (ms: number) => ms / 2 + Math.random() * (ms / 2);
const hex = (b: Uint8Array) => Buffer.from(b).toString('hex');
const sha256hex = (b: Uint8Array) => createHash('sha256').update(b).digest('hex');

function equalBytes(a: Uint8Array, b: Uint8Array): boolean {
  return a.length === b.length && Buffer.compare(Buffer.from(a.buffer, a.byteOffset, a.length), Buffer.from(b.buffer, b.byteOffset, b.length)) === 0;
}

/** The first key after every key that starts with `p` (etcd's range_end for a prefix). */
function prefixEnd(p: Buffer): Buffer {
  const end = Buffer.from(p);
  for (let i = end.length - 1; i >= 0; i--) {
    if (end[i]! < 0xff) {
      end[i]!++;
      return end.subarray(0, i + 1);
    }
  }
  return Buffer.from([0]);
}

export class CohortLedger {
  readonly stats: LedgerStats = {
    txns: 0, applied: 0, compareFailed: 0, ambiguous: 0, notApplied: 0, commits: 0, landedInDoubt: 0, prefetches: 0, snapshots: 0, largestBatch: 0,
  };
  private readonly etcd: Etcd3;
  private readonly replica: Replica;
  private readonly prefix: string;
  private readonly nodeId: string;
  private readonly maxBatchKeys: number;
  private readonly maxAttempts: number;
  private readonly applyWaitMs: number;
  private readonly checkpointMs: number;
  private readonly snapshotPage: number;
  private readonly ckptPrefix: string;
  private readonly ckptKey: string;
  private readonly anchor: LedgerAnchor | undefined;
  /** etcd may never be seen below this revision: the anchor's, whatever the replica says. */
  private readonly floor: bigint;
  private lastCheckpoint: CheckpointMark | undefined;

  private queue: Op[] = [];
  private looping = false;
  /** Values this node last saw for keys (its own writes, failure-branch reads): better than a lagging replica. */
  private readonly hints = new Map<string, Base>();
  /** Commit ids whose landing the applier watches for: id → revision it landed at (0 while not seen). */
  private readonly watching = new Map<string, bigint>();
  private waiters: Waiter[] = [];
  private seenRevision = 0n;
  private clusterId: string | undefined;
  private epoch = 0;
  private watch: WatchFrom | undefined;
  private connectedOnce = false;
  private stoppedBy: VaultError | undefined;
  private closed = false;
  private timer: NodeJS.Timeout | undefined;
  private resnapshotting: Promise<void> | undefined;
  private lastRecordRevision = 0n;
  private lastCheckpointRevision = 0n;
  private readIndexInFlight: Promise<bigint> | undefined;
  private readIndexNext: Promise<bigint> | undefined;

  constructor(o: CohortLedgerOptions) {
    const bad = (m: string) => new VaultError(ErrorCodes.BAD_REQUEST, `config: cohort ${m}`);
    if (!PREFIX.test(o.prefix)) throw bad('prefix must be path segments of [A-Za-z0-9._-] without a trailing slash');
    if (!NODE_ID.test(o.nodeId)) throw bad('nodeId must be 1-63 of [a-z0-9-], starting with a letter or digit');
    this.etcd = o.etcd;
    this.replica = o.replica;
    this.prefix = o.prefix;
    this.nodeId = o.nodeId;
    this.maxBatchKeys = o.maxBatchKeys ?? 64;
    this.maxAttempts = o.maxAttempts ?? 64;
    this.applyWaitMs = o.applyWaitMs ?? 5_000;
    this.checkpointMs = o.checkpointMs ?? 1_000;
    this.snapshotPage = o.snapshotPage ?? 1_000;
    this.anchor = o.anchor;
    this.floor = o.anchor?.revision ?? 0n;
    if (!(this.maxBatchKeys >= 1 && this.maxBatchKeys <= 128)) throw bad('maxBatchKeys must be 1..128');
    this.ckptPrefix = `${o.prefix}/ckpt/`;
    this.ckptKey = `${this.ckptPrefix}${o.nodeId}`;
    this.clusterId = o.replica.clusterId;
    if (o.replica.appliedRevision > 0n && !o.replica.clusterId) throw bad('replica has applied revisions but no cluster id');
  }

  // ---- public ------------------------------------------------------------

  /**
   * Loads a snapshot (fresh replica) or verifies etcd against the replica,
   * starts the applier, and resolves once the replica has caught up with
   * etcd's revision at start. Throws STATE_ROLLBACK_DETECTED on a contradiction,
   * etcd's errors when it cannot be reached; close() the ledger after a failed start.
   */
  async start(): Promise<void> {
    this.lastCheckpointRevision = this.replica.appliedRevision;
    if (this.replica.appliedRevision === 0n) await this.snapshot();
    await this.verify();
    this.lastCheckpointRevision = this.replica.appliedRevision;
    this.lastRecordRevision = this.replica.appliedRevision;
    this.guard(() => this.checkAnchorHead());
    this.startWatch();
    // A long replay may take more than applyWaitMs: give up only when it stops advancing.
    const target = await this.readIndex();
    for (let last = -1n; ; ) {
      try {
        await this.waitApplied(target);
        break;
      } catch (e) {
        if (this.stoppedBy || this.replica.appliedRevision === last) throw e;
        last = this.replica.appliedRevision;
      }
    }
    if (this.checkpointMs > 0) {
      const tick = () => {
        this.timer = setTimeout(() => {
          void this.periodic().finally(() => {
            if (!this.closed && !this.stoppedBy) tick();
          });
        }, this.checkpointMs);
        this.timer.unref();
      };
      tick();
    }
  }

  /** The etcd key of a record id (lowercase hex, e.g. a userRef). */
  recordKey(id: string): string {
    if (!RECORD_ID.test(id)) throw new VaultError(ErrorCodes.BAD_REQUEST, 'cohort: record id must be 2-128 lowercase hex digits');
    return `${this.prefix}/r/${id}`;
  }

  /** The prefix every record key starts with (to list them in a replica). */
  recordPrefix(): string {
    return `${this.prefix}/r/`;
  }

  /** Commits decide(current) on record `id` through an etcd quorum; see Decide and CommitResult. */
  commit(id: string, decide: Decide): Promise<CommitResult> {
    let key: string;
    try {
      key = this.recordKey(id);
    } catch (e) {
      return Promise.reject(e);
    }
    return this.enqueue(key, decide);
  }

  /**
   * A linearizable read served from the replica: asks etcd for its current
   * revision, waits until the replica has applied it, then reads locally.
   */
  async read(id: string): Promise<{ value: Uint8Array | undefined; modRevision: bigint; revision: bigint }> {
    const key = this.recordKey(id);
    const revision = await this.readIndex();
    await this.waitApplied(revision);
    const e = this.replica.get(key);
    if (!e) return { value: undefined, modRevision: 0n, revision };
    const env = decodeEnvelope(e.value);
    if (!env) throw new VaultError(ErrorCodes.RECORD_CORRUPT, 'cohort: a record value was not written by this engine');
    return { value: env.payload, modRevision: e.modRevision, revision };
  }

  /** etcd's current revision, by a linearizable request (concurrent callers share one). */
  readIndex(): Promise<bigint> {
    if (this.stoppedBy) return Promise.reject(this.stoppedBy);
    if (!this.readIndexInFlight) {
      this.readIndexInFlight = this.fetchRevision().finally(() => (this.readIndexInFlight = undefined));
      return this.readIndexInFlight;
    }
    // One is in flight; it may have left before this call: share the next one.
    this.readIndexNext ??= this.readIndexInFlight
      .catch(() => undefined)
      .then(() => {
        this.readIndexNext = undefined;
        return this.readIndex();
      });
    return this.readIndexNext;
  }

  /** Resolves once the replica has applied `revision` (the serving rule); rejects after timeoutMs. */
  waitApplied(revision: bigint, timeoutMs = this.applyWaitMs): Promise<void> {
    if (this.stoppedBy) return Promise.reject(this.stoppedBy);
    if (this.replica.appliedRevision >= revision) return Promise.resolve();
    return new Promise((resolve, reject) => {
      const w: Waiter = {
        revision,
        resolve,
        reject,
        timer: setTimeout(() => {
          this.waiters = this.waiters.filter((x) => x !== w);
          reject(new VaultError(ErrorCodes.STORE_UNAVAILABLE, `cohort: replica did not apply revision ${revision} within ${timeoutMs} ms`));
        }, timeoutMs),
      };
      this.waiters.push(w);
    });
  }

  /**
   * Reads every checkpoint key linearizably and checks it against the replica
   * (see the header comment). Throws (and stops the engine) on a rollback;
   * other errors (etcd unreachable) are thrown as they are.
   */
  async verify(): Promise<void> {
    if (this.stoppedBy) throw this.stoppedBy;
    const a0 = this.replica.appliedRevision;
    // As of the request's departure: a checkpoint written while it is in flight must not count against it.
    const mark = this.lastCheckpoint ?? this.anchor?.checkpoint;
    const p = Buffer.from(this.ckptPrefix);
    const res = await this.etcd.kv.range({ key: p, range_end: prefixEnd(p) });
    this.guard(() => {
      this.checkHeader(res.header, a0);
      const r = BigInt(res.header.revision);
      const seen = new Set<string>();
      if (mark) {
        // Only this node writes its checkpoint key: etcd must hold the one it last wrote, or a later one.
        const own = res.kvs.find((kv) => kv.key.toString() === this.ckptKey);
        const mod = own ? BigInt(own.mod_revision) : 0n;
        const payload = own ? decodeEnvelope(own.value)?.payload : undefined;
        if (mod < mark.modRevision || (mod === mark.modRevision && (!payload || sha256hex(payload) !== mark.digest))) {
          throw rollbackDetected('this node\'s last checkpoint is not in etcd');
        }
      }
      for (const kv of res.kvs) {
        seen.add(kv.key.toString());
        this.checkRead(kv.key.toString(), kv, a0, r);
      }
      // Checkpoint keys are never deleted: one the replica had at a revision etcd has passed must still be there.
      for (const k of this.replica.keys(this.ckptPrefix)) {
        const e = this.replica.get(k);
        if (!seen.has(k) && e && e.modRevision <= a0) throw rollbackDetected(`checkpoint ${k.slice(this.ckptPrefix.length)} disappeared`);
      }
    });
  }

  /** Writes this node's checkpoint (revision and chain head) if records changed since the last one. */
  async checkpoint(force = false): Promise<void> {
    const a = this.replica.appliedRevision;
    if (!force && this.lastRecordRevision <= this.lastCheckpointRevision) return;
    const body = Buffer.from(JSON.stringify({ node: this.nodeId, revision: String(a), head: hex(this.replica.chainHead) }));
    const r = await this.enqueue(this.ckptKey, () => body);
    this.lastCheckpointRevision = a;
    if (!this.lastCheckpoint || r.revision > this.lastCheckpoint.modRevision) this.lastCheckpoint = { modRevision: r.revision, digest: sha256hex(body) };
  }

  status(): LedgerStatus {
    const applied = this.replica.appliedRevision;
    return {
      nodeId: this.nodeId,
      appliedRevision: applied,
      seenRevision: this.seenRevision,
      lag: this.seenRevision > applied ? this.seenRevision - applied : 0n,
      chainHead: hex(this.replica.chainHead),
      clusterId: this.clusterId,
      stopped: this.stoppedBy?.message,
      checkpoint: this.lastCheckpoint,
      stats: { ...this.stats },
    };
  }

  /** The error that stopped the engine, if any: STATE_ROLLBACK_DETECTED, or INTERNAL when the replica failed to apply. */
  get stopped(): VaultError | undefined {
    return this.stoppedBy;
  }

  /** Stops the applier and timers; queued commits fail (nothing of theirs was sent); a txn in flight finishes. */
  async close(): Promise<void> {
    if (this.closed) return;
    this.closed = true;
    clearTimeout(this.timer);
    const err = new VaultError(ErrorCodes.STORE_UNAVAILABLE, 'cohort: ledger closed');
    for (const op of this.queue.splice(0)) this.settle(op, undefined, op.inDoubt.size ? new CommitOutcomeUnknown('ledger closed') : err);
    for (const w of this.waiters.splice(0)) {
      clearTimeout(w.timer);
      w.reject(err);
    }
    await this.watch?.close().catch(() => undefined);
    this.watch = undefined;
  }

  // ---- group commit ---------------------------------------------------------

  private enqueue(key: string, decide: Decide): Promise<CommitResult> {
    if (this.stoppedBy) return Promise.reject(this.stoppedBy);
    if (this.closed) return Promise.reject(new VaultError(ErrorCodes.STORE_UNAVAILABLE, 'cohort: ledger closed'));
    return new Promise((resolve, reject) => {
      this.queue.push({ key, decide, resolve, reject, attempts: 0, inDoubt: new Map(), doubtEpoch: 0 });
      if (!this.looping) void this.loop();
    });
  }

  private async loop(): Promise<void> {
    this.looping = true;
    try {
      while (this.queue.length > 0 && !this.stoppedBy) {
        // Take ops in arrival order up to maxBatchKeys distinct keys; stopping
        // at the first that does not fit keeps each key's ops in order.
        const keys = new Set<string>();
        let n = 0;
        for (; n < this.queue.length; n++) {
          const k = this.queue[n]!.key;
          if (!keys.has(k) && keys.size >= this.maxBatchKeys) break;
          keys.add(k);
        }
        const batch = this.queue.splice(0, n);
        let retry: Op[];
        try {
          retry = await this.attempt(batch);
        } catch (e) {
          // A rollback (the engine stopped) or a bug: fail the batch, never leave a caller hanging.
          for (const op of batch) this.settle(op, undefined, this.stoppedBy ?? e);
          retry = [];
        }
        const again: Op[] = [];
        for (const op of retry) {
          if (op.settled) continue;
          if (this.closed) {
            this.settle(op, undefined, op.inDoubt.size ? new CommitOutcomeUnknown('ledger closed') : new VaultError(ErrorCodes.STORE_UNAVAILABLE, 'cohort: ledger closed'));
          } else if (++op.attempts >= this.maxAttempts) {
            this.settle(op, undefined, op.inDoubt.size
              ? new CommitOutcomeUnknown(`gave up after ${op.attempts} attempts`)
              : new VaultError(ErrorCodes.OVERLOADED, `cohort: commit gave up after ${op.attempts} attempts (contention or etcd unavailable)`));
          } else again.push(op);
        }
        this.queue = again.concat(this.queue);
        this.forgetIds();
      }
      if (this.stoppedBy) for (const op of this.queue.splice(0)) this.settle(op, undefined, this.stoppedBy);
    } finally {
      this.looping = false;
    }
  }

  private settle(op: Op, result: CommitResult | undefined, error?: unknown): void {
    if (op.settled) return;
    op.settled = true;
    if (result) {
      this.stats.commits++;
      op.resolve(result);
    } else op.reject(error);
  }

  /** Drops watched commit ids that no queued op can still be resolved by. */
  private forgetIds(): void {
    if (this.watching.size === 0) return;
    const live = new Set<string>();
    for (const op of this.queue) for (const id of op.inDoubt.keys()) live.add(id);
    for (const id of this.watching.keys()) if (!live.has(id)) this.watching.delete(id);
  }

  /** One txn attempt for a batch. Returns the ops to try again (the rest are settled). */
  private async attempt(batch: Op[]): Promise<Op[]> {
    const byKey = new Map<string, Op[]>();
    for (const op of batch) {
      const list = byKey.get(op.key);
      if (list) list.push(op);
      else byKey.set(op.key, [op]);
    }

    // Fetch current values the replica may not have: keys without a hint
    // while the replica lags, and every key an in-doubt op touches.
    const lagging = this.replica.appliedRevision < this.seenRevision;
    const doubtful = batch.some((op) => op.inDoubt.size > 0);
    const need = [...byKey.keys()].filter((k) => (lagging && !this.hints.has(k)) || byKey.get(k)!.some((op) => op.inDoubt.size > 0));
    if (need.length > 0) {
      this.stats.prefetches++;
      let r: bigint;
      try {
        r = await this.fetch(need);
      } catch (e) {
        if (this.stoppedBy) throw this.stoppedBy;
        await sleep(jitter(50));
        return batch; // a read changes nothing: just try again
      }
      if (doubtful) {
        // Everything that landed by r has been applied once the replica reaches r.
        let caughtUp = true;
        await this.waitApplied(r).catch(() => (caughtUp = false));
        for (const op of batch) {
          if (op.inDoubt.size === 0) continue;
          if (op.doubtEpoch !== this.epoch) {
            this.settle(op, undefined, new CommitOutcomeUnknown('a snapshot replaced the history to look in'));
            continue;
          }
          for (const [id, res] of op.inDoubt) {
            const at = this.watching.get(id) ?? 0n;
            if (at > 0n) {
              this.stats.landedInDoubt++;
              this.settle(op, { ...res, revision: at });
              break;
            }
          }
          if (!op.settled && !caughtUp) this.settle(op, undefined, new CommitOutcomeUnknown('replica did not catch up'));
        }
        batch = batch.filter((op) => !op.settled);
        if (batch.length === 0) return [];
        byKey.clear();
        for (const op of batch) {
          const list = byKey.get(op.key);
          if (list) list.push(op);
          else byKey.set(op.key, [op]);
        }
      }
    }

    // Decide, per key in order, chaining ops on one key.
    const commitId = newCommitId();
    const compare: { key: Buffer; target: 'Mod'; result: 'Equal'; mod_revision: string }[] = [];
    const success: { request_put: { key: Buffer; value: Buffer } }[] = [];
    const failure: { request_range: { key: Buffer } }[] = [];
    const keys: string[] = [];
    const written = new Map<string, Uint8Array>();
    const live: Op[] = [];
    for (const [key, ops] of byKey) {
      const base = this.baseOf(key);
      let payload: Uint8Array | undefined;
      let deleted = false;
      if (base.raw) {
        const env = decodeEnvelope(base.raw);
        if (!env) {
          for (const op of ops) this.settle(op, undefined, new VaultError(ErrorCodes.RECORD_CORRUPT, 'cohort: a record value was not written by this engine'));
          continue;
        }
        payload = env.payload;
        deleted = env.payload === undefined;
      }
      // A key with an op in doubt is always re-written: its old txn compared
      // this same mod_revision, and must never be able to land after this one.
      let write = ops.some((op) => op.inDoubt.size > 0);
      let any = false;
      for (const op of ops) {
        let next: Uint8Array | null | undefined;
        try {
          next = op.decide(payload, { deleted, modRevision: base.mod });
        } catch (e) {
          this.settle(op, undefined, e);
          continue;
        }
        any = true;
        if (next === undefined) op.pending = { value: payload, changed: false };
        else {
          payload = next === null ? undefined : Uint8Array.from(next);
          deleted = next === null;
          write = true;
          op.pending = { value: payload, changed: true };
        }
        live.push(op);
      }
      if (!any) continue;
      const k = Buffer.from(key);
      keys.push(key);
      compare.push({ key: k, target: 'Mod', result: 'Equal', mod_revision: String(base.mod) });
      failure.push({ request_range: { key: k } });
      if (write) {
        const raw = encodeEnvelope(commitId, payload);
        written.set(key, raw);
        success.push({ request_put: { key: k, value: Buffer.from(raw) } });
      }
    }
    if (live.length === 0) return [];
    this.stats.largestBatch = Math.max(this.stats.largestBatch, live.length);

    if (success.length > 0) this.watching.set(commitId, 0n);
    const a0 = this.replica.appliedRevision;
    this.stats.txns++;
    const out = await commitOutcome(this.etcd.kv.txn({ compare, success, failure }));
    switch (out.outcome) {
      case 'applied': {
        this.stats.applied++;
        this.guard(() => this.checkHeader(out.response.header, a0));
        const rev = BigInt(out.response.header.revision);
        for (const [key, raw] of written) this.hint(key, { mod: rev, raw });
        this.watching.delete(commitId);
        for (const op of live) this.settle(op, { ...op.pending!, revision: rev });
        return [];
      }
      case 'compare-failed': {
        this.stats.compareFailed++;
        this.watching.delete(commitId);
        const res = out.response;
        this.guard(() => {
          this.checkHeader(res.header, a0);
          const r = BigInt(res.header.revision);
          keys.forEach((key, i) => {
            const kv = res.responses[i]?.response_range?.kvs[0];
            this.checkRead(key, kv, a0, r);
            this.hint(key, kv ? { mod: BigInt(kv.mod_revision), raw: new Uint8Array(kv.value) } : { mod: 0n, raw: undefined });
          });
        });
        return live;
      }
      case 'not-applied': {
        this.stats.notApplied++;
        this.watching.delete(commitId);
        if (!isTransientNotApplied(out.error)) {
          // Refused for good (quota, too large, permission): retrying will not help.
          for (const op of live) {
            this.settle(op, undefined, op.inDoubt.size
              ? new CommitOutcomeUnknown('etcd refused the retry')
              : new VaultError(ErrorCodes.STORE_UNAVAILABLE, 'cohort: etcd refused the commit'));
          }
          return [];
        }
        await sleep(jitter(100));
        return live;
      }
      case 'ambiguous': {
        this.stats.ambiguous++;
        for (const key of keys) this.hints.delete(key);
        if (success.length > 0) {
          for (const op of live) {
            if (op.inDoubt.size === 0) op.doubtEpoch = this.epoch;
            op.inDoubt.set(commitId, op.pending!);
          }
        }
        await sleep(jitter(100));
        return live;
      }
    }
  }

  /** The freshest value this node knows for a key, without asking etcd. */
  private baseOf(key: string): Base {
    const e = this.replica.get(key);
    const h = this.hints.get(key);
    if (h && (!e || h.mod >= e.modRevision)) return h;
    if (h) this.hints.delete(key);
    return e ? { mod: e.modRevision, raw: e.value } : { mod: 0n, raw: undefined };
  }

  private hint(key: string, b: Base): void {
    // Bounded: hints only save round trips; losing them costs a prefetch.
    if (this.hints.size >= 10_000) this.hints.clear();
    this.hints.set(key, b);
  }

  /** Reads keys linearizably in one txn; returns the read revision and leaves the values as hints. */
  private async fetch(keys: string[]): Promise<bigint> {
    const a0 = this.replica.appliedRevision;
    const res = await this.etcd.kv.txn({ compare: [], success: keys.map((k) => ({ request_range: { key: Buffer.from(k) } })), failure: [] });
    let r = 0n;
    this.guard(() => {
      this.checkHeader(res.header, a0);
      r = BigInt(res.header.revision);
      keys.forEach((key, i) => {
        const kv = res.responses[i]?.response_range?.kvs[0];
        this.checkRead(key, kv, a0, r);
        this.hint(key, kv ? { mod: BigInt(kv.mod_revision), raw: new Uint8Array(kv.value) } : { mod: 0n, raw: undefined });
      });
    });
    return r;
  }

  private async fetchRevision(): Promise<bigint> {
    const a0 = this.replica.appliedRevision;
    // A range over one key that never exists: the cheapest linearizable request.
    const res = await this.etcd.kv.range({ key: Buffer.from(`${this.prefix}/.read-index`), count_only: true });
    this.guard(() => this.checkHeader(res.header, a0));
    return BigInt(res.header.revision);
  }

  // ---- rollback checks -------------------------------------------------------

  /** Runs checks; a rollback they find stops the engine before it propagates. */
  private guard(f: () => void): void {
    try {
      f();
    } catch (e) {
      if (e instanceof VaultError && e.code === ErrorCodes.STATE_ROLLBACK_DETECTED) this.fail(e);
      throw e;
    }
  }

  /**
   * A linearizable answer's header: the pinned cluster, and a revision not
   * below what was applied when the request left (a0): anything applied had
   * been committed before the request, and a linearizable read sees it.
   */
  private checkHeader(h: IResponseHeader, a0: bigint): void {
    this.checkCluster(h.cluster_id);
    const rev = BigInt(h.revision);
    if (rev < a0) throw rollbackDetected(`etcd is at revision ${rev}, below the applied revision ${a0}`);
    if (rev < this.floor) throw rollbackDetected(`etcd is at revision ${rev}, below the anchored revision ${this.floor}`);
    if (rev > this.seenRevision) this.seenRevision = rev;
  }

  private checkCluster(id: string): void {
    if (this.clusterId === undefined) this.clusterId = id;
    else if (id !== this.clusterId) throw rollbackDetected(`etcd cluster id ${id} is not the replica's ${this.clusterId}`);
  }

  /**
   * A value etcd reports at read revision r, for a request that left when the
   * replica had applied a0. If etcd says the key last changed at or before a0,
   * the replica (which applied a0) must hold exactly that version, unless it
   * has since applied a newer one (beyond r). Checkpoint keys are never
   * deleted, so one missing in etcd but held by the replica at or before a0 is
   * a rewind too.
   */
  private checkRead(key: string, kv: IKeyValue | undefined, a0: bigint, r: bigint): void {
    const e = this.replica.get(key);
    if (e && e.modRevision > r) return;
    if (!kv) {
      if (key.startsWith(this.ckptPrefix) && e && e.modRevision <= a0) throw rollbackDetected(`checkpoint ${key.slice(this.ckptPrefix.length)} disappeared`);
      return;
    }
    const mod = BigInt(kv.mod_revision);
    if (mod > a0) return;
    if (!e || e.modRevision !== mod || !equalBytes(e.value, kv.value)) {
      throw rollbackDetected(`a value last changed at revision ${mod} differs from the applied one`);
    }
  }

  /** At the anchored revision, the replica's head must be the anchored one. */
  private checkAnchorHead(): void {
    const head = this.anchor?.head;
    // A replica loaded from a snapshot has another origin, hence another chain: nothing to compare.
    if (!head || this.epoch > 0 || this.replica.appliedRevision !== this.floor) return;
    if (!equalBytes(head, this.replica.chainHead)) throw rollbackDetected(`the replica's chain head at the anchored revision ${this.floor} is not the anchored one`);
  }

  /** Stops the engine for good: everything waiting fails with `err`. */
  private fail(err: VaultError): void {
    if (this.stoppedBy) return;
    this.stoppedBy = err;
    clearTimeout(this.timer);
    for (const op of this.queue.splice(0)) this.settle(op, undefined, err);
    for (const w of this.waiters.splice(0)) {
      clearTimeout(w.timer);
      w.reject(err);
    }
    const w = this.watch;
    this.watch = undefined;
    void w?.close().catch(() => undefined);
  }

  // ---- applier -----------------------------------------------------------------

  private startWatch(): void {
    if (this.closed || this.stoppedBy) return;
    const from = this.replica.appliedRevision + 1n;
    this.connectedOnce = false;
    const w = watchFrom(this.etcd, `${this.prefix}/`, from, {
      onEvents: (events, header) => {
        try {
          this.guard(() => {
            this.checkCluster(header.cluster_id);
            this.applyEvents(events);
          });
        } catch (e) {
          // A rollback has already stopped the engine. Anything else (the
          // replica could not apply) stops it too: watch.ts has moved past
          // these events, and going on would leave a gap in the replica.
          if (!this.stoppedBy) {
            this.fail(new VaultError(ErrorCodes.INTERNAL, `cohort: the replica could not apply a change (${e instanceof Error ? e.message : String(e)}); engine stopped`));
          }
        }
      },
      onCanceled: () => {
        if (this.watch !== w) return;
        this.watch = undefined;
        void this.resnapshot();
      },
    });
    // A reconnected stream may lead to another member, or to a cluster that was
    // restored while we were away: check it before trusting what it sends.
    w.watcher.on('connected', () => {
      if (this.connectedOnce) void this.verify().catch(() => undefined);
      this.connectedOnce = true;
    });
    this.watch = w;
  }

  private applyEvents(events: IEvent[]): void {
    let i = 0;
    while (i < events.length) {
      const rev = BigInt(events[i]!.kv.mod_revision);
      const ops: ReplicaOp[] = [];
      if (rev <= this.replica.appliedRevision) {
        i++; // never twice (watch.ts already filters)
        continue;
      }
      for (; i < events.length && BigInt(events[i]!.kv.mod_revision) === rev; i++) {
        const ev = events[i]!;
        const key = ev.kv.key.toString();
        this.checkContinuity(key, ev);
        if (ev.type === 'Put') {
          const value = new Uint8Array(ev.kv.value);
          ops.push({ type: 'put', key, value });
          if (this.watching.size > 0) {
            const id = commitIdOf(value);
            if (id !== undefined && this.watching.get(id) === 0n) this.watching.set(id, rev);
          }
          if (!key.startsWith(this.ckptPrefix)) this.lastRecordRevision = rev;
        } else {
          ops.push({ type: 'delete', key });
        }
      }
      this.replica.apply(rev, ops, chainStep(this.replica.chainHead, rev, ops));
      if (rev === this.floor) this.checkAnchorHead();
    }
    this.wake();
  }

  /** Resolves the waiters the replica has reached. */
  private wake(): void {
    const applied = this.replica.appliedRevision;
    if (this.waiters.length > 0) {
      const ready = this.waiters.filter((w) => w.revision <= applied);
      if (ready.length > 0) {
        this.waiters = this.waiters.filter((w) => w.revision > applied);
        for (const w of ready) {
          clearTimeout(w.timer);
          w.resolve();
        }
      }
    }
  }

  /**
   * An event's prev_kv is what etcd had before it; it must be what the replica
   * holds. A create (version 1) has none, and the replica must hold nothing.
   * etcd leaves prev_kv out when it could not read it (compacted meanwhile):
   * that proves nothing either way.
   */
  private checkContinuity(key: string, ev: IEvent): void {
    const e = this.replica.get(key);
    const prev = ev.prev_kv;
    if (prev) {
      if (!e || e.modRevision !== BigInt(prev.mod_revision) || !equalBytes(e.value, prev.value)) {
        throw rollbackDetected(`the change at revision ${ev.kv.mod_revision} follows a version this replica never applied`);
      }
    } else if (ev.type === 'Put' && ev.kv.version === '1' && e) {
      throw rollbackDetected(`revision ${ev.kv.mod_revision} creates a key this replica holds`);
    }
  }

  // ---- snapshots -----------------------------------------------------------------

  /**
   * Loads the state at one revision, page by page, into the replica. Over a
   * replica that already applied a0, every value last changed at or before a0
   * is checked against it first (a full audit), so a re-snapshot cannot hide
   * a rewind.
   */
  private async snapshot(): Promise<void> {
    for (let tries = 1; ; tries++) {
      try {
        return await this.snapshotOnce();
      } catch (e) {
        if (this.stoppedBy || tries >= 3 || !String((e as Error).message).includes('compacted')) throw this.stoppedBy ?? e;
      }
    }
  }

  private async snapshotOnce(): Promise<void> {
    const a0 = this.replica.appliedRevision;
    const p = Buffer.from(`${this.prefix}/`);
    const end = prefixEnd(p);
    const entries = new Map<string, ReplicaEntry>();
    let from = p;
    let rev: bigint | undefined;
    let cluster = '';
    for (;;) {
      const res = await this.etcd.kv.range({
        key: from,
        range_end: end,
        limit: this.snapshotPage,
        ...(rev !== undefined ? { revision: String(rev) } : {}),
      });
      if (rev === undefined) {
        this.guard(() => this.checkHeader(res.header, a0));
        rev = BigInt(res.header.revision);
        cluster = res.header.cluster_id;
      }
      for (const kv of res.kvs) {
        const key = kv.key.toString();
        this.guard(() => this.checkRead(key, kv, a0, rev!));
        entries.set(key, { modRevision: BigInt(kv.mod_revision), value: new Uint8Array(kv.value) });
      }
      if (!res.more || res.kvs.length === 0) break;
      from = Buffer.concat([res.kvs[res.kvs.length - 1]!.key, Buffer.from([0])]);
    }
    this.guard(() => {
      for (const k of this.replica.keys(this.ckptPrefix)) {
        if (!entries.has(k)) this.checkRead(k, undefined, a0, rev!);
      }
    });
    this.epoch++;
    this.stats.snapshots++;
    this.hints.clear();
    this.replica.reset(rev!, entries, snapshotHead(rev!, entries), cluster);
    if (rev! > this.seenRevision) this.seenRevision = rev!;
    this.wake();
  }

  /** The watch start was compacted away (or the server ended it): snapshot again, then watch on. */
  private resnapshot(): Promise<void> {
    this.resnapshotting ??= (async () => {
      for (let delay = 100; !this.closed && !this.stoppedBy; delay = Math.min(delay * 2, 2_000)) {
        try {
          await this.snapshot();
          this.startWatch();
          return;
        } catch {
          if (this.stoppedBy) return;
          await sleep(delay);
        }
      }
    })().finally(() => (this.resnapshotting = undefined));
    return this.resnapshotting;
  }

  private async periodic(): Promise<void> {
    try {
      await this.checkpoint();
      await this.verify();
    } catch {
      // Unreachable etcd: the next period tries again. A rollback has stopped the engine.
    }
  }
}
