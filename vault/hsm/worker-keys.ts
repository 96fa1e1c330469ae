// VaultKeys on a pool of HSM worker threads. pkcs11js calls are synchronous
// and SoftHSM's ECDH costs ~100 µs, so on the main thread they would stall the
// event loop; here each worker owns one session and runs batches of calls,
// while the main thread only queues, dispatches and matches answers.
//
//   queue      three lanes, served in order: control (anchor, epochs, ping),
//              work in progress (OPRF evaluation, verifier, seal/unseal, ...),
//              new channels (the channel-key ECDH of a handshake).
//   control    one more worker, with its own session, serves only the control
//              lane. Every answer waits for an anchor write, and behind two
//              batches of ECDH on a busy worker that write waited up to 15 ms;
//              on its own thread it waits for nothing (docs/PERFORMANCE.md).
//   admission  only ECDH jobs — the first HSM call of a channel or of an
//              enrol/recover begin, made before any state changes — are
//              bounded. Past `maxQueue` waiting derives they fail at once with
//              OVERLOADED (retryable: nothing changed) instead of queueing
//              without bound. Calls that complete work already admitted (and
//              the anchor write every answer waits for) are never refused.
//   batching   a free worker takes up to `maxBatch` jobs in one message, so
//              under load the per-message cost is shared; `depth` batches may
//              be in flight per worker so it never waits for the main thread.
//   recycle    SoftHSM frees the session object every ECDH derive leaves
//              behind (~250 B, even after C_DestroyObject) only at C_Finalize.
//              After `recycleAfter` derives the pool stops dispatching, lets
//              the in-flight batches finish, has every worker close its
//              sessions, lets one worker C_Finalize + C_Initialize + log in
//              and re-resolve the key set (handles may change), checks the
//              public keys are unchanged, and resumes. Queued jobs wait; none
//              is dropped.
//
// Ownership of the process-wide library: the main realm pins it (pinLibrary)
// for as long as the pool is open, and every worker pins it in its own realm,
// so no Token.close() anywhere finalises it under a running worker. Only the
// recycle finalises it, with every worker idle. Rule for the rest of the
// process: while a pool is open, do not run another Token in this process
// across a recycle (its session and object handles would go stale).
import { Worker } from 'node:worker_threads';
import { existsSync } from 'node:fs';
import { availableParallelism } from 'node:os';
import { fileURLToPath } from 'node:url';
import type { Logger } from 'pino';
import { VaultError, ErrorCodes, type ErrorCode } from '../../protocol/errors.js';
import { sealLabel } from '../../hsm-policy/policy.js';
import { pinLibrary, type TokenConfig } from './token.js';
import type { VaultKeys } from './vault-keys.js';
import { AnchorBook, type AnchorState } from './anchor.js';
import type { FromWorker, Job, JobResult, ToWorker, WireKeys, WorkerInit } from './hsm-worker.js';
import { workerUrl } from '../worker-url.js';

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
  /** Compiled hsm-worker.js; found next to this file or under dist/ by default. */
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

type KeyRef = 'kx' | 'sig' | 'oprf' | 'verifier' | 'tenant' | 'anchor' | 'anchorB' | { seal: number };
type Lane = 0 | 1 | 2;

/** A job before dispatch: the key is named, and resolved to a handle only when sent. */
type Queued = {
  spec: DistributiveOmit<Job, 'key' | 'slots'> & { key?: KeyRef };
  derive: boolean;
  resolve: (v: JobResult) => void;
};
type DistributiveOmit<T, K extends PropertyKey> = T extends unknown ? Omit<T, K> : never;

interface Slot {
  worker: Worker;
  index: number;
  /** Serves only the control lane. */
  controlOnly: boolean;
  inflight: Map<number, Queued[]>;
  control: Map<number, (m: Extract<FromWorker, { type: 'ack' }>) => void>;
  alive: boolean;
}

const IV = 12;

