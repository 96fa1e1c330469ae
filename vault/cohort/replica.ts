// A node's local copy of the cohort state, as the replication engine
// (ledger.ts) maintains it: the values under the engine's etcd prefix as of one
// etcd revision, plus a hash chain over the history this copy applied.
//
// The engine is the only writer. It calls apply() once per etcd revision, in
// revision order, and reset() when it (re)loads a snapshot; both must be
// atomic (all or nothing), so a crash leaves the copy at a revision boundary
// with the head that belongs to it. The SQLite replica (vault/store/, later)
// implements the same interface; MemoryReplica is for tests and tools.
import { createHash } from 'node:crypto';

export interface ReplicaEntry {
  /** The etcd mod_revision of this value. */
  modRevision: bigint;
  /** The raw etcd value: an envelope (envelope.ts), opaque to the replica. */
  value: Uint8Array;
}

export type ReplicaOp = { type: 'put'; key: string; value: Uint8Array } | { type: 'delete'; key: string };

export interface Replica {
  /** The etcd revision this copy reflects; 0 for a copy that holds nothing yet. */
  readonly appliedRevision: bigint;
  /** Hash chain head after appliedRevision (chain.ts). */
  readonly chainHead: Uint8Array;
  /** The etcd cluster id this copy came from; undefined only while appliedRevision is 0. */
  readonly clusterId: string | undefined;
  get(key: string): ReplicaEntry | undefined;
  /** The keys that start with `prefix`, in any order (used for the few checkpoint keys). */
  keys(prefix: string): string[];
  /** Applies the changes of one revision (> appliedRevision): puts get modRevision = revision. Atomic. */
  apply(revision: bigint, ops: readonly ReplicaOp[], newHead: Uint8Array): void;
  /** Replaces everything with a snapshot taken at `revision`. Atomic. */
  reset(revision: bigint, entries: ReadonlyMap<string, ReplicaEntry>, head: Uint8Array, clusterId: string): void;
}

export const ZERO_HEAD = new Uint8Array(32);

const u64 = (n: bigint) => {
  const b = Buffer.alloc(8);
  b.writeBigUInt64BE(n);
  return b;
};
const u32 = (n: number) => {
  const b = Buffer.alloc(4);
  b.writeUInt32BE(n);
  return b;
};

/**
 * head' = SHA-256("bkv-cohort-chain-v1" || head || revision || for each op in
 * txn order: 'P' || len(key) || key || len(value) || value, or 'D' || len(key) || key).
 * Lengths make the encoding unambiguous; the tag keeps it apart from any other hash.
 */
export function chainStep(head: Uint8Array, revision: bigint, ops: readonly ReplicaOp[]): Uint8Array {
  const h = createHash('sha256').update('bkv-cohort-chain-v1').update(head).update(u64(revision));
  for (const op of ops) {
    const k = Buffer.from(op.key, 'utf8');
    if (op.type === 'put') h.update('P').update(u32(k.length)).update(k).update(u32(op.value.length)).update(op.value);
    else h.update('D').update(u32(k.length)).update(k);
  }
  return new Uint8Array(h.digest());
}

/**
 * The head a copy starts from when it loads a snapshot at `revision`: a hash
 * of the whole state in key order (with each key's mod_revision). Two copies
 * have equal heads exactly when they started from the same origin (the same
 * snapshot revision of the same cluster) and applied the same history since.
 */
export function snapshotHead(revision: bigint, entries: ReadonlyMap<string, ReplicaEntry>): Uint8Array {
  const h = createHash('sha256').update('bkv-cohort-snapshot-v1').update(u64(revision));
  for (const key of [...entries.keys()].sort()) {
    const e = entries.get(key)!;
    const k = Buffer.from(key, 'utf8');
    h.update(u32(k.length)).update(k).update(u64(e.modRevision)).update(u32(e.value.length)).update(e.value);
  }
  return new Uint8Array(h.digest());
}

/** A replica in memory: what the engine needs, plus inspection for tests. */
export class MemoryReplica implements Replica {
  appliedRevision = 0n;
  chainHead: Uint8Array = ZERO_HEAD;
  clusterId: string | undefined;
  private readonly map = new Map<string, ReplicaEntry>();

  get(key: string): ReplicaEntry | undefined {
    return this.map.get(key);
  }

  keys(prefix: string): string[] {
    return [...this.map.keys()].filter((k) => k.startsWith(prefix));
  }

  apply(revision: bigint, ops: readonly ReplicaOp[], newHead: Uint8Array): void {
    if (revision <= this.appliedRevision) throw new Error(`replica: revision ${revision} is not after ${this.appliedRevision}`);
    for (const op of ops) {
      if (op.type === 'put') this.map.set(op.key, { modRevision: revision, value: op.value });
      else this.map.delete(op.key);
    }
    this.appliedRevision = revision;
    this.chainHead = newHead;
  }

  reset(revision: bigint, entries: ReadonlyMap<string, ReplicaEntry>, head: Uint8Array, clusterId: string): void {
    this.map.clear();
    for (const [k, e] of entries) this.map.set(k, e);
    this.appliedRevision = revision;
    this.chainHead = head;
    this.clusterId = clusterId;
  }

  /** A copy of everything, for comparisons in tests. */
  entries(): Map<string, ReplicaEntry> {
    return new Map(this.map);
  }

  /** SHA-256 over the state (not the history): equal on replicas that hold the same values at the same mod_revisions. */
  stateDigest(): string {
    return Buffer.from(snapshotHead(0n, this.map)).toString('hex');
  }
}

/** Told after every apply (with its ops) and after every snapshot load (rebuild from scratch). */
export interface ReplicaListener {
  apply(ops: readonly ReplicaOp[]): void;
  reset(): void;
}

/**
 * A replica that tells listeners what it applied (after the apply, so they read
 * the new state): how the tenant table (tenants.ts) and the record port's index
 * of records at their limit (core/record-log.ts) stay current without scanning.
 */
export class ObservedReplica implements Replica {
  private readonly listeners: ReplicaListener[] = [];
  constructor(private readonly inner: Replica) {}
  listen(l: ReplicaListener): void {
    this.listeners.push(l);
  }
  get appliedRevision(): bigint {
    return this.inner.appliedRevision;
  }
  get chainHead(): Uint8Array {
    return this.inner.chainHead;
  }
  get clusterId(): string | undefined {
    return this.inner.clusterId;
  }
  get(key: string): ReplicaEntry | undefined {
    return this.inner.get(key);
  }
  keys(prefix: string): string[] {
    return this.inner.keys(prefix);
  }
  apply(revision: bigint, ops: readonly ReplicaOp[], newHead: Uint8Array): void {
    this.inner.apply(revision, ops, newHead);
    for (const l of this.listeners) l.apply(ops);
  }
  reset(revision: bigint, entries: ReadonlyMap<string, ReplicaEntry>, head: Uint8Array, clusterId: string): void {
    this.inner.reset(revision, entries, head, clusterId);
    for (const l of this.listeners) l.reset();
  }
}
