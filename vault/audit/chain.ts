// The audit log's format, shared by the writer (log.ts) and the offline
// verifier (`bkv-admin audit verify`). Pure: no I/O, no HSM.
//
// One JSON object per line:
//   {"seq":N,"time":"ISO-8601","event":"…",…event fields…,"prev":"<hash of line N-1>","hash":"<hash of this line>"}
// hash = hex SHA-256 over the exact JSON text of the line without its "hash"
// field (keys in the order written). Line 1's prev is 64 zeros. Editing,
// removing, inserting or reordering any line breaks the chain at that point.
//
// A chain alone can be rewritten wholesale by whoever can write the file, so
// every so often the vault appends a checkpoint: event "audit.checkpoint"
// with {vaultId, headSeq, headHash, sig}, where sig is the HSM `sig` key's
// ECDSA P-256 signature (raw r‖s) over
//   SHA-256(frame("bkv-v1-audit-checkpoint", vaultId(16), u64be(headSeq), headHash(32)))
// — the same key clients pin (vault-key.pub), under its own domain-separation
// string so a checkpoint signature can never pass as a descriptor signature.
// Lines up to a checkpoint's head can only be rewritten by someone who can
// make the HSM sign; lines after the last checkpoint are protected by the
// chain only, and a cut-off tail is visible only against a later copy.
import { createHash, createPublicKey } from 'node:crypto';
import { p256 } from '@noble/curves/nist.js';
import { sha256 } from '@noble/hashes/sha2.js';
import { frame, fromHex, toHex, u64be } from '../../protocol/bytes.js';
import { vaultIdOf } from '../../protocol/descriptor.js';

export const GENESIS = '0'.repeat(64);
export const CHECKPOINT_DST = 'bkv-v1-audit-checkpoint';
export const CHECKPOINT_EVENT = 'audit.checkpoint';

export type AuditValue = string | number | boolean | null | (string | number | boolean)[];
export type AuditFields = Record<string, AuditValue>;

/** Field names the format owns: event fields may not use them. */
export const RESERVED = new Set(['seq', 'time', 'event', 'prev', 'hash']);

export function lineHash(bodyJson: string): string {
  return createHash('sha256').update(bodyJson).digest('hex');
}

/** Serialise one line (without the newline). Returns its hash too. */
export function encodeLine(seq: number, time: string, event: string, fields: AuditFields, prev: string): { line: string; hash: string } {
  const body: Record<string, unknown> = { seq, time, event };
  for (const [k, v] of Object.entries(fields)) if (!RESERVED.has(k)) body[k] = v;
  body.prev = prev;
  const json = JSON.stringify(body);
  const hash = lineHash(json);
  // Appending the hash as the last key keeps the body's text exactly as hashed.
  return { line: `${json.slice(0, -1)},"hash":"${hash}"}`, hash };
}

export function checkpointDigest(vaultId: Uint8Array, headSeq: number, headHash: string): Uint8Array {
  return sha256(frame(CHECKPOINT_DST, vaultId, u64be(headSeq), fromHex(headHash)));
}

/** 65-byte uncompressed P-256 point from vault-key.pub (PEM SPKI) or 130 hex digits. */
export function publicKeyFromText(text: string): Uint8Array {
  const t = text.trim();
  if (/^[0-9a-fA-F]{130}$/.test(t)) return fromHex(t);
  const jwk = createPublicKey(t).export({ format: 'jwk' }) as { kty?: string; crv?: string; x?: string; y?: string };
  if (jwk.kty !== 'EC' || jwk.crv !== 'P-256' || !jwk.x || !jwk.y) throw new Error('the vault key must be a P-256 public key');
  return Uint8Array.from([4, ...Buffer.from(jwk.x, 'base64url'), ...Buffer.from(jwk.y, 'base64url')]);
}

export interface VerifyProblem {
  /** 1-based line number in the file. */
  line: number;
  message: string;
}

export interface VerifyReport {
  ok: boolean;
  lines: number;
  checkpoints: number;
  /** Highest seq covered by a valid HSM signature (0 when none). */
  signedThrough: number;
  /** Lines after the last signed head: protected by the chain only. */
  unsignedTail: number;
  firstTime?: string;
  lastTime?: string;
  problems: VerifyProblem[];
}

/** How far back a checkpoint's head may lie behind it (the writer signs its current head). */
const HEAD_WINDOW = 4096;