/** FIFO with O(1) shift. */
class Fifo<T> {
  private items: T[] = [];
  private head = 0;
  get length(): number {
    return this.items.length - this.head;
  }
  push(x: T): void {
    this.items.push(x);
  }
  shift(): T | undefined {
    if (this.head >= this.items.length) return undefined;
    const x = this.items[this.head]!;
    (this.items as (T | undefined)[])[this.head] = undefined;
    this.head++;
    if (this.head > 1024 && this.head * 2 > this.items.length) {
      this.items = this.items.slice(this.head);
      this.head = 0;
    }
    return x;
  }
  drain(): T[] {
    const out = this.items.slice(this.head);
    this.items = [];
    this.head = 0;
    return out;
  }
}

export function defaultWorkerUrl(): URL {
  return workerUrl(import.meta.url, 'hsm-worker.js');
}

interface Handles {
  kx: Uint8Array;
  sig: Uint8Array;
  oprf: Uint8Array;
  verifier: Uint8Array;
  tenant: Uint8Array;
  anchor: Uint8Array;
  anchorB: Uint8Array;
  seals: Map<number, Uint8Array>;
}

export class WorkerVaultKeys implements VaultKeys {
  readonly channelPublic: Uint8Array;
  readonly signingPublic: Uint8Array;
  /** Labels created while resolving the key set. */
  readonly created: string[];

  private handles: Handles;
  private readonly oprfPublic: Uint8Array;
  private readonly lanes: [Fifo<Queued>, Fifo<Queued>, Fifo<Queued>] = [new Fifo(), new Fifo(), new Fifo()];
  private waitingDerives = 0;
  private nextId = 1;
  private recycleWanted = false;
  private recycling = false;
  private closed = false;
  private pumpScheduled = false;
  private lastHeal = 0;
  private idleWaiters: (() => void)[] = [];
  private afterRecycle: (() => void)[] = [];
  /** Set when a recycle failed: nothing is served on handles that may be stale. */
  private broken: 'retry' | 'fatal' | undefined;
  private retryTimer: NodeJS.Timeout | undefined;
  private readonly opts: Required<Omit<WorkerPoolOptions, 'workerUrl' | 'controlThread'>>;
  private readonly counters = { jobs: 0, batches: 0, derives: 0, sinceRecycle: 0, recycles: 0, recycleMsTotal: 0, recycleMsMax: 0, overloaded: 0 };
  private unpin: (() => void) | undefined;
  private shutdownPromise: Promise<void> | undefined;

  private constructor(
    private readonly slots: Slot[],
    keys: WireKeys,
    opts: Required<Omit<WorkerPoolOptions, 'workerUrl' | 'controlThread'>>,
    private readonly log: Logger | undefined,
    unpin: () => void,
  ) {
    this.opts = opts;
    this.unpin = unpin;
    this.channelPublic = new Uint8Array(keys.kx.point);
    this.signingPublic = new Uint8Array(keys.sig.point);
    this.oprfPublic = new Uint8Array(keys.oprf.point);
    this.created = keys.created;
    this.handles = handlesOf(keys);
    for (const s of slots) this.attach(s);
  }

