// Leaves of recently used state buckets, so a recovery reads its bucket from
// SQLite once instead of at every step (four reads and two rehashes of the
// same ~15 rows at 1 M records: docs/PERFORMANCE.md, Scale).
//
// An entry is only ever used under the hash it hashes to: the caller passes
// the trusted bucket hash from the in-memory tree, and an entry whose hash
// differs (the bucket changed, or a transaction that changed it was undone)
// is a miss. So the cache can hold nothing the tree does not vouch for, and
// never needs invalidating: a stale entry simply stops matching.
import type { BucketLeaf } from '../store/records.js';
import { bucketHash } from './state-hash.js';
import { equalBytes } from '../../protocol/bytes.js';

/** A bucket's leaves, every one present (a row without a leaf is never cached). */
export type Leaves = readonly { userId: string; leaf: Uint8Array }[];

interface Entry {
  hash: Uint8Array;
  leaves: Leaves;
}

export class BucketCache {
  // Map order is the order entries were last set: the oldest goes first. A recovery's
  // two steps are milliseconds to seconds apart; 1 024 buckets are ~2 s of recoveries
  // at 500/s, at most ~5 MiB at 15 leaves a bucket.
  private readonly entries = new Map<number, Entry>();

  constructor(private readonly max = 1024) {}

  /** The leaves of bucket `b` if they hash to `trusted`, else undefined. */
  get(b: number, trusted: Uint8Array): Leaves | undefined {
    const e = this.entries.get(b);
    return e && equalBytes(e.hash, trusted) ? e.leaves : undefined;
  }

  /** Remember leaves the caller has checked against, or computed as, `hash`. */
  set(b: number, hash: Uint8Array, leaves: Leaves): void {
    this.entries.delete(b);
    this.entries.set(b, { hash, leaves });
    if (this.entries.size > this.max) this.entries.delete(this.entries.keys().next().value!);
  }

  get size(): number {
    return this.entries.size;
  }
}

/** The leaves with `leaf` checked against `hash`; undefined if a row has no leaf or they do not match. */
export function verifiedLeaves(read: readonly BucketLeaf[], hash: Uint8Array): Leaves | undefined {
  if (!read.every((l): l is { userId: string; leaf: Uint8Array } => l.leaf !== null)) return undefined;
  return equalBytes(bucketHash(read.map((l) => l.leaf)), hash) ? read : undefined;
}

/**
 * The bucket with `userId`'s leaf replaced, or inserted where SQLite's
 * `ORDER BY user_id` puts it: TEXT compares as UTF-8 bytes there, which is not
 * JavaScript's UTF-16 order (😀 sorts after ｡ in UTF-8, before it in UTF-16).
 */
export function withLeaf(leaves: Leaves, userId: string, leaf: Uint8Array): Leaves {
  const i = leaves.findIndex((l) => l.userId === userId);
  if (i >= 0) return leaves.map((l, k) => (k === i ? { userId, leaf } : l));
  const mine = Buffer.from(userId, 'utf8');
  let at = leaves.findIndex((l) => Buffer.compare(Buffer.from(l.userId, 'utf8'), mine) > 0);
  if (at < 0) at = leaves.length;
  return [...leaves.slice(0, at), { userId, leaf }, ...leaves.slice(at)];
}
