// Dispatch: which queued jobs go to which worker thread, in what batches.
//
//   control    one more worker, with its own session, serves only the control
//              lane. Every answer waits for an anchor write, and behind two
//              batches of ECDH on a busy worker that write waited up to 15 ms;
//              on its own thread it waits for nothing (docs/PERFORMANCE.md).
//              If that thread is gone, the control lane goes first on the others.
//   batching   a free worker takes up to `maxBatch` jobs in one message, so
//              under load the per-message cost is shared; `depth` batches may
//              be in flight per worker so it never waits for the main thread.
import { ErrorCodes, type VaultError } from '../../../protocol/errors.js';
import type { Job } from '../jobs.js';
import type { Fifo, JobQueue, Queued } from './queue.js';
import type { WorkerSlot } from './workers.js';

export interface BatchOptions {
  maxBatch: number;
  depth: number;
}

/** Sends one batch; false when dispatching must stop now (a recycle is due). */
export type Send = (slot: WorkerSlot, batch: Queued[], jobs: Job[], derives: number) => boolean;

/** Send what `queue` holds to the live `slots`; false once `send` said stop. */
export function dispatch(slots: readonly WorkerSlot[], queue: JobQueue, o: BatchOptions, bind: (q: Queued) => Job, send: Send): boolean {
  const control = slots.find((s) => s.controlOnly);
  const workers = slots.filter((s) => !s.controlOnly);
  if (control && workers.length > 0) {
    if (!fill([control], [queue.lanes[0]], queue, o, bind, send)) return false;
    return fill(workers, [queue.lanes[1], queue.lanes[2]], queue, o, bind, send);
  }
  return fill(workers.length > 0 ? workers : slots, queue.lanes, queue, o, bind, send);
}

/** Batches from `lanes` (in order) to the least busy of `slots` until the lanes are empty or every slot is at depth. */
function fill(slots: readonly WorkerSlot[], lanes: readonly Fifo<Queued>[], queue: JobQueue, o: BatchOptions, bind: (q: Queued) => Job, send: Send): boolean {
  for (;;) {
    const n = queue.count(lanes);
    if (n === 0) return true;
    let slot: WorkerSlot | undefined;
    for (const s of slots) if (s.inflight.size < o.depth && (!slot || s.inflight.size < slot.inflight.size)) slot = s;
    if (!slot) return true;
    const size = Math.min(o.maxBatch, Math.max(1, Math.ceil(n / slots.length)));
    const batch: Queued[] = [];
    const jobs: Job[] = [];
    let derives = 0;
    while (batch.length < size) {
      const q = queue.take(lanes);
      if (!q) break;
      if (q.derive) derives++;
      let job: Job;
      try {
        job = bind(q);
      } catch (e) {
        // E.g. a seal epoch destroyed while the job waited: answered here, never sent.
        q.resolve({ ok: false, code: (e as VaultError).code ?? ErrorCodes.HSM_ERROR, message: (e as Error).message });
        continue;
      }
      batch.push(q);
      jobs.push(job);
    }
    if (batch.length === 0) continue;
    if (!send(slot, batch, jobs, derives)) return false;
  }
}
