// Hashes of the authenticated state: every record (live or destroyed) is a
// leaf; leaves are grouped into 2^16 buckets by a hash of the user id; the
// bucket hashes are the leaves of a binary Merkle tree whose root, with a
// batch sequence number, is anchored in the HSM. Pure: no I/O. Vault-side
// only, so it hashes with node:crypto: the tree is rebuilt at every start
// (131 071 hashes) and native SHA-256 does that several times faster.
import { createHash } from 'node:crypto';
import { concat, frame, fromHex, toHex, u32be, u64be, utf8 } from '../../protocol/bytes.js';
import type { StoredRecord } from './record.js';

export const BUCKET_BITS = 16;
export const BUCKETS = 1 << BUCKET_BITS;

const DST_LEAF = 'bkv-v1-state-leaf';
const DST_BUCKET = 'bkv-v1-state-bucket';
const NODE = new Uint8Array([0x01]);

function sha256(...parts: Uint8Array[]): Uint8Array {
  const h = createHash('sha256');
  for (const p of parts) h.update(p);
  return h.digest();
}

/** What a leaf covers: every field of a record but its timestamps. */
export type LeafFields = Omit<StoredRecord, 'createdAt' | 'updatedAt'>;

const opt = (b: Uint8Array | null): Uint8Array => (b ? concat(new Uint8Array([1]), b) : new Uint8Array([0]));

/** Everything that decides what a record allows goes into its leaf; timestamps do not. */
export function leafHash(r: LeafFields): Uint8Array {
  const kdf = r.kdf ? concat(utf8(r.kdf.alg), u32be(r.kdf.m), u32be(r.kdf.t), u32be(r.kdf.p)) : new Uint8Array(0);
  return sha256(
    frame(
      DST_LEAF,
      utf8(r.userId),
      utf8(r.state),
      u64be(r.generation),
      u32be(r.attempts),
      u32be(r.attemptLimit),
      opt(r.verifier),
      opt(r.sealed),
      u32be(r.sealEpoch ?? 0),
      kdf,
    ),
  );
}

export function bucketOf(userId: string): number {
  const h = sha256(utf8(userId));
  return (h[0]! << 8) | h[1]!;
}

/**
 * A bucket's hash over its leaves, ordered by user id (the caller sorts). The
 * bucket's position is not hashed in: a leaf names its user, and the user id
 * fixes the bucket, so empty buckets share one hash and so do empty subtrees.
 */
export function bucketHash(leaves: Uint8Array[]): Uint8Array {
  return leaves.length === 0 ? EMPTY_BUCKET : sha256(frame(DST_BUCKET, ...leaves));
}

const EMPTY_BUCKET = sha256(frame(DST_BUCKET));

export const nodeHash = (left: Uint8Array, right: Uint8Array): Uint8Array => sha256(NODE, left, right);

/**
 * The Merkle tree over bucket hashes, heap-ordered in one flat 4 MiB buffer:
 * node i has children 2i and 2i+1, leaves at BUCKETS..2·BUCKETS-1, the root at
 * 1. An update rehashes the 16 nodes on one path.
 */
export class BucketTree {
  private readonly nodes = new Uint8Array(2 * BUCKETS * 32);

  /** `buckets` lists the non-empty buckets; every other bucket is empty. */
  constructor(buckets: Map<number, Uint8Array> = new Map()) {
    // Empty subtrees are identical per level, so a sparse tree costs one hash per
    // level plus one per non-empty path, not 2^17 hashes.
    const empty: Uint8Array[] = [EMPTY_BUCKET];
    for (let l = 1; l <= BUCKET_BITS; l++) empty.push(nodeHash(empty[l - 1]!, empty[l - 1]!));
    const filled = new Uint8Array(2 * BUCKETS);
    for (let i = 0; i < BUCKETS; i++) {
      const h = buckets.get(i);
      this.put(BUCKETS + i, h ?? EMPTY_BUCKET);
      filled[BUCKETS + i] = h && !equal(h, EMPTY_BUCKET) ? 1 : 0;
    }
    for (let i = BUCKETS - 1, level = 1; i >= 1; i--) {
      if (i < 1 << (BUCKET_BITS - level)) level++;
      filled[i] = filled[2 * i]! | filled[2 * i + 1]!;
      this.put(i, filled[i] ? nodeHash(this.node(2 * i), this.node(2 * i + 1)) : empty[level]!);
    }
  }

  root(): Uint8Array {
    return this.node(1).slice();
  }

  bucket(i: number): Uint8Array {
    return this.node(BUCKETS + i).slice();
  }

  set(i: number, hash: Uint8Array): void {
    let n = BUCKETS + i;
    this.put(n, hash);
    for (n >>= 1; n >= 1; n >>= 1) this.put(n, nodeHash(this.node(2 * n), this.node(2 * n + 1)));
  }

  private node(i: number): Uint8Array {
    return this.nodes.subarray(i * 32, i * 32 + 32);
  }

  private put(i: number, h: Uint8Array): void {
    this.nodes.set(h, i * 32);
  }
}

function equal(a: Uint8Array, b: Uint8Array): boolean {
  for (let i = 0; i < 32; i++) if (a[i] !== b[i]) return false;
  return true;
}

/**
 * Label text the anchor object carries: "bkv.anchor <seq> <root hex> <writer>", where
 * writer is 16 hex digits naming the process (one random id per start) that wrote it.
 * Labels written before the writer id existed ("bkv.anchor <seq> <root hex>") still parse,
 * with no writer: existing vaults keep starting.
 */
export function anchorLabel(seq: number, root: Uint8Array, writer?: string): string {
  return `bkv.anchor ${seq} ${toHex(root)}${writer ? ` ${writer}` : ''}`;
}

export function parseAnchorLabel(label: string): { seq: number; root: Uint8Array; writer?: string } | undefined {
  const m = /^bkv\.anchor (\d{1,15}) ([0-9a-f]{64})(?: ([0-9a-f]{16}))?$/.exec(label);
  if (!m) return undefined;
  return { seq: Number(m[1]), root: fromHex(m[2]!), ...(m[3] ? { writer: m[3] } : {}) };
}
