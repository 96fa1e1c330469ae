// One HSM worker thread: a Token with its own session, running batches of
// bound jobs (jobs.ts runJob) synchronously so the main thread's event loop
// never blocks on the HSM. Stateless about keys: every job carries the object
// handles it needs (handles are process-wide, bound by the pool), so a recycle
// only has to update the pool's table. Started by workers.ts, never imported
// elsewhere (the pool imports only its message types).
import { parentPort, workerData } from 'node:worker_threads';
import { Token, pinLibrary, type ModuleQuirks } from '../token.js';
import { enforcePolicy, type ResolvedKeys } from '../../../hsm-policy/enforce.js';
import { VaultError, ErrorCodes } from '../../../protocol/errors.js';
import { runJob, tightValue, type Job, type JobValue, type KeySet } from '../jobs.js';

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

/** The key set as it crosses the thread boundary (handles as plain bytes). */
export type WireKeys = KeySet & { created: string[] };

export type JobResult = { ok: true; v: JobValue } | { ok: false; code: string; message: string };

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

function toWire(k: ResolvedKeys): WireKeys {
  return { kx: k.kx, sig: k.sig, oprf: k.oprf, verifier: k.verifier, tenant: k.tenant, anchors: k.anchors, seals: k.seals, created: k.created };
}

function failure(e: unknown): { code: string; message: string } {
  if (e instanceof VaultError) return { code: e.code, message: e.message };
  return { code: ErrorCodes.HSM_ERROR, message: `HSM worker: ${(e as Error)?.message ?? String(e)}` };
}

function main(): void {
  const port = parentPort;
  if (!port) throw new Error('worker.js runs only as a worker thread');
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
            // Results are often views into Node's 8 KiB buffer pool: send only their bytes.
            results[i] = { ok: true, v: tightValue(runJob(token, m.jobs[i]!)) };
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
