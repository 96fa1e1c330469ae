// The HSM port on a pool of worker threads. pkcs11js calls are synchronous
// and SoftHSM's ECDH costs ~100 µs, so on the main thread they would stall the
// event loop; here each worker owns one session and runs batches of calls,
// while the main thread only queues (queue.ts: lanes, admission), dispatches
// (dispatch.ts: control thread, batching), recycles the library (recycle.ts)
// and matches answers (workers.ts). This file wires them together.
//
// Ownership of the process-wide library: the main realm pins it (pinLibrary)
// for as long as the pool is open, and every worker pins it in its own realm,
// so no Token.close() anywhere finalises it under a running worker. Only the
// recycle finalises it, with every worker idle. Rule for the rest of the
// process: while a pool is open, do not run another Token in this process
// across a recycle (its session and object handles would go stale).
import { existsSync } from 'node:fs';
import { availableParallelism } from 'node:os';
import { fileURLToPath } from 'node:url';
import type { Logger } from 'pino';
import { VaultError, ErrorCodes, type ErrorCode } from '../../../protocol/errors.js';
import { pinLibrary, type TokenConfig } from '../token.js';
import { KeyTable, tight, type Job } from '../jobs.js';
import type { HsmOp, HsmPort, ResultOf } from '../port.js';
import { HsmKeys } from '../keys.js';
import { JobQueue, type Queued } from './queue.js';
import { dispatch, type BatchOptions } from './dispatch.js';
import { Recycler } from './recycle.js';
import { WorkerSlot, defaultWorkerUrl, unavailable } from './workers.js';
import type { JobResult, WireKeys, WorkerInit } from './worker.js';

export interface WorkerPoolOptions {
  /** Worker threads, each with one HSM session. Default: the number of cores. */
  threads?: number;
  /** ECDH jobs allowed to wait before new ones get OVERLOADED. Default 256 per thread. */
  maxQueue?: number;
  /** ECDH derives between library recycles (memory). 0 disables recycling. Default 32 768 (~8 MB). */
  recycleAfter?: number;
  /** Jobs per message to a worker. Default 16. */
  maxBatch?: number;
  /** Batches in flight per worker. Default 2. */
  depth?: number;
  /** Compiled pool/worker.js; found next to this file or under dist/ by default. */
  workerUrl?: URL;
  /** One extra worker for the control lane (anchor writes). Default true. */
  controlThread?: boolean;
}

export interface PoolStats {
  /** Live workers serving HSM work (not counting the control thread). */
  threads: number;
  /** The control thread is alive. */
  control: boolean;
  queued: number;
  waitingDerives: number;
  inFlight: number;
  jobs: number;
  batches: number;
  derives: number;
  derivesSinceRecycle: number;
  recycles: number;
  recycleMsTotal: number;
  recycleMsMax: number;
  overloaded: number;
}

/** How long ping() waits for its round trip before answering false. */
const PING_TIMEOUT_MS = 2000;

export class HsmPool implements HsmPort {
  readonly points: { kx: Uint8Array; sig: Uint8Array };
  /** Labels created while resolving the key set. */
  readonly created: string[];

  readonly table: KeyTable;
  readonly queue: JobQueue;
  private readonly recycler: Recycler;
  private nextId = 1;
  private closed = false;
  private pumpScheduled = false;
  private idleWaiters: (() => void)[] = [];
  private readonly counters = { jobs: 0, batches: 0, derives: 0 };
  private unpin: (() => void) | undefined;
  private shutdownPromise: Promise<void> | undefined;

  private constructor(
    readonly slots: WorkerSlot[],
    keys: WireKeys,
    private readonly opts: BatchOptions & { maxQueue: number; recycleAfter: number },
    readonly log: Logger | undefined,
    unpin: () => void,
  ) {
    this.unpin = unpin;
    this.table = new KeyTable(keys);
    this.points = { kx: this.table.points.kx, sig: this.table.points.sig };
    this.created = keys.created;
    this.queue = new JobQueue(opts.maxQueue);
    this.recycler = new Recycler(
      {
        slots,
        table: this.table,
        queue: this.queue,
        log,
        nextId: () => this.nextId++,
        isClosed: () => this.closed,
        pump: () => this.pump(),
      },
      opts.recycleAfter,
    );
    for (const s of slots) {
      s.attach(
        () => this.afterBatch(),
        (why) => {
          if (!this.closed) this.log?.error({ event: 'hsm.worker.lost', worker: s.index, why }, 'HSM worker thread ended');
        },
      );
    }
  }

