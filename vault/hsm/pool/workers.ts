// One HSM worker thread as the main thread sees it: starting it (and waiting
// for its session), the batches it has in flight, control messages (suspend,
// reinit, close) with their answers, and what happens when it ends.
import { Worker } from 'node:worker_threads';
import { VaultError, ErrorCodes, type ErrorCode } from '../../../protocol/errors.js';
import { workerUrl } from '../../worker-url.js';
import type { Job } from '../jobs.js';
import type { Queued } from './queue.js';
import type { FromWorker, JobResult, ToWorker, WireKeys, WorkerInit } from './worker.js';

type Ack = Extract<FromWorker, { type: 'ack' }>;

export function defaultWorkerUrl(): URL {
  return workerUrl(import.meta.url, 'worker.js');
}

export function unavailable(message: string): JobResult {
  return { ok: false, code: ErrorCodes.HSM_UNAVAILABLE, message };
}

export class WorkerSlot {
  /** Batches sent and not answered, by message id. */
  readonly inflight = new Map<number, Queued[]>();
  private readonly control = new Map<number, (m: Ack) => void>();
  alive = true;

  private constructor(
    readonly worker: Worker,
    readonly index: number,
    /** Serves only the control lane. */
    readonly controlOnly: boolean,
  ) {}

  /** Start a worker and wait until its token is open (and, for the first, the key set resolved). */
  static async start(url: URL, init: WorkerInit, index: number, controlOnly: boolean, started: WorkerSlot[]): Promise<{ slot: WorkerSlot; keys?: WireKeys }> {
    const worker = new Worker(url, { workerData: init, env: process.env, name: controlOnly ? 'bkv-hsm-control' : `bkv-hsm-${index}` });
    const slot = new WorkerSlot(worker, index, controlOnly);
    started.push(slot);
    const ready = await new Promise<FromWorker>((res, rej) => {
      worker.once('message', res);
      worker.once('error', rej);
      worker.once('exit', (code) => rej(new VaultError(ErrorCodes.HSM_UNAVAILABLE, `HSM worker exited during start (${code})`)));
    });
    worker.removeAllListeners('error');
    worker.removeAllListeners('exit');
    if (ready.type === 'fatal') throw new VaultError(ready.code as ErrorCode, ready.message);
    if (ready.type !== 'ready') throw new VaultError(ErrorCodes.HSM_ERROR, 'HSM worker did not start');
    return { slot, ...(ready.keys ? { keys: ready.keys } : {}) };
  }

  /**
   * Listen for answers. `onBatch` runs after each answered batch and after the
   * thread ended (its batches then fail HSM_UNAVAILABLE: retryable); `onLost` reports why it ended.
   */
  attach(onBatch: () => void, onLost: (why: string) => void): void {
    this.worker.on('message', (m: FromWorker) => {
      if (m.type === 'done') {
        const batch = this.inflight.get(m.id);
        if (!batch) return;
        this.inflight.delete(m.id);
        for (let i = 0; i < batch.length; i++) {
          batch[i]!.resolve(m.results[i] ?? { ok: false, code: ErrorCodes.HSM_ERROR, message: 'HSM worker lost a result' });
        }
        onBatch();
      } else if (m.type === 'ack') {
        const cb = this.control.get(m.id);
        this.control.delete(m.id);
        cb?.(m);
      }
    });
    const lost = (why: string) => {
      if (!this.alive) return;
      this.alive = false;
      onLost(why);
      for (const batch of this.inflight.values()) for (const q of batch) q.resolve(unavailable('the HSM worker ended'));
      this.inflight.clear();
      for (const cb of this.control.values()) cb({ type: 'ack', id: 0, error: { code: ErrorCodes.HSM_UNAVAILABLE, message: 'HSM worker ended' } });
      this.control.clear();
      onBatch();
    };
    this.worker.on('error', (e) => lost(e.message));
    this.worker.on('exit', (code) => lost(`exit ${code}`));
  }

  send(id: number, batch: Queued[], jobs: Job[]): void {
    this.inflight.set(id, batch);
    this.worker.postMessage({ type: 'batch', id, jobs } satisfies ToWorker);
  }

  /** A control message and its answer; HSM_UNAVAILABLE when none comes within `timeoutMs`. */
  request(id: number, msg: ToWorker, timeoutMs = 30_000): Promise<Ack> {
    return new Promise((res, rej) => {
      const timer = setTimeout(() => {
        this.control.delete(id);
        rej(new VaultError(ErrorCodes.HSM_UNAVAILABLE, `HSM worker did not answer ${msg.type}`));
      }, timeoutMs);
      this.control.set(id, (m) => {
        clearTimeout(timer);
        if (m.error) rej(new VaultError(m.error.code as ErrorCode, m.error.message));
        else res(m);
      });
      this.worker.postMessage({ ...msg, id });
    });
  }

  /** Close its sessions and end the thread (the library stays pinned by the others). */
  async stop(id: number): Promise<void> {
    if (!this.alive) return;
    await this.request(id, { type: 'close', id: 0 }, 2000).catch(() => undefined);
    this.alive = false;
    await this.worker.terminate().catch(() => undefined);
  }
}
