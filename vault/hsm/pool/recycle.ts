// The library-recycle state machine. SoftHSM frees the session object every
// ECDH derive leaves behind (~250 B, even after C_DestroyObject) only at
// C_Finalize. After `recycleAfter` derives (or when a session was lost under
// the pool: heal) the pool stops dispatching, lets the in-flight batches
// finish, has every worker close its sessions, lets one worker C_Finalize +
// C_Initialize + log in and re-resolve the key set (handles may change),
// checks the public keys are unchanged (KeyTable.replace), and resumes. Queued
// jobs wait; none is dropped. A failed recycle leaves the pool `broken`: it
// serves nothing on handles that may be stale, and retries in a second unless
// the token itself is wrong (other keys, PIN refused).
import type { Logger } from 'pino';
import { VaultError, ErrorCodes } from '../../../protocol/errors.js';
import type { KeyTable } from '../jobs.js';
import type { JobQueue } from './queue.js';
import { unavailable, type WorkerSlot } from './workers.js';

export interface RecycleHost {
  readonly slots: readonly WorkerSlot[];
  readonly table: KeyTable;
  readonly queue: JobQueue;
  readonly log: Logger | undefined;
  nextId(): number;
  isClosed(): boolean;
  /** Dispatch again. */
  pump(): void;
}

export class Recycler {
  /** A recycle is due: dispatching stops until it ran. */
  wanted = false;
  running = false;
  /** Set when a recycle failed: nothing is served on handles that may be stale. */
  broken: 'retry' | 'fatal' | undefined;
  sinceRecycle = 0;
  recycles = 0;
  msTotal = 0;
  msMax = 0;
  private lastHeal = 0;
  private retryTimer: NodeJS.Timeout | undefined;
  private readonly after: (() => void)[] = [];

  constructor(
    private readonly host: RecycleHost,
    /** Derives between recycles; 0: only on request. */
    private readonly recycleAfter: number,
  ) {}

  /** Count derives just sent; true when that makes a recycle due. */
  counted(derives: number): boolean {
    this.sinceRecycle += derives;
    if (this.recycleAfter > 0 && this.sinceRecycle >= this.recycleAfter) this.wanted = true;
    return this.wanted;
  }

  /** Recycle as soon as the in-flight batches are done; resolves when serving again (or failed). */
  request(): Promise<void> {
    this.wanted = true;
    const done = new Promise<void>((res) => this.after.push(res));
    this.host.pump();
    return done;
  }

  /** A session or the library went away under us (e.g. finalised elsewhere): recycle, at most once a second. */
  heal(): void {
    const now = Date.now();
    if (this.host.isClosed() || this.broken || now - this.lastHeal < 1000) return;
    this.lastHeal = now;
    this.host.log?.warn({ event: 'hsm.pool.heal' }, 'HSM session lost: re-initialising the HSM library');
    this.wanted = true;
    this.host.pump();
  }

  stop(): void {
    if (this.retryTimer) clearTimeout(this.retryTimer);
  }

  /** Run now: the caller saw no batch in flight. */
  async run(): Promise<void> {
    if (this.running) return;
    this.running = true;
    const { host } = this;
    const t0 = performance.now();
    const alive = host.slots.filter((s) => s.alive);
    try {
      if (alive.length === 0) throw new VaultError(ErrorCodes.HSM_UNAVAILABLE, 'no HSM worker is running');
      // 1. Nobody may hold a session handle the re-initialised library could hand out again.
      await Promise.all(alive.map((s) => s.request(host.nextId(), { type: 'suspend', id: 0 })));
      // 2. One worker finalises, initialises, logs in and resolves the key set again.
      const ack = await alive[0]!.request(host.nextId(), { type: 'reinit', id: 0 });
      // Same token, same keys: anything else and the vault must stop, not serve with other keys.
      host.table.replace(ack.keys!);
      const ms = performance.now() - t0;
      this.recycles++;
      this.msTotal += ms;
      this.msMax = Math.max(this.msMax, ms);
      host.log?.debug({ event: 'hsm.pool.recycled', ms: Math.round(ms * 10) / 10, derives: this.sinceRecycle }, 'HSM library recycled');
      this.broken = undefined;
    } catch (e) {
      // After a C_Finalize the old handles may name other objects: never serve on them.
      // Fail what waits (retryable), refuse new work, and try again in a second
      // unless the token itself is wrong (other keys, PIN refused).
      this.broken = isFatal(e) ? 'fatal' : 'retry';
      host.log?.error({ event: 'hsm.pool.recycle.failed', err: (e as Error).message, fatal: this.broken === 'fatal' }, 'HSM library recycle failed');
      host.queue.failAll(unavailable('the HSM is unavailable'));
      if (this.broken === 'retry' && !host.isClosed()) {
        this.retryTimer = setTimeout(() => {
          this.retryTimer = undefined;
          if (host.isClosed()) return;
          this.wanted = true;
          host.pump();
        }, 1000);
        this.retryTimer.unref();
      }
    } finally {
      this.sinceRecycle = 0;
      this.wanted = false;
      this.running = false;
      for (const w of this.after.splice(0)) w();
      if (!host.isClosed()) host.pump();
    }
  }
}

function isFatal(e: unknown): boolean {
  return e instanceof VaultError && (e.code === ErrorCodes.HSM_POLICY_VIOLATION || e.code === ErrorCodes.HSM_PIN_INCORRECT);
}