  /**
   * Start the workers: the first opens the token and resolves (with `create`,
   * makes) the key set under hsm-policy; the others open sessions and share its
   * handles. Fails like Token.open / enforcePolicy would.
   */
  static async open(cfg: TokenConfig, o: WorkerPoolOptions & { create?: boolean; log?: Logger } = {}): Promise<HsmPool> {
    const threads = Math.max(1, o.threads ?? availableParallelism());
    const opts = {
      maxQueue: Math.max(1, o.maxQueue ?? 256 * threads),
      recycleAfter: Math.max(0, o.recycleAfter ?? 32_768),
      maxBatch: Math.max(1, o.maxBatch ?? 16),
      depth: Math.max(1, o.depth ?? 2),
    };
    const url = o.workerUrl ?? defaultWorkerUrl();
    if (!existsSync(fileURLToPath(url))) {
      throw new VaultError(ErrorCodes.HSM_UNAVAILABLE, `HSM worker script ${fileURLToPath(url)} is missing; build first (npx tsc -p .)`);
    }
    const unpin = pinLibrary(cfg.modulePath, cfg.libraryParameters);
    const slots: WorkerSlot[] = [];
    try {
      const init = (resolve: boolean): WorkerInit => ({
        modulePath: cfg.modulePath,
        tokenLabel: cfg.tokenLabel,
        pin: cfg.pin,
        ...(cfg.libraryParameters ? { libraryParameters: cfg.libraryParameters } : {}),
        ...(cfg.quirks ? { quirks: cfg.quirks } : {}),
        resolve,
        create: !!o.create,
      });
      // The first worker alone: it may create keys, and nobody else logs in before it checked the PIN.
      const first = await WorkerSlot.start(url, init(true), 0, false, slots);
      // The others only open sessions on a token the first has checked: side by side, so a
      // start costs about two thread starts, not one per thread.
      const rest: Promise<unknown>[] = [];
      for (let i = 1; i < threads; i++) rest.push(WorkerSlot.start(url, init(false), i, false, slots));
      if (o.controlThread ?? true) rest.push(WorkerSlot.start(url, init(false), threads, true, slots));
      await Promise.all(rest);
      return new HsmPool(slots, first.keys!, opts, o.log, unpin);
    } catch (e) {
      await Promise.all(slots.map((s) => s.worker.terminate().catch(() => undefined)));
      unpin();
      throw e;
    }
  }

  // ---- HsmPort --------------------------------------------------------------------

  epochs(): number[] {
    return this.table.epochs();
  }

  async call<O extends HsmOp>(op: O): Promise<ResultOf<O>> {
    const r = await this.submit(op);
    if (!r.ok) {
      if (r.code === ErrorCodes.HSM_UNAVAILABLE) this.recycler.heal();
      throw new VaultError(r.code as ErrorCode, r.message);
    }
    return this.table.settle(op, r.v);
  }

  /**
   * A real C_GetSessionInfo round trip on the control lane, answered within
   * PING_TIMEOUT_MS (false after that); false at once once the pool is closed,
   * has lost its workers or failed a recycle.
   */
  async ping(): Promise<boolean> {
    if (this.closed || this.recycler.broken || !this.slots.some((s) => s.alive)) return false;
    let timer: NodeJS.Timeout | undefined;
    const late = new Promise<boolean>((res) => {
      timer = setTimeout(() => res(false), PING_TIMEOUT_MS);
    });
    try {
      return await Promise.race([this.submit({ op: 'ping' }).then((r) => r.ok && r.v === true), late]);
    } finally {
      clearTimeout(timer);
    }
  }

  /**
   * Refuse new work, fail what is still queued (HSM_UNAVAILABLE: retryable),
   * let in-flight batches finish, end the workers, then release the library
   * (the main realm finalises it if nothing else here holds it).
   */
  close(): Promise<void> {
    return (this.shutdownPromise ??= (async () => {
      this.closed = true;
      this.recycler.stop();
      this.queue.failAll(unavailable('the HSM pool is closed'));
      await this.idle();
      await Promise.all(this.slots.map((s) => s.stop(this.nextId++)));
      this.unpin?.();
      this.unpin = undefined;
    })());
  }