/**
 * Check a whole audit file. Reports every problem it can attribute to a line
 * (capped), and keeps going after a break so one edit does not hide another.
 */
export function verifyAudit(text: string, vaultKey: Uint8Array, opts: { maxProblems?: number } = {}): VerifyReport {
  const max = opts.maxProblems ?? 50;
  const problems: VerifyProblem[] = [];
  const problem = (line: number, message: string) => {
    if (problems.length < max) problems.push({ line, message });
  };
  const vaultId = vaultIdOf(vaultKey);
  const vaultIdHex = toHex(vaultId);
  const rawLines = text.split('\n');
  const trailing = rawLines.pop();
  if (trailing !== undefined && trailing !== '') problem(rawLines.length + 1, 'last line is incomplete (no newline): cut off or still being written');
  const recent = new Map<number, string>();
  let prevHash = GENESIS;
  let prevSeq = 0;
  let checkpoints = 0;
  let signedThrough = 0;
  /** Seqs of event lines (not checkpoints) after the highest signed head so far. */
  let unsigned: number[] = [];
  let firstTime: string | undefined;
  let lastTime: string | undefined;
  rawLines.forEach((raw, i) => {
    const n = i + 1;
    let obj: Record<string, unknown>;
    try {
      obj = JSON.parse(raw) as Record<string, unknown>;
      if (!obj || typeof obj !== 'object' || Array.isArray(obj)) throw new Error('not an object');
    } catch {
      problem(n, 'not a JSON object');
      prevSeq++;
      prevHash = '';
      return;
    }
    const { seq, time, event, prev, hash } = obj;
    if (typeof seq !== 'number' || typeof time !== 'string' || typeof event !== 'string' || typeof prev !== 'string' || typeof hash !== 'string') {
      problem(n, 'missing seq, time, event, prev or hash');
      prevSeq++;
      prevHash = typeof hash === 'string' ? hash : '';
      return;
    }
    // The hash covers the line's text up to the hash field, exactly as written.
    const suffix = `,"hash":"${hash}"}`;
    const recomputed = raw.endsWith(suffix) ? lineHash(raw.slice(0, -suffix.length) + '}') : '';
    if (recomputed !== hash) problem(n, `seq ${seq}: content does not match its hash (the line was modified)`);
    if (seq !== prevSeq + 1) problem(n, `seq ${seq} follows seq ${prevSeq}: ${seq <= prevSeq ? 'lines reordered or repeated' : 'lines removed'}`);
    else if (prev !== prevHash && prevHash !== '') problem(n, `seq ${seq}: prev does not match the hash of the line before (a line was removed, inserted, reordered or modified)`);
    if (event === CHECKPOINT_EVENT) {
      checkpoints++;
      const { vaultId: vid, headSeq, headHash, sig } = obj;
      if (vid !== vaultIdHex) {
        problem(n, `checkpoint at seq ${seq} names vault ${String(vid)}, not the vault of this key (${vaultIdHex})`);
      } else if (typeof headSeq !== 'number' || typeof headHash !== 'string' || typeof sig !== 'string' || !/^[0-9a-f]{64}$/.test(headHash) || !/^[0-9a-f]{128}$/.test(sig)) {
        problem(n, `checkpoint at seq ${seq} is malformed`);
      } else if (recent.get(headSeq) !== headHash) {
        problem(n, `checkpoint at seq ${seq} signs head ${headSeq} whose line is missing or different`);
      } else if (!p256.verify(fromHex(sig), checkpointDigest(vaultId, headSeq, headHash), vaultKey, { prehash: false, format: 'compact', lowS: false })) {
        problem(n, `checkpoint at seq ${seq}: HSM signature does not verify with the vault key`);
      } else {
        signedThrough = Math.max(signedThrough, headSeq);
        unsigned = unsigned.filter((s) => s > signedThrough);
      }
    } else {
      unsigned.push(seq);
    }
    firstTime ??= time;
    lastTime = time;
    recent.set(seq, hash);
    if (recent.size > HEAD_WINDOW) recent.delete(recent.keys().next().value as number);
    prevSeq = seq;
    prevHash = hash;
  });
  return {
    ok: problems.length === 0,
    lines: rawLines.length,
    checkpoints,
    signedThrough,
    unsignedTail: unsigned.length,
    ...(firstTime ? { firstTime } : {}),
    ...(lastTime ? { lastTime } : {}),
    problems,
  };
}
