// One HSM worker thread: a Token with its own session, running batches of
// PKCS#11 calls synchronously so the main thread's event loop never blocks on
// the HSM. Stateless about keys: every job carries the object handle it needs
// (handles are process-wide, resolved by the pool), so a recycle only has to
// update the pool's copy. Started by worker-keys.ts, never imported elsewhere.
import { parentPort, workerData } from 'node:worker_threads';
import { Token, pinLibrary, type Handle, type ModuleQuirks } from './token.js';
import { enforcePolicy, epochProtection, type ResolvedKeys } from '../../hsm-policy/enforce.js';
import { VaultError, ErrorCodes } from '../../protocol/errors.js';
import { casAnchor, type AnchorExpectation } from './anchor.js';

export interface WorkerInit {
  modulePath: string;
  tokenLabel: string;
  pin: string;
  /** C_Initialize library parameters (hsm.libraryParameters), if the module needs any. */
  libraryParameters?: string;
  /** The module's quirks as the capability check measured them in the main thread. */
  quirks?: ModuleQuirks;
  /** Resolve (and with `create`, make) the key set after opening: the first worker only. */
  resolve: boolean;
  create: boolean;
}

/** Handles as plain bytes: what crosses the thread boundary. */
export interface WireKeys {
  kx: { priv: Uint8Array; point: Uint8Array };
  sig: { priv: Uint8Array; point: Uint8Array };
  oprf: { priv: Uint8Array; point: Uint8Array };
  verifier: Uint8Array;
  tenant: Uint8Array;
  /** The two state anchor slots (hsm-policy ANCHOR), written alternately. */
  anchor: Uint8Array;
  anchorB: Uint8Array;
  seals: [number, Uint8Array][];
  created: string[];
}

export type Job =
  | { op: 'ecdh'; key: Uint8Array; point: Uint8Array }
  | { op: 'hmac'; key: Uint8Array; data: Uint8Array }
  | { op: 'verify'; key: Uint8Array; data: Uint8Array; mac: Uint8Array }
  | { op: 'seal'; key: Uint8Array; aad: Uint8Array; pt: Uint8Array }
  | { op: 'unseal'; key: Uint8Array; aad: Uint8Array; blob: Uint8Array }
  | { op: 'sign'; key: Uint8Array; digest: Uint8Array }
  | { op: 'random'; n: number }
  | { op: 'readLabel'; key: Uint8Array }
  | { op: 'setLabel'; key: Uint8Array; label: string }
  /** The anchor write: both slots checked against `expect`, then `target` written (hsm/anchor.ts). Answers null, or the labels found. */
  | { op: 'casAnchor'; slots: [Uint8Array, Uint8Array]; expect: AnchorExpectation; target: 0 | 1; label: string }
  /** A new seal epoch key, in the phase of `key`, the current epoch's key. */
  | { op: 'genSeal'; label: string; key: Uint8Array }
  | { op: 'destroy'; key: Uint8Array }
  /** A seal epoch's key that arrived by the ceremony: the key set checked against the policy, then its handle (or null). */
  | { op: 'findSeal'; epoch: number }
  | { op: 'ping' };

export type JobResult = { ok: true; v: Uint8Array | boolean | string | null } | { ok: false; code: string; message: string };

export type ToWorker =
  | { type: 'batch'; id: number; jobs: Job[] }
  | { type: 'suspend'; id: number }
  | { type: 'reinit'; id: number }
  | { type: 'close'; id: number };

export type FromWorker =
  | { type: 'ready'; keys?: WireKeys }
  | { type: 'fatal'; code: string; message: string }
  | { type: 'done'; id: number; results: JobResult[] }
  | { type: 'ack'; id: number; keys?: WireKeys; error?: { code: string; message: string } };

const IV = 12;

export function toWire(k: ResolvedKeys): WireKeys {
  return {
    kx: { priv: k.kx.priv, point: k.kx.point },
    sig: { priv: k.sig.priv, point: k.sig.point },
    oprf: { priv: k.oprf.priv, point: k.oprf.point },
    verifier: k.verifier,
    tenant: k.tenant,
    anchor: k.anchors[0],
    anchorB: k.anchors[1],
    seals: [...k.seals.entries()],
    created: k.created,
  };
}

// Structured clone turns a Buffer into a plain Uint8Array; pkcs11js wants Buffers.
const h = (u: Uint8Array): Handle => Buffer.from(u.buffer, u.byteOffset, u.byteLength) as Handle;