  // ---- pool ----------------------------------------------------------------------

  stats(): PoolStats {
    const c = this.counters;
    const r = this.recycler;
    let inFlight = 0;
    for (const s of this.slots) for (const b of s.inflight.values()) inFlight += b.length;
    return {
      threads: this.slots.filter((s) => s.alive && !s.controlOnly).length,
      control: this.slots.some((s) => s.alive && s.controlOnly),
      queued: this.queue.count(),
      waitingDerives: this.queue.waitingDerives,
      inFlight,
      jobs: c.jobs,
      batches: c.batches,
      derives: c.derives,
      derivesSinceRecycle: r.sinceRecycle,
      recycles: r.recycles,
      recycleMsTotal: Math.round(r.msTotal * 10) / 10,
      recycleMsMax: Math.round(r.msMax * 10) / 10,
      overloaded: this.queue.overloaded,
    };
  }

  /** Recycle the library now (tests, operators); resolves when serving again. */
  async recycle(): Promise<void> {
    if (this.closed) throw new VaultError(ErrorCodes.HSM_UNAVAILABLE, 'the HSM pool is closed');
    return this.recycler.request();
  }

  private submit(spec: Queued['spec']): Promise<JobResult> {
    if (this.closed) return Promise.resolve(unavailable('the HSM pool is closed'));
    if (this.recycler.broken) return Promise.resolve(unavailable('the HSM is being re-initialised after a failure'));
    const answer = this.queue.admit(spec);
    this.schedulePump();
    return answer;
  }

  /**
   * Dispatch after the current I/O phase rather than per call: the jobs of every
   * request parsed in this turn go out together, in fewer (larger) batches,
   * each of which costs a cross-thread wake-up.
   */
  private schedulePump(): void {
    if (this.pumpScheduled) return;
    this.pumpScheduled = true;
    setImmediate(() => {
      this.pumpScheduled = false;
      this.pump();
    });
  }

  private pump(): void {
    if (this.recycler.running) return;
    if (this.recycler.wanted) {
      if (this.inFlightBatches() === 0) void this.recycler.run();
      return;
    }
    const alive = this.slots.filter((s) => s.alive);
    if (alive.length === 0) {
      this.queue.failAll(unavailable('no HSM worker is running'));
      return;
    }
    dispatch(alive, this.queue, this.opts, (q) => this.bind(q.spec), (slot, batch, jobs, derives) => {
      slot.send(this.nextId++, batch, jobs);
      this.counters.jobs += batch.length;
      this.counters.batches++;
      this.counters.derives += derives;
      return !this.recycler.counted(derives);
    });
  }

  /** The job for a queued operation, on the handles as of now (after any recycle). */
  private bind(spec: Queued['spec']): Job {
    const job = spec.op === 'ping' ? spec : this.table.bind(spec);
    const out: Record<string, unknown> = {};
    for (const [k, v] of Object.entries(job)) out[k] = v instanceof Uint8Array ? tight(v) : v;
    return out as Job;
  }

  private inFlightBatches(): number {
    let n = 0;
    for (const s of this.slots) n += s.inflight.size;
    return n;
  }

  private idle(): Promise<void> {
    if (this.inFlightBatches() === 0) return Promise.resolve();
    return new Promise((res) => this.idleWaiters.push(res));
  }

  private afterBatch(): void {
    if (this.inFlightBatches() === 0 && this.idleWaiters.length) {
      for (const w of this.idleWaiters.splice(0)) w();
    }
    if (!this.closed) this.pump();
  }
}

/** The vault's keys on a worker pool (see HsmPool.open). */
export async function poolKeys(cfg: TokenConfig, o: WorkerPoolOptions & { create?: boolean; log?: Logger } = {}): Promise<HsmKeys<HsmPool>> {
  return new HsmKeys(await HsmPool.open(cfg, o));
}

/** The pool under `keys`, when they run on one (stats, recycle); undefined for keys on this thread or wrapped ones. */
export function poolOf(keys: unknown): HsmPool | undefined {
  return keys instanceof HsmKeys && keys.port instanceof HsmPool ? keys.port : undefined;
}
