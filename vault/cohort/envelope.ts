// What the engine stores in etcd around a caller's value: a version byte, a
// flags byte, and the id of the commit (one etcd txn attempt) that wrote it.
//
// The commit id is what makes an unknown outcome decidable: after a txn whose
// fate the client could not learn, the engine looks for its id in the history
// it applies (ledger.ts), instead of running the caller's decide() twice.
// A tombstone (a deleted record) keeps its commit id and a mod_revision, so
// deletes are checked and compared like any other write, and a destroyed
// record stays visibly destroyed rather than becoming "never existed".
import { randomBytes } from 'node:crypto';

export const ENVELOPE_VERSION = 1;
export const COMMIT_ID_BYTES = 16;
const HEADER = 2 + COMMIT_ID_BYTES;
const TOMBSTONE = 1;

export interface Envelope {
  commitId: string; // hex
  /** undefined for a tombstone. */
  payload: Uint8Array | undefined;
}

export function newCommitId(): string {
  return randomBytes(COMMIT_ID_BYTES).toString('hex');
}

export function encodeEnvelope(commitId: string, payload: Uint8Array | undefined): Uint8Array {
  const id = Buffer.from(commitId, 'hex');
  if (id.length !== COMMIT_ID_BYTES) throw new RangeError('commit id must be 16 bytes');
  const out = new Uint8Array(HEADER + (payload?.length ?? 0));
  out[0] = ENVELOPE_VERSION;
  out[1] = payload === undefined ? TOMBSTONE : 0;
  out.set(id, 2);
  if (payload) out.set(payload, HEADER);
  return out;
}

/** Undefined for a value the engine did not write (wrong version, too short, unknown flags). */
export function decodeEnvelope(raw: Uint8Array): Envelope | undefined {
  if (raw.length < HEADER || raw[0] !== ENVELOPE_VERSION || (raw[1]! & ~TOMBSTONE) !== 0) return undefined;
  const tomb = (raw[1]! & TOMBSTONE) !== 0;
  if (tomb && raw.length !== HEADER) return undefined;
  return {
    commitId: Buffer.from(raw.subarray(2, HEADER)).toString('hex'),
    payload: tomb ? undefined : raw.slice(HEADER),
  };
}

/** The commit id alone, cheaply, for the applier's in-doubt lookups. */
export function commitIdOf(raw: Uint8Array): string | undefined {
  if (raw.length < HEADER || raw[0] !== ENVELOPE_VERSION) return undefined;
  return Buffer.from(raw.subarray(2, HEADER)).toString('hex');
}