function run(token: Token, j: Job): Uint8Array | boolean | string | null {
  switch (j.op) {
    case 'ecdh':
      return token.ecdhX(h(j.key), j.point);
    case 'hmac':
      return token.hmacSha256(h(j.key), j.data);
    case 'verify':
      return token.hmacSha256Verify(h(j.key), j.data, j.mac);
    case 'seal': {
      const iv = token.random(IV);
      return Buffer.concat([iv, token.aesGcmEncrypt(h(j.key), iv, j.aad, j.pt)]);
    }
    case 'unseal':
      if (j.blob.length < IV + 16) return null;
      return token.aesGcmDecrypt(h(j.key), j.blob.subarray(0, IV), j.aad, j.blob.subarray(IV));
    case 'sign':
      return token.ecdsaSign(h(j.key), j.digest);
    case 'random':
      return token.random(j.n);
    case 'readLabel':
      return token.readLabel(h(j.key));
    case 'setLabel':
      token.setLabel(h(j.key), j.label);
      return null;
    case 'casAnchor': {
      const found = casAnchor(token, [h(j.slots[0]), h(j.slots[1])], j.expect, j.target, j.label);
      return found ? JSON.stringify(found) : null;
    }
    case 'genSeal':
      return token.generateSecretKey(j.label, 'aes', 32, ['encrypt', 'decrypt'], epochProtection(token, h(j.key)));
    case 'destroy':
      token.destroy(h(j.key));
      return null;
    case 'findSeal':
      return enforcePolicy(token, { create: false }).seals.get(j.epoch) ?? null;
    case 'ping':
      return token.ping();
  }
}

function failure(e: unknown): { code: string; message: string } {
  if (e instanceof VaultError) return { code: e.code, message: e.message };
  return { code: ErrorCodes.HSM_ERROR, message: `HSM worker: ${(e as Error)?.message ?? String(e)}` };
}

function main(): void {
  const port = parentPort;
  if (!port) throw new Error('hsm-worker.js runs only as a worker thread');
  const init = workerData as WorkerInit;
  // This realm never finalises the library on its own: only a coordinated recycle does.
  // Never released: when this thread ends, the library stays up for the others.
  pinLibrary(init.modulePath, init.libraryParameters);
  let token: Token;
  try {
    token = Token.open({
      modulePath: init.modulePath,
      tokenLabel: init.tokenLabel,
      pin: init.pin,
      maxSessions: 2,
      ...(init.libraryParameters ? { libraryParameters: init.libraryParameters } : {}),
      ...(init.quirks ? { quirks: init.quirks } : {}),
    });
    const keys = init.resolve ? toWire(enforcePolicy(token, { create: init.create })) : undefined;
    port.postMessage({ type: 'ready', ...(keys ? { keys } : {}) } satisfies FromWorker);
  } catch (e) {
    port.postMessage({ type: 'fatal', ...failure(e) } satisfies FromWorker);
    return;
  }
  port.on('message', (m: ToWorker) => {
    switch (m.type) {
      case 'batch': {
        const results: JobResult[] = new Array(m.jobs.length);
        for (let i = 0; i < m.jobs.length; i++) {
          try {
            const v = run(token, m.jobs[i]!);
            // Results are often views into Node's 8 KiB buffer pool: send only their bytes.
            results[i] = { ok: true, v: v instanceof Uint8Array && (v.byteOffset !== 0 || v.byteLength !== v.buffer.byteLength) ? new Uint8Array(v) : v };
          } catch (e) {
            results[i] = { ok: false, ...failure(e) };
          }
        }
        port.postMessage({ type: 'done', id: m.id, results } satisfies FromWorker);
        return;
      }
      case 'suspend':
        token.dropSessions();
        port.postMessage({ type: 'ack', id: m.id } satisfies FromWorker);
        return;
      case 'reinit':
        try {
          token.reinitialize();
          port.postMessage({ type: 'ack', id: m.id, keys: toWire(enforcePolicy(token, { create: false })) } satisfies FromWorker);
        } catch (e) {
          port.postMessage({ type: 'ack', id: m.id, error: failure(e) } satisfies FromWorker);
        }
        return;
      case 'close':
        // Sessions only; the pinned library stays initialised for the other threads.
        token.close();
        port.postMessage({ type: 'ack', id: m.id } satisfies FromWorker);
        port.close();
        return;
    }
  });
}

main();