  /**
   * Start the workers: the first opens the token and resolves (with `create`,
   * makes) the key set under hsm-policy; the others open sessions and share its
   * handles. Fails like Token.open / enforcePolicy would.
   */
  static async open(
    cfg: TokenConfig,
    o: WorkerPoolOptions & { create?: boolean; log?: Logger } = {},
  ): Promise<WorkerVaultKeys> {
    const threads = Math.max(1, o.threads ?? availableParallelism());
    const opts = {
      threads,
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
    const slots: Slot[] = [];
    try {
      const spawn = async (index: number, resolveKeys: boolean, controlOnly = false): Promise<{ slot: Slot; keys?: WireKeys }> => {
        const init: WorkerInit = {
          modulePath: cfg.modulePath,
          tokenLabel: cfg.tokenLabel,
          pin: cfg.pin,
          ...(cfg.libraryParameters ? { libraryParameters: cfg.libraryParameters } : {}),
          ...(cfg.quirks ? { quirks: cfg.quirks } : {}),
          resolve: resolveKeys,
          create: !!o.create,
        };
        const worker = new Worker(url, { workerData: init, env: process.env, name: controlOnly ? 'bkv-hsm-control' : `bkv-hsm-${index}` });
        const slot: Slot = { worker, index, controlOnly, inflight: new Map(), control: new Map(), alive: true };
        slots.push(slot);
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
      };
      // The first worker alone: it may create keys, and nobody else logs in before it checked the PIN.
      const first = await spawn(0, true);
      const keys = first.keys!;
      for (let i = 1; i < threads; i++) await spawn(i, false);
      if (o.controlThread ?? true) await spawn(threads, false, true);
      return new WorkerVaultKeys(slots, keys, opts, o.log, unpin);
    } catch (e) {
      await Promise.all(slots.map((s) => s.worker.terminate().catch(() => undefined)));
      unpin();
      throw e;
    }
  }

  // ---- VaultKeys ------------------------------------------------------------------

  currentEpoch(): number {
    return Math.max(...this.handles.seals.keys());
  }

  epochs(): number[] {
    return [...this.handles.seals.keys()].sort((a, b) => a - b);
  }

  async oprfEvaluate(point: Uint8Array): Promise<Uint8Array> {
    // Inside an open channel: a little head room over new handshakes.
    return this.bytes(this.submit({ op: 'ecdh', key: 'oprf', point }, 1, Math.ceil(this.opts.maxQueue * 1.25)));
  }

  async channelAgree(point: Uint8Array): Promise<Uint8Array> {
    return this.bytes(this.submit({ op: 'ecdh', key: 'kx', point }, 2, this.opts.maxQueue));
  }

  async makeVerifier(input: Uint8Array): Promise<Uint8Array> {
    return this.bytes(this.submit({ op: 'hmac', key: 'verifier', data: input }, 1));
  }

  async checkVerifier(input: Uint8Array, verifier: Uint8Array): Promise<boolean> {
    return (await this.value(this.submit({ op: 'verify', key: 'verifier', data: input, mac: verifier }, 1))) === true;
  }

  async seal(epoch: number, aad: Uint8Array, plaintext: Uint8Array): Promise<Uint8Array> {
    return this.bytes(this.submit({ op: 'seal', key: { seal: epoch }, aad, pt: plaintext }, 1));
  }

  async unseal(epoch: number, aad: Uint8Array, blob: Uint8Array): Promise<Uint8Array | null> {
    if (blob.length < IV + 16) return null;
    const v = await this.value(this.submit({ op: 'unseal', key: { seal: epoch }, aad, blob }, 1));
    return v instanceof Uint8Array ? v : null;
  }

  async sign(digest: Uint8Array): Promise<Uint8Array> {
    return this.bytes(this.submit({ op: 'sign', key: 'sig', digest }, 1));
  }

  async tenantSecret(input: Uint8Array): Promise<Uint8Array> {
    return this.bytes(this.submit({ op: 'hmac', key: 'tenant', data: input }, 1));
  }

  async random(n: number): Promise<Uint8Array> {
    return this.bytes(this.submit({ op: 'random', n }, 1));
  }

  /** Which slot is newest, what each should hold, this process's writer id: the same book as TokenVaultKeys (hsm/anchor.ts). */
  private readonly anchor = new AnchorBook();

  async readAnchor(): Promise<AnchorState> {
    // Both reads in one dispatch.
    const [a, b] = await Promise.all((['anchor', 'anchorB'] as const).map((key) => this.value(this.submit({ op: 'readLabel', key }, 0))));
    return this.anchor.read([typeof a === 'string' ? a : '', typeof b === 'string' ? b : '']);
  }

  async writeAnchor(a: { seq: number; root: Uint8Array }): Promise<void> {
    const w = this.anchor.plan(a);
    let found: unknown;
    try {
      // The check and the write run together on the control thread, next to its session.
      found = await this.value(this.submit({ op: 'casAnchor', expect: w.expect, target: w.target, label: w.label }, 0));
    } catch (e) {
      this.anchor.failed(w);
      throw e;
    }
    if (typeof found === 'string') throw this.anchor.conflict(JSON.parse(found) as string[]);
    this.anchor.wrote(w);
  }

  async addEpoch(epoch: number): Promise<void> {
    if (this.handles.seals.has(epoch)) return;
    // In the phase of the current epoch's key: an open vault's new epoch can be cloned to its cohort.
    const h = await this.bytes(this.submit({ op: 'genSeal', label: sealLabel(epoch), key: { seal: this.currentEpoch() } }, 0));
    this.handles.seals.set(epoch, h);
  }

  async adoptEpoch(epoch: number): Promise<void> {
    if (this.handles.seals.has(epoch)) return;
    const h = await this.value(this.submit({ op: 'findSeal', epoch }, 0));
    if (!(h instanceof Uint8Array)) throw new VaultError(ErrorCodes.HSM_POLICY_VIOLATION, `the HSM holds no key ${sealLabel(epoch)} to adopt`);
    this.handles.seals.set(epoch, h);
  }

  async destroyEpoch(epoch: number): Promise<void> {
    if (!this.handles.seals.has(epoch)) return;
    if (epoch === this.currentEpoch()) throw new VaultError(ErrorCodes.BAD_REQUEST, 'refusing to destroy the current seal epoch');
    await this.value(this.submit({ op: 'destroy', key: { seal: epoch } }, 0));
    this.handles.seals.delete(epoch);
  }

  /**
   * A real C_GetSessionInfo round trip on the control lane, answered within
   * `timeoutMs` (false after that): false at once once the pool is closed, has
   * lost its workers or failed a recycle.
   */
  async ping(timeoutMs = 2000): Promise<boolean> {
    if (this.closed || this.broken || !this.slots.some((s) => s.alive)) return false;
    let timer: NodeJS.Timeout | undefined;
    const late = new Promise<boolean>((res) => {
      timer = setTimeout(() => res(false), timeoutMs);
    });
    try {
      return await Promise.race([this.submit({ op: 'ping' }, 0).then((r) => r.ok && r.v === true), late]);
    } finally {
      clearTimeout(timer);
    }
  }

  /** Stop taking work and end the workers (see shutdown()); resolves when they are gone. */
  close(): Promise<void> {
    return this.shutdown();
  }

  /**
   * Refuse new work, fail what is still queued (HSM_UNAVAILABLE: retryable),
   * let in-flight batches finish, end the workers, then release the library
   * (the main realm finalises it if nothing else here holds it).
   */
  shutdown(): Promise<void> {
    return (this.shutdownPromise ??= (async () => {
      this.closed = true;
      if (this.retryTimer) clearTimeout(this.retryTimer);
      for (const lane of this.lanes) for (const q of lane.drain()) q.resolve(unavailable('the HSM pool is closed'));
      this.waitingDerives = 0;
      await this.idle();
      await Promise.all(
        this.slots.map(async (s) => {
          if (!s.alive) return;
          await this.control(s, { type: 'close', id: 0 }, 2000).catch(() => undefined);
          s.alive = false;
          await s.worker.terminate().catch(() => undefined);
        }),
      );
      this.unpin?.();
      this.unpin = undefined;
    })());
  }

  // ---- pool ----------------------------------------------------------------------

  stats(): PoolStats {
    const c = this.counters;
    let inFlight = 0;
    for (const s of this.slots) for (const b of s.inflight.values()) inFlight += b.length;
    return {
      threads: this.slots.filter((s) => s.alive && !s.controlOnly).length,
      control: this.slots.some((s) => s.alive && s.controlOnly),
      queued: this.lanes.reduce((n, lane) => n + lane.length, 0),
      waitingDerives: this.waitingDerives,
      inFlight,
      jobs: c.jobs,
      batches: c.batches,
      derives: c.derives,
      derivesSinceRecycle: c.sinceRecycle,
      recycles: c.recycles,
      recycleMsTotal: Math.round(c.recycleMsTotal * 10) / 10,
      recycleMsMax: Math.round(c.recycleMsMax * 10) / 10,
      overloaded: c.overloaded,
    };
  }

  /** Recycle the library now (tests, operators); resolves when serving again. */
  async recycle(): Promise<void> {
    if (this.closed) throw new VaultError(ErrorCodes.HSM_UNAVAILABLE, 'the HSM pool is closed');
    this.recycleWanted = true;
    const done = new Promise<void>((res) => this.afterRecycle.push(res));
    this.pump();
    return done;
  }

  private submit(spec: Queued['spec'], lane: Lane, bound?: number): Promise<JobResult> {
    if (this.closed) return Promise.resolve(unavailable('the HSM pool is closed'));
    if (this.broken) return Promise.resolve(unavailable('the HSM is being re-initialised after a failure'));
    const derive = spec.op === 'ecdh';
    if (bound !== undefined && this.waitingDerives >= bound) {
      this.counters.overloaded++;
      return Promise.reject(new VaultError(ErrorCodes.OVERLOADED, 'the HSM is saturated; retry shortly'));
    }
    return new Promise<JobResult>((res) => {
      this.lanes[lane].push({ spec, derive, resolve: res });
      if (derive) this.waitingDerives++;
      this.schedulePump();
    });
  }

  private async bytes(p: Promise<JobResult>): Promise<Uint8Array> {
    const v = await this.value(p);
    if (!(v instanceof Uint8Array)) throw new VaultError(ErrorCodes.HSM_ERROR, 'HSM worker returned no bytes');
    return v;
  }

  private async value(p: Promise<JobResult>): Promise<Uint8Array | boolean | string | null> {
    const r = await p;
    if (!r.ok) {
      if (r.code === ErrorCodes.HSM_UNAVAILABLE) this.heal();
      throw new VaultError(r.code as ErrorCode, r.message);
    }
    return r.v;
  }

  /** A session or the library went away under us (e.g. finalised elsewhere): recycle, at most once a second. */
  private heal(): void {
    const now = Date.now();
    if (this.closed || this.broken || now - this.lastHeal < 1000) return;
    this.lastHeal = now;
    this.log?.warn({ event: 'hsm.pool.heal' }, 'HSM session lost: re-initialising the HSM library');
    this.recycleWanted = true;
    this.pump();
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
    if (this.recycling) return;
    if (this.recycleWanted) {
      if (this.inFlightBatches() === 0) void this.runRecycle();
      return;
    }
    const alive = this.slots.filter((s) => s.alive);
    if (alive.length === 0) {
      for (const lane of this.lanes) for (const q of lane.drain()) q.resolve(unavailable('no HSM worker is running'));
      this.waitingDerives = 0;
      return;
    }
    const control = alive.find((s) => s.controlOnly);
    const workers = alive.filter((s) => !s.controlOnly);
    // The control lane on its own thread; if that thread is gone, first in line on the others.
    if (control && workers.length > 0) {
      if (!this.fill([control], [this.lanes[0]])) return;
      this.fill(workers, [this.lanes[1], this.lanes[2]]);
    } else {
      this.fill(workers.length > 0 ? workers : alive, this.lanes);
    }
  }

  /** Send batches from `lanes` (in order) to the least busy of `slots` until they are empty or every slot is at depth. False once a recycle is due. */
  private fill(slots: Slot[], lanes: Fifo<Queued>[]): boolean {
    for (;;) {
      let n = 0;
      for (const l of lanes) n += l.length;
      if (n === 0) return true;
      let slot: Slot | undefined;
      for (const s of slots) if (s.inflight.size < this.opts.depth && (!slot || s.inflight.size < slot.inflight.size)) slot = s;
      if (!slot) return true;
      const size = Math.min(this.opts.maxBatch, Math.max(1, Math.ceil(n / slots.length)));
      const batch: Queued[] = [];
      const jobs: Job[] = [];
      let derives = 0;
      while (batch.length < size) {
        let q: Queued | undefined;
        for (const l of lanes) if ((q = l.shift())) break;
        if (!q) break;
        if (q.derive) {
          this.waitingDerives--;
          derives++;
        }
        let job: Job;
        try {
          job = this.bind(q.spec);
        } catch (e) {
          q.resolve({ ok: false, code: (e as VaultError).code ?? ErrorCodes.HSM_ERROR, message: (e as Error).message });
          continue;
        }
        batch.push(q);
        jobs.push(job);
      }
      if (batch.length === 0) continue;
      const id = this.nextId++;
      slot.inflight.set(id, batch);
      this.counters.jobs += batch.length;
      this.counters.batches++;
      this.counters.derives += derives;
      this.counters.sinceRecycle += derives;
      slot.worker.postMessage({ type: 'batch', id, jobs } satisfies ToWorker);
      if (this.opts.recycleAfter > 0 && this.counters.sinceRecycle >= this.opts.recycleAfter) {
        this.recycleWanted = true;
        return false;
      }
    }
  }

  /** The handle for a named key, as of now (after any recycle). */
  private bind(spec: Queued['spec']): Job {
    if (spec.op === 'casAnchor') return tightJob({ ...spec, slots: [this.handles.anchor, this.handles.anchorB] } as Job);
    if (!('key' in spec) || spec.key === undefined) return tightJob(spec as Job);
    const k = spec.key;
    let handle: Uint8Array | undefined;
    if (typeof k === 'object') {
      handle = this.handles.seals.get(k.seal);
      // The epoch's key was destroyed by a rotation: whatever was sealed under it is gone for good.
      if (!handle) throw new VaultError(ErrorCodes.RECORD_CORRUPT, `seal epoch ${k.seal} no longer exists on the HSM`);
    } else handle = this.handles[k];
    return tightJob({ ...spec, key: handle } as Job);
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

  private attach(s: Slot): void {
    s.worker.on('message', (m: FromWorker) => {
      if (m.type === 'done') {
        const batch = s.inflight.get(m.id);
        if (!batch) return;
        s.inflight.delete(m.id);
        for (let i = 0; i < batch.length; i++) {
          batch[i]!.resolve(m.results[i] ?? { ok: false, code: ErrorCodes.HSM_ERROR, message: 'HSM worker lost a result' });
        }
        this.afterBatch();
      } else if (m.type === 'ack') {
        const cb = s.control.get(m.id);
        s.control.delete(m.id);
        cb?.(m);
      }
    });
    const lost = (why: string) => {
      if (!s.alive) return;
      s.alive = false;
      if (!this.closed) this.log?.error({ event: 'hsm.worker.lost', worker: s.index, why }, 'HSM worker thread ended');
      for (const batch of s.inflight.values()) for (const q of batch) q.resolve(unavailable('the HSM worker ended'));
      s.inflight.clear();
      for (const cb of s.control.values()) cb({ type: 'ack', id: 0, error: { code: ErrorCodes.HSM_UNAVAILABLE, message: 'HSM worker ended' } });
      s.control.clear();
      this.afterBatch();
    };
    s.worker.on('error', (e) => lost(e.message));
    s.worker.on('exit', (code) => lost(`exit ${code}`));
  }

  private afterBatch(): void {
    if (this.inFlightBatches() === 0 && this.idleWaiters.length) {
      for (const w of this.idleWaiters.splice(0)) w();
    }
    if (!this.closed) this.pump();
  }

  private control(s: Slot, msg: ToWorker, timeoutMs = 30_000): Promise<Extract<FromWorker, { type: 'ack' }>> {
    const id = this.nextId++;
    return new Promise((res, rej) => {
      const timer = setTimeout(() => {
        s.control.delete(id);
        rej(new VaultError(ErrorCodes.HSM_UNAVAILABLE, `HSM worker did not answer ${msg.type}`));
      }, timeoutMs);
      s.control.set(id, (m) => {
        clearTimeout(timer);
        if (m.error) rej(new VaultError(m.error.code as ErrorCode, m.error.message));
        else res(m);
      });
      s.worker.postMessage({ ...msg, id });
    });
  }

  private async runRecycle(): Promise<void> {
    if (this.recycling) return;
    this.recycling = true;
    const t0 = performance.now();
    const alive = this.slots.filter((s) => s.alive);
    try {
      if (alive.length === 0) throw new VaultError(ErrorCodes.HSM_UNAVAILABLE, 'no HSM worker is running');
      // 1. Nobody may hold a session handle the re-initialised library could hand out again.
      await Promise.all(alive.map((s) => this.control(s, { type: 'suspend', id: 0 })));
      // 2. One worker finalises, initialises, logs in and resolves the key set again.
      const ack = await this.control(alive[0]!, { type: 'reinit', id: 0 });
      const keys = ack.keys!;
      // Same token, same keys: anything else and the vault must stop, not serve with other keys.
      if (
        !Buffer.from(keys.kx.point).equals(Buffer.from(this.channelPublic)) ||
        !Buffer.from(keys.sig.point).equals(Buffer.from(this.signingPublic)) ||
        !Buffer.from(keys.oprf.point).equals(Buffer.from(this.oprfPublic))
      ) {
        throw new VaultError(ErrorCodes.HSM_POLICY_VIOLATION, 'the HSM key set changed across a library recycle');
      }
      this.handles = handlesOf(keys);
      const ms = performance.now() - t0;
      this.counters.recycles++;
      this.counters.recycleMsTotal += ms;
      this.counters.recycleMsMax = Math.max(this.counters.recycleMsMax, ms);
      this.log?.debug({ event: 'hsm.pool.recycled', ms: Math.round(ms * 10) / 10, derives: this.counters.sinceRecycle }, 'HSM library recycled');
      this.broken = undefined;
    } catch (e) {
      // After a C_Finalize the old handles may name other objects: never serve on them.
      // Fail what waits (retryable), refuse new work, and try again in a second
      // unless the token itself is wrong (other keys, PIN refused).
      this.broken = isFatal(e) ? 'fatal' : 'retry';
      this.log?.error({ event: 'hsm.pool.recycle.failed', err: (e as Error).message, fatal: this.broken === 'fatal' }, 'HSM library recycle failed');
      for (const lane of this.lanes) for (const q of lane.drain()) q.resolve(unavailable('the HSM is unavailable'));
      this.waitingDerives = 0;
      if (this.broken === 'retry' && !this.closed) {
        this.retryTimer = setTimeout(() => {
          this.retryTimer = undefined;
          if (this.closed) return;
          this.recycleWanted = true;
          this.pump();
        }, 1000);
        this.retryTimer.unref();
      }
    } finally {
      this.counters.sinceRecycle = 0;
      this.recycleWanted = false;
      this.recycling = false;
      for (const w of this.afterRecycle.splice(0)) w();
      if (!this.closed) this.pump();
    }
  }
}

function isFatal(e: unknown): boolean {
  return e instanceof VaultError && (e.code === ErrorCodes.HSM_POLICY_VIOLATION || e.code === ErrorCodes.HSM_PIN_INCORRECT);
}

function unavailable(message: string): JobResult {
  return { ok: false, code: ErrorCodes.HSM_UNAVAILABLE, message };
}

function handlesOf(k: WireKeys): Handles {
  return {
    kx: tight(k.kx.priv),
    sig: tight(k.sig.priv),
    oprf: tight(k.oprf.priv),
    verifier: tight(k.verifier),
    tenant: tight(k.tenant),
    anchor: tight(k.anchor),
    anchorB: tight(k.anchorB),
    seals: new Map(k.seals.map(([e, h]) => [e, tight(h)])),
  };
}

/**
 * A Uint8Array that owns exactly its bytes. postMessage clones a view's whole
 * ArrayBuffer, and small Buffers are views into Node's shared 8 KiB pool: a
 * 32-byte argument would otherwise cost an 8 KiB copy each way.
 */
export function tight(u: Uint8Array): Uint8Array {
  return u.byteOffset === 0 && u.byteLength === u.buffer.byteLength ? u : new Uint8Array(u);
}

function tightJob(j: Job): Job {
  const out: Record<string, unknown> = {};
  for (const [k, v] of Object.entries(j)) out[k] = v instanceof Uint8Array ? tight(v) : v;
  return out as Job;
}
