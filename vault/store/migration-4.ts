// Migration 4 (leaf column), frozen. A shipped migration must compute what it
// computed the day it shipped, whatever the live code becomes, so this file
// carries its own copy of the schema-4 row layout and of the leaf hash as
// defined then (core/state-hash.ts leafHash), and imports nothing from the
// live store or core: a later change to the record type or to the leaf
// definition needs a migration of its own and leaves this one alone.
// (Before issue 15 it called the live fromRow() and leafHash(), and db.ts and
// records.ts imported each other.) The byte helpers are the protocol's, pinned
// by its test vectors. test/integration/rollback.test.ts checks that a database migrated
// through here opens against its anchor, which holds while the two definitions
// agree.
import { createHash } from 'node:crypto';
import { concat, frame, u32be, u64be, utf8 } from '../../protocol/bytes.js';

/** A records row as of schema 3 (the columns migration 4 reads). */
export interface RowV3 {
  user_id: string;
  state: number;
  generation: number;
  attempts: number;
  attempt_limit: number;
  verifier: Buffer | null;
  sealed: Buffer | null;
  seal_epoch: number | null;
  kdf: string | null;
}

const STATE_V3: Record<number, string> = { 1: 'active', 2: 'locked', 3: 'deleted' };

const opt = (b: Buffer | null): Uint8Array => (b ? concat(new Uint8Array([1]), new Uint8Array(b)) : new Uint8Array([0]));

/** The leaf hash of a schema-3 row, as schema 4 defined it. */
export function leafHashV4(r: RowV3): Uint8Array {
  const state = STATE_V3[r.state];
  if (!state) throw new Error(`record ${JSON.stringify(r.user_id)} has unknown state ${r.state}`);
  const k = r.kdf ? (JSON.parse(r.kdf) as { alg: string; m: number; t: number; p: number }) : null;
  const kdf = k ? concat(utf8(k.alg), u32be(k.m), u32be(k.t), u32be(k.p)) : new Uint8Array(0);
  const framed = frame(
    'bkv-v1-state-leaf',
    utf8(r.user_id),
    utf8(state),
    u64be(r.generation),
    u32be(r.attempts),
    u32be(r.attempt_limit),
    opt(r.verifier),
    opt(r.sealed),
    u32be(r.seal_epoch ?? 0),
    kdf,
  );
  return createHash('sha256').update(framed).digest();
}
